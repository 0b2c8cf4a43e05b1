"""Component ``attn.kv_cache``: the attention KV cache stored at lower precision (simulated),
and the per-token memory of the KV cache versus Block AttnRes's depth sources.

The reference model calls ``layer.attn.kv_quantizer(k)`` and ``layer.attn.kv_quantizer(v)``
on the rotated keys and the values, each ``[B, H_kv, T, head_dim]``, before they enter the
cache (and before attention, so prefill and decode both see the stored values).
:func:`make_kv_quantizer` builds that callable:

* precision ``bf16``: a cast to bfloat16 and back (a no-op in a bf16 model);
* ``fp8``: scaled float8 e4m3fn (scale = amax / 448 over the granule) cast and back;
* ``int8`` / ``int4``: symmetric integer quantize-dequantize, scale = amax / qmax
  (qmax 127 / 7) so the largest element of each granule is represented exactly.
  ``symmetric=False`` gives the asymmetric (min/max, zero point) variant.

Granularity (one scale per):

* ``per_token``: (batch, kv-head, token) over ``head_dim`` -- what a cache that appends
  token by token can do online; one scale per token and head is stored beside the data.
* ``per_head``: (batch, kv-head), the running maximum over the tokens written so far:
  token t is quantized once, when it is written, with the scale of tokens 0..t of its
  head (``cummax`` within a call, continued from the previous calls' maximum). A cache
  never sees tokens that are not written yet, so a scale taken over the whole prompt would
  let position i depend on later tokens (and on right padding); with the running maximum
  the logits of positions 0..i do not change when tokens are appended, and prefill +
  token-by-token decode equals one prefill (tested). The running maximum is state of the
  cache: the model keeps it beside its KV cache (``KVQuantizer.stateful``). Stored tokens
  are never re-quantized, so a real cache keeps the scale at each point where the running
  maximum grew (a handful per head and sequence; not counted in the bytes below).

Memory (:func:`kv_cache_bytes_per_token`, :func:`depth_source_bytes_per_token`): the KV
cache keeps ``2 * L * H_kv * head_dim`` values for every token of the context, for the
whole generation. Block AttnRes keeps, per token *in flight* through the layer stack, the
embedding, the completed block sums and the partial sum of the current block: at most
``N + 1`` vectors of ``d`` (N = number of blocks = ceil(2L / S)); Full AttnRes (S = 1)
``2L + 1``; the standard residual stream 1. Depth sources are needed only inside one
forward pass -- a decoded token never reads an earlier token's sources -- so they scale with
the prefill chunk, while the KV cache scales with the context length.
"""

from __future__ import annotations

import math

import torch

PRECISIONS = ("bf16", "fp8", "int8", "int4")
GRANULARITIES = ("per_head", "per_token")
_BITS = {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "fp16": 16, "fp32": 32,
         "fp8_e5m2": 8, "mxfp8": 8.25, "mxfp4": 4.25, "nvfp4": 4.5}  # MX / NV: incl. their group scales
_QMAX = {"int8": 127, "int4": 7}
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_TINY = torch.finfo(torch.float32).tiny


