"""torchao real kernels (for latency studies): int8 weight-only, int8 dynamic-activation +
int8 weight, int4 weight-only (CUDA only: torchao 0.18's int4 packings need tinygemm/CUDA
or FBGEMM's mslk; on CPU this raises a UserError before any model work).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def torchao_config(weight: str, activation: str | None, group_size: int | None, device: torch.device):
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if weight == "int8" and activation == "int8":
        return Int8DynamicActivationInt8WeightConfig(), "int8-dynamic"
    if weight == "int8":
        return Int8WeightOnlyConfig(), "int8-weight-only"
    if weight == "int4":
        if device.type != "cuda":
            raise UserError("torchao int4 weight-only has no CPU kernel in torchao 0.18 (its int4 packings "
                            "need CUDA or FBGEMM's mslk)", f"device {device}",
                            "run on a CUDA device, or use `method: rtn`/`gptq` (simulated int4) or "
                            "`method: bnb` with nf4/fp4 (real CPU kernels)")
        return Int4WeightOnlyConfig(group_size=group_size or 128, int4_packing_format="tile_packed_to_4d"), \
            "int4-weight-only"
    raise ValueError(f"torchao cannot provide weight {weight}")


def check_torchao_device(weights: list[str], device: torch.device) -> None:
    if "int4" in weights:
        torchao_config("int4", None, None, device)


def apply_torchao(model: nn.Module, targets: dict[str, tuple[str, str | None, int | None]]) -> set[str]:
    """Quantize ``targets`` {module name: (weight, activation, group_size)} in place; returns kernel names."""
    from torchao.quantization import quantize_

    kernels = set()
    by_cfg: dict[tuple, set[str]] = {}
    for name, spec in targets.items():
        by_cfg.setdefault(spec, set()).add(name)
    for (weight, act, group), names in by_cfg.items():
        device = model.get_submodule(next(iter(names))).weight.device
        cfg, kernel = torchao_config(weight, act, group, device)
        kernels.add(kernel)
        quantize_(model, cfg, filter_fn=lambda m, fqn, names=names: isinstance(m, nn.Linear) and fqn in names)
    return kernels
