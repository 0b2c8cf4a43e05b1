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
  i.e. the path ``llama-quantize`` takes without an importance matrix), in float32, batched over
  all super-blocks on the weight's device (:mod:`.kquant_torch`: numba SIMD kernels on CPU,
  :mod:`.kquant_cpu`; torch on a GPU); the earlier numpy implementation is kept as the test oracle
  (:mod:`.kquant_reference`) and all write the same bytes:

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

from . import kquant_torch

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
QK_K = 256

# llama-quantize's substitution for a tensor whose rows do not fit the type's blocks
# (llama.cpp src/llama-quant.cpp, "using fallback quantization"); F16 if that fails too.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

_F32 = np.float32


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


def _kquant_blocks(weight, shape: tuple[int, ...], device) -> torch.Tensor:
    """``weight`` as float32 super-blocks [nb, 256] on ``device`` (default: the weight's own device)."""
    t = weight.detach() if isinstance(weight, torch.Tensor) else torch.from_numpy(np.asarray(weight, dtype=_F32))
    dev = torch.device(device) if device is not None else t.device
    return t.to(device=dev, dtype=torch.float32).reshape(-1, QK_K)


# --------------------------------------------------------------------------- public
def quantize_packed(weight, qtype: str, *, device=None) -> np.ndarray:
    """Quantize ``weight`` (torch tensor or array; rows along the last dimension) into GGUF
    blocks. Returns uint8 ``[*shape[:-1], shape[-1] // block_size * type_size]`` -- the bytes
    a GGUF file holds for this tensor. ``gguf.quants.dequantize(out, GGMLQuantizationType[qtype])``
    reads it back. K-quants run in torch on ``device`` (default: the weight's device, so a
    CUDA weight is packed on its GPU); legacy types in the ``gguf`` package's numpy code."""
    q = _qtype(qtype).name
    if q in LEGACY_TYPES:
        rows, shape = _as_rows(weight)
        check_shape(shape, q)
        return gguf_quants.quantize(rows, GGMLQuantizationType[q]).reshape(*shape[:-1], -1)
    shape = _shape_of(weight)
    check_shape(shape, q)
    packed = kquant_torch.quantize_blocks(_kquant_blocks(weight, shape, device), q)
    return packed.cpu().numpy().reshape(*shape[:-1], -1)


def dequantize_packed(packed: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF blocks -> float32 weights, through the ``gguf`` package's dequantizer."""
    return gguf_quants.dequantize(np.asarray(packed, dtype=np.uint8), _qtype(qtype))


def _shape_of(weight) -> tuple[int, ...]:
    shape = tuple(int(s) for s in (weight.shape if hasattr(weight, "shape") else np.shape(weight)))
    if len(shape) == 0:
        raise ValueError("GGUF quantization needs a tensor with at least one dimension")
    return shape


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
    if q in LEGACY_TYPES:
        rows, shape = _as_rows(weight)
        check_shape(shape, q)
        qt = GGMLQuantizationType[q]
        deq = torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(gguf_quants.quantize(rows, qt), qt)))
    else:
        shape = _shape_of(weight)
        check_shape(shape, q)
        deq = kquant_torch.roundtrip_blocks(_kquant_blocks(weight, shape, None), q)
    out = deq.reshape(shape)
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
