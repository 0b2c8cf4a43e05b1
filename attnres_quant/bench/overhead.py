"""AttnRes inference overhead against a standard-residual model of the same size.

Four models share one set of sub-layer weights (embedding, attention, MLP,
norms, head -- the very same tensors, so memory is paid once): the standard
PreNorm model, Block AttnRes on the default two-phase path, Block AttnRes on
the naive path, and Full AttnRes.  Their pseudo-queries are zero (the
initialisation), so by the identity property all four compute the same logits:
the comparison is of equal work, and :func:`logit_agreement` checks it.
They are timed interleaved in one run (see ``latency.measure_interleaved``).
"""

from __future__ import annotations

import torch

from ..model import AttnResConfig, AttnResForCausalLM
from .latency import measure_interleaved, prompt_ids
from .machine import machine_info, resolve_device

VARIANTS = ("standard", "block", "block_naive", "full")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    from ..errors import UserError

    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}", "--dtype", f"use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def build_overhead_models(*, hidden_size: int, layers: int, block_size: int, vocab_size: int = 32000,
                          num_heads: int | None = None, num_kv_heads: int | None = None,
                          intermediate_size: int | None = None, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu", seed: int = 0,
                          initializer_range: float = 0.2) -> dict[str, AttnResForCausalLM]:
    """standard / block (two-phase) / block_naive / full sharing the same sub-layer tensors.

    ``initializer_range`` 0.2 gives activations of a trained model's scale, where
    the RMSNorm epsilon is negligible and the identity property holds to 1e-4.
    """
    num_heads = num_heads or max(1, hidden_size // 64)
    base = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, vocab_size=vocab_size, intermediate_size=intermediate_size,
                initializer_range=initializer_range)
    settings = {"standard": dict(attnres_block_size=None),
                "block": dict(attnres_block_size=block_size, attnres_two_phase=True),
                "block_naive": dict(attnres_block_size=block_size, attnres_two_phase=False),
                "full": dict(attnres_block_size=1, attnres_two_phase=True)}
    models = {}
    shared = None
    for name in VARIANTS:
        torch.manual_seed(seed)
        cfg = AttnResConfig(**base, **settings[name])
        with torch.device("meta") if shared is not None else _nullcontext():
            model = AttnResForCausalLM(cfg)
        if shared is None:
            model = model.to(device=device, dtype=dtype)
            shared = model.state_dict()
        else:
            own = model.state_dict()
            state = {k: shared[k] for k in own if k in shared}
            # Depth parameters: zero pseudo-queries, unit key norms (the initialisation).
            for k, v in own.items():
                if k not in shared:
                    fill = 0.0 if k.endswith("res_proj.weight") else 1.0
                    state[k] = torch.full(v.shape, fill, dtype=dtype, device=device)
            model.load_state_dict(state, strict=True, assign=True)
        models[name] = model.eval()
    return models


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def logit_agreement(models: dict[str, AttnResForCausalLM], ids: torch.Tensor) -> dict[str, float]:
    """Max |logit - standard logit| of every model on ``ids`` (full sequence, no cache)."""
    with torch.inference_mode():
        ref = models["standard"](ids, use_cache=False).logits.float()
        return {name: float((m(ids, use_cache=False).logits.float() - ref).abs().max())
                for name, m in models.items()}


