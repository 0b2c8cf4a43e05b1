"""Tiny random models for tests and demos of the quantization engine (no downloads)."""

from __future__ import annotations

import torch


def tiny_attnres(block_size: int | None = 2, layers: int = 2, hidden: int = 64, vocab: int = 97, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, depth_scale: float = 1.0, intermediate: int = 128):
    """A random Block/Full/standard AttnRes LM; pseudo-queries randomised (not zero) so the
    depth softmax is not uniform."""
    from ..model import AttnResConfig, AttnResForCausalLM
    from ..model.testing import randomize_depth

    cfg = AttnResConfig(hidden_size=hidden, num_hidden_layers=layers, num_heads=4, num_kv_heads=2,
                        vocab_size=vocab, attnres_block_size=block_size, intermediate_size=intermediate)
    torch.manual_seed(seed)
    model = AttnResForCausalLM(cfg).eval()
    randomize_depth(model, scale=depth_scale, seed=seed + 1)
    return model.to(dtype)


def tiny_llama(kind: str = "llama", layers: int = 2, hidden: int = 64, vocab: int = 97, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16):
    """A random HF Llama / Qwen2 / Qwen3 / Mistral causal LM."""
    import transformers as tf

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    cfg = getattr(tf, cls[0])(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, vocab_size=vocab,
                              max_position_embeddings=128, head_dim=hidden // 4)
    torch.manual_seed(seed)
    return getattr(tf, cls[1])(cfg).eval().to(dtype)


def kl_divergence(base_logits: torch.Tensor, var_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(baseline || variant) in nats."""
    lp = torch.log_softmax(base_logits.detach().float(), -1)
    lq = torch.log_softmax(var_logits.detach().float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())
