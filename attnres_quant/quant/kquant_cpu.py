"""llama.cpp's reference K-quant rounding (Q4_K, Q5_K, Q6_K) as numba-compiled CPU kernels.

The same algorithm and the same float32 operations, in the same order, as ``quantize_row_q{4,5,6}_K_ref``
(see :mod:`.gguf_quant`) and as the numpy oracle :mod:`.kquant_reference`, which these kernels equal byte
for byte (tests). Why this is fast *and* exact:

* A sub-block's sums are accumulated element 0, 1, 2, ... in float32 (the C loops' order), but many
  sub-blocks are processed side by side: a tile of ``TILE`` sub-blocks is transposed to
  ``[element, sub-block]`` so that the innermost loop runs over independent sub-blocks. LLVM turns it
  into SIMD code (one lane per sub-block) without reordering any sub-block's own sum, and the whole
  candidate step (round, three sums, the error pass) runs in registers/L1 instead of one memory pass per
  operation (which is what limits eager numpy/torch).
* No fast-math: numba emits plain IEEE float32 ``fmul``/``fadd``/``fdiv`` without the ``contract``
  flag, so nothing is fused into an FMA (ggml's reference built without -march=native does not fuse
  either); ``np.rint`` is round-half-to-even like ggml's ``nearest_int``; divisions stay divisions.
* Where the reference casts a rounded float to int32 (numpy: NaN and out-of-range values become
  INT_MIN) and then clamps, :func:`_round_clamp` gives the same code.

The per-super-block steps that need fp16 rounding (``d``, ``dmin``) run in numpy between two kernels:
``search`` (per sub-block scale search) and ``requant`` (codes re-derived from the quantized scales).
Kernels are compiled on first use (a few seconds) and cached on disk next to this file when writable.
"""

from __future__ import annotations

import numpy as np
from numba import njit

QK_K = 256
TILE = 64  # sub-blocks processed side by side (SIMD lanes x unroll); a multiple of 16
_F32 = np.float32
_INT32_LIMIT = _F32(2147483648.0)


@njit(inline="always")
def _round_clamp(v, lo, hi):
    """nearest_int (round half to even) clamped to [lo, hi], as the reference's rint -> int32 -> clip."""
    r = np.rint(v)
    if not (r < _INT32_LIMIT):  # NaN, +inf, >= 2^31: numpy's int32 cast gives INT_MIN, clipped to lo
        r = lo
    if r < lo:
        r = lo
    if r > hi:
        r = hi
    return r


