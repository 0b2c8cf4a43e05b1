"""The numpy K-quant implementation (Q4_K, Q5_K, Q6_K) the project shipped before the torch one.

Kept unchanged as the test oracle of :mod:`.kquant_torch` (which must produce the same bytes) and as the
"before" of ``python -m attnres_quant bench kquant``. It follows llama.cpp's ``quantize_row_q{4,5,6}_K_ref``
step by step in float32 numpy (see :mod:`.gguf_quant` for the algorithm) and was checked against ggml's own
quantizer (0 of 8192 blocks differ against ggml built without -march=native).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_F32 = np.float32


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


def quantize_blocks(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """float32 super-blocks [nb, 256] -> GGUF blocks [nb, type_size] uint8."""
    return _kq_pack(_kq_encode(np.ascontiguousarray(blocks, dtype=_F32), qtype), qtype)


def roundtrip_blocks(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """float32 super-blocks [nb, 256] -> the dequantized float32 values llama.cpp computes with."""
    return _kq_dequant(_kq_encode(np.ascontiguousarray(blocks, dtype=_F32), qtype), qtype)
