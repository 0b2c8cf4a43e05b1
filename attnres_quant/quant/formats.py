"""Deployment floating-point formats as precisions (SPEC section 3): FP8 (E4M3) per-tensor / per-channel /
per-group / 128x128 blocks, OCP Microscaling MXFP8 and MXFP4 (32-element groups, E8M0 power-of-two scales),
NVFP4 (E2M1 values, 16-element groups, FP8-E4M3 group scales, one FP32 global scale), FP8 activations (dynamic
per token or static per tensor; with int4 weights that is W4AFP8), and the same formats as simulated storage of
depth sources / KV cache.

All format arithmetic lives here. Every weight/activation format maps to one compressed-tensors
``QuantizationArgs`` (:func:`weight_args`, :func:`activation_args`) and the simulated quantize-dequantize follows
compressed-tensors 0.19's definition of that format operation by operation, *in the tensor's own dtype* (a bf16
weight gets bf16 min/max, a bf16 scale and bf16 division, exactly as ``calculate_qparams`` + ``fake_quantize``
do), so the results equal compressed-tensors' quantize->dequantize bit for bit (tests/test_quant_formats.py).
The semantics, per format (``amax`` = max(|min(x, 0)|, max(x, 0)) over the scale's granule):

* ``fp8`` family (E4M3, max 448): scale = amax / 448 (in x's dtype; a zero scale becomes the dtype's eps);
  q = cast_e4m3(clamp(x / scale, -448, 448)) (round to nearest even); x' = q * scale. Granule: the row
  (``fp8``, per-channel), a group of ``group_size`` columns (``fp8`` with group_size), the whole tensor
  (``fp8_tensor``) or a ``group_size`` x ``group_size`` block, 128 by default, zero-padded at the edges
  (``fp8_block``, DeepSeek-V3 style).
* ``mxfp8`` / ``mxfp4`` (groups of 32 along the input dimension): the group amax rounded to a power of two
  (up to the next one when its mantissa is >= 1.75: compressed-tensors' rounding, the OCP spec floors), minus
  the element format's exponent offset (floor(log2 emax): 8 for E4M3, 2 for E2M1) gives the E8M0 exponent
  (bias 127, clamped to 0..255); scale = 2^(e - 127); elements cast to E4M3 / rounded to E2M1.
* ``nvfp4`` (groups of 16): global = 448 * 6 / amax(tensor) (fp32); group scale = cast_e4m3(global * amax_g / 6)
  (zero -> 0.125); effective scale = group scale / global; q = E2M1(clamp(x / scale, -6, 6)).
* E2M1 rounding: nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 with ties to the even mantissa (0.25 -> 0, 0.75 -> 1,
  1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).

An all-zero group has scale eps (fp8: the dtype's eps; MX: 2^-127; NVFP4: 0.125 / global) and dequantizes to
zeros -- never NaN/Inf.

Bits per weight (:func:`bits_per_weight`) count every stored scale: fp8 per-channel 8 + s/in_features, per-group
8 + s/g, per-tensor 8 + s/numel, block 8 + s * n_blocks / numel (s = the scale's width: compressed-tensors stores
fp8 scales in the weight's dtype, 16 bits in a bf16 model); MXFP8 8.25, MXFP4 4.25 (one 8-bit E8M0 per 32);
NVFP4 4.5 + 32/numel (one E4M3 per 16, one fp32 global per tensor).
"""

from __future__ import annotations

import math

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = float(torch.finfo(E4M3).max)  # 448
FP4_MAX = 6.0

# Weight formats (method rtn) and their fixed group size (None: set by group_size).
WEIGHT_FORMATS = ("fp8", "fp8_tensor", "fp8_block", "mxfp8", "mxfp4", "nvfp4")
FIXED_GROUP = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}
BLOCK_DEFAULT = 128
# Activation formats (inputs of nn.Linear; fp8 dynamic per token or static per tensor; MX dynamic per 32-group).
ACTIVATION_FORMATS = ("fp8", "mxfp8", "mxfp4", "nvfp4")  # nvfp4: calibrated fp32 global + dynamic 16-groups
# Storage (depth.sources, attn.kv_cache) and depth.softmax compute formats beyond the older fp8/int8/int4.
STORAGE_FORMATS = ("fp8_e5m2", "mxfp8", "mxfp4", "nvfp4")
COMPUTE_FORMATS = ("fp8_e5m2",)
ELEMENT_BITS = {"fp8": 8, "fp8_tensor": 8, "fp8_block": 8, "mxfp8": 8, "mxfp4": 4, "nvfp4": 4, "fp8_e5m2": 8}

