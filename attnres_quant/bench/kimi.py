"""Kimi-architecture throughput: our Block-AttnRes Kimi model against transformers' native ``kimi_linear``.

Three random-init models of one Kimi-Linear config (KDA + no-RoPE MLA + MoE with a shared expert), timed
interleaved (``latency.measure_interleaved``) on the same prompts:

* ``attnres`` -- attnres_quant's Kimi model (``architectures.kimi_modeling``, exact torch KDA / short
  convolution / gated norm) with Block AttnRes (``attn_res_block_size``);
* ``standard`` -- the same modelling code and the same sub-layer weights, standard residual (no
  ``attn_res_block_size``): the ratio attnres / standard is the AttnRes overhead in isolation;
* ``kimi_linear`` -- transformers' own ``KimiLinearForCausalLM`` (no AttnRes; its pure-PyTorch fallbacks
  when flash-linear-attention / causal-conv1d are absent, as on CPU) built from the same config dict, with
  its own random weights of the same distribution (``kimi_testing.randomize``): the ratio attnres /
  kimi_linear is what a user of our model pays against the reference library's modelling.

Prefill = one forward over the prompt building the cache (logits of the last token); decode = greedy
single-token steps on that cache (MLA latent cache, KDA recurrent and convolution states), per token.
"""

from __future__ import annotations

import torch

from .latency import measure_interleaved
from .machine import machine_info