def run_overhead(*, hidden_size: int = 1024, layers: int = 16, block_size: int = 4, seq_len: int = 512,
                 batch_size: int = 1, device: str = "cpu", dtype: str = "float32", vocab_size: int = 32000,
                 num_heads: int | None = None, decode_tokens: int = 16, warmup: int = 1, repeats: int = 5,
                 threads: int | None = None, seed: int = 0, check_tokens: int = 64,
                 variants: tuple[str, ...] = VARIANTS, clock: str = "wall") -> dict:
    """Build the four models, check they agree, time them interleaved, return the report dict."""
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    models = build_overhead_models(hidden_size=hidden_size, layers=layers, block_size=block_size,
                                   vocab_size=vocab_size, num_heads=num_heads, dtype=torch_dtype,
                                   device=dev, seed=seed)
    check_ids = prompt_ids(vocab_size, 1, min(seq_len, check_tokens), dev, seed + 1)
    agreement = logit_agreement(models, check_ids)
    timed = {n: models[n] for n in ("standard", *[v for v in variants if v != "standard"])}
    res = measure_interleaved(timed, prompt_len=seq_len, batch_size=batch_size,
                              decode_tokens=decode_tokens, warmup=warmup, repeats=repeats,
                              threads=threads, vocab_size=vocab_size, seed=seed, kernel="torch", clock=clock)
    cfg = models["block"].config
    n_params = sum(p.numel() for p in models["standard"].parameters())
    out = {
        "config": {"hidden_size": hidden_size, "layers": layers, "block_size": block_size,
                   "n_blocks": -(-2 * layers // block_size), "seq_len": seq_len, "batch_size": batch_size,
                   "device": str(dev), "dtype": str(torch_dtype).replace("torch.", ""),
                   "vocab_size": vocab_size, "num_heads": cfg.num_heads,
                   "intermediate_size": cfg.mlp_intermediate_size, "params_standard": n_params,
                   "decode_tokens": decode_tokens, "warmup": warmup, "repeats": repeats,
                   "threads": res["standard"]["threads"], "interleaved": True,
                   "clock": res["standard"]["clock"],
                   "prefill": "one forward over the prompt building the KV cache, next-token logits only",
                   "decode": "greedy single-token steps on that cache, ms per step"},
        "machine": machine_info(dev),
    }
    for name, r in res.items():
        out[name] = {"prefill_ms": r["prefill_ms"], "decode_ms_per_token": r["decode_ms_per_token"],
                     "prefill_ms_iqr": r["prefill_ms_iqr"],
                     "decode_ms_per_token_iqr": r["decode_ms_per_token_iqr"],
                     "tokens_per_s": r["tokens_per_s"], "peak_mem_bytes": r["peak_mem_bytes"],
                     "max_abs_logit_diff_vs_standard": agreement[name],
                     "simulated": r["simulated"], "kernel": r["kernel"]}
    std = res["standard"]
    ratios = {}
    for name, key in (("block", "block"), ("block_naive", "block_naive"), ("full", "full")):
        if name in res:
            ratios[f"{key}_prefill"] = res[name]["prefill_ms"] / std["prefill_ms"]
            ratios[f"{key}_decode"] = res[name]["decode_ms_per_token"] / std["decode_ms_per_token"]
    out["ratios"] = ratios
    return out


def run_overhead_matrix(*, dtypes: list[str] | tuple[str, ...] = ("bfloat16", "float32"),
                        batch_sizes: list[int] | tuple[int, ...] = (1, 8), **kwargs) -> dict:
    """:func:`run_overhead` for every (dtype, batch size), bf16 and fp32 at batch 1 and 8 by default.

    One configuration returns :func:`run_overhead`'s dict unchanged; several return
    ``{"runs": [...], "summary": [{"dtype", "batch_size", "ratios"}], "machine": ...}``.
    """
    from ..errors import UserError

    variants = kwargs.get("variants", VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown overhead variant(s) {', '.join(unknown)}", "--variants",
                        f"use a subset of {', '.join(VARIANTS[1:])}")
    for d in dtypes:
        parse_dtype(d)  # fail before the first (long) run
    runs = [run_overhead(dtype=d, batch_size=b, **kwargs) for d in dtypes for b in batch_sizes]
    if len(runs) == 1:
        return runs[0]
    return {"runs": runs,
            "summary": [{"dtype": r["config"]["dtype"], "batch_size": r["config"]["batch_size"],
                         "ratios": r["ratios"]} for r in runs],
            "machine": runs[-1]["machine"]}