# ----------------------------------------------------------------- Q4_K / Q5_K search
@njit(cache=True, error_model="numpy", nogil=True)
def _qkx2_tile(xt, wt, nmax, cands, flat, mn, mx, sum_w, sum_x, best, scale, L, La, sum_l, sum_l2, sum_xl,
               err, isc, best_isc, best_mn):
    """make_qkx2_quants (use_mad = false) for TILE sub-blocks: xt, wt [32, TILE] -> flat, scale, mn,
    L [32, TILE] (the caller zeroes flat sub-blocks). The codes are those of the last accepted inverse
    scale and the min it was applied with (``best_isc``, ``best_mn``), derived once at the end."""
    n, T = xt.shape
    zero, one = _F32(0.0), _F32(1.0)
    for s in range(T):
        mn[s] = xt[0, s]
        mx[s] = xt[0, s]
        sum_w[s] = wt[0, s]
        sum_x[s] = wt[0, s] * xt[0, s]
    for j in range(1, n):
        for s in range(T):
            v = xt[j, s]
            if v < mn[s]:
                mn[s] = v
            if v > mx[s]:
                mx[s] = v
            sum_w[s] = sum_w[s] + wt[j, s]
            sum_x[s] = sum_x[s] + wt[j, s] * v
    for s in range(T):
        if mn[s] > zero:
            mn[s] = zero
        flat[s] = mx[s] == mn[s]
        isc[s] = nmax / (one if flat[s] else mx[s] - mn[s])
        scale[s] = one / isc[s]
        best[s] = zero
        best_isc[s] = isc[s]
        best_mn[s] = mn[s]
    for j in range(n):
        for s in range(T):
            l = _round_clamp(isc[s] * (xt[j, s] - mn[s]), zero, nmax)
            diff = scale[s] * l + mn[s] - xt[j, s]
            e = wt[j, s] * (diff * diff)
            best[s] = e if j == 0 else best[s] + e
    for c in range(cands.shape[0]):
        cand = cands[c]
        for s in range(T):
            isc[s] = cand / (one if flat[s] else mx[s] - mn[s])  # mn moves with accepted candidates
        for s in range(T):  # element 0 starts the sums (the reference's cumulative sums do)
            l = _round_clamp(isc[s] * (xt[0, s] - mn[s]), zero, nmax)
            La[0, s] = l
            wl = wt[0, s] * l
            sum_l[s] = wl
            sum_l2[s] = wl * l
            sum_xl[s] = wl * xt[0, s]
        for j in range(1, n):
            for s in range(T):
                l = _round_clamp(isc[s] * (xt[j, s] - mn[s]), zero, nmax)
                La[j, s] = l
                wl = wt[j, s] * l
                sum_l[s] = sum_l[s] + wl
                sum_l2[s] = sum_l2[s] + wl * l
                sum_xl[s] = sum_xl[s] + wl * xt[j, s]
        for s in range(T):
            D = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s]
            ts = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / D
            tm = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / D
            if tm > zero:
                tm = zero
                ts = sum_xl[s] / sum_l2[s]
            sum_xl[s] = ts  # reused: this candidate's scale, min and D
            sum_l2[s] = tm
            sum_l[s] = D
        for s in range(T):
            diff = sum_xl[s] * La[0, s] + sum_l2[s] - xt[0, s]
            err[s] = wt[0, s] * (diff * diff)
        for j in range(1, n):
            for s in range(T):
                diff = sum_xl[s] * La[j, s] + sum_l2[s] - xt[j, s]
                err[s] = err[s] + wt[j, s] * (diff * diff)
        for s in range(T):
            if sum_l[s] > zero and err[s] < best[s] and not flat[s]:
                best[s] = err[s]
                scale[s] = sum_xl[s]
                best_isc[s] = isc[s]
                best_mn[s] = mn[s]
                mn[s] = sum_l2[s]
    for j in range(n):
        for s in range(T):
            L[j, s] = _round_clamp(best_isc[s] * (xt[j, s] - best_mn[s]), zero, nmax)


@njit(cache=True, error_model="numpy", nogil=True)
def search_qkx2(sub, nmax, cands, scale_out, min_out, L_out):
    """Q4_K/Q5_K sub-block search over rows of ``sub`` [n, 32] (weights sqrt(mean x^2) + |x|).

    Writes scale_out [n], min_out [n] (the_min, >= 0, subtracted) and L_out [n, 32] (codes, float32)."""
    n_sub, n = sub.shape
    T = TILE
    xt = np.zeros((n, T), _F32)
    wt = np.zeros((n, T), _F32)
    L = np.empty((n, T), _F32)
    La = np.empty((n, T), _F32)
    vec = np.empty((13, T), _F32)
    flat = np.empty(T, np.bool_)
    for t0 in range(0, n_sub, T):
        m = min(T, n_sub - t0)
        for s in range(m):
            sq = _F32(0.0)
            for j in range(n):
                v = sub[t0 + s, j]
                xt[j, s] = v
                sq = v * v if j == 0 else sq + v * v
            av = np.sqrt(sq / _F32(n))
            for j in range(n):
                wt[j, s] = av + np.abs(xt[j, s])
        for s in range(m, T):  # padding lanes: flat zero sub-blocks, results dropped
            for j in range(n):
                xt[j, s] = _F32(0.0)
                wt[j, s] = _F32(0.0)
        mn, mx, sum_w, sum_x, best, scale = vec[0], vec[1], vec[2], vec[3], vec[4], vec[5]
        _qkx2_tile(xt, wt, nmax, cands, flat, mn, mx, sum_w, sum_x, best, scale, L, La,
                   vec[6], vec[7], vec[8], vec[9], vec[10], vec[11], vec[12])
        for s in range(m):
            scale_out[t0 + s] = _F32(0.0) if flat[s] else scale[s]
            min_out[t0 + s] = -mn[s]
            for j in range(n):
                L_out[t0 + s, j] = _F32(0.0) if flat[s] else L[j, s]