_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def is_format(precision: str | None) -> bool:
    return precision in WEIGHT_FORMATS or precision in STORAGE_FORMATS


# ------------------------------------------------------------------------------------------- element rounding
def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round (already clamped) values to the nearest E2M1 value, ties to the even mantissa; x's dtype."""
    a = x.abs()
    mids = torch.tensor(_E2M1_MIDS, dtype=a.dtype)
    grid = torch.tensor(_E2M1_GRID, dtype=a.dtype)
    idx = torch.bucketize(a, mids)  # a == mids[k] -> k (rounds down)
    tie_up = torch.zeros(len(_E2M1_MIDS) + 1, dtype=torch.bool)
    tie_up[[1, 3, 5]] = True  # 0.75 -> 1, 1.75 -> 2, 3.5 -> 4 (even mantissa above)
    on_mid = a == mids[idx.clamp(max=len(_E2M1_MIDS) - 1)]
    idx = idx + (on_mid & tie_up[idx]).long()
    return grid[idx] * torch.sign(x)


def _round_elements(xs: torch.Tensor, element: str) -> torch.Tensor:
    """Clamp to the element format's range and round; result in xs's dtype."""
    if element == "e4m3":
        return xs.clamp(-FP8_MAX, FP8_MAX).to(E4M3).to(xs.dtype)
    return round_e2m1(xs.clamp(-FP4_MAX, FP4_MAX))