# ~31M parameters: 8 decoder layers (KDA x3, MLA, KDA x3, MLA), hidden 384, a dense first MLP, then MoE
# (top-2 of 8 routed experts + 1 shared), Block AttnRes over blocks of 2 decoder layers.
SIZES = {
    "30m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                num_key_value_heads=6, num_hidden_layers=8, moe_intermediate_size=256, num_experts=8,
                num_experts_per_token=2, num_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=128,
                qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, mla_use_nope=True,
                linear_attn_config={"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "head_dim": 64,
                                    "num_heads": 6, "short_conv_kernel_size": 4}),
    "tiny": dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
                 num_hidden_layers=4, moe_intermediate_size=16, num_experts=4, num_experts_per_token=2,
                 num_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=16, mla_use_nope=True,
                 linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 8, "num_heads": 4,
                                     "short_conv_kernel_size": 4}),
}
COMMON = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_models(size: str = "30m", *, block_size: int = 2, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> dict:
    """``{"attnres", "standard", "kimi_linear"}`` models of one config (see the module docstring)."""
    import warnings

    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    from ..architectures.kimi_modeling import KimiAttnResConfig, KimiAttnResForCausalLM
    from ..architectures.kimi_testing import randomize

    cfg = {**SIZES[size], **COMMON}
    attnres = KimiAttnResForCausalLM(KimiAttnResConfig(**cfg, attn_res_block_size=block_size)).eval()
    randomize(attnres, seed)
    standard = KimiAttnResForCausalLM(KimiAttnResConfig(**cfg)).eval()
    missing, _ = standard.load_state_dict(attnres.state_dict(), strict=False)  # the same sub-layer weights
    assert not missing, missing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = KimiLinearForCausalLM(KimiLinearConfig(**cfg)).eval()
    randomize(native, seed)
    return {name: m.to(dtype) for name, m in (("attnres", attnres), ("standard", standard), ("kimi_linear", native))}


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_kimi_bench(*, size: str = "30m", seq_len: int = 512, decode_tokens: int = 16, warmup: int = 1,
                   repeats: int = 3, threads: int | None = 1, clock: str = "cpu", block_size: int = 2,
                   dtype: str = "float32", seed: int = 0) -> dict:
    """Build the three models, time them interleaved on CPU, return the JSON-ready report."""
    from transformers.utils import logging as hf_logging

    from .overhead import parse_dtype

    torch_dtype = parse_dtype(dtype)
    models = build_models(size, block_size=block_size, dtype=torch_dtype, seed=seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "falling back to its reference PyTorch implementation" (recorded below)
    try:
        res = measure_interleaved(models, prompt_len=seq_len, batch_size=1, decode_tokens=decode_tokens,
                                  warmup=warmup, repeats=repeats, threads=threads, seed=seed, clock=clock,
                                  kernel={"attnres": "attnres_quant kimi_modeling (exact torch KDA, naive "
                                                     "recurrence)",
                                          "standard": "attnres_quant kimi_modeling (exact torch KDA, naive "
                                                      "recurrence)",
                                          "kimi_linear": "transformers KimiLinearForCausalLM (torch fallbacks: "
                                                         "chunk_kda / fused_recurrent_kda / causal_conv1d)"})
    finally:
        hf_logging.set_verbosity(verbosity)
    cfg = SIZES[size]
    out = {
        "config": {"size": size, "params": {n: _params(m) for n, m in models.items()},
                   "attn_res_block_size": block_size, "seq_len": seq_len, "batch_size": 1,
                   "decode_tokens": decode_tokens, "warmup": warmup, "repeats": repeats, "dtype": dtype,
                   "threads": res["attnres"]["threads"], "clock": res["attnres"]["clock"], "interleaved": True,
                   "hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_hidden_layers"],
                   "kda_layers": cfg["linear_attn_config"]["kda_layers"],
                   "mla_layers": cfg["linear_attn_config"]["full_attn_layers"],
                   "num_experts": cfg["num_experts"], "num_experts_per_token": cfg["num_experts_per_token"],
                   "vocab_size": cfg["vocab_size"],
                   "prefill": "one forward over the prompt building the caches, next-token logits only",
                   "decode": "greedy single-token steps on those caches, per token"},
        "machine": machine_info("cpu"),
    }
    for name, r in res.items():
        out[name] = {"prefill_ms": r["prefill_ms"], "prefill_ms_iqr": r["prefill_ms_iqr"],
                     "prefill_tokens_per_s": r["prefill_tokens_per_s"],
                     "decode_ms_per_token": r["decode_ms_per_token"],
                     "decode_ms_per_token_iqr": r["decode_ms_per_token_iqr"],
                     "decode_tokens_per_s": r["tokens_per_s"], "kernel": r["kernel"]}
    a, s, n = res["attnres"], res["standard"], res["kimi_linear"]
    out["ratios"] = {  # time ratios (> 1: attnres is slower)
        "attnres_vs_kimi_linear_prefill": a["prefill_ms"] / n["prefill_ms"],
        "attnres_vs_kimi_linear_decode": a["decode_ms_per_token"] / n["decode_ms_per_token"],
        "attnres_vs_standard_prefill": a["prefill_ms"] / s["prefill_ms"],
        "attnres_vs_standard_decode": a["decode_ms_per_token"] / s["decode_ms_per_token"],
        "standard_vs_kimi_linear_prefill": s["prefill_ms"] / n["prefill_ms"],
        "standard_vs_kimi_linear_decode": s["decode_ms_per_token"] / n["decode_ms_per_token"],
    }
    return out


def kimi_table(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [f"Kimi ({c['size']}: {c['params']['attnres'] / 1e6:.1f}M params, attn_res_block_size "
             f"{c['attn_res_block_size']}), prefill {c['seq_len']} tokens, {c['dtype']}, {c['threads']} thread(s), "
             f"{c['clock']} clock, {m['cpu_model']}, {m['date_utc']}, load {m['load_avg_1m']}",
             f"{'model':<12} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill ms':>11} {'decode ms/tok':>14}"]
    for name in ("attnres", "standard", "kimi_linear"):
        x = r[name]
        lines.append(f"{name:<12} {x['prefill_tokens_per_s']:>14.1f} {x['decode_tokens_per_s']:>13.2f} "
                     f"{x['prefill_ms']:>11.1f} {x['decode_ms_per_token']:>14.2f}")
    lines.append("time ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in r["ratios"].items()))
    return "\n".join(lines)


__all__ = ["SIZES", "build_models", "run_kimi_bench", "kimi_table"]