class KVQuantizer:
    """Simulated KV-cache storage: ``q(x) -> x'`` with x's shape and dtype ([B, H, T, D])."""

    elementwise = False

    def __init__(self, precision: str, granularity: str = "per_token", symmetric: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown KV-cache precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown KV-cache granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
        self.precision = precision
        self.granularity = granularity
        self.symmetric = symmetric

    @property
    def stateful(self) -> bool:
        """True when the scale of a token depends on earlier calls' tokens (per_head): the caller
        passes a ``state`` dict that lives as long as its KV cache."""
        return self.granularity == "per_head" and self.precision != "bf16"

    def _ranges(self, xf: torch.Tensor, state: dict | None, slot: str, valid: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) per granule, broadcastable to ``xf``: per token, or the running min / max over
        the head's tokens written so far (this call's tokens in order, after ``state[slot]``),
        padding tokens (``valid`` False) excluded."""
        own_lo = xf.amin(-1, keepdim=True)
        own_hi = xf.amax(-1, keepdim=True)
        if self.granularity == "per_token" or xf.dim() < 3:
            return own_lo, own_hi
        lo, hi = own_lo, own_hi
        if valid is not None:  # [B, T]: padding never widens a real sequence's scale
            v = valid.to(torch.bool)[:, None, :, None]
            lo = lo.masked_fill(~v, float("inf"))
            hi = hi.masked_fill(~v, float("-inf"))
        lo = torch.cummin(lo, dim=-2).values  # [B, H, T, 1]: tokens 0..t of this call
        hi = torch.cummax(hi, dim=-2).values
        prev = state.get(slot) if state is not None else None
        if prev is not None:  # tokens of earlier calls (the prefill, earlier decode steps)
            lo, hi = torch.minimum(lo, prev[0]), torch.maximum(hi, prev[1])
        if state is not None:
            state[slot] = (lo[..., -1:, :], hi[..., -1:, :])
        if valid is not None:  # leading padding (no real token yet): its own range, never read
            none_yet = lo > hi
            lo, hi = torch.where(none_yet, own_lo, lo), torch.where(none_yet, own_hi, hi)
        return lo, hi

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, state: dict | None = None, slot: str = "x",
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize-dequantize ``x`` [B, H, T, D] as written to the cache. ``state`` (per_head only):
        a dict kept with the cache across calls, ``slot`` its key for this tensor ("k" / "v"); None
        for a single call that holds the whole sequence. ``valid`` [B, T] (per_head only): False at
        padding tokens, which then do not enter the running scale."""
        p = self.precision
        if p == "bf16":
            return x.to(torch.bfloat16).to(x.dtype)
        xf = x.float()
        lo, hi = self._ranges(xf, state, slot, valid)
        if p == "fp8" or self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
        if p == "fp8":
            scale = (amax / _FP8_MAX).clamp(min=_TINY)
            return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
        qmax = _QMAX[p]
        if self.symmetric:
            scale = (amax / qmax).clamp(min=_TINY)
            q = torch.clamp(torch.round(xf / scale), -qmax - 1, qmax)
            return (q * scale).to(x.dtype)
        levels = 2 * qmax + 1  # 255 / 15
        scale = ((hi - lo) / levels).clamp(min=_TINY)
        zp = torch.round(-lo / scale)
        q = torch.clamp(torch.round(xf / scale) + zp, 0, levels)
        return ((q - zp) * scale).to(x.dtype)

    def __repr__(self) -> str:
        sym = "" if self.symmetric else ", asymmetric"
        return f"KVQuantizer({self.precision}, {self.granularity}{sym})"


def make_kv_quantizer(precision: str, granularity: str = "per_token", *, symmetric: bool = True) -> KVQuantizer:
    """The callable for ``Attention.kv_quantizer``: simulated KV storage at ``precision``
    (``bf16`` | ``fp8`` | ``int8`` | ``int4``), one scale per ``granularity``
    (``per_token`` | ``per_head``); applied separately to k and to v [B, H_kv, T, head_dim].
    ``fp8_e5m2`` / ``mxfp8`` / ``mxfp4`` / ``nvfp4``: :class:`~attnres_quant.quant.formats.FormatStorageQuantizer`
    (MX groups of 32 along head_dim whatever the granularity; nvfp4's fp32 global scale per ``granularity``)."""
    from .formats import STORAGE_FORMATS, FormatStorageQuantizer

    if precision in STORAGE_FORMATS:
        return FormatStorageQuantizer(precision, granularity)
    return KVQuantizer(precision, granularity, symmetric)


def set_kv_quantizer(model, precision: str | None, granularity: str = "per_token", *,
                     layers=None, symmetric: bool = True) -> int:
    """Install (or, with ``precision=None``, remove) the KV quantizer on every attention layer of
    ``model`` (or only ``layers``, a collection of layer indices). Returns the count installed."""
    n = 0
    for module in model.modules():
        # Attention layers with a KV cache: the reference model's (k_proj) and MLA's latent cache
        # (kv_a_proj_with_mqa, Kimi); KDA layers have k_proj but no kv_quantizer (attn.state instead).
        if hasattr(module, "kv_quantizer") and (hasattr(module, "k_proj") or hasattr(module, "kv_a_proj_with_mqa")):
            idx = getattr(module, "layer_idx", None)
            if layers is not None and idx not in layers:
                continue
            module.kv_quantizer = None if precision is None else make_kv_quantizer(precision, granularity,
                                                                                   symmetric=symmetric)
            n += 1
    return n


