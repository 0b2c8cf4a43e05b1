"""The torch K-quant packer writes the same bytes as the numpy implementation it replaced (the oracle,
itself checked against a scalar transcription of llama.cpp and ggml in test_gguf_quant.py)."""

import pathlib

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


def _trained_blocks(limit: int | None = None) -> torch.Tensor:
    """Every 2-D weight of the bundled trained zoo model, flattened into super-blocks (float32)."""
    tensors = [t.float().reshape(-1) for t in load_file(str(ZOO_WEIGHTS)).values() if t.dim() == 2]
    flat = torch.cat(tensors)
    flat = flat[: flat.numel() // 256 * 256].reshape(-1, 256)
    return flat[:limit] if limit else flat


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setenv("ATTNRES_KQUANT_COMPILE", "0")


@pytest.mark.parametrize("qtype", G.K_QUANTS)
def test_eager_torch_bytes_equal_numpy_reference(qtype, eager, one_thread):
    for blocks in (_random_blocks(96, seed=1), _trained_blocks(limit=768)):
        ours = K.quantize_blocks(blocks, qtype).numpy()
        ref = R.quantize_blocks(blocks.numpy(), qtype)
        assert ours.shape == ref.shape == (blocks.shape[0], G.type_size(qtype))
        assert np.array_equal(ours, ref), f"{int((ours != ref).any(1).sum())} blocks differ"
        deq = K.roundtrip_blocks(blocks, qtype).numpy()
        assert np.array_equal(deq.view(np.int32), R.roundtrip_blocks(blocks.numpy(), qtype).view(np.int32))


@pytest.mark.slow  # torch.compile of two kernels: ~1 min of CPU on a fresh inductor cache
def test_compiled_cpu_path_bytes_equal_numpy_reference(monkeypatch):
    """The path big tensors take on CPU: full chunks through torch.compile'd steps, the tail padded."""
    monkeypatch.setenv("ATTNRES_KQUANT_COMPILE", "1")
    monkeypatch.setattr(K, "CPU_CHUNK_BLOCKS", 1024)  # one compiled shape, smaller than the default
    trained = _trained_blocks()
    blocks = torch.cat([trained[:1024 + 200], _random_blocks(64, seed=2)])  # one full chunk + a padded tail
    for qtype in G.K_QUANTS:
        ours = K.quantize_blocks(blocks, qtype).numpy()
        ref = R.quantize_blocks(blocks.numpy(), qtype)
        assert np.array_equal(ours, ref), (qtype, int((ours != ref).any(1).sum()))
    assert not K._COMPILE_FAILED, K._COMPILE_FAILED
    assert K._COMPILED, "the compiled kernels were not used"


def test_quantize_packed_reads_back_through_gguf(eager):
    w = _random_blocks(12, seed=3).reshape(4, 768)
    for qtype in G.K_QUANTS:
        packed = G.quantize_packed(w, qtype)
        assert packed.shape == (4, 3 * G.type_size(qtype))
        by_gguf = G.dequantize_packed(packed, qtype)
        assert np.array_equal(G.gguf_roundtrip(w, qtype).numpy().view(np.int32), by_gguf.view(np.int32))


@pytest.mark.gpu
def test_cuda_packer_bytes_equal_cpu_reference():
    blocks = torch.cat([_random_blocks(512, seed=4), _trained_blocks(limit=4096)])
    for qtype in G.K_QUANTS:
        on_gpu = K.quantize_blocks(blocks.cuda(), qtype)
        assert on_gpu.device.type == "cuda"
        assert np.array_equal(on_gpu.cpu().numpy(), R.quantize_blocks(blocks.numpy(), qtype)), qtype
        w = blocks[:64].reshape(16, 1024).cuda().to(torch.bfloat16)
        rt = G.gguf_roundtrip(w, qtype)
        assert rt.device.type == "cuda" and torch.equal(rt.cpu(), G.gguf_roundtrip(w.cpu(), qtype))
