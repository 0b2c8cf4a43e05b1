"""The K-quant packer writes the same bytes as the numpy implementation it replaced (the oracle, itself
checked against a scalar transcription of llama.cpp and ggml in test_gguf_quant.py): on CPU through the
numba kernels (quant/kquant_cpu.py), and through the torch code that GPUs run (checked here on CPU)."""

import pathlib
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import attnres_quant
from attnres_quant.quant import gguf_quant as G
from attnres_quant.quant import kquant_reference as R
from attnres_quant.quant import kquant_torch as K

ZOO_WEIGHTS = pathlib.Path(attnres_quant.__file__).parent / "zoo" / "tiny-block" / "model.safetensors"


def _random_blocks(n_blocks: int, seed: int = 0) -> torch.Tensor:
    """Gaussian super-blocks plus the corner cases of the scale searches."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_blocks, 256, generator=g) * 0.02
    w[1, 100:104] = 0.9  # outliers
    w[2] = 0.0  # all-zero super-block
    w[3] = 0.013  # constant super-block
    w[4] = torch.linspace(-0.05, 0.07, 256)  # ramp: sub-blocks without negative values
    w[5, :32] = 0.0  # one all-zero sub-block
    w[6] *= 1e-6  # tiny scales (fp16 subnormal d)
    w[7] = w[7].abs()  # all positive (min 0)
    return w


def _edge_blocks(seed: int = 0) -> torch.Tensor:
    """Degenerate and tie-prone super-blocks: signs, magnitudes from subnormal to fp16/float32 overflow,
    values on coarse grids (exact halves for the round-half-to-even codes), heavy tails."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 256, generator=g)
    w[0] = -0.0  # negative zeros
    w[1] = -0.013  # constant negative
    w[2] = -w[2].abs()  # negative only
    w[3] *= 1e4  # huge
    w[4] *= 1e-30  # tiny
    w[5] *= 1e-38  # float32 subnormal
    w[6] = 1e-45  # smallest subnormal, constant
    w[7] *= 65504.0 * 63  # fp16 overflow of d
    w[8] *= 3e38  # near float32 max (max - min overflows)
    w[9] = torch.randint(-8, 8, (256,), generator=g).float()  # integers
    w[10] = torch.randint(0, 16, (256,), generator=g).float() * 0.5  # halves
    w[11, ::2] = 0.0  # sparse
    w[12, :16], w[12, 16:32] = 0.0, 5.0  # a flat sub-block next to a zero one
    w[13] = torch.linspace(-1.0, 0.0, 256)  # max exactly 0
    w[14] = torch.randint(-2, 3, (256,), generator=g).float() * 1e-3  # five levels
    w[15] = w[15].to(torch.bfloat16).float() * 0.02  # bf16 weights (what a model holds)
    w[16:20] = torch.randint(-31, 32, (4, 256), generator=g).float() * 0.01  # grids
    w[20:24] = torch.distributions.StudentT(2.0).sample((4, 256)) * 0.01  # heavy tails
    return w


