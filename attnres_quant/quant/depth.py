"""Depth-path (and KV-cache) precision through the model's hooks -- the model is never edited.

* ``depth.softmax`` compute: fp32 (default) / bf16 / fp16 set ``DepthMixer.softmax_dtype``;
  fp8 sets an elementwise ``logit_quantizer`` (cast to float8_e4m3fn and back, so the
  two-phase path stays usable); int8 sets a per-token symmetric int8 quantizer over the
  logits of all sources of a token (not elementwise: the model then takes the naive path).
* ``depth.sources`` storage: bf16 / fp8 / int8 / int4 set ``DepthMixer.source_quantizer``
  (per-token scales; bf16 is a cast when the model runs in fp32, a no-op in bf16).
* ``attn.kv_cache`` storage: ``kv_cache.make_kv_quantizer`` on ``Attention.kv_quantizer`` (bf16 / fp8 / int8 /
  int4; one scale per token and KV head by default, per KV head with option ``kv_granularity: per_head``).
"""

from __future__ import annotations

import torch

from .rtn import EPS, QRANGE, fake_quantize_fp8, fake_quantize_per_token

_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FP8LogitQuantizer:
    """Elementwise simulated fp8 (e4m3fn) logits: saturating cast and back to fp32."""

    elementwise = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return fake_quantize_fp8(logits, per_token=False)

    def __repr__(self) -> str:
        return "FP8LogitQuantizer(e4m3fn)"


class Int8LogitQuantizer:
    """Symmetric int8 logits, one scale per token over its sources (dim 0 of [n, B, T])."""

    elementwise = False

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        qmin, qmax = QRANGE["int8"]
        lf = logits.float()
        if lf.dim() == 3:
            amax = lf.abs().amax(0, keepdim=True)
        else:  # a single logit per token: its own scale
            amax = lf.abs()
        scale = (amax / (float(qmax - qmin) / 2)).clamp(min=EPS)
        return torch.clamp(torch.round(lf * (1.0 / scale)), qmin, qmax) * scale

    def __repr__(self) -> str:
        return "Int8LogitQuantizer(per-token)"


class StorageQuantizer:
    """Simulated storage of a tensor [..., D]: float cast or per-token int8/int4/fp8."""

    def __init__(self, precision: str):
        self.precision = precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.precision
        if p in _FLOAT:
            return x.to(_FLOAT[p]).to(x.dtype)
        if p == "fp8":
            return fake_quantize_fp8(x, per_token=True)
        return fake_quantize_per_token(x, p)

    def __repr__(self) -> str:
        return f"StorageQuantizer({self.precision})"


def set_softmax(mixer, compute: str | None) -> None:
    compute = compute or "fp32"
    mixer.logit_quantizer = None
    mixer.softmax_dtype = torch.float32
    if compute in _FLOAT:
        mixer.softmax_dtype = _FLOAT[compute]
    elif compute == "fp8":
        mixer.logit_quantizer = FP8LogitQuantizer()
    elif compute == "int8":
        mixer.logit_quantizer = Int8LogitQuantizer()
    elif compute == "fp8_e5m2":
        from .formats import E5M2LogitQuantizer

        mixer.logit_quantizer = E5M2LogitQuantizer()
    else:
        raise ValueError(f"unknown depth.softmax compute {compute!r}")


def storage_quantizer(storage: str | None, model_dtype: torch.dtype):
    """The quantizer for a storage precision, or None when it does not lower the model dtype."""
    if storage is None or storage == "fp32":
        return None
    if storage == "bf16" and model_dtype == torch.bfloat16:
        return None
    from .formats import STORAGE_FORMATS, FormatStorageQuantizer

    if storage in STORAGE_FORMATS:  # fp8_e5m2 / mxfp8 / mxfp4 / nvfp4 (quant/formats.py)
        return FormatStorageQuantizer(storage)
    return StorageQuantizer(storage)


def set_sources(mixer, storage: str | None, model_dtype: torch.dtype) -> None:
    mixer.source_quantizer = storage_quantizer(storage, model_dtype)


def kv_granularity(options: dict | None) -> str:
    """The ``kv_granularity`` option of a variant (per_token, the default, or per_head)."""
    return (options or {}).get("kv_granularity", "per_token")


def set_kv_cache(attn, storage: str | None, model_dtype: torch.dtype, granularity: str = "per_token") -> None:
    """``Attention.kv_quantizer`` from :func:`attnres_quant.quant.kv_cache.make_kv_quantizer` (the one KV-cache
    implementation); None when ``storage`` does not lower the model dtype (fp32, or bf16 in a bf16 model)."""
    from .kv_cache import make_kv_quantizer

    if storage is None or storage == "fp32" or (storage == "bf16" and model_dtype == torch.bfloat16):
        attn.kv_quantizer = None
    else:
        attn.kv_quantizer = make_kv_quantizer(storage, granularity)


def set_state(attn, storage: str | None) -> None:
    """``KimiDeltaAttention.state_quantizer`` (component ``attn.state``): the fp32 KDA recurrent state
    [B, H, V, K] as stored after every token -- bf16/fp16 cast, fp8 scaled e4m3 or int8/int4 symmetric RTN
    with one scale per (sequence, head, value row) over K (``per-row``); None for fp32 (the baseline)."""
    attn.state_quantizer = None if storage is None or storage == "fp32" else StorageQuantizer(storage)
