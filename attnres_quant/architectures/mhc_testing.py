"""Random tiny mHC checkpoints for tests and demos (issue 20).

``python -m attnres_quant.architectures.mhc_testing DIR [deepseek_v4]`` writes one:

* ``attnres_mhc`` (default): our minimal mHC variant of the reference model -- 2 layers, hidden 32, 4 heads,
  ``hc_mult`` 4 streams, random weights (mapping parameters included, so the maps depend on the input), with
  the project's tiny byte-level tokenizer;
* ``deepseek_v4``: transformers' DeepSeek-V4 at toy size -- 3 layers (sliding, CSA with indexer, HCA
  attention), hash-routed then top-k MoE (top-2 of 4 routed experts + 1 shared), mHC with 4 streams.

Untrained: task scores are near chance; they exercise every component and hook.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TINY_MHC = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=48, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, tie_word_embeddings=False)

TINY_DSV4 = dict(vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, q_lora_rank=16, qk_rope_head_dim=8,
                 num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, hc_mult=4, hc_sinkhorn_iters=20,
                 sliding_window=8, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4,
                 compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                 layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                 mlp_layer_types=["hash_moe", "moe", "moe"], scoring_func="sqrtsoftplus",
                 num_nextn_predict_layers=0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def randomize(model, seed: int = 0) -> None:
    """Deterministic random weights: norms near 1, other vectors N(0, 0.5), matrices N(0, 1/fan_in) (mHC ``fn``
    and the head's ``hc_fn`` included; ``scale`` near 1 so no map is trivial); the hash router's table is a random
    expert assignment."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("_hc.scale", "hc_scale")):
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):  # distinct experts per token
                b.copy_(torch.stack([torch.randperm(int(model.config.n_routed_experts), generator=g)[:b.shape[1]]
                                     for _ in range(b.shape[0])]))


def tiny_mhc(cfg: dict | None = None, seed: int = 0):
    from .mhc_modeling import MHCConfig, MHCForCausalLM

    model = MHCForCausalLM(MHCConfig(**(TINY_MHC if cfg is None else cfg))).eval()
    randomize(model, seed)
    return model


def tiny_deepseek_v4(cfg: dict | None = None, seed: int = 0):
    """transformers' own ``DeepseekV4ForCausalLM`` (no hooks attached) with random tiny weights."""
    import warnings

    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DeepseekV4ForCausalLM(DeepseekV4Config(**(TINY_DSV4 if cfg is None else cfg))).eval()
    randomize(model, seed)
    return model


def save_tiny(directory, kind: str = "attnres_mhc", cfg: dict | None = None, seed: int = 0, tokenizer: bool = True):
    """Write a random tiny ``attnres_mhc`` or ``deepseek_v4`` checkpoint (+ the tiny tokenizer); returns the model."""
    cfg = dict((TINY_MHC if kind == "attnres_mhc" else TINY_DSV4) if cfg is None else cfg)
    tok = None
    if tokenizer:
        from ..evaluation.testing import tiny_tokenizer

        tok = tiny_tokenizer(vocab_size=320)
        cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    model = tiny_mhc(cfg, seed) if kind == "attnres_mhc" else tiny_deepseek_v4(cfg, seed)
    model.save_pretrained(directory)
    if tok is not None:
        tok.save_pretrained(directory)
    return model


if __name__ == "__main__":  # pragma: no cover
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-mhc")
    kind = sys.argv[2] if len(sys.argv) > 2 else "attnres_mhc"
    save_tiny(target, kind)
    print(f"wrote a random tiny {kind} checkpoint to {target}")