# ------------------------------------------------------------------------------------------- scales
def _amax(mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    return torch.maximum(mn.clamp(max=0).abs(), mx.clamp(min=0))


def _eps_for_zero(scale: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)


def _fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in amax's dtype; 0 -> the dtype's eps."""
    scale = amax / torch.tensor(FP8_MAX, dtype=amax.dtype)
    return _eps_for_zero(scale, torch.finfo(scale.dtype).eps)


def _pow2_round(x: torch.Tensor) -> torch.Tensor:
    """x (>= 0) to a power of two: 2^floor(log2 x), or the next power when x's mantissa is >= 1.75."""
    bits = {torch.float32: (torch.int32, 23), torch.bfloat16: (torch.int16, 7), torch.float16: (torch.int16, 10)}
    itype, mant = bits[x.dtype]
    i = x.view(itype).to(torch.int32)
    keep = ((1 << 31) - 1) ^ ((1 << mant) - 1)  # sign (0 here) and exponent bits
    out = (i + (1 << (mant - 2))) & keep
    return out.to(itype).view(x.dtype)


def _mx_scale(amax: torch.Tensor, element_bits: int) -> torch.Tensor:
    """E8M0 shared scale 2^(e - 127) in amax's dtype (e = 127 + log2(pow2(amax)) - offset, clamped to 0..255)."""
    offset = 2 if element_bits == 4 else 8  # floor(log2(6)), floor(log2(448))
    e = 127 + torch.floor(torch.log2(_pow2_round(amax))) - offset
    e = e.clamp(0, 255).round().to(torch.uint8)
    return (2.0 ** (e.to(torch.int32) - 127).float()).to(amax.dtype)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 [1]: 448 * 6 / amax (amax clamped to its dtype's tiny); NaN/Inf -> 1."""
    a = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    g = FP8_MAX * FP4_MAX / a
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def _nvfp4_group_scale(amax_g: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Group scales as stored (E4M3 values in amax's dtype); 0 -> 0.125."""
    s = global_scale * (amax_g / torch.tensor(FP4_MAX, dtype=amax_g.dtype))
    s = s.clamp(-FP8_MAX, FP8_MAX).to(E4M3).to(s.dtype)
    return _eps_for_zero(s, 0.125)


# ------------------------------------------------------------------------------------------- weights
def weight_group(precision: str, group_size: int | None) -> int | None:
    """Elements per scale along the input dim (None: a whole row / tensor / block, see granularity)."""
    if precision in FIXED_GROUP:
        return FIXED_GROUP[precision]
    if precision == "fp8":
        return group_size
    return None


def block_edge(precision: str, group_size: int | None) -> int:
    return group_size or BLOCK_DEFAULT


def _qdq_groups(xg: torch.Tensor, precision: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize x [..., G, g] with one scale per last-dim group; x's dtype."""
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    amax = _amax(mn, mx)
    if precision in ("mxfp8", "mxfp4"):
        scale = _mx_scale(amax, ELEMENT_BITS[precision])
        q = _round_elements(xg / scale, "e4m3" if precision == "mxfp8" else "e2m1")
        return (q.to(scale.dtype) * scale).to(xg.dtype)
    if precision == "nvfp4":
        gs = global_scale if global_scale is not None else nvfp4_global_scale(amax.amax())
        scale = _nvfp4_group_scale(amax, gs) / gs  # fp32
        q = _round_elements(xg / scale, "e2m1")
        return (q.to(scale.dtype) * scale).to(xg.dtype)
    scale = _fp8_scale(amax)  # fp8 per-group / per-row
    q = _round_elements(xg / scale, "e4m3")
    return (q.to(scale.dtype) * scale).to(xg.dtype)


# Sibling projections a serving engine fuses into one GEMM (vLLM's qkv_proj / gate_up_proj): NVFP4 gives them one
# shared global scale, as llm-compressor's fuse_weight_observers does (vLLM needs it).
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
                  ("w1", "w3"))


def fused_global_amax(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module name: weight} of the nvfp4 weights -> {module name: amax for its global scale}: the max |w| over
    the fused siblings present among them (``FUSED_SIBLINGS`` under one parent), else the tensor's own."""
    out = {n: _amax(w.amin(), w.amax()) for n, w in weights.items()}
    for name in list(weights):
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf in group:
                members = [f"{parent}.{g}" if parent else g for g in group]
                members = [m for m in members if m in weights]
                if len(members) > 1:
                    out[name] = torch.stack([_amax(weights[m].amin(), weights[m].amax()) for m in members]).amax()
    return out


@torch.no_grad()
def fake_quantize_weight(w: torch.Tensor, precision: str, group_size: int | None = None, *,
                         global_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize a weight [out, in] (or 1-D) in ``precision``; returns w's dtype and shape.
    ``global_amax`` (nvfp4): the amax its global scale comes from (fused siblings), default the tensor's own."""
    if precision not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {precision!r}")
    x = w if w.dim() >= 2 else w.unsqueeze(0)
    if precision == "fp8_tensor" or (precision == "fp8" and w.dim() == 1 and group_size is None):
        amax = _amax(x.amin(), x.amax())
        scale = _fp8_scale(amax)
        q = _round_elements(x / scale, "e4m3")
        return (q.to(scale.dtype) * scale).to(w.dtype).reshape(w.shape)
    if precision == "fp8_block":
        return _fp8_block(x, block_edge(precision, group_size)).reshape(w.shape)
    g = weight_group(precision, group_size)
    cols = x.shape[-1]
    if g is None or g >= cols and precision == "fp8":
        g = cols
    if cols % g:
        raise ValueError(f"group of {g} does not divide {cols} columns")
    xg = x.unflatten(-1, (cols // g, g))
    gs = None
    if precision == "nvfp4":
        gs = nvfp4_global_scale(global_amax if global_amax is not None else _amax(x.amin(), x.amax()))
    return _qdq_groups(xg, precision, gs).flatten(-2).reshape(w.shape)


def _fp8_block(x: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = x.shape[-2], x.shape[-1]
    pr, pc = (-rows) % b, (-cols) % b
    xp = nn.functional.pad(x, (0, pc, 0, pr)) if pr or pc else x
    R, C = xp.shape[-2] // b, xp.shape[-1] // b
    blocks = xp.reshape(R, b, C, b).transpose(1, 2)  # [R, C, b, b]
    amax = _amax(blocks.amin((-2, -1), keepdim=True), blocks.amax((-2, -1), keepdim=True))
    scale = _fp8_scale(amax)
    q = _round_elements(blocks / scale, "e4m3")
    out = (q.to(scale.dtype) * scale).transpose(1, 2).reshape(xp.shape)
    return out[:rows, :cols].to(x.dtype)


def weight_qparams(w: torch.Tensor, precision: str, group_size: int | None = None, *,
                   global_amax: torch.Tensor | None = None) -> dict:
    """Scales as compressed-tensors stores them for a weight (export): ``weight_scale`` (E4M3 for nvfp4,
    E8M0 values for MX, else in w's dtype) and ``weight_global_scale`` (nvfp4)."""
    x = w
    if precision == "fp8_tensor":
        return {"weight_scale": _fp8_scale(_amax(x.amin(), x.amax())).reshape(1)}
    if precision == "fp8_block":
        b = block_edge(precision, group_size)
        rows, cols = x.shape
        xp = nn.functional.pad(x, (0, (-cols) % b, 0, (-rows) % b))
        R, C = xp.shape[0] // b, xp.shape[1] // b
        blocks = xp.reshape(R, b, C, b).transpose(1, 2)
        return {"weight_scale": _fp8_scale(_amax(blocks.amin((-2, -1)), blocks.amax((-2, -1))))}
    g = weight_group(precision, group_size) or x.shape[-1]
    xg = x.unflatten(-1, (x.shape[-1] // g, g))
    amax = _amax(xg.amin(-1), xg.amax(-1))
    if precision in ("mxfp8", "mxfp4"):
        return {"weight_scale": _mx_scale(amax, ELEMENT_BITS[precision])}
    if precision == "nvfp4":
        gs = nvfp4_global_scale(global_amax if global_amax is not None else _amax(x.amin(), x.amax()))
        return {"weight_scale": _nvfp4_group_scale(amax, gs), "weight_global_scale": gs}
    return {"weight_scale": _fp8_scale(amax)}  # fp8 per-channel [out, 1] / per-group [out, G]


# ------------------------------------------------------------------------------------------- activations
def fake_quantize_fp8_tokens(x: torch.Tensor) -> torch.Tensor:
    """Dynamic FP8 (E4M3) per token: one scale per (dim 0, dim 1) index over the remaining dims (per token of
    [B, T, D]; a 2-D input gets one scale, as compressed-tensors' TOKEN strategy does); x's dtype."""
    if x.dim() <= 2:
        amax = _amax(x.amin(), x.amax())
    else:
        dims = tuple(range(2, x.dim()))
        amax = _amax(x.amin(dims, keepdim=True), x.amax(dims, keepdim=True))
    scale = _fp8_scale(amax)
    return (_round_elements(x / scale, "e4m3").to(scale.dtype) * scale).to(x.dtype)


def fake_quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 with a calibrated ``scale`` (x's dtype)."""
    return (_round_elements(x / scale, "e4m3").to(scale.dtype) * scale).to(x.dtype)


def fake_quantize_groups(x: torch.Tensor, precision: str, group: int | None = None) -> torch.Tensor:
    """Dynamic quantize-dequantize of x [..., D] in groups along the last dim (MX: 32, NVFP4: 16 with the
    global scale from this tensor's own amax, fp8: ``group`` or the whole last dim)."""
    g = FIXED_GROUP.get(precision) or group or x.shape[-1]
    d = x.shape[-1]
    if d % g:
        raise ValueError(f"group of {g} does not divide the last dim {d}")
    xg = x.unflatten(-1, (d // g, g))
    gs = None
    if precision == "nvfp4":
        gs = nvfp4_global_scale(_amax(x.amin(), x.amax()))
    return _qdq_groups(xg, precision, gs).flatten(-2)


class FormatActivationQuantizer:
    """Forward pre-hook simulating a floating activation format at an nn.Linear's input.

    ``fp8`` dynamic: per-token E4M3 (:func:`fake_quantize_fp8_tokens`); ``fp8`` static: one per-tensor scale
    amax / 448 from calibration (``observe`` while ``observing``, then :meth:`freeze`); ``mxfp8`` / ``mxfp4``:
    dynamic 32-element groups with E8M0 scales (what compressed-tensors' MXFP8/MXFP4 schemes do); ``nvfp4``:
    compressed-tensors' NVFP4 activations -- one fp32 global scale 2688 / amax from calibration (static), E4M3
    scales of 16-element groups computed at run time (dynamic "local")."""

    def __init__(self, precision: str, scheme: str = "dynamic"):
        if precision not in ACTIVATION_FORMATS:
            raise ValueError(f"unknown activation format {precision!r}")
        if scheme == "static" and precision in ("mxfp8", "mxfp4"):
            raise ValueError(f"{precision} activations are dynamic only")
        self.bits, self.scheme = precision, scheme
        self.amax: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.global_scale: torch.Tensor | None = None
        self.observing = scheme == "static" or precision == "nvfp4"

    def __call__(self, module: nn.Module, args):
        x = args[0]
        if self.bits in ("mxfp8", "mxfp4"):
            return (fake_quantize_groups(x, self.bits),) + tuple(args[1:])
        if self.observing:  # static fp8 scale / nvfp4 global scale: running amax over the calibration batches
            a = _amax(x.detach().amin(), x.detach().amax())
            self.amax = a if self.amax is None else torch.maximum(self.amax, a)
            return None
        if self.bits == "nvfp4":
            d = x.shape[-1]
            xg = x.unflatten(-1, (d // 16, 16))
            return (_qdq_groups(xg, "nvfp4", self.global_scale).flatten(-2),) + tuple(args[1:])
        if self.scheme == "dynamic":
            return (fake_quantize_fp8_tokens(x),) + tuple(args[1:])
        return (fake_quantize_fp8_static(x, self.scale),) + tuple(args[1:])

    def freeze(self) -> None:
        if self.amax is None:
            raise RuntimeError("static activation quantizer was never calibrated")
        if self.bits == "nvfp4":
            self.global_scale = nvfp4_global_scale(self.amax)
        else:
            self.scale = _fp8_scale(self.amax).reshape(1)
        self.observing = False

    def __repr__(self) -> str:
        return f"FormatActivationQuantizer({self.bits}, {self.scheme})"


def add_activation_quantizer(linear: nn.Module, precision: str, scheme: str) -> FormatActivationQuantizer:
    q = FormatActivationQuantizer(precision, scheme)
    linear.register_forward_pre_hook(q)
    linear._act_quantizer = q
    return q


# ------------------------------------------------------------------------------------------- storage / compute
class FormatStorageQuantizer:
    """Simulated storage of a tensor [..., D] (depth sources, KV cache) in a floating format, with scales only
    from values a real cache would hold at that moment (so prefill and decode agree): ``fp8_e5m2`` per-token
    scaled (amax / 57344) E5M2; ``mxfp8`` / ``mxfp4`` 32-element groups along D; ``nvfp4`` 16-element groups
    with the FP32 global scale from the token's own vector (per token, or per KV head with granularity
    ``per_head``)."""

    elementwise = False

    def __init__(self, precision: str, granularity: str = "per_token"):
        if precision not in STORAGE_FORMATS:
            raise ValueError(f"unknown storage format {precision!r}")
        self.precision, self.granularity = precision, granularity

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.precision
        if p == "fp8_e5m2":
            xf = x.float()
            scale = (xf.abs().amax(-1, keepdim=True) / float(torch.finfo(E5M2).max)).clamp(
                min=torch.finfo(torch.float32).tiny)
            return ((xf / scale).to(E5M2).float() * scale).to(x.dtype)
        if p in ("mxfp8", "mxfp4"):
            return fake_quantize_groups(x, p)
        # nvfp4: the global scale per token (or per head over a call's tokens), group scales per 16.
        d = x.shape[-1]
        xg = x.unflatten(-1, (d // 16, 16))
        dims = (-1,) if self.granularity == "per_token" or x.dim() < 3 else (-2, -1)
        amax = _amax(x.amin(dims, keepdim=True), x.amax(dims, keepdim=True))
        gs = torch.nan_to_num(FP8_MAX * FP4_MAX / amax.clamp(min=torch.finfo(amax.dtype).tiny), nan=1.0,
                              posinf=1.0, neginf=1.0).to(torch.float32).unsqueeze(-1)
        return _qdq_groups(xg, "nvfp4", gs).flatten(-2)

    def __repr__(self) -> str:
        return f"FormatStorageQuantizer({self.precision}, {self.granularity})"


class E5M2LogitQuantizer:
    """Elementwise depth logits in float8 e5m2 (saturating cast and back): wider range, 2 mantissa bits."""

    elementwise = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        m = float(torch.finfo(E5M2).max)
        return logits.float().clamp(-m, m).to(E5M2).float().to(logits.dtype)

    def __repr__(self) -> str:
        return "E5M2LogitQuantizer()"


def storage_granularity(precision: str) -> str:
    return {"fp8_e5m2": "per-token", "mxfp8": "group 32 (E8M0)", "mxfp4": "group 32 (E8M0)",
            "nvfp4": "group 16 (E4M3) + per-token fp32"}.get(precision, "-")


def storage_bits(precision: str) -> float:
    """Bits per stored element incl. group scales (per-token fp32/bf16 scales not included)."""
    return {"fp8_e5m2": 8.0, "mxfp8": 8.25, "mxfp4": 4.25, "nvfp4": 4.5}[precision]


# ------------------------------------------------------------------------------------------- plan helpers
def check_weight(precision: str, shape: tuple[int, ...], group_size: int | None, symmetric: bool | None,
                 explicit: dict) -> tuple[str, str] | None:
    """(what, fix) when ``precision`` cannot be applied as asked to a tensor of ``shape``, else None."""
    cols = shape[-1] if shape else 1
    if symmetric is False:
        return (f"{precision} is a symmetric floating format (no zero point); `symmetric: false` cannot be applied",
                "remove `symmetric: false` for floating formats")
    if precision in FIXED_GROUP and "group_size" in explicit and group_size not in (None, FIXED_GROUP[precision]):
        return (f"{precision} has a fixed group of {FIXED_GROUP[precision]} elements; group_size {group_size} "
                f"cannot be applied", f"remove `group_size` (or set {FIXED_GROUP[precision]})")
    if precision == "fp8_tensor" and "group_size" in explicit and group_size is not None:
        return ("fp8_tensor has one scale per tensor; group_size cannot be applied",
                "use `fp8` with group_size for per-group scales, or `fp8_block` for blocks")
    g = weight_group(precision, group_size)
    if g is not None and g < cols and cols % g:
        return (f"{precision}'s group of {g} does not divide the {cols} input features",
                "keep this tensor at bf16 with a rule, or pick a format whose group divides it")
    if g is not None and precision in FIXED_GROUP and cols < g:
        return (f"{precision} needs rows of at least {g} elements (this tensor has {cols})",
                "keep this tensor at bf16 with a rule")
    return None


def bits_per_weight(precision: str, shape: tuple[int, ...], group_size: int | None, scale_bits: int) -> float:
    """Stored bits per weight incl. every scale (``scale_bits``: width of an fp8 scale = the model dtype's)."""
    numel = math.prod(shape) if shape else 1
    cols = shape[-1] if shape else 1
    rows = numel // cols if cols else 1
    if precision in ("mxfp8", "mxfp4"):
        return ELEMENT_BITS[precision] + 8 / 32
    if precision == "nvfp4":
        return 4 + 8 / 16 + 32 / numel
    if precision == "fp8_tensor" or (precision == "fp8" and len(shape) <= 1 and group_size is None):
        return 8 + scale_bits / numel
    if precision == "fp8_block":
        b = block_edge(precision, group_size)
        rows2 = shape[-2] if len(shape) >= 2 else 1
        n_blocks = math.ceil(rows2 / b) * math.ceil(cols / b) * (numel // (rows2 * cols))
        return 8 + scale_bits * n_blocks / numel
    g = group_size if group_size is not None and group_size < cols else cols  # fp8 per-group / per-channel
    del rows
    return 8 + scale_bits / g


def granularity(precision: str, shape: tuple[int, ...], group_size: int | None) -> str:
    cols = shape[-1] if shape else 1
    if precision in ("mxfp8", "mxfp4"):
        return "g32 E8M0"
    if precision == "nvfp4":
        return "g16 E4M3 + fp32 global"
    if precision == "fp8_tensor" or (precision == "fp8" and len(shape) <= 1 and group_size is None):
        return "per-tensor"
    if precision == "fp8_block":
        b = block_edge(precision, group_size)
        return f"block {b}x{b}"
    if group_size is None or group_size >= cols:
        return "per-channel"
    return f"g{group_size}"


# ------------------------------------------------------------------------------------------- compressed-tensors
def weight_args(precision: str, group_size: int | None = None, *, ndim: int = 2):
    """The compressed-tensors ``QuantizationArgs`` of a weight format (the oracle and the export's config)."""
    from compressed_tensors.quantization import QuantizationArgs

    if precision == "fp8_tensor" or (precision == "fp8" and ndim <= 1 and group_size is None):
        return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    if precision == "fp8":
        if group_size is None:
            return QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
        return QuantizationArgs(num_bits=8, type="float", strategy="group", group_size=group_size, symmetric=True,
                                dynamic=False)
    if precision == "fp8_block":
        b = block_edge(precision, group_size)
        return QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[b, b], symmetric=True,
                                dynamic=False)
    if precision in ("mxfp8", "mxfp4"):
        return QuantizationArgs(num_bits=ELEMENT_BITS[precision], type="float", strategy="group", group_size=32,
                                symmetric=True, dynamic=False, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    if precision == "nvfp4":
        return QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                                dynamic=False, scale_dtype=E4M3, zp_dtype=E4M3)
    raise ValueError(f"no compressed-tensors args for {precision!r}")


def int_weight_args(precision: str, group_size: int | None, symmetric: bool, cols: int):
    from compressed_tensors.quantization import QuantizationArgs

    bits = 8 if precision == "int8" else 4
    if group_size is None or group_size >= cols:
        return QuantizationArgs(num_bits=bits, type="int", strategy="channel", symmetric=symmetric)
    return QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=group_size, symmetric=symmetric)


def activation_args(precision: str, scheme: str = "dynamic"):
    """compressed-tensors ``QuantizationArgs`` of an activation precision (fp8 / mxfp8 / mxfp4 / int8 / int4)."""
    from compressed_tensors.quantization import QuantizationArgs

    if precision == "fp8":
        if scheme == "static":
            return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False,
                                    observer="static_minmax")
        return QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    if precision in ("mxfp8", "mxfp4"):
        return QuantizationArgs(num_bits=ELEMENT_BITS[precision], type="float", strategy="group", group_size=32,
                                symmetric=True, dynamic=True, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    if precision == "nvfp4":
        return QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                                dynamic="local", observer="static_minmax", scale_dtype=E4M3, zp_dtype=E4M3)
    if precision in ("int8", "int4"):
        bits = 8 if precision == "int8" else 4
        if scheme == "static":
            return QuantizationArgs(num_bits=bits, type="int", strategy="tensor", symmetric=True, dynamic=False)
        return QuantizationArgs(num_bits=bits, type="int", strategy="token", symmetric=True, dynamic=True)
    raise ValueError(f"no compressed-tensors activation args for {precision!r}")


__all__ = ["WEIGHT_FORMATS", "ACTIVATION_FORMATS", "STORAGE_FORMATS", "COMPUTE_FORMATS", "FIXED_GROUP",
           "fake_quantize_weight", "weight_qparams", "fake_quantize_fp8_tokens", "fake_quantize_groups",
           "FormatActivationQuantizer", "FormatStorageQuantizer", "E5M2LogitQuantizer", "round_e2m1",
           "bits_per_weight", "granularity", "check_weight", "weight_args", "activation_args", "storage_bits"]
