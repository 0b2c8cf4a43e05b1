"""Real low-bit kernels against bf16 on a bench-size model (random weights).

Variants (all real kernels, none simulated):

* ``bf16`` / ``fp32`` -- dense references (``fp32`` matters on CPUs without
  native bf16 matmul, where bf16 is emulated and slow);
* ``torchao_int8_wo`` -- ``quantize_(model, Int8WeightOnlyConfig())``;
* ``torchao_int8_dyn`` -- ``Int8DynamicActivationInt8WeightConfig()`` (W8A8,
  activations quantized per token at run time);
* ``torchao_int4_wo`` -- ``Int4WeightOnlyConfig(group_size=128)`` where this
  torchao build has a kernel for the device;
* ``bnb_int8`` / ``bnb_nf4`` -- bitsandbytes ``Linear8bitLt`` /
  ``Linear4bit(quant_type="nf4")`` swapped in for every projection (nf4: except those
  bitsandbytes' AVX512-BF16 CPU packing cannot hold, kept dense on every machine and listed
  as ``kept_dense``; ``quant.bnb.cpu_packing_problem``);
* ``fbgemm_int8_dyn`` -- PyTorch's own CPU W8A8 dynamic kernel
  (``torch.ao.quantization.quantize_dynamic``, fbgemm, fp32 activations in/out);
* ``aten_int8pack_wo`` -- PyTorch's CPU int8 weight-only kernel
  ``aten._weight_int8pack_mm`` (bf16 activations) in a small module.

The torchao configs run their eager implementations here (torchao targets
CUDA and ``torch.compile``; on CPU eager the int8 paths dequantize or call a
slow ``_int_mm``), so the two PyTorch CPU kernels are timed beside them.

Only the projections of attention, MLP and the LM head are quantized; the
depth pseudo-queries (d -> 1 linears) and norms stay dense.  A variant whose
kernel does not exist on the device is reported with ``supported: false`` and
the reason, never silently replaced by a dense fallback.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..model import AttnResConfig, AttnResForCausalLM
from .latency import linear_weight_bytes, measure_interleaved, model_device, prompt_ids, weight_bytes
from .machine import copy_bandwidth_gbs, machine_info, resolve_device
from .overhead import parse_dtype

VARIANTS = ("bf16", "fp32", "torchao_int8_wo", "torchao_int8_dyn", "torchao_int4_wo", "torchao_float8_wo",
            "torchao_float8_dyn", "bnb_int8", "bnb_nf4", "fbgemm_int8_dyn", "aten_int8pack_wo")

KERNEL_LABELS = {
    "bf16": "torch dense bf16",
    "fp32": "torch dense fp32",
    "torchao_int8_wo": "torchao Int8WeightOnlyConfig",
    "torchao_int8_dyn": "torchao Int8DynamicActivationInt8WeightConfig",
    "torchao_int4_wo": "torchao Int4WeightOnlyConfig(group_size=128)",
    "torchao_float8_wo": "torchao Float8WeightOnlyConfig (e4m3 weights, bf16 act)",
    "torchao_float8_dyn": "torchao Float8DynamicActivationFloat8WeightConfig(PerRow) (FP8 W8A8, CUDA sm89+)",
    "bnb_int8": "bitsandbytes Linear8bitLt (LLM.int8, threshold 0)",
    "bnb_nf4": "bitsandbytes Linear4bit nf4 (blocksize 64, compute bf16)",
    "fbgemm_int8_dyn": "torch.ao quantize_dynamic: fbgemm int8 W8A8 dynamic (per-channel w, per-tensor act; fp32 io)",
    "aten_int8pack_wo": "aten._weight_int8pack_mm: int8 weight-only (per-row scale, bf16 act)",
}


def _quantizable(module: nn.Module, fqn: str) -> bool:
    """Projections only: skip the depth pseudo-queries (d -> 1) and anything that is not Linear."""
    return isinstance(module, nn.Linear) and module.out_features > 1 and "res_proj" not in fqn


def build_bench_model(*, hidden_size: int = 1024, layers: int = 8, vocab_size: int = 32000,
                      num_heads: int | None = None, block_size: int | None = 4,
                      dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0) -> AttnResForCausalLM:
    """Random-weight Block AttnRes model (defaults: ~168M parameters) with non-zero pseudo-queries."""
    torch.manual_seed(seed)
    cfg = AttnResConfig(hidden_size=hidden_size, num_hidden_layers=layers,
                        num_heads=num_heads or max(1, hidden_size // 64), vocab_size=vocab_size,
                        attnres_block_size=block_size)
    model = AttnResForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("res_proj.weight"):
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def _torchao(model: nn.Module, which: str) -> nn.Module:
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, PerRow, quantize_)

    config = {"torchao_int8_wo": Int8WeightOnlyConfig(),
              "torchao_int8_dyn": Int8DynamicActivationInt8WeightConfig(),
              "torchao_int4_wo": Int4WeightOnlyConfig(group_size=128),
              "torchao_float8_wo": Float8WeightOnlyConfig(),
              "torchao_float8_dyn": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}[which]
    quantize_(model, config, filter_fn=_quantizable)
    return model


def _bnb(model: nn.Module, which: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    from ..quant.bnb import cpu_packing_problem

    device = model_device(model)
    targets = [(name, m) for name, m in model.named_modules() if _quantizable(m, name)]
    kept = []
    for name, lin in targets:
        if which == "bnb_nf4":
            # bitsandbytes' AVX512-BF16 CPU path repacks 4-bit weights in blocks of 32 rows and asserts
            # otherwise (e.g. an lm_head of vocab 97): keep such layers dense on every machine, and say so.
            problem = cpu_packing_problem(lin.out_features, lin.in_features, 64)
            if problem:
                kept.append(f"{name} ({problem})")
                continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        w = lin.weight.data.float()
        if which == "bnb_int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=0.0)
            new.weight = bnb.nn.Int8Params(w.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=compute_dtype, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        new = new.to(device)  # quantizes the weight
        setattr(parent, name.rpartition(".")[2], new)
    # A tied lm_head/embedding would now be two tensors; bench models are untied.
    model.kept_dense = kept
    return model


class Int8PackLinear(nn.Module):
    """int8 weight-only linear on ``aten._weight_int8pack_mm`` (symmetric, per output row)."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.data.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(act_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.to(act_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(self.scale.dtype), self.qweight,
                                               self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _int8pack(model: nn.Module) -> nn.Module:
    targets = [(name, m) for name, m in model.named_modules() if _quantizable(m, name)]
    for name, lin in targets:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], Int8PackLinear(lin))
    return model


