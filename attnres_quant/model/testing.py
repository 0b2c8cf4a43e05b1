"""Helpers for tests and demos of the reference model (no downloads)."""

from __future__ import annotations

import torch


def randomize_depth(model, scale: float = 1.0, seed: int = 1) -> None:
    """Give every pseudo-query random values (N(0, scale^2)) and every key norm 1 + N(0, 0.3^2),
    in place, so the depth softmax is non-uniform (a fresh model's is uniform: zero queries)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "res_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif "res_norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
