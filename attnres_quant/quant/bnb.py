"""bitsandbytes real kernels: LLM.int8 (Linear8bitLt), NF4 / FP4 (Linear4bit).

Replaces the selected ``nn.Linear`` modules in place. CPU works (slowly) with
bitsandbytes >= 0.48; on CUDA the modules are moved with the model.
"""

from __future__ import annotations

import torch
from torch import nn

# bitsandbytes 0.50's CPU 4-bit path: on a CPU with AVX512-BF16, Linear4bit's first inference forward repacks the
# weight (bitsandbytes.functional._convert_weight_packed_for_cpu, block_n=32): it asserts N % 32 == 0 (N = output
# rows) and K % 2 == 0, and reshapes the absmax to [N, K // blocksize] (so K must hold whole 4-bit blocks).
# AVX2-only CPUs and CUDA never repack. The plan keeps such tensors at baseline precision on every machine.
BNB_BLOCK_N = 32


def cpu_packing_problem(out_features: int, in_features: int, blocksize: int = 64) -> str | None:
    """Why bitsandbytes' AVX512-BF16 CPU repacking cannot hold a 4-bit [out, in] weight, or None."""
    if out_features % BNB_BLOCK_N:
        return f"{out_features} output rows are not a multiple of {BNB_BLOCK_N}"
    if in_features % 2 or in_features % blocksize:
        return f"{in_features} input features are not a multiple of the 4-bit block size {blocksize}"
    return None


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_bnb(linear: nn.Linear, precision: str, *, blocksize: int = 64, threshold: float = 6.0,
           compute_dtype: torch.dtype | None = None) -> nn.Module:
    import bitsandbytes as bnb

    w = linear.weight.data
    device = w.device
    has_bias = linear.bias is not None
    if precision == "int8":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=threshold)
        new.weight = bnb.nn.Int8Params(w.detach().clone().cpu(), requires_grad=False, has_fp16_weights=False)
    elif precision in ("nf4", "fp4"):
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                compute_dtype=compute_dtype or w.dtype, quant_type=precision,
                                compress_statistics=False)
        new.weight = bnb.nn.Params4bit(w.detach().clone().cpu(), requires_grad=False, quant_type=precision,
                                       blocksize=blocksize, compress_statistics=False)
    else:
        raise ValueError(f"bitsandbytes cannot provide {precision}")
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.detach().clone().cpu(), requires_grad=False)
    # Moving to the device quantizes (Int8Params / Params4bit quantize on .to()).
    new = new.to(device if device.type != "meta" else "cpu")
    return new.train(linear.training)  # an eval model gets eval modules (bnb's CPU 4-bit path depends on it)


def bnb_weight_bytes(module: nn.Module) -> int:
    """Bytes actually held by a bitsandbytes Linear's weight (packed data + statistics)."""
    w = module.weight
    total = w.data.numel() * w.data.element_size()
    scb = getattr(w, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "absmax", None) is not None:
        total += qs.absmax.numel() * qs.absmax.element_size()
        if getattr(qs, "state2", None) is not None:
            total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return int(total)


def apply_bnb(model: nn.Module, targets: dict[str, tuple[str, int | None]], *, threshold: float = 6.0) -> int:
    """Replace ``targets`` {module name: (precision, blocksize)}; returns their weight bytes."""
    total = 0
    for name, (precision, block) in targets.items():
        linear = model.get_submodule(name)
        new = to_bnb(linear, precision, blocksize=block or 64, threshold=threshold)
        _set_child(model, name, new)
        total += bnb_weight_bytes(new)
    return total
