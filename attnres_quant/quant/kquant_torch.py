"""llama.cpp's reference K-quant rounding (Q4_K, Q5_K, Q6_K) in torch, batched over super-blocks.

The same algorithm as ``quantize_row_q{4,5,6}_K_ref`` (see :mod:`.gguf_quant` for the description),
written so that every float32 operation is the one the C reference performs, in the same order:

* sums over a sub-block are accumulated left to right, one element at a time (``_seqsum``) --
  ``torch.sum``/``cumsum`` use other orders or a double accumulator and can flip near-tie decisions;
* divisions are tensor-by-tensor (torch turns ``scalar / tensor`` and, on CUDA, ``tensor / python
  scalar`` into a multiplication by a reciprocal, which rounds differently);
* no fused multiply-add: each product and sum is its own (IEEE-rounded) op.

The torch code runs the rounding on GPUs (every op is one kernel over all sub-blocks of a chunk); on CPU,
where eager torch runs one memory pass per op and is slower than numpy, :func:`quantize_blocks` and
:func:`roundtrip_blocks` take the codes from the numba kernels of :mod:`.kquant_cpu` (same algorithm,
fused and SIMD across sub-blocks, ~45x the numpy oracle). Both paths equal the numpy implementation kept
as the test oracle (:mod:`.kquant_reference`) byte for byte; both pack with the oracle's byte layout (:func:`pack`).

Sub-block data is laid out ``[k, n]`` (element index first, one column per sub-block) so each step of
a sequential sum is one contiguous vector op over all sub-blocks at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

QK_K = 256
_F32 = torch.float32


def _const(v: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant as a 1-element tensor on ``like``'s device (a true tensor division operand)."""
    import numpy as np

    return torch.tensor([float(np.float32(v))], dtype=_F32, device=like.device)


def _seqsum(a: torch.Tensor) -> torch.Tensor:
    """Column sums of ``a`` [k, n] accumulated from row 0 to row k-1 in float32 (the C loops' order)."""
    acc = a[0]
    for i in range(1, a.shape[0]):
        acc = acc + a[i]
    return acc


CHUNK_BLOCKS = 1 << 16  # 16M weights per call: bounds the temporaries (float32 codes) on either device
MIN_BLOCKS_PER_THREAD = 1024  # 256K weights: below that a CPU tensor is packed on one thread


def _round_clamp(v: torch.Tensor, lo, hi) -> torch.Tensor:
    """llama.cpp's nearest_int (round half to even) clamped to [lo, hi], kept as float32 codes. NaN and
    values >= 2^31 give ``lo``, as in the oracle, whose int32 cast turns them into INT_MIN before clipping
    (reached only by degenerate blocks: subnormal or fp16-overflowing scales)."""
    r = torch.round(v)
    r = torch.where(r < 2147483648.0, r, torch.as_tensor(lo, dtype=r.dtype, device=r.device))
    return torch.clamp(r, lo, hi)


