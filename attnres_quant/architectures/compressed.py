"""Reading compressed-tensors packed checkpoints by dequantizing them (our own decoder).

Kimi K3 ships its weights as compressed-tensors MXFP4 (``format: mxfp4-pack-quantized``):
each quantized Linear stores ``weight_packed`` (uint8, two FP4 E2M1 codes per byte, the
even column in the low nibble) and ``weight_scale`` (uint8 E8M0 exponents, one per group of
32 input columns, value ``2 ** (e - 127)``).  :func:`dequantize_mxfp4` turns them back into
a dense weight; every product of an E2M1 value and a power of two is exact in fp32 and in
bf16, so the result equals compressed-tensors' own decompression bit for bit (tested).

Supported so far: MXFP4 weight-only groups.  NVFP4, FP8 and int4-packed formats are future
work and are refused with a clear error (:func:`check_quantization_config`).
"""

from __future__ import annotations

import torch

from ..errors import UserError

MXFP4_FORMAT = "mxfp4-pack-quantized"
SUPPORTED_FORMATS = (MXFP4_FORMAT,)
# FP4 E2M1 magnitudes by code (bits 0-2); bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """``weight_packed`` [m, n/2] uint8 + ``weight_scale`` [m, n/group] uint8 (E8M0) -> fp32 [m, n]."""
    if packed.dtype != torch.uint8 or scale.dtype != torch.uint8:
        raise ValueError(f"MXFP4 tensors must be uint8 (got {packed.dtype}, {scale.dtype})")
    m, half = packed.shape
    n = 2 * half
    if n % group_size or scale.shape != (m, n // group_size):
        raise ValueError(f"MXFP4 scale shape {tuple(scale.shape)} does not fit a [{m}, {n}] weight in groups of "
                         f"{group_size}")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(m, n)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    values = table[(codes & 0x07).long()]
    values = torch.where((codes & 0x08).bool(), -values, values)
    exps = scale.to(torch.int32) - 127
    factors = torch.exp2(exps.float())
    factors = torch.where(scale == 255, torch.full_like(factors, float("nan")), factors)  # E8M0 NaN code
    return (values.view(m, n // group_size, group_size) * factors.unsqueeze(-1)).reshape(m, n)


def _group_format(group: dict, default: str | None) -> str | None:
    return group.get("format") or default


def check_quantization_config(qcfg: dict, where: str) -> str:
    """Validate a checkpoint's ``quantization_config``; return its (single) packed format."""
    method = qcfg.get("quant_method")
    if method != "compressed-tensors":
        raise UserError(f"Quantized checkpoint with quant_method {method!r} cannot be read", where=where,
                        fix="use a bf16 checkpoint or a compressed-tensors MXFP4 one")
    groups = qcfg.get("config_groups") or {}
    formats = {_group_format(g, qcfg.get("format")) for g in groups.values() if isinstance(g, dict)}
    formats = formats or {qcfg.get("format")}
    unsupported = sorted(str(f) for f in formats if f not in SUPPORTED_FORMATS)
    if unsupported:
        raise UserError(f"compressed-tensors format(s) {', '.join(unsupported)} are not read yet (only "
                        f"{', '.join(SUPPORTED_FORMATS)})", where=where,
                        fix="use a bf16 or an MXFP4 checkpoint; other packed formats are future work")
    for name, g in groups.items():
        w = (g or {}).get("weights") or {}
        if w and not (w.get("num_bits") == 4 and w.get("type") == "float" and w.get("group_size") == 32):
            raise UserError(f"config group {name!r} is not MXFP4 (4-bit float, groups of 32): {w}", where=where,
                            fix="only MXFP4 weight groups are read so far")
    return MXFP4_FORMAT


__all__ = ["MXFP4_FORMAT", "SUPPORTED_FORMATS", "dequantize_mxfp4", "check_quantization_config"]
