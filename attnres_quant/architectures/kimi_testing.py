"""A random tiny Kimi-architecture checkpoint for tests and demos (issue 16, item 5).

``python -m attnres_quant.architectures.kimi_testing DIR`` writes one: 3 decoder layers (KDA, KDA,
no-RoPE MLA), a dense first MLP then MoE (top-2 of 4 routed experts + 1 shared, sigmoid router),
Block AttnRes over blocks of 2 decoder layers, hidden 32, random weights (pseudo-queries included,
so the depth softmax is not uniform), saved as ``model_type: kimi_linear`` safetensors with the
project's tiny byte-level tokenizer (Moonshot's own tokenizer is tiktoken remote code).  It is
untrained: task scores are near chance; it exercises every component and hook.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, mla_use_nope=True)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2, rms_norm_eps=1e-6,
            tie_word_embeddings=False, num_hidden_layers=3, attn_res_block_size=2, moe_intermediate_size=16,
            num_experts=4, num_experts_per_token=2, num_shared_experts=1, first_k_dense_replace=1,
            linear_attn_config={"kda_layers": [1, 2], "full_attn_layers": [3], "head_dim": 8, "num_heads": 4,
                                "short_conv_kernel_size": 4}, **MLA)


def randomize(model, seed: int = 0) -> None:
    """Deterministic random weights: norms near 1, A_log = log U(1, 16), other vectors N(0, 0.5),
    matrices N(0, 1/fan_in) -- pseudo-queries included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1, 16, generator=g)))
            elif p.dim() == 1:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def tiny_kimi(cfg: dict | None = None, seed: int = 0):
    from .kimi_modeling import KimiAttnResConfig, KimiAttnResForCausalLM

    model = KimiAttnResForCausalLM(KimiAttnResConfig(**(TINY if cfg is None else cfg))).eval()
    randomize(model, seed)
    return model


def save_tiny_kimi(directory, cfg: dict | None = None, seed: int = 0, tokenizer: bool = True):
    """Write a random tiny Kimi checkpoint (+ the tiny tokenizer) to ``directory``; returns the model."""
    cfg = dict(TINY if cfg is None else cfg)
    tok = None
    if tokenizer:
        from ..evaluation.testing import tiny_tokenizer

        tok = tiny_tokenizer(vocab_size=320)
        cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    model = tiny_kimi(cfg, seed)
    model.save_pretrained(directory)
    if tok is not None:
        tok.save_pretrained(directory)
    return model


if __name__ == "__main__":  # pragma: no cover
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-kimi")
    save_tiny_kimi(target)
    print(f"wrote a random tiny Kimi checkpoint to {target}")
