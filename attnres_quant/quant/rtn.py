"""Round-to-nearest (RTN) simulated quantization: quantize-dequantize of weights and
activations.

The arithmetic follows torchao's affine primitives (``choose_qparams_affine`` /
``quantize_affine`` / ``dequantize_affine``) exactly -- symmetric scale
``amax / ((qmax - qmin) / 2)``, asymmetric scale ``(max - min) / (qmax - qmin)`` with an
integer zero point, ``q = clamp(round(x * (1 / scale)) + zp)``, ``x' = (q - zp) * scale``
-- computed in fp32; tests check bit-for-bit agreement with torchao.
"""

from __future__ import annotations

import torch
from torch import nn

QRANGE = {"int8": (-128, 127), "int4": (-8, 7)}
EPS = torch.finfo(torch.float32).eps


def _group_view(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[..., C] -> [..., C // g, g] (per-channel / per-tensor for 1-D when group is None)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    cols = x.shape[-1]
    g = cols if group_size is None or group_size >= cols else group_size
    if cols % g:
        raise ValueError(f"group_size {g} does not divide {cols}")
    return x.reshape(*x.shape[:-1], cols // g, g)


def qparams(xg: torch.Tensor, bits: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group of ``xg`` [..., G, g] (fp32) -> [..., G, 1]."""
    qmin, qmax = QRANGE[bits]
    mn = xg.amin(-1, keepdim=True).clamp(max=0)
    mx = xg.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale = torch.maximum(-mn, mx) / (float(qmax - qmin) / 2)
        scale = scale.clamp(min=EPS)
        zp = torch.zeros_like(scale)
    else:
        scale = ((mx - mn) / float(qmax - qmin)).clamp(min=EPS)
        zp = (qmin - torch.round(mn / scale)).clamp(qmin, qmax)
    return scale, zp


def fake_quant_groups(xg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: str) -> torch.Tensor:
    qmin, qmax = QRANGE[bits]
    q = torch.clamp(torch.round(xg * (1.0 / scale)) + zp, qmin, qmax)
    return (q - zp) * scale


@torch.no_grad()
def fake_quantize_weight(w: torch.Tensor, bits: str, group_size: int | None = None,
                         symmetric: bool = True) -> torch.Tensor:
    """Quantize-dequantize a weight [out, in] (or 1-D) per channel / per group; returns w's dtype."""
    xg = _group_view(w.float(), group_size)
    scale, zp = qparams(xg, bits, symmetric)
    return fake_quant_groups(xg, scale, zp, bits).reshape(w.shape).to(w.dtype)


# Rows quantized per step by fake_quantize_weight_: float32 temporaries of ~1M weights (~12 MiB) rather
# than of the whole tensor (an lm_head of 32k x 4k would need ~1.5 GiB of them).
INPLACE_CHUNK_ELEMENTS = 1 << 20


@torch.no_grad()
def fake_quantize_weight_(w: torch.Tensor, bits: str, group_size: int | None = None, symmetric: bool = True,
                          chunk_elements: int = INPLACE_CHUNK_ELEMENTS) -> None:
    """:func:`fake_quantize_weight` written into ``w`` a block of rows at a time. Groups never cross a
    row, so the result is bit-identical to the whole-tensor call; only the temporaries shrink."""
    if w.dim() < 2 or not w.is_contiguous() or w.numel() <= chunk_elements:
        w.copy_(fake_quantize_weight(w, bits, group_size, symmetric))
        return
    rows = w.view(-1, w.shape[-1])
    step = max(1, chunk_elements // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        block.copy_(fake_quantize_weight(block, bits, group_size, symmetric))


def fake_quantize_per_token(x: torch.Tensor, bits: str, symmetric: bool = True) -> torch.Tensor:
    """Dynamic per-token (last dim) quantize-dequantize of an activation; returns x's dtype."""
    xf = x.float()
    scale, zp = qparams(xf.unsqueeze(-2), bits, symmetric)
    return fake_quant_groups(xf.unsqueeze(-2), scale, zp, bits).reshape(x.shape).to(x.dtype)


def fake_quantize_fp8(x: torch.Tensor, per_token: bool = True) -> torch.Tensor:
    """Simulated float8 e4m3: (per-token scaled) cast to float8_e4m3fn and back."""
    xf = x.float()
    fmax = torch.finfo(torch.float8_e4m3fn).max
    if per_token:
        scale = (xf.abs().amax(-1, keepdim=True) / fmax).clamp(min=EPS)
        return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
    return xf.clamp(-fmax, fmax).to(torch.float8_e4m3fn).float().to(x.dtype)


class ActivationQuantizer:
    """Forward pre-hook simulating int8/int4 quantization of an nn.Linear's input.

    ``scheme="dynamic"``: symmetric per-token scales computed on the fly.
    ``scheme="static"``: one symmetric per-tensor scale from calibration (``observe`` then
    ``freeze``); before calibration it observes and passes inputs through unchanged.
    """

    def __init__(self, bits: str, scheme: str = "dynamic"):
        self.bits, self.scheme = bits, scheme
        self.amax: torch.Tensor | None = None
        self.observing = scheme == "static"

    def __call__(self, module: nn.Module, args):
        x = args[0]
        if self.scheme == "dynamic":
            return (fake_quantize_per_token(x, self.bits),) + tuple(args[1:])
        if self.observing:
            a = x.detach().float().abs().amax()
            self.amax = a if self.amax is None else torch.maximum(self.amax, a)
            return None
        qmin, qmax = QRANGE[self.bits]
        scale = (self.amax / (float(qmax - qmin) / 2)).clamp(min=EPS)
        xf = x.float()
        q = torch.clamp(torch.round(xf * (1.0 / scale)), qmin, qmax)
        return ((q * scale).to(x.dtype),) + tuple(args[1:])

    def freeze(self) -> None:
        if self.amax is None:
            raise RuntimeError("static activation quantizer was never calibrated")
        self.observing = False

    def __repr__(self) -> str:
        return f"ActivationQuantizer({self.bits}, {self.scheme})"


def add_activation_quantizer(linear: nn.Module, bits: str, scheme: str) -> ActivationQuantizer:
    q = ActivationQuantizer(bits, scheme)
    linear.register_forward_pre_hook(q)
    linear._act_quantizer = q
    return q
