"""llama.cpp (GGUF) quant types applied to one weight tensor: simulation of a GGUF deployment.

A GGUF file stores each weight row as a sequence of fixed-size *blocks*; llama.cpp
dequantizes (or dot-products) them at inference. This module turns a weight into those
blocks (:func:`quantize_packed`, the exact GGUF byte layout), and into the dequantized
tensor llama.cpp would compute with (:func:`gguf_roundtrip`), plus the exact storage
size (:func:`packed_nbytes`, :func:`bits_per_weight`).

Types and where their arithmetic comes from:

* ``Q8_0, Q4_0, Q4_1, Q5_0, Q5_1`` (blocks of 32): the ``gguf`` package's own
  ``gguf.quants.quantize`` / ``gguf.quants.dequantize`` (a numpy port of llama.cpp's
  reference ``quantize_row_*_ref``).
* ``Q4_K, Q5_K, Q6_K`` (super-blocks of 256): ``gguf`` only *dequantizes* them, and
  ggml's C quantizer is not reachable from Python here (llama-cpp-python has no wheel on
  this index and its API does not expose ``ggml_quantize_chunk``).  This module therefore
  implements llama.cpp's reference K-quant rounding (``quantize_row_q{4,5,6}_K_ref``,
  i.e. the path ``llama-quantize`` takes without an importance matrix), vectorised in
  float32 numpy:

  - Q4_K / Q5_K: 8 sub-blocks of 32 with an asymmetric (scale, min) pair each, found by
    the weighted least-squares search over candidate inverse scales (llama.cpp's
    ``make_qkx2_quants``; weights ``sqrt(mean x^2) + |x|``; Q4_K: 4-bit codes, 21
    candidates from ``(nmax - 1.0 + 0.1 i)``; Q5_K: 5-bit codes, 16 candidates from
    ``(nmax - 0.5 + 0.1 i)``); the 8 scales and 8 mins are quantized to 6 bits against
    fp16 super-block factors ``d`` and ``dmin`` and the codes are re-derived from the
    quantized scales; 6-bit scales/mins packed into 12 bytes.
  - Q6_K: 16 sub-blocks of 16 with a symmetric signed scale each, found by the
    ``x^2``-weighted search over 19 candidate inverse scales (llama.cpp's
    ``make_qx_quants``, rmse_type 1); scales stored as int8 against an fp16 ``d``.

  The blocks are packed in GGUF layout, and ``gguf.quants.dequantize`` reads them back
  to exactly the tensor :func:`gguf_roundtrip` returns (tests check bit equality).
  The rounding follows llama.cpp's reference algorithm step by step in float32, with
  sums accumulated left to right like the C loops (tests check the vectorised code
  against a plain scalar transcription, bit for bit). A llama.cpp binary built with
  FMA contraction (-march=native) may still round a near tie differently in rare
  sub-blocks; the format, and the dequantized values of *our* blocks, are exact.

Rows whose length is not a multiple of the type's block size are refused with a
``ValueError`` (naming the shape and block size); :func:`fallback_type` gives the type
llama.cpp's ``llama-quantize`` substitutes in that case (Q4_K->Q5_0, Q5_K->Q5_1,
Q6_K->Q8_0, then F16).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
QK_K = 256

# llama-quantize's substitution for a tensor whose rows do not fit the type's blocks
# (llama.cpp src/llama-quant.cpp, "using fallback quantization"); F16 if that fails too.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

_F32 = np.float32
_ROW_CHUNK_ELEMS = 1 << 20  # process ~1M weights at a time (bounded temporaries)


# ---------------------------------------------------------------------------- sizes
def _qtype(qtype: str) -> GGMLQuantizationType:
    name = str(qtype).upper()
    if name not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF quant type {qtype!r}; supported: {', '.join(GGUF_TYPES)}")
    return GGMLQuantizationType[name]


def block_size(qtype: str) -> int:
    """Weights per block: 32 for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, 256 for the K-quants."""
    return GGML_QUANT_SIZES[_qtype(qtype)][0]


def type_size(qtype: str) -> int:
    """Bytes per block (Q4_K 144, Q5_K 176, Q6_K 210, Q8_0 34, Q4_0 18, ...)."""
    return GGML_QUANT_SIZES[_qtype(qtype)][1]


def bits_per_weight(qtype: str) -> float:
    """Storage bits per weight, scales included (llama.cpp's figures): Q8_0 8.5, Q4_0 4.5,
    Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625."""
    return type_size(qtype) * 8 / block_size(qtype)


def check_shape(shape: Sequence[int], qtype: str) -> None:
    """Raise ``ValueError`` unless the last dimension (the row) is a multiple of the block size."""
    shape = tuple(int(s) for s in shape)
    bs = block_size(qtype)
    if len(shape) == 0 or shape[-1] % bs != 0:
        raise ValueError(
            f"GGUF {str(qtype).upper()} needs rows whose length is a multiple of its block size {bs}; "
            f"tensor shape {shape} has rows of {shape[-1] if shape else 0}. Use another type for this "
            f"tensor (llama.cpp falls back to {fallback_type(qtype, shape[-1] if shape else 0)}).")


def is_compatible(shape: Sequence[int], qtype: str) -> bool:
    """True when ``shape``'s rows can be stored in ``qtype`` blocks."""
    return len(shape) > 0 and int(shape[-1]) % block_size(qtype) == 0


def fallback_type(qtype: str, row_len: int) -> str:
    """The type llama.cpp's quantizer uses when ``row_len`` does not fit ``qtype``'s blocks:
    ``qtype`` itself if it fits, else Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, and ``"F16"``
    when even that does not fit (legacy types fall back to F16 directly)."""
    q = str(qtype).upper()
    if row_len > 0 and row_len % block_size(q) == 0:
        return q
    alt = _FALLBACK.get(q)
    if alt is not None and row_len > 0 and row_len % block_size(alt) == 0:
        return alt
    return "F16"


def packed_nbytes(shape: Sequence[int], qtype: str) -> int:
    """Exact bytes of a tensor of ``shape`` stored as ``qtype`` (= numel * bpw / 8)."""
    check_shape(shape, qtype)
    numel = int(np.prod([int(s) for s in shape]))
    return numel // block_size(qtype) * type_size(qtype)


# ---------------------------------------------------------------------------- helpers
def _as_rows(weight) -> tuple[np.ndarray, tuple[int, ...]]:
    if isinstance(weight, torch.Tensor):
        arr = weight.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(weight, dtype=_F32)
    shape = tuple(arr.shape)
    if arr.ndim == 0:
        raise ValueError("GGUF quantization needs a tensor with at least one dimension")
    return np.ascontiguousarray(arr.reshape(-1, shape[-1]), dtype=_F32), shape


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even of a float32 (the 1.5*2^23 trick)."""
    return np.rint(v).astype(np.int32)


def _fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 value, the same value as float32), as GGML_FP32_TO_FP16 / FP16_TO_FP32."""
    h = v.astype(np.float16)
    return h, h.astype(_F32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, like the C reference's loops (numpy's
    ``sum`` is pairwise, which can flip near-tie decisions of the scale searches)."""
    return np.cumsum(a, axis=1, dtype=_F32)[:, -1]


def _chunks(n_rows: int, row_len: int):
    step = max(1, _ROW_CHUNK_ELEMS // max(1, row_len))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


# ------------------------------------------------------------- K-quant scale searches
def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Vectorised llama.cpp make_qkx2_quants over rows of ``x`` [n, 32] (use_mad = false).

    Returns (scale [n], the_min [n] (>= 0, subtracted), codes [n, 32] in 0..nmax).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mn = x.min(axis=1)
        mx = x.max(axis=1)
        sum_w = _seqsum(w)
        sum_x = _seqsum(w * x)
        mn = np.minimum(mn, _F32(0))
        flat = mx == mn
        rng = np.where(flat, _F32(1), mx - mn)
        iscale = (_F32(nmax) / rng).astype(_F32)
        scale = (_F32(1) / iscale).astype(_F32)
        L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        diff = scale[:, None] * L.astype(_F32) + mn[:, None] - x
        best = _seqsum(w * (diff * diff))
        for i in range(nstep + 1):
            cand = (_F32(rmin) + _F32(rdelta) * _F32(i) + _F32(nmax)).astype(_F32)
            rng = np.where(flat, _F32(1), mx - mn)  # mn is updated by better candidates
            isc = (cand / rng).astype(_F32)
            La = np.clip(_nearest_int(isc[:, None] * (x - mn[:, None])), 0, nmax)
            Lf = La.astype(_F32)
            wl = w * Lf
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * Lf)
            sum_xl = _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale[:, None] * Lf + this_min[:, None] - x
            cur = _seqsum(w * (diff * diff))
            better = (D > 0) & (cur < best) & ~flat
            if better.any():
                L = np.where(better[:, None], La, L)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                mn = np.where(better, this_min, mn)
        scale = np.where(flat, _F32(0), scale).astype(_F32)
        L = np.where(flat[:, None], 0, L)
    return scale, (-mn).astype(_F32), L.astype(np.int32)


def _make_qx_rmse1(x: np.ndarray, nmax: int):
    """Vectorised llama.cpp make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over rows of
    ``x`` [n, 16]. Returns (signed scale [n], codes [n, 16] in 0..2*nmax-1 (offset nmax))."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ax = np.abs(x)
        idx = ax.argmax(axis=1)  # first index of the largest |x| (C's strict '>')
        amax = ax[np.arange(x.shape[0]), idx]
        mxv = x[np.arange(x.shape[0]), idx]
        zero = amax < _F32(1e-15)
        safe = np.where(zero, _F32(1), mxv)
        w = x * x
        iscale = (_F32(-nmax) / safe).astype(_F32)
        lq = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lq.astype(_F32)
        sumlx = _seqsum(w * x * lf)
        suml2 = _seqsum(w * lf * lf)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
        best = scale * sumlx
        L = lq + nmax
        for i in range(-9, 10):
            if i == 0:
                continue
            isc = (-(_F32(nmax) + _F32(0.1) * _F32(i)) / safe).astype(_F32)
            lq = np.clip(_nearest_int(isc[:, None] * x), -nmax, nmax - 1)
            lf = lq.astype(_F32)
            slx = _seqsum(w * x * lf)
            sl2 = _seqsum(w * lf * lf)
            better = (sl2 > 0) & (slx * slx > best * sl2) & ~zero
            if better.any():
                L = np.where(better[:, None], lq + nmax, L)
                new_scale = slx / sl2
                scale = np.where(better, new_scale, scale)
                best = np.where(better, new_scale * slx, best)
        scale = np.where(zero, _F32(0), scale).astype(_F32)
        L = np.where(zero[:, None], 0, L)
    return scale, L.astype(np.int32)


# ----------------------------------------------------------------- K-quant encoders
# Each encoder maps x [nb, 256] (float32 super-blocks) to a dict of integer codes and fp16
# factors; _kq_dequant and _kq_pack consume the dict.

def _encode_q45k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> dict:
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seqsum(sub * sub) / _F32(32)).astype(_F32)
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2(sub, weights, nmax, rmin, 0.1, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
    ls = np.clip(_nearest_int(inv_scale[:, None] * scales), 0, 63)
    lm = np.clip(_nearest_int(inv_min[:, None] * mins), 0, 63)
    d16, d32 = _fp16_round((max_scale / _F32(63)).astype(_F32))
    m16, m32 = _fp16_round((max_min / _F32(63)).astype(_F32))
    dj = d32[:, None] * ls.astype(_F32)  # [nb, 8]
    dmj = m32[:, None] * lm.astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        req = np.clip(_nearest_int((x.reshape(nb, 8, 32) + dmj[..., None]) / dj[..., None]), 0, nmax)
    L = np.where((dj != 0)[..., None], req, L)  # llama.cpp keeps the search codes where d == 0
    return {"d": d16, "dmin": m16, "sc": ls.astype(np.uint8), "m": lm.astype(np.uint8),
            "L": L.reshape(nb, QK_K).astype(np.uint8)}


def _encode_q6k(x: np.ndarray) -> dict:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _make_qx_rmse1(sub, 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    a = np.abs(scales)
    idx = a.argmax(axis=1)
    max_abs = a[np.arange(nb), idx]
    max_scale = scales[np.arange(nb), idx]
    zero = max_abs < _F32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (_F32(-128) / np.where(zero, _F32(1), max_scale)).astype(_F32)
        d16, d32 = _fp16_round((_F32(1) / iscale).astype(_F32))
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dj = d32[:, None] * sc.astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        req = np.clip(_nearest_int(x.reshape(nb, 16, 16) / dj[..., None]), -32, 31) + 32
    L = np.where((dj != 0)[..., None], req, L)
    # An all-zero super-block is written as zeros (d = 0, scales = 0, codes = 0).
    d16 = np.where(zero, np.float16(0), d16)
    sc = np.where(zero[:, None], np.int8(0), sc)
    L = np.where(zero[:, None, None], 0, L)
    return {"d": d16, "sc": sc, "L": L.reshape(nb, QK_K).astype(np.uint8)}


def _kq_dequant(codes: dict, qtype: str) -> np.ndarray:
    """Dequantize our own codes with llama.cpp's formulas, in float32: [nb, 256]."""
    L = codes["L"]
    nb = L.shape[0]
    if qtype == "Q6_K":
        d = codes["d"].astype(_F32)[:, None] * codes["sc"].astype(_F32)  # [nb, 16]
        q = (L.astype(np.int8) - np.int8(32)).astype(_F32).reshape(nb, 16, 16)
        return (d[..., None] * q).reshape(nb, QK_K)
    d = codes["d"].astype(_F32)[:, None] * codes["sc"].astype(_F32)  # [nb, 8]
    dm = codes["dmin"].astype(_F32)[:, None] * codes["m"].astype(_F32)
    q = L.astype(_F32).reshape(nb, 8, 32)
    return (d[..., None] * q - dm[..., None]).reshape(nb, QK_K)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes (llama.cpp's get_scale_min_k4 layout)."""
    nb = sc.shape[0]
    out = np.zeros((nb, 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _kq_pack(codes: dict, qtype: str) -> np.ndarray:
    """Codes -> GGUF blocks [nb, type_size] uint8."""
    L = codes["L"]
    nb = L.shape[0]
    if qtype == "Q6_K":
        Lh = L.reshape(nb, 2, 4, 32)  # [half, quarter, lane] -> element 128*h + 32*q + l
        lo = Lh & 0xF
        hi = Lh >> 4
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), codes["sc"].view(np.uint8),
                               codes["d"].reshape(nb, 1).view(np.uint8)], axis=1)
    head = np.concatenate([codes["d"].reshape(nb, 1).view(np.uint8), codes["dmin"].reshape(nb, 1).view(np.uint8),
                           _pack_scales_k4(codes["sc"], codes["m"])], axis=1)
    Lc = L.reshape(nb, 4, 2, 32)  # [chunk of 64, half, lane]
    ql = ((Lc[:, :, 0] & 0xF) | ((Lc[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    if qtype == "Q4_K":
        return np.concatenate([head, ql], axis=1)
    bits = (Lc >> 4) & 1  # fifth bit, [nb, 4, 2, 32]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # bit 2c + h
    qh = (bits << shifts[None, :, :, None]).sum(axis=(1, 2)).astype(np.uint8)
    return np.concatenate([head, qh, ql], axis=1)


def _kq_encode(x_blocks: np.ndarray, qtype: str) -> dict:
    if qtype == "Q4_K":
        return _encode_q45k(x_blocks, 15, -1.0, 20)
    if qtype == "Q5_K":
        return _encode_q45k(x_blocks, 31, -0.5, 15)
    return _encode_q6k(x_blocks)


# --------------------------------------------------------------------------- public
def quantize_packed(weight, qtype: str) -> np.ndarray:
    """Quantize ``weight`` (torch tensor or array; rows along the last dimension) into GGUF
    blocks. Returns uint8 ``[*shape[:-1], shape[-1] // block_size * type_size]`` -- the bytes
    a GGUF file holds for this tensor. ``gguf.quants.dequantize(out, GGMLQuantizationType[qtype])``
    reads it back."""
    q = _qtype(qtype).name
    rows, shape = _as_rows(weight)
    check_shape(shape, q)
    if q in LEGACY_TYPES:
        out = gguf_quants.quantize(rows, GGMLQuantizationType[q])
    else:
        nbr = shape[-1] // QK_K
        out = np.empty((rows.shape[0], nbr * type_size(q)), dtype=np.uint8)
        for sl in _chunks(rows.shape[0], shape[-1]):
            blocks = rows[sl].reshape(-1, QK_K)
            out[sl] = _kq_pack(_kq_encode(blocks, q), q).reshape(-1, nbr * type_size(q))
    return out.reshape(*shape[:-1], -1)


def dequantize_packed(packed: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF blocks -> float32 weights, through the ``gguf`` package's dequantizer."""
    return gguf_quants.dequantize(np.asarray(packed, dtype=np.uint8), _qtype(qtype))


def _roundtrip_rows(rows: np.ndarray, q: str) -> np.ndarray:
    if q in LEGACY_TYPES:
        qt = GGMLQuantizationType[q]
        return gguf_quants.dequantize(gguf_quants.quantize(rows, qt), qt)
    out = np.empty_like(rows)
    for sl in _chunks(rows.shape[0], rows.shape[1]):
        blocks = rows[sl].reshape(-1, QK_K)
        out[sl] = _kq_dequant(_kq_encode(blocks, q), q).reshape(out[sl].shape)
    return out


@torch.no_grad()
def gguf_roundtrip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """The weight llama.cpp computes with after storing ``weight`` as ``qtype``: quantize,
    then dequantize (float32), returned with ``weight``'s shape, dtype and device.

    For Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 this is ``gguf``'s own dequantize(quantize(w)); for the
    K-quants it is computed from our codes with llama.cpp's dequantization formulas and equals
    ``dequantize_packed(quantize_packed(w))`` bit for bit. Casting back to a bf16/fp16
    ``weight.dtype`` rounds the float32 result once (as a bf16 dequantizing kernel would).
    Raises ``ValueError`` if rows do not fit the block size (see :func:`fallback_type`).
    """
    q = _qtype(qtype).name
    rows, shape = _as_rows(weight)
    check_shape(shape, q)
    deq = _roundtrip_rows(rows, q).reshape(shape)
    out = torch.from_numpy(np.ascontiguousarray(deq))
    if isinstance(weight, torch.Tensor):
        return out.to(device=weight.device, dtype=weight.dtype)
    return out


def roundtrip_error(weight: torch.Tensor, qtype: str) -> dict:
    """Error figures of :func:`gguf_roundtrip` on ``weight``: rmse, relative mse, max abs."""
    w = weight.detach().float()
    d = gguf_roundtrip(w, qtype) - w
    return {"rmse": float(d.pow(2).mean().sqrt()), "rel_mse": float(d.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)),
            "max_abs": float(d.abs().max()), "bits_per_weight": bits_per_weight(qtype)}


# ------------------------------------------------------------------ llama.cpp mixes
# Followed: ggml-org/llama.cpp src/llama-quant.cpp at commit 007dbbf3fd17eefe9b47fee45f48f7ba5e62b714
# (tensor_allows_quantization, llama_tensor_get_type_impl, tensor_type_fallback), dense non-Falcon models
# without an importance matrix, --output-tensor-type / --token-embedding-type / --tensor-type not given.
# llama.cpp counts attn_v / ffn_down tensors (i_attention_wv, i_ffn_down) in the loader's order, which sorts by
# layer number (llama_model_loader::weight_name_comparer), so for dense models the counter is the layer index.
PRESETS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_PRESET_BASE = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q6_K": "Q6_K",
                "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1"}
LLAMA_CPP_COMMIT = "007dbbf3fd17eefe9b47fee45f48f7ba5e62b714"


def ggml_n_dims(shape: Sequence[int]) -> int:
    """``ggml_n_dims`` of a torch tensor of ``shape`` stored in GGUF: ggml's ne is the torch shape reversed
    and trailing ne of 1 do not count, so leading torch dims of size 1 do not count (min 1).
    [out, in] -> 2; [d] -> 1; a [1, d] pseudo-query (ne = [d, 1]) -> 1; [d, 1] -> 2."""
    dims = [int(x) for x in shape]
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return max(1, len(dims))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer heuristic for the *_M mixes: the first and last eighth of the layers
    and every third layer in between get more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _output_type(base: str, row_len: int | None) -> str:
    # llama_tensor_get_type_impl, OUTPUT (and a tied TOKEN_EMBD): Q8_0 when the rows do not fit the base type's
    # blocks, else Q6_K unless the mix is Q8_0.
    if row_len is not None and row_len % block_size(base) != 0:
        return "Q8_0"
    return base if base == "Q8_0" else "Q6_K"


def preset_type(preset: str, component: str, layer: int | None, n_layers: int, *, row_len: int | None = None,
                tied_embeddings: bool = False, shape: Sequence[int] | None = None) -> str | None:
    """The GGUF type ``llama-quantize <preset>`` gives a tensor of ``component`` (SPEC component names) in
    ``layer`` of ``n_layers``, or ``None`` for a tensor it leaves at its stored type.

    * ``ggml_n_dims < 2`` (norms, key norms, the ``[1, d]`` pseudo-queries ``depth.query``): not quantized;
    * ``lm_head`` (llama.cpp's ``output.weight``) -- and the token embedding when it is tied to it (no
      ``output.weight``): Q6_K, or Q8_0 for the Q8_0 mix or when its rows do not fit the base type;
    * ``embed`` (``token_embd.weight``, untied): the base type (Q4_K for Q4_K_M);
    * Q4_K_M / Q5_K_M: ``attn.v`` and ``mlp.down`` at Q6_K where :func:`use_more_bits`;
      Q4_K_S: ``attn.v`` of layers 0-3 and ``mlp.down`` of the first eighth at Q5_K;
    * everything else 2-D: the base type.

    With ``row_len`` the result passes through llama.cpp's fallback (:func:`fallback_type`).
    """
    p = str(preset).upper()
    if p not in _PRESET_BASE:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; supported: {', '.join(PRESETS)}")
    if component in ("norm", "depth.key_norm", "depth.query", "depth.softmax", "depth.sources", "attn.kv_cache"):
        return None
    if shape is not None and ggml_n_dims(shape) < 2:
        return None
    base = _PRESET_BASE[p]
    t = base
    if component == "lm_head" or (tied_embeddings and component == "embed"):
        t = _output_type(base, row_len)
    elif layer is not None and component == "attn.v":
        if p in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            t = "Q6_K"
        elif p == "Q4_K_S" and layer < 4:
            t = "Q5_K"
    elif layer is not None and component == "mlp.down":
        if p in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            t = "Q6_K"
        elif p == "Q4_K_S" and layer < n_layers // 8:
            t = "Q5_K"
    if row_len is not None:
        t = fallback_type(t, row_len)
    return t


def preset_rules(preset: str, n_layers: int, *, tied_embeddings: bool = False) -> list[dict]:
    """Policy rules (SPEC section 3 shape: ``select``, ``layers``, ``weight``) that express a
    llama.cpp preset on top of ``default: {weight: <base type>}`` (whose scope leaves out embed, norms and
    lm_head, and -- for gguf -- every tensor with ggml_n_dims < 2); add ``depth.*`` rules after them.
    Example: ``preset_rules("Q4_K_M", 8)`` -> attn.v and mlp.down of layers [0, 3, 6, 7] at Q6_K,
    lm_head at Q6_K, embed at Q4_K."""
    p = str(preset).upper()
    base = _PRESET_BASE[p]
    rules = []
    for comp in ("attn.v", "mlp.down"):
        by_type: dict[str, list[int]] = {}
        for i in range(n_layers):
            t = preset_type(p, comp, i, n_layers)
            if t != base:
                by_type.setdefault(t, []).append(i)
        rules += [{"select": comp, "layers": layers, "weight": t} for t, layers in by_type.items()]
    rules.append({"select": "lm_head", "weight": preset_type(p, "lm_head", None, n_layers)})
    rules.append({"select": "embed", "weight": preset_type(p, "embed", None, n_layers,
                                                           tied_embeddings=tied_embeddings)})
    return rules


@torch.no_grad()
def apply_gguf(model: torch.nn.Module, types: dict[str, str], *, fallback: bool = True) -> dict[str, dict]:
    """Replace, in place, the weight of each module named in ``types`` (module name -> GGUF
    type) by its GGUF round trip. Rows that do not fit the type's blocks take llama.cpp's
    fallback type (``fallback=True``; ``"F16"`` = an fp16 cast) or raise ``ValueError``.

    Returns, per module name: ``requested``, ``type`` (after fallback), ``fallback`` (bool),
    ``bytes`` (stored size), ``bits_per_weight``.
    """
    modules = dict(model.named_modules())
    report = {}
    for name, qtype in types.items():
        if name not in modules or not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise ValueError(f"apply_gguf: {name!r} is not a module with a weight")
        w = modules[name].weight
        t = str(qtype).upper()
        if fallback:
            t = fallback_type(t, int(w.shape[-1]))
        if t == "F16":
            new = w.detach().to(torch.float16).to(w.dtype)
            nbytes, bpw = w.numel() * 2, 16.0
        else:
            new = gguf_roundtrip(w.detach(), t)
            nbytes, bpw = packed_nbytes(tuple(w.shape), t), bits_per_weight(t)
        w.data.copy_(new)
        report[name] = {"requested": str(qtype).upper(), "type": t, "fallback": t != str(qtype).upper(),
                        "bytes": int(nbytes), "bits_per_weight": bpw}
    return report


__all__ = ["GGUF_TYPES", "LEGACY_TYPES", "K_QUANTS", "block_size", "type_size", "bits_per_weight",
           "check_shape", "is_compatible", "fallback_type", "packed_nbytes", "quantize_packed",
           "dequantize_packed", "gguf_roundtrip", "roundtrip_error", "PRESETS", "use_more_bits", "preset_type",
           "preset_rules", "apply_gguf", "ggml_n_dims", "LLAMA_CPP_COMMIT"]