def _trained_blocks(limit: int | None = None) -> torch.Tensor:
    """Every 2-D weight of the bundled trained zoo model, flattened into super-blocks (float32)."""
    tensors = [t.float().reshape(-1) for t in load_file(str(ZOO_WEIGHTS)).values() if t.dim() == 2]
    flat = torch.cat(tensors)
    flat = flat[: flat.numel() // 256 * 256].reshape(-1, 256)
    return flat[:limit] if limit else flat


def _reference(blocks: torch.Tensor, qtype: str, fn=R.quantize_blocks) -> np.ndarray:
    with warnings.catch_warnings():  # the oracle's int casts of NaN/inf in degenerate blocks
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(blocks.numpy(), qtype)


def _assert_same_bytes(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, what
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert bad.size == 0, f"{what}: {bad.size} blocks differ, first {bad[:8].tolist()}"


@pytest.mark.parametrize("qtype", G.K_QUANTS)
def test_cpu_packer_bytes_equal_numpy_reference(qtype, one_thread):
    """The numba path (what quantize_packed / gguf_roundtrip run on CPU): random tensors with the corner
    cases, a tensor whose sub-block count is not a multiple of the kernel's tile, and 1M trained weights."""
    cases = {"random": torch.cat([_random_blocks(101, seed=1), _edge_blocks(seed=2)]),
             "trained": _trained_blocks(limit=4096)}
    for what, blocks in cases.items():
        ours = K.quantize_blocks(blocks, qtype).numpy()
        assert ours.shape == (blocks.shape[0], G.type_size(qtype))
        _assert_same_bytes(ours, _reference(blocks, qtype), f"{qtype} {what}")
    deq = K.roundtrip_blocks(cases["random"], qtype).numpy()
    ref_deq = _reference(cases["random"], qtype, R.roundtrip_blocks)
    assert np.array_equal(deq.view(np.int32), ref_deq.view(np.int32))


@pytest.mark.parametrize("qtype", G.K_QUANTS)
def test_torch_path_bytes_equal_numpy_reference(qtype, one_thread):
    """The torch code GPUs run, here on CPU (eager; slow, so on fewer blocks)."""
    for what, blocks in {"random": torch.cat([_random_blocks(40, seed=3), _edge_blocks(seed=4)]),
                         "trained": _trained_blocks(limit=256)}.items():
        ours = K.pack(K.encode(blocks, qtype), qtype).numpy()
        _assert_same_bytes(ours, _reference(blocks, qtype), f"{qtype} torch {what}")


def test_chunked_and_threaded_packing_equal_one_call(monkeypatch, one_thread):
    blocks = _random_blocks(50, seed=5)
    whole = K.quantize_blocks(blocks, "Q4_K")
    monkeypatch.setattr(K, "CHUNK_BLOCKS", 16)  # 4 chunks, the last one partial
    assert torch.equal(K.quantize_blocks(blocks, "Q4_K"), whole)
    monkeypatch.setattr(K, "MIN_BLOCKS_PER_THREAD", 8)
    torch.set_num_threads(3)  # 3 threads over chunks of 16, 16, 16 and 2 (restored by one_thread)
    assert K._cpu_workers(50) == 3
    assert torch.equal(K.quantize_blocks(blocks, "Q4_K"), whole)
    assert torch.equal(K.roundtrip_blocks(blocks, "Q6_K").view(torch.int32),
                       torch.from_numpy(R.roundtrip_blocks(blocks.numpy(), "Q6_K")).view(torch.int32))


def test_quantize_packed_reads_back_through_gguf():
    w = _random_blocks(12, seed=3).reshape(4, 768)
    for qtype in G.K_QUANTS:
        packed = G.quantize_packed(w, qtype)
        assert packed.shape == (4, 3 * G.type_size(qtype))
        by_gguf = G.dequantize_packed(packed, qtype)
        assert np.array_equal(G.gguf_roundtrip(w, qtype).numpy().view(np.int32), by_gguf.view(np.int32))


@pytest.mark.gpu
def test_cuda_packer_bytes_equal_cpu_reference():
    blocks = torch.cat([_random_blocks(512, seed=4), _edge_blocks(seed=6), _trained_blocks(limit=4096)])
    for qtype in G.K_QUANTS:
        on_gpu = K.quantize_blocks(blocks.cuda(), qtype)
        assert on_gpu.device.type == "cuda"
        _assert_same_bytes(on_gpu.cpu().numpy(), _reference(blocks, qtype), f"{qtype} cuda")
        w = blocks[:64].reshape(16, 1024).cuda().to(torch.bfloat16)
        rt = G.gguf_roundtrip(w, qtype)
        assert rt.device.type == "cuda" and torch.equal(rt.cpu(), G.gguf_roundtrip(w.cpu(), qtype))