# ------------------------------------------------------------------------ scale searches
def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (torch's CPU float32 sqrt is not: SLEEF, up to 0.5001 ulp);
    the float64 root of a float32 rounds to the same float32 as an exact root."""
    return torch.sqrt(v.double()).float()


def _qkx2_step(x, w, mx, mn, flat, sum_w, sum_x, cand, L, best, scale, nmax: torch.Tensor):
    """One candidate inverse scale of make_qkx2_quants for every column (sub-block) at once."""
    zero = torch.zeros_like(cand)
    one = torch.ones_like(cand)
    rng = torch.where(flat, one, mx - mn)  # mn moves with better candidates
    isc = cand / rng
    La = _round_clamp(isc * (x - mn), zero, nmax)
    wl = w * La
    sum_l = _seqsum(wl)
    sum_l2 = _seqsum(wl * La)
    sum_xl = _seqsum(wl * x)
    D = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    pos = this_min > 0
    this_min = torch.where(pos, zero, this_min)
    this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
    diff = this_scale * La + this_min - x
    cur = _seqsum(w * (diff * diff))
    better = (D > 0) & (cur < best) & ~flat
    return (torch.where(better, La, L), torch.where(better, cur, best), torch.where(better, this_scale, scale),
            torch.where(better, this_min, mn))


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad = false) over the columns of ``x`` [32, n] with weights ``w``.

    Returns (scale [n], the_min [n] (>= 0, subtracted), codes [32, n] float32 in 0..nmax)."""
    import numpy as np

    one, zero = _const(1.0, x), _const(0.0, x)
    mn = torch.minimum(x.amin(0), zero)
    mx = x.amax(0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    rng = torch.where(flat, one, mx - mn)
    iscale = _const(nmax, x) / rng
    scale = one / iscale
    L = _round_clamp(iscale * (x - mn), 0, nmax)
    diff = scale * L + mn - x
    best = _seqsum(w * (diff * diff))
    for i in range(nstep + 1):
        cand = _const(np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax), x)
        L, best, scale, mn = _qkx2_step(x, w, mx, mn, flat, sum_w, sum_x, cand, L, best, scale, _const(nmax, x))
    scale = torch.where(flat, zero, scale)
    L = torch.where(flat, zero, L)
    return scale, -mn, L


def _qx_step(x, w, wx, safe, is_zero, num, L, best, scale, lo: torch.Tensor, hi: torch.Tensor):
    """One candidate inverse scale of make_qx_quants (rmse_type 1) for every column at once."""
    isc = num / safe
    lq = _round_clamp(isc * x, lo, hi)
    slx = _seqsum(wx * lq)
    sl2 = _seqsum(w * lq * lq)
    better = (sl2 > 0) & (slx * slx > best * sl2) & ~is_zero
    new_scale = slx / sl2
    return (torch.where(better, lq, L), torch.where(better, new_scale * slx, best),
            torch.where(better, new_scale, scale))


def _make_qx_rmse1(x: torch.Tensor, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over the columns of ``x`` [16, n].

    Returns (signed scale [n], codes [16, n] float32 in 0..2*nmax-1 (offset nmax))."""
    import numpy as np

    one, zero = _const(1.0, x), _const(0.0, x)
    cols = torch.arange(x.shape[1], device=x.device)
    idx = x.abs().argmax(0)  # first row of the largest |x| (C's strict '>')
    mxv = x[idx, cols]
    is_zero = mxv.abs() < _const(1e-15, x)
    safe = torch.where(is_zero, one, mxv)
    w = x * x
    wx = w * x
    iscale = _const(-nmax, x) / safe
    lq = _round_clamp(iscale * x, -nmax, nmax - 1)
    sumlx = _seqsum(wx * lq)
    suml2 = _seqsum(w * lq * lq)
    scale = torch.where(suml2 != 0, sumlx / suml2, zero)
    best = scale * sumlx
    L = lq
    for i in range(-9, 10):
        if i == 0:
            continue
        num = _const(-(np.float32(nmax) + np.float32(0.1) * np.float32(i)), x)
        L, best, scale = _qx_step(x, w, wx, safe, is_zero, num, L, best, scale, _const(-nmax, x), _const(nmax - 1, x))
    scale = torch.where(is_zero, zero, scale)
    L = torch.where(is_zero, zero, L + _const(nmax, x))
    return scale, L


# ---------------------------------------------------------------------------- encoders
def _encode_q45k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> dict:
    """x [nb, 256] -> {d, dmin (fp16 [nb]), sc, m (uint8 [nb, 8]), L (uint8 [nb, 256])}."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32).t().contiguous()  # [32, nb*8]
    av_x = _sqrt(_seqsum(sub * sub) / _const(32.0, x))
    weights = av_x + sub.abs()
    scales, mins, L = _make_qkx2(sub, weights, nmax, rmin, 0.1, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    zero = _const(0.0, x)
    max_scale = torch.maximum(scales.amax(1), zero)
    max_min = torch.maximum(mins.amax(1), zero)
    c63 = _const(63.0, x)
    inv_scale = torch.where(max_scale > 0, c63 / max_scale, zero)
    inv_min = torch.where(max_min > 0, c63 / max_min, zero)
    ls = _round_clamp(inv_scale[:, None] * scales, 0, 63)
    lm = _round_clamp(inv_min[:, None] * mins, 0, 63)
    d16 = (max_scale / c63).to(torch.float16)
    m16 = (max_min / c63).to(torch.float16)
    dj = d16.float()[:, None] * ls  # [nb, 8]
    dmj = m16.float()[:, None] * lm
    req = _round_clamp((x.reshape(nb, 8, 32) + dmj[..., None]) / dj[..., None], 0, nmax)
    L = L.t().reshape(nb, 8, 32)
    L = torch.where((dj != 0)[..., None], req, L)  # llama.cpp keeps the search codes where d == 0
    return {"d": d16, "dmin": m16, "sc": ls.to(torch.uint8), "m": lm.to(torch.uint8),
            "L": L.reshape(nb, QK_K).to(torch.uint8)}


def _encode_q6k(x: torch.Tensor) -> dict:
    """x [nb, 256] -> {d (fp16 [nb]), sc (int8 [nb, 16]), L (uint8 [nb, 256], offset 32)}."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16).t().contiguous()  # [16, nb*16]
    scales, L = _make_qx_rmse1(sub, 32)
    scales = scales.reshape(nb, 16)
    rows = torch.arange(nb, device=x.device)
    idx = scales.abs().argmax(1)
    max_scale = scales[rows, idx]
    is_zero = max_scale.abs() < _const(1e-15, x)
    one, zero = _const(1.0, x), _const(0.0, x)
    iscale = _const(-128.0, x) / torch.where(is_zero, one, max_scale)
    d16 = (one / iscale).to(torch.float16)
    sc = torch.round(iscale[:, None] * scales).clamp_(max=127)
    dj = d16.float()[:, None] * sc
    req = _round_clamp(x.reshape(nb, 16, 16) / dj[..., None], -32, 31) + _const(32.0, x)
    L = L.t().reshape(nb, 16, 16)
    L = torch.where((dj != 0)[..., None], req, L)
    # An all-zero super-block is written as zeros (d = 0, scales = 0, codes = 0).
    d16 = torch.where(is_zero, torch.zeros_like(d16), d16)
    sc = torch.where(is_zero[:, None], zero, sc)
    L = torch.where(is_zero[:, None, None], zero, L)
    return {"d": d16, "sc": sc.to(torch.int8), "L": L.reshape(nb, QK_K).to(torch.uint8)}


def encode(blocks: torch.Tensor, qtype: str) -> dict:
    """float32 super-blocks [nb, 256] -> the K-quant codes of ``qtype`` (tensors on ``blocks``' device)."""
    if qtype == "Q4_K":
        return _encode_q45k(blocks, 15, -1.0, 20)
    if qtype == "Q5_K":
        return _encode_q45k(blocks, 31, -0.5, 15)
    if qtype == "Q6_K":
        return _encode_q6k(blocks)
    raise ValueError(f"not a K-quant type: {qtype!r}")


# ------------------------------------------------------------------ dequantize and pack (shared layout)
def dequantize(codes: dict, qtype: str) -> torch.Tensor:
    """Our codes -> float32 [nb, 256] with llama.cpp's (and gguf's) dequantization formulas."""
    L = codes["L"]
    nb = L.shape[0]
    if qtype == "Q6_K":
        d = codes["d"].float()[:, None] * codes["sc"].float()  # [nb, 16]
        q = (L.to(torch.int16) - 32).float().reshape(nb, 16, 16)
        return (d[..., None] * q).reshape(nb, QK_K)
    d = codes["d"].float()[:, None] * codes["sc"].float()  # [nb, 8]
    dm = codes["dmin"].float()[:, None] * codes["m"].float()
    q = L.float().reshape(nb, 8, 32)
    return (d[..., None] * q - dm[..., None]).reshape(nb, QK_K)


def pack(codes: dict, qtype: str) -> torch.Tensor:
    """Codes -> GGUF blocks [nb, type_size] uint8 (Q4_K 144, Q5_K 176, Q6_K 210 bytes), on the codes' device.

    The byte layout is :mod:`.kquant_reference`'s (checked against the ``gguf`` package's dequantizer):
    packing is a cheap reshuffle of bytes that end up on the host in a GGUF file anyway, so one layout
    serves both encoders (on CPU the numpy views cost no copy)."""
    from .kquant_reference import _kq_pack

    device = codes["L"].device
    packed = _kq_pack({k: v.cpu().numpy() for k, v in codes.items()}, qtype)
    return torch.from_numpy(packed).to(device)


# ------------------------------------------------------------------------------ entry points
def _encode_on_device(blocks: torch.Tensor, qtype: str) -> dict:
    """The codes of ``blocks``: on CPU from the numba kernels of :mod:`.kquant_cpu` (eager torch would be
    slower than numpy there: one memory pass per op), elsewhere from the torch code above (one parallel
    kernel per op). Both equal the numpy oracle byte for byte (tests)."""
    if blocks.device.type != "cpu":
        return encode(blocks, qtype)
    from . import kquant_cpu  # numba: imported on first CPU use only

    codes = kquant_cpu.encode(blocks.detach().numpy(), qtype)
    return {k: torch.from_numpy(v) for k, v in codes.items()}


def _cpu_workers(n_blocks: int) -> int:
    """Threads for a CPU tensor: torch's thread count, at most one per MIN_BLOCKS_PER_THREAD super-blocks
    (the numba kernels release the GIL; each chunk's result is independent of the split)."""
    return max(1, min(torch.get_num_threads(), n_blocks // MIN_BLOCKS_PER_THREAD))


def _map_chunks(blocks: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` ([n, 256] -> [n, ...]) to ``blocks`` in chunks of at most CHUNK_BLOCKS (bounded
    temporaries), on several threads for a big CPU tensor."""
    n = blocks.shape[0]
    workers = _cpu_workers(n) if blocks.device.type == "cpu" else 1
    step = min(CHUNK_BLOCKS, -(-n // workers))
    starts = range(0, n, step)
    if workers == 1:
        outs = [fn(blocks[s:s + step]) for s in starts]
    else:
        def run(s: int) -> torch.Tensor:
            with torch.no_grad():  # grad mode is per thread
                return fn(blocks[s:s + step])
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outs = list(pool.map(run, starts))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@torch.no_grad()
def quantize_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """float32 super-blocks [nb, 256] -> GGUF blocks [nb, type_size] uint8, on ``blocks``' device."""
    return _map_chunks(blocks, lambda b: pack(_encode_on_device(b, qtype), qtype))


@torch.no_grad()
def roundtrip_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """float32 super-blocks [nb, 256] -> the float32 values llama.cpp dequantizes them to."""
    return _map_chunks(blocks, lambda b: dequantize(_encode_on_device(b, qtype), qtype))
