"""GGUF quant types: bit-exactness against the gguf package, K-quant packing, sizes, errors."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from attnres_quant.quant import gguf_quant as G

F32 = np.float32


def _gauss(rows, cols, seed=0, std=0.02):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, cols)).astype(F32) * F32(std))


def _bits_equal(a, b) -> bool:
    a = np.ascontiguousarray(np.asarray(a, dtype=F32))
    b = np.ascontiguousarray(np.asarray(b, dtype=F32))
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


def test_bits_per_weight_match_llama_cpp():
    expected = {"Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0,
                "Q5_0": 5.5, "Q5_1": 6.0}
    assert set(expected) == set(G.GGUF_TYPES)
    for q, bpw in expected.items():
        assert G.bits_per_weight(q) == bpw
    assert G.block_size("Q4_K") == 256 and G.type_size("Q4_K") == 144
    assert G.type_size("Q5_K") == 176 and G.type_size("Q6_K") == 210


@pytest.mark.parametrize("qtype", G.LEGACY_TYPES)
def test_legacy_types_equal_gguf_package_bit_exact(qtype):
    w = _gauss(48, 320, seed=1)
    w[3, :7] *= 40  # an outlier row segment
    ref = gq.dequantize(gq.quantize(w.numpy(), GGMLQuantizationType[qtype]), GGMLQuantizationType[qtype])
    out = G.gguf_roundtrip(w, qtype)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert _bits_equal(out.numpy(), ref)
    packed = G.quantize_packed(w, qtype)
    assert np.array_equal(packed, gq.quantize(w.numpy(), GGMLQuantizationType[qtype]))
    assert packed.nbytes == G.packed_nbytes(w.shape, qtype) == w.numel() * G.bits_per_weight(qtype) / 8


@pytest.mark.parametrize("qtype", G.K_QUANTS)
def test_kquant_blocks_read_back_by_gguf_bit_exact(qtype):
    w = _gauss(40, 768, seed=2)
    w[5, 100:104] = 0.9  # outliers
    w[7, :256] = 0.0  # an all-zero super-block
    w[8, 256:512] = 0.013  # a constant super-block
    w[9, :] = torch.linspace(-0.05, 0.07, 768)  # a ramp (sub-blocks without negative values)
    packed = G.quantize_packed(w, qtype)
    assert packed.dtype == np.uint8
    n = w.numel()
    assert packed.nbytes == G.bits_per_weight(qtype) * n / 8 == G.packed_nbytes(w.shape, qtype)
    assert packed.shape == (40, 768 // 256 * G.type_size(qtype))
    by_gguf = G.dequantize_packed(packed, qtype)  # the gguf package's own dequantizer
    ours = G.gguf_roundtrip(w, qtype)
    assert _bits_equal(ours.numpy(), by_gguf)
    assert torch.equal(ours[7, :256], torch.zeros(256))
    assert (ours - w).abs().max() < 0.05


def test_kquants_beat_legacy_types_at_similar_bits():
    w = _gauss(128, 1024, seed=3)
    err = {q: G.roundtrip_error(w, q)["rel_mse"] for q in G.GGUF_TYPES}
    # Measured relative MSE (seed 3): Q4_0 7.4e-3, Q4_1 6.1e-3, Q4_K 5.1e-3, Q5_0 1.8e-3, Q5_1 1.4e-3,
    # Q5_K 1.3e-3, Q6_K 3.1e-4, Q8_0 2.9e-5.
    assert err["Q4_K"] < err["Q4_0"] and err["Q4_K"] < err["Q4_1"]  # 4.5 bpw vs 4.5 / 5.0
    assert err["Q5_K"] < err["Q5_0"] and err["Q5_K"] < err["Q5_1"]  # 5.5 bpw vs 5.5 / 6.0
    assert err["Q8_0"] < err["Q6_K"] < err["Q5_K"] < err["Q4_K"]


def test_dtype_shape_and_row_checks():
    w = _gauss(4, 512, seed=4).to(torch.bfloat16)
    out = G.gguf_roundtrip(w, "Q4_K")
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert torch.equal(out, G.gguf_roundtrip(w.float(), "Q4_K").to(torch.bfloat16))
    v = _gauss(1, 256, seed=5)[0]  # 1-D tensors are one row
    assert G.gguf_roundtrip(v, "Q6_K").shape == (256,)
    with pytest.raises(ValueError, match=r"block size 256.*\(64, 96\)"):
        G.gguf_roundtrip(_gauss(64, 96), "Q4_K")
    with pytest.raises(ValueError, match="block size 32"):
        G.quantize_packed(_gauss(3, 48), "Q8_0")
    with pytest.raises(ValueError, match="unknown GGUF quant type"):
        G.bits_per_weight("Q3_K_M")
    assert G.fallback_type("Q4_K", 64) == "Q5_0" and G.fallback_type("Q5_K", 96) == "Q5_1"
    assert G.fallback_type("Q6_K", 128) == "Q8_0" and G.fallback_type("Q4_K", 512) == "Q4_K"
    assert G.fallback_type("Q4_K", 40) == "F16"
    assert not G.is_compatible((64, 64), "Q4_K") and G.is_compatible((64, 64), "Q4_0")


# ----------------------------------------------------------------------------------------
# A plain scalar transcription of llama.cpp's reference K-quant rounding (sequential float32
# loops, as in quantize_row_q{4,5,6}_K_ref), used to check the vectorised implementation.

def _ni(v):
    return int(np.rint(F32(v)))


def _qkx2_scalar(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = F32(sum_w * x[0])
    for i in range(1, n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
        sum_w = F32(sum_w + w[i])
        sum_x = F32(sum_x + F32(w[i] * x[i]))
    mn = min(mn, F32(0))
    if mx == mn:
        return F32(0), F32(-mn), [0] * n
    iscale = F32(F32(nmax) / F32(mx - mn))
    scale = F32(F32(1) / iscale)
    L = [max(0, min(nmax, _ni(F32(iscale * F32(x[i] - mn))))) for i in range(n)]
    best = F32(0)
    for i in range(n):
        d = F32(F32(F32(scale * L[i]) + mn) - x[i])
        best = F32(best + F32(w[i] * F32(d * d)))
    for s in range(nstep + 1):
        iscale = F32(F32(F32(rmin) + F32(F32(rdelta) * s) + F32(nmax)) / F32(mx - mn))
        La = [max(0, min(nmax, _ni(F32(iscale * F32(x[i] - mn))))) for i in range(n)]
        sl = sl2 = sxl = F32(0)
        for i in range(n):
            sl = F32(sl + F32(w[i] * La[i]))
            sl2 = F32(sl2 + F32(F32(w[i] * La[i]) * La[i]))
            sxl = F32(sxl + F32(F32(w[i] * La[i]) * x[i]))
        D = F32(F32(sum_w * sl2) - F32(sl * sl))
        if D > 0:
            ts = F32(F32(F32(sum_w * sxl) - F32(sum_x * sl)) / D)
            tm = F32(F32(F32(sl2 * sum_x) - F32(sl * sxl)) / D)
            if tm > 0:
                tm = F32(0)
                ts = F32(sxl / sl2)
            cur = F32(0)
            for i in range(n):
                d = F32(F32(F32(ts * La[i]) + tm) - x[i])
                cur = F32(cur + F32(w[i] * F32(d * d)))
            if cur < best:
                L, best, scale, mn = La, cur, ts, tm
    return scale, F32(-mn), L


def _q45k_scalar(x, nmax, rmin, nstep):
    """One 256-weight super-block -> dequantized values (Q4_K: nmax 15, Q5_K: nmax 31)."""
    scales, mins = [], []
    for j in range(8):
        sub = [F32(v) for v in x[32 * j:32 * j + 32]]
        sx2 = F32(0)
        for v in sub:
            sx2 = F32(sx2 + F32(v * v))
        av = F32(np.sqrt(F32(sx2 / F32(32))))
        w = [F32(av + abs(v)) for v in sub]
        s, m, _ = _qkx2_scalar(sub, w, nmax, rmin, 0.1, nstep)
        scales.append(s)
        mins.append(m)
    ms = max([F32(0)] + scales)
    mm = max([F32(0)] + mins)
    isc = F32(63) / ms if ms > 0 else F32(0)
    imn = F32(63) / mm if mm > 0 else F32(0)
    ls = [min(63, _ni(F32(isc * s))) for s in scales]
    lm = [min(63, _ni(F32(imn * m))) for m in mins]
    d = F32(np.float16(F32(ms / F32(63))))
    dmin = F32(np.float16(F32(mm / F32(63))))
    out = []
    for j in range(8):
        dj = F32(d * ls[j])
        dm = F32(dmin * lm[j])
        for v in x[32 * j:32 * j + 32]:
            q = max(0, min(nmax, _ni(F32(F32(F32(v) + dm) / dj)))) if dj != 0 else None
            out.append(F32(F32(dj * q) - dm) if q is not None else None)
    return out


@pytest.mark.parametrize("qtype,nmax,rmin,nstep", [("Q4_K", 15, -1.0, 20), ("Q5_K", 31, -0.5, 15)])
def test_vectorised_kquant_matches_scalar_reference(qtype, nmax, rmin, nstep):
    w = _gauss(2, 512, seed=6)
    ours = G.gguf_roundtrip(w, qtype).numpy().reshape(-1, 256)
    blocks = w.numpy().reshape(-1, 256)
    n_diff = n_total = 0
    for b in range(blocks.shape[0]):
        ref = _q45k_scalar(blocks[b], nmax, rmin, nstep)
        for i, r in enumerate(ref):
            if r is None:
                continue
            n_total += 1
            n_diff += int(r != ours[b, i])
    assert n_total == 512 * 2 and n_diff == 0, (n_diff, n_total)


def _qx_scalar(x, nmax):
    """llama.cpp make_qx_quants(n, nmax, x, L, rmse_type=1, NULL), scalar."""
    amax, mxv = F32(0), F32(0)
    for v in x:
        if abs(v) > amax:
            amax, mxv = abs(v), v
    if amax < F32(1e-15):
        return F32(0), [0] * len(x)
    w = [F32(v * v) for v in x]

    def trial(iscale):
        ls = [max(-nmax, min(nmax - 1, _ni(F32(iscale * v)))) for v in x]
        slx = sl2 = F32(0)
        for wi, v, li in zip(w, x, ls):
            slx = F32(slx + F32(F32(wi * v) * li))
            sl2 = F32(sl2 + F32(F32(wi * li) * li))
        return ls, slx, sl2

    L, slx, sl2 = trial(F32(F32(-nmax) / mxv))
    scale = F32(slx / sl2) if sl2 != 0 else F32(0)
    best = F32(scale * slx)
    for s in range(-9, 10):
        if s == 0:
            continue
        ls, slx, sl2 = trial(F32(-F32(F32(nmax) + F32(F32(0.1) * s)) / mxv))
        if sl2 > 0 and F32(slx * slx) > F32(best * sl2):
            L, scale = ls, F32(slx / sl2)
            best = F32(scale * slx)
    return scale, [li + nmax for li in L]


def _q6k_scalar(x):
    scales = [_qx_scalar([F32(v) for v in x[16 * j:16 * j + 16]], 32)[0] for j in range(16)]
    max_abs, max_scale = F32(0), F32(0)
    for s in scales:
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    iscale = F32(F32(-128) / max_scale)
    d = F32(np.float16(F32(F32(1) / iscale)))
    out = []
    for j in range(16):
        sc = min(127, _ni(F32(iscale * scales[j])))
        dj = F32(d * sc)
        for v in x[16 * j:16 * j + 16]:
            q = max(-32, min(31, _ni(F32(F32(v) / dj))))
            out.append(F32(dj * q))
    return out


def test_vectorised_q6k_matches_scalar_reference():
    w = _gauss(2, 512, seed=7)
    ours = G.gguf_roundtrip(w, "Q6_K").numpy().reshape(-1, 256)
    blocks = w.numpy().reshape(-1, 256)
    for b in range(blocks.shape[0]):
        assert _bits_equal(np.array(_q6k_scalar(blocks[b]), dtype=F32), ours[b])


def test_llama_cpp_presets_and_apply_gguf():
    assert [i for i in range(8) if G.use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert G.preset_rules("Q4_K_M", 8) == [
        {"select": "attn.v", "layers": [0, 3, 6, 7], "weight": "Q6_K"},
        {"select": "mlp.down", "layers": [0, 3, 6, 7], "weight": "Q6_K"},
        {"select": "lm_head", "weight": "Q6_K"},
        {"select": "embed", "weight": "Q4_K"}]
    assert G.preset_rules("Q4_K_M", 8, tied_embeddings=True)[-1] == {"select": "embed", "weight": "Q6_K"}
    assert G.preset_type("Q4_K_M", "attn.q", 3, 8) == "Q4_K"
    assert G.preset_type("Q4_K_M", "norm", 0, 8) is None
    # llama.cpp quantizes only tensors with ggml_n_dims >= 2: a [1, d] pseudo-query has ne = [d, 1]
    assert G.preset_type("Q4_K_M", "depth.query", 0, 8) is None
    assert G.preset_type("Q4_K_M", "other", None, 8, shape=(1, 256)) is None
    assert [G.ggml_n_dims(s) for s in ((1, 256), (256,), (256, 1), (64, 256), (1, 1))] == [1, 1, 2, 2, 1]
    assert G.preset_type("Q4_K_M", "embed", None, 8) == "Q4_K"
    assert G.preset_type("Q4_K_M", "attn.q", 0, 8, row_len=64) == "Q5_0"  # llama.cpp fallback
    assert G.preset_type("Q8_0", "lm_head", None, 8) == "Q8_0"
    assert G.preset_type("Q4_0", "lm_head", None, 8, row_len=96) == "Q8_0"

    lin = torch.nn.Sequential(torch.nn.Linear(512, 4, bias=False), torch.nn.Linear(64, 4, bias=False))
    w0 = lin[0].weight.detach().clone()
    rep = G.apply_gguf(lin, {"0": "Q4_K", "1": "Q4_K"})
    assert rep["0"] == {"requested": "Q4_K", "type": "Q4_K", "fallback": False, "bytes": 4 * 2 * 144,
                        "bits_per_weight": 4.5}
    assert rep["1"]["type"] == "Q5_0" and rep["1"]["fallback"] and rep["1"]["bytes"] == 4 * 2 * 22
    assert torch.equal(lin[0].weight, G.gguf_roundtrip(w0, "Q4_K"))
    with pytest.raises(ValueError, match="block size 256"):
        G.apply_gguf(lin, {"1": "Q6_K"}, fallback=False)