# ------------------------------------------------------------------------------ memory
def _element_bytes(precision: str) -> float:
    if precision not in _BITS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(_BITS)}")
    return _BITS[precision] / 8


def _scale_bytes(precision: str, scale_bytes: int) -> int:
    return scale_bytes if precision in ("fp8", "int8", "int4", "fp8_e5m2") else 4 if precision == "nvfp4" else 0


def _cfg(config, name, default=None):
    return getattr(config, name, default)


def kv_cache_bytes_per_token(config, precision: str = "bf16", granularity: str = "per_token", *,
                             scale_bytes: int = 2) -> float:
    """Bytes the KV cache holds per token of context, all layers:
    ``L * 2 * H_kv * head_dim * bits/8`` plus, for ``per_token`` fp8/int8/int4, one fp16 scale per
    token, head and tensor (``L * 2 * H_kv * scale_bytes``). ``per_head`` scales are per sequence,
    not per token (counted as 0 here)."""
    L = int(config.num_hidden_layers)
    h_kv = int(_cfg(config, "num_key_value_heads", None) or _cfg(config, "num_kv_heads", None)
               or config.num_heads)
    hd = int(_cfg(config, "head_dim", None) or config.hidden_size // config.num_heads)
    data = L * 2 * h_kv * hd * _element_bytes(precision)
    scales = L * 2 * h_kv * _scale_bytes(precision, scale_bytes) if granularity == "per_token" else 0
    return data + scales


def depth_sources_held(config) -> int:
    """Peak number of d-vectors per token the residual/depth path holds during a forward pass:
    standard residual 1 (the stream); Full AttnRes (S = 1) 2L + 1 (embedding + every sub-layer
    output); Block AttnRes N + 1 with N = ceil(2L / S) blocks (embedding, N - 1 completed block
    sums and the partial sum of the last block, all live at the final mix)."""
    S = _cfg(config, "attnres_block_size", None)
    n_sub = 2 * int(config.num_hidden_layers)
    if S is None:
        return 1
    S = int(S)
    return math.ceil(n_sub / S) + 1


def depth_source_bytes_per_token(config, precision: str = "bf16", *, scale_bytes: int = 2) -> float:
    """Bytes of depth sources per token in flight: ``depth_sources_held(config) * d * bits/8`` plus
    one scale per stored vector for fp8/int8/int4 (per-token quantization)."""
    n = depth_sources_held(config)
    d = int(config.hidden_size)
    return n * (d * _element_bytes(precision) + _scale_bytes(precision, scale_bytes))


def memory_comparison(config, precision: str = "bf16", *, context_len: int = 2048, tokens_in_flight: int = 512,
                      granularity: str = "per_token", scale_bytes: int = 2) -> dict:
    """Per-token and total bytes of the KV cache (``context_len`` tokens, batch 1) and of the depth
    sources (``tokens_in_flight`` tokens, e.g. a prefill chunk), at the same precision."""
    kv = kv_cache_bytes_per_token(config, precision, granularity, scale_bytes=scale_bytes)
    ds = depth_source_bytes_per_token(config, precision, scale_bytes=scale_bytes)
    return {"precision": precision, "kv_bytes_per_token": kv, "depth_bytes_per_token": ds,
            "depth_over_kv_per_token": ds / kv if kv else float("nan"),
            "depth_vectors_per_token": depth_sources_held(config),
            "kv_total_bytes": kv * context_len, "depth_total_bytes": ds * tokens_in_flight,
            "context_len": context_len, "tokens_in_flight": tokens_in_flight}


__all__ = ["PRECISIONS", "GRANULARITIES", "KVQuantizer", "make_kv_quantizer", "set_kv_quantizer",
           "kv_cache_bytes_per_token", "depth_sources_held", "depth_source_bytes_per_token", "memory_comparison"]