def _fbgemm_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.float()
    spec = {name: per_channel_dynamic_qconfig for name, m in model.named_modules() if _quantizable(m, name)}
    return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def make_variant(base: nn.Module, which: str) -> nn.Module:
    """A quantized (or re-typed) deep copy of ``base`` (bf16); raises if unsupported here."""
    if which == "bf16":
        return base
    model = copy.deepcopy(base)
    if which == "fp32":
        return model.float()
    if which.startswith("torchao_"):
        return _torchao(model, which)
    if which.startswith("bnb_"):
        return _bnb(model, which, torch.bfloat16)
    if which == "fbgemm_int8_dyn":
        return _fbgemm_dynamic(model)
    if which == "aten_int8pack_wo":
        return _int8pack(model)
    raise ValueError(f"unknown kernel variant {which!r}; choose from {', '.join(VARIANTS)}")


def run_kernels(*, hidden_size: int = 1024, layers: int = 8, seq_len: int = 128, batch_size: int = 1,
                device: str = "cpu", dtype: str = "bfloat16", vocab_size: int = 32000,
                num_heads: int | None = None, block_size: int | None = 4, decode_tokens: int = 16,
                warmup: int = 1, repeats: int = 5, threads: int | None = None, seed: int = 0,
                variants: list[str] | None = None) -> dict:
    """Time every supported variant interleaved with bf16; speedups and decode bandwidth."""
    dev = resolve_device(device)
    wanted = list(variants) if variants else list(VARIANTS)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        from ..errors import UserError

        raise UserError(f"unknown kernel variant(s) {', '.join(unknown)}", "--variants",
                        f"choose from {', '.join(VARIANTS)}")
    if "bf16" not in wanted:
        wanted.insert(0, "bf16")
    base = build_bench_model(hidden_size=hidden_size, layers=layers, vocab_size=vocab_size,
                             num_heads=num_heads, block_size=block_size, dtype=parse_dtype(dtype),
                             device=dev, seed=seed)
    check_ids = prompt_ids(vocab_size, 1, 32, dev, seed + 1)
    with torch.inference_mode():
        ref_logits = base(check_ids, use_cache=False).logits.float()
    models: dict[str, nn.Module] = {}
    unsupported: dict[str, str] = {}
    agreement: dict[str, float] = {}
    for which in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = make_variant(base, which)
                with torch.inference_mode():
                    logits = m(check_ids, use_cache=False).logits.float()
        except Exception as exc:  # noqa: BLE001 -- a kernel missing on this device is a result, not a crash
            unsupported[which] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        models[which] = m
        agreement[which] = float((logits - ref_logits).norm() / ref_logits.norm())
    bandwidth = copy_bandwidth_gbs(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns on every int8 matmul with bf16 inputs
        res = measure_interleaved(models, prompt_len=seq_len, batch_size=batch_size,
                                  decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, threads=threads,
                                  vocab_size=vocab_size, seed=seed, simulated=False,
                                  kernel={k: KERNEL_LABELS[k] for k in models})
    bf = res["bf16"]
    out_variants = {}
    for which in wanted:
        if which in unsupported:
            out_variants[which] = {"supported": False, "reason": unsupported[which],
                                   "kernel": KERNEL_LABELS[which], "simulated": False}
            continue
        r = res[which]
        streamed = linear_weight_bytes(models[which])
        achieved = streamed / (r["decode_ms_per_token"] / 1e3) / 1e9
        out_variants[which] = {
            "supported": True, "kernel": r["kernel"], "simulated": r["simulated"],
            "prefill_ms": r["prefill_ms"], "prefill_ms_iqr": r["prefill_ms_iqr"],
            "decode_ms_per_token": r["decode_ms_per_token"], "decode_ms_per_token_iqr": r["decode_ms_per_token_iqr"],
            "tokens_per_s": r["tokens_per_s"],
            "prefill_speedup_vs_bf16": bf["prefill_ms"] / r["prefill_ms"],
            "decode_speedup_vs_bf16": bf["decode_ms_per_token"] / r["decode_ms_per_token"],
            "weight_bytes": weight_bytes(models[which]),
            "decode_weight_bytes_per_token": streamed,
            "decode_achieved_gbs": achieved,
            "decode_bandwidth_utilisation": achieved / bandwidth,
            "peak_mem_bytes": r["peak_mem_bytes"], "peak_mem_kind": r["peak_mem_kind"],
            "rel_logit_error_vs_bf16": agreement[which],
        }
        if getattr(models[which], "kept_dense", None):
            out_variants[which]["kept_dense"] = list(models[which].kept_dense)
    if "fp32" in res:
        for which, v in out_variants.items():
            if v.get("supported"):
                v["decode_speedup_vs_fp32"] = res["fp32"]["decode_ms_per_token"] / v["decode_ms_per_token"]
                v["prefill_speedup_vs_fp32"] = res["fp32"]["prefill_ms"] / v["prefill_ms"]
    return {
        "config": {"hidden_size": hidden_size, "layers": layers, "block_size": block_size,
                   "vocab_size": vocab_size, "num_heads": base.config.num_heads,
                   "params": sum(p.numel() for p in base.parameters()), "seq_len": seq_len,
                   "batch_size": batch_size, "device": str(dev), "dtype": dtype,
                   "decode_tokens": decode_tokens, "warmup": warmup, "repeats": repeats,
                   "threads": bf["threads"], "interleaved": True, "weights": "random"},
        "machine": machine_info(dev),
        "copy_bandwidth_gbs": bandwidth,
        "variants": out_variants,
    }


def kernels_table(r: dict) -> str:
    c = r["config"]
    lines = [f"Real kernels: {c['params'] / 1e6:.0f}M params (hidden {c['hidden_size']}, {c['layers']} layers), "
             f"seq {c['seq_len']}, batch {c['batch_size']} on {c['device']} ({c['threads']} threads, "
             f"{r['machine']['cpu_model']}, {r['machine']['date_utc']}); copy bandwidth "
             f"{r['copy_bandwidth_gbs']:.1f} GB/s",
             f"{'variant':<17} {'prefill ms':>10} {'x bf16':>7} {'decode ms':>10} {'x bf16':>7} "
             f"{'GB/s':>6} {'util':>5} {'weights MB':>10} {'rel err':>8}"]
    for name, v in r["variants"].items():
        if not v["supported"]:
            lines.append(f"{name:<17} unsupported here: {v['reason']}")
            continue
        lines.append(f"{name:<17} {v['prefill_ms']:>10.1f} {v['prefill_speedup_vs_bf16']:>7.2f} "
                     f"{v['decode_ms_per_token']:>10.2f} {v['decode_speedup_vs_bf16']:>7.2f} "
                     f"{v['decode_achieved_gbs']:>6.1f} {v['decode_bandwidth_utilisation']:>5.2f} "
                     f"{v['weight_bytes'] / 1e6:>10.1f} {v['rel_logit_error_vs_bf16']:>8.4f}")
        if v.get("kept_dense"):
            lines.append(f"{'':<17} kept dense (bitsandbytes CPU 4-bit packing): {', '.join(v['kept_dense'])}")
    return "\n".join(lines)
