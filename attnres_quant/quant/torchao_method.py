"""torchao real kernels (for latency studies): int8 weight-only, int8 dynamic-activation +
int8 weight, int4 weight-only (CUDA only: torchao 0.18's int4 packings need tinygemm/CUDA
or FBGEMM's mslk; on CPU this raises a UserError before any model work), fp8 (E4M3, per row)
weight-only (``Float8WeightOnlyConfig``: fp8 storage, dequantized to bf16 for the matmul -- runs on CPU) and
fp8 dynamic activation + fp8 weight (``Float8DynamicActivationFloat8WeightConfig(PerRow)``: a real FP8 GEMM,
CUDA compute capability >= 8.9 only; ``methods.can_run`` refuses it elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def torchao_config(weight: str, activation: str | None, group_size: int | None, device: torch.device):
    """torchao config for one plan setting; the settings torchao cannot apply were refused at plan time
    (``methods.torchao_setting_problem``): int8 weights are symmetric, W8A8 weights per row, int4 asymmetric
    with group_size 32/64/128/256, activations dynamic. ``group_size`` None = per output row."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if weight == "int8" and activation == "int8":
        if group_size is not None:
            raise ValueError("torchao W8A8 quantizes weights per row only (refused at plan time)")
        return Int8DynamicActivationInt8WeightConfig(), "int8-dynamic"
    if weight == "int8":
        if group_size is None:
            return Int8WeightOnlyConfig(), "int8-weight-only"
        from torchao.quantization import PerGroup

        return Int8WeightOnlyConfig(granularity=PerGroup(int(group_size))), "int8-weight-only"
    if weight == "int4":
        if device.type != "cuda":
            raise UserError("torchao int4 weight-only has no CPU kernel in torchao 0.18 (its int4 packings "
                            "need CUDA or FBGEMM's mslk)", f"device {device}",
                            "run on a CUDA device, or use `method: rtn`/`gptq` (simulated int4) or "
                            "`method: bnb` with nf4/fp4 (real CPU kernels)")
        if group_size is None:
            raise ValueError("torchao int4 needs a group_size (refused at plan time)")
        return Int4WeightOnlyConfig(group_size=int(group_size), int4_packing_format="tile_packed_to_4d"), \
            "int4-weight-only"
    if weight == "fp8":  # E4M3, one scale per output row
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

        if activation == "fp8":
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), "float8-dynamic"
        return Float8WeightOnlyConfig(), "float8-weight-only"
    raise ValueError(f"torchao cannot provide weight {weight}")


def check_torchao_device(weights: list[str], device: torch.device) -> None:
    if "int4" in weights:
        torchao_config("int4", None, 128, device)


def apply_torchao(model: nn.Module, targets: dict[str, tuple[str, str | None, int | None]]) -> set[str]:
    """Quantize ``targets`` {module name: (weight, activation, group_size)} in place; returns kernel names."""
    from torchao.quantization import quantize_

    kernels = set()
    by_cfg: dict[tuple, set[str]] = {}
    for name, (weight, act, group) in targets.items():
        cols = model.get_submodule(name).in_features
        group = None if group is None or group >= cols else int(group)  # >= the row: per-row
        by_cfg.setdefault((weight, act, group), set()).add(name)
    for (weight, act, group), names in by_cfg.items():
        device = model.get_submodule(next(iter(names))).weight.device
        cfg, kernel = torchao_config(weight, act, group, device)
        kernels.add(kernel)
        quantize_(model, cfg, filter_fn=lambda m, fqn, names=names: isinstance(m, nn.Linear) and fqn in names)
    return kernels