# ------------------------------------------------------------------------ Q6_K search
@njit(cache=True, error_model="numpy", nogil=True)
def _qx_tile(xt, w, wx, nmax, nums, safe, is_zero, scale, best, L, sumlx, suml2, isc, best_isc):
    """make_qx_quants(rmse_type=1, qw=NULL) for TILE sub-blocks xt [16, TILE] -> scale, L (offset nmax).

    w = x*x and wx = w*x are the C loop's ``w`` and ``w*x[i]``, computed once per tile. The codes are
    those of the last accepted inverse scale (``best_isc``), derived once at the end."""
    n, T = xt.shape
    zero = _F32(0.0)
    lo, hi = _F32(-nmax), _F32(nmax - 1)
    for s in range(T):
        amax = zero
        mxv = zero
        for j in range(n):
            ax = np.abs(xt[j, s])
            if ax > amax:
                amax = ax
                mxv = xt[j, s]
        is_zero[s] = amax < _F32(1e-15)
        safe[s] = _F32(1.0) if is_zero[s] else mxv
    for j in range(n):
        for s in range(T):
            w[j, s] = xt[j, s] * xt[j, s]
            wx[j, s] = w[j, s] * xt[j, s]
    for c in range(nums.shape[0]):  # nums[0]: the first inverse scale, then the 18 candidates
        for s in range(T):
            isc[s] = nums[c] / safe[s]
        for s in range(T):  # element 0 starts the sums
            l = _round_clamp(isc[s] * xt[0, s], lo, hi)
            sumlx[s] = wx[0, s] * l
            suml2[s] = w[0, s] * l * l
        for j in range(1, n):
            for s in range(T):
                l = _round_clamp(isc[s] * xt[j, s], lo, hi)
                sumlx[s] = sumlx[s] + wx[j, s] * l
                suml2[s] = suml2[s] + w[j, s] * l * l
        for s in range(T):
            if c == 0:
                sc = sumlx[s] / suml2[s] if suml2[s] != zero else zero
                scale[s] = sc
                best[s] = sc * sumlx[s]
                best_isc[s] = isc[s]
            elif suml2[s] > zero and sumlx[s] * sumlx[s] > best[s] * suml2[s] and not is_zero[s]:
                sc = sumlx[s] / suml2[s]
                scale[s] = sc
                best[s] = sc * sumlx[s]
                best_isc[s] = isc[s]
    for j in range(n):
        for s in range(T):
            L[j, s] = _round_clamp(best_isc[s] * xt[j, s], lo, hi) + _F32(nmax)


@njit(cache=True, error_model="numpy", nogil=True)
def search_qx(sub, nmax, nums, scale_out, L_out):
    """Q6_K sub-block search over rows of ``sub`` [n, 16]: writes scale_out [n] (signed) and L_out [n, 16]
    (codes offset by nmax, float32; zero where the sub-block is all ~0)."""
    n_sub, n = sub.shape
    T = TILE
    xt = np.zeros((n, T), _F32)
    w = np.empty((n, T), _F32)
    wx = np.empty((n, T), _F32)
    L = np.empty((n, T), _F32)
    vec = np.empty((7, T), _F32)
    is_zero = np.empty(T, np.bool_)
    for t0 in range(0, n_sub, T):
        m = min(T, n_sub - t0)
        for s in range(m):
            for j in range(n):
                xt[j, s] = sub[t0 + s, j]
        for s in range(m, T):
            for j in range(n):
                xt[j, s] = _F32(0.0)
        safe, scale, best, sumlx, suml2 = vec[0], vec[1], vec[2], vec[3], vec[4]
        _qx_tile(xt, w, wx, nmax, nums, safe, is_zero, scale, best, L, sumlx, suml2, vec[5], vec[6])
        for s in range(m):
            z = is_zero[s]
            scale_out[t0 + s] = _F32(0.0) if z else scale[s]
            for j in range(n):
                L_out[t0 + s, j] = _F32(0.0) if z else L[j, s]


# ----------------------------------------------------------------------- re-derived codes
@njit(cache=True, error_model="numpy", nogil=True)
def requant(x, dj, dmj, lo, hi, offset, L):
    """Codes from the quantized sub-block scales, in place: L[i, k] = clamp(rint((x + dmj) / dj), lo, hi)
    + offset for the sub-block of x [n, size] with factor dj != 0 (llama.cpp keeps the search codes
    where dj == 0). x, L [n, size]; dj, dmj [n]."""
    n, size = x.shape
    for i in range(n):
        d = dj[i]
        if d != _F32(0.0):
            m = dmj[i]
            for k in range(size):
                L[i, k] = _round_clamp((x[i, k] + m) / d, lo, hi) + offset


