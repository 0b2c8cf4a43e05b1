"""Reading compressed-tensors packed checkpoints by dequantizing them (our own decoder).

Kimi K3 ships its weights as compressed-tensors MXFP4 (``format: mxfp4-pack-quantized``):
each quantized Linear stores ``weight_packed`` (uint8, two FP4 E2M1 codes per byte, the
even column in the low nibble) and ``weight_scale`` (uint8 E8M0 exponents, one per group of
32 input columns, value ``2 ** (e - 127)``).  :func:`dequantize_mxfp4` turns them back into
a dense weight; every product of an E2M1 value and a power of two is exact in fp32 and in
bf16, so the result equals compressed-tensors' own decompression bit for bit (tested).

The other weight formats ``attnres_quant export`` writes -- ``nvfp4-pack-quantized`` (NVFP4),
``float-quantized`` / ``naive-quantized`` (FP8 per-tensor / channel / group / 128x128 block, int8),
``int-quantized``, ``pack-quantized`` (int4/int8 packed into int32) and ``mxfp8-quantized`` -- are
decompressed by compressed-tensors' own per-format decompressor (:func:`decompress_module`), so a
module's dense weight is exactly what compressed-tensors' decompression (plain transformers'
loading) gives.  Input-activation quantization (``input_scale`` / ``input_global_scale``) is a run-
time computation, not a weight: the loader drops it and says so.  Other formats (sparse ones) are
refused with a clear error (:func:`check_quantization_config`).
"""

from __future__ import annotations

import torch

from ..errors import UserError

MXFP4_FORMAT = "mxfp4-pack-quantized"
# Read with compressed-tensors' own decompressors (its registry names).
CT_FORMATS = ("nvfp4-pack-quantized", "float-quantized", "naive-quantized", "int-quantized", "pack-quantized",
              "mxfp8-quantized")
SUPPORTED_FORMATS = (MXFP4_FORMAT,) + CT_FORMATS
MIXED_FORMAT = "mixed-precision"  # the top-level format when groups differ; each group names its own
# Per-module tensors of a compressed-tensors checkpoint (beside the module's `weight`).
WEIGHT_FIELDS = ("weight_packed", "weight_scale", "weight_global_scale", "weight_zero_point", "weight_shape",
                 "weight_g_idx")
ACTIVATION_FIELDS = ("input_scale", "input_global_scale", "input_zero_point")
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
    """Validate a checkpoint's ``quantization_config``; return its packed format (``mixed-precision`` when
    its config groups name different ones)."""
    method = qcfg.get("quant_method")
    if method != "compressed-tensors":
        raise UserError(f"Quantized checkpoint with quant_method {method!r} cannot be read", where=where,
                        fix="use a bf16 checkpoint or a compressed-tensors one")
    groups = qcfg.get("config_groups") or {}
    formats = {_group_format(g, qcfg.get("format")) for g in groups.values() if isinstance(g, dict)}
    formats = formats or {qcfg.get("format")}
    unsupported = sorted(str(f) for f in formats if f not in SUPPORTED_FORMATS)
    if unsupported:
        raise UserError(f"compressed-tensors format(s) {', '.join(unsupported)} are not read yet (only "
                        f"{', '.join(SUPPORTED_FORMATS)})", where=where,
                        fix="use a bf16 checkpoint or one in a format listed here (sparse formats are future work)")
    for name, g in groups.items():
        w = (g or {}).get("weights") or {}
        if _group_format(g, qcfg.get("format")) == MXFP4_FORMAT and w and not (
                w.get("num_bits") == 4 and w.get("type") == "float" and w.get("group_size") == 32):
            raise UserError(f"config group {name!r} is not MXFP4 (4-bit float, groups of 32): {w}", where=where,
                            fix="an mxfp4-pack-quantized group must be 4-bit float in groups of 32")
    return formats.pop() if len(formats) == 1 else MIXED_FORMAT


def module_group(name: str, module, qcfg: dict) -> tuple[str, dict]:
    """(format, config group) of a quantized module, by compressed-tensors' own target matching (``re:``
    names, exact names, class names such as ``Linear``); a checkpoint with one group needs no match."""
    from compressed_tensors.utils.match import is_match

    groups = {k: g for k, g in (qcfg.get("config_groups") or {}).items() if isinstance(g, dict)}
    hits = [g for g in groups.values() if is_match(name, module, g.get("targets") or [])]
    if not hits and len(groups) == 1:
        hits = list(groups.values())
    if len(hits) != 1:
        raise ValueError(f"{name}: {len(hits)} config groups target this packed module")
    return _group_format(hits[0], qcfg.get("format")), hits[0]


def decompress_module(fields: dict[str, torch.Tensor], fmt: str, group: dict) -> torch.Tensor:
    """A quantized module's dense weight from its checkpoint tensors (``weight`` / ``weight_packed``,
    ``weight_scale`` ...): MXFP4 by :func:`dequantize_mxfp4`, the other formats by compressed-tensors'
    own decompressor for ``fmt`` (its dtype: the scale's, or bf16 for NVFP4)."""
    if fmt == MXFP4_FORMAT:
        return dequantize_mxfp4(fields["weight_packed"], fields["weight_scale"])
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
    compressor = BaseCompressor.get_value_from_registry(fmt)
    weights = {k: v for k, v in fields.items() if k == "weight" or k in WEIGHT_FIELDS}
    return compressor.decompress(weights, scheme)["weight"]


__all__ = ["MXFP4_FORMAT", "CT_FORMATS", "SUPPORTED_FORMATS", "MIXED_FORMAT", "WEIGHT_FIELDS", "ACTIVATION_FIELDS",
           "dequantize_mxfp4", "check_quantization_config", "module_group", "decompress_module"]