# ------------------------------------------------------------------------------ encoders
def _nearest_int(v: np.ndarray) -> np.ndarray:
    return np.rint(v).astype(np.int32)


def _fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = v.astype(np.float16)
    return h, h.astype(_F32)


def _qkx2_candidates(nmax: int, rmin: float, nstep: int) -> np.ndarray:
    """(rmin + rdelta*i + nmax) in float32, i = 0..nstep, rdelta = 0.1, as the C expression."""
    return np.array([_F32(rmin) + _F32(0.1) * _F32(i) + _F32(nmax) for i in range(nstep + 1)], dtype=_F32)


def _qx_numerators(nmax: int) -> np.ndarray:
    """-nmax, then -(nmax + 0.1*i) for i = -9..9 (i != 0): the numerators of make_qx_quants' inverse scales."""
    rest = [-(_F32(nmax) + _F32(0.1) * _F32(i)) for i in range(-9, 10) if i != 0]
    return np.array([_F32(-nmax)] + rest, dtype=_F32)


def encode_q45k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> dict:
    """x [nb, 256] float32 -> {d, dmin (fp16 [nb]), sc, m (uint8 [nb, 8]), L (uint8 [nb, 256])}."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    scales = np.empty(nb * 8, _F32)
    mins = np.empty(nb * 8, _F32)
    L = np.empty((nb * 8, 32), _F32)
    search_qkx2(sub, _F32(nmax), _qkx2_candidates(nmax, rmin, nstep), scales, mins, L)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
        ls = np.clip(_nearest_int(inv_scale[:, None] * scales), 0, 63)
        lm = np.clip(_nearest_int(inv_min[:, None] * mins), 0, 63)
        d16, d32 = _fp16_round((max_scale / _F32(63)).astype(_F32))
        m16, m32 = _fp16_round((max_min / _F32(63)).astype(_F32))
        dj = d32[:, None] * ls.astype(_F32)  # [nb, 8]
        dmj = m32[:, None] * lm.astype(_F32)
    requant(sub, dj.reshape(-1), dmj.reshape(-1), _F32(0), _F32(nmax), _F32(0), L)
    return {"d": d16, "dmin": m16, "sc": ls.astype(np.uint8), "m": lm.astype(np.uint8),
            "L": L.reshape(nb, QK_K).astype(np.uint8)}


def encode_q6k(x: np.ndarray) -> dict:
    """x [nb, 256] float32 -> {d (fp16 [nb]), sc (int8 [nb, 16]), L (uint8 [nb, 256], offset 32)}."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales = np.empty(nb * 16, _F32)
    L = np.empty((nb * 16, 16), _F32)
    search_qx(sub, 32, _qx_numerators(32), scales, L)
    scales = scales.reshape(nb, 16)
    rows = np.arange(nb)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[rows, idx]
    zero = np.abs(max_scale) < _F32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (_F32(-128) / np.where(zero, _F32(1), max_scale)).astype(_F32)
        d16, d32 = _fp16_round((_F32(1) / iscale).astype(_F32))
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
        dj = d32[:, None] * sc.astype(_F32)
    requant(sub, dj.reshape(-1), np.zeros(nb * 16, _F32), _F32(-32), _F32(31), _F32(32), L)
    L = L.reshape(nb, QK_K)
    # An all-zero super-block is written as zeros (d = 0, scales = 0, codes = 0).
    d16 = np.where(zero, np.float16(0), d16)
    sc = np.where(zero[:, None], np.int8(0), sc)
    L[zero] = 0
    return {"d": d16, "sc": sc, "L": L.astype(np.uint8)}


def encode(blocks: np.ndarray, qtype: str) -> dict:
    """float32 super-blocks [nb, 256] -> the K-quant codes of ``qtype`` (numpy arrays)."""
    x = np.ascontiguousarray(blocks, dtype=_F32)
    if qtype == "Q4_K":
        return encode_q45k(x, 15, -1.0, 20)
    if qtype == "Q5_K":
        return encode_q45k(x, 31, -0.5, 15)
    if qtype == "Q6_K":
        return encode_q6k(x)
    raise ValueError(f"not a K-quant type: {qtype!r}")
