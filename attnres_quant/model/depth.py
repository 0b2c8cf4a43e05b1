"""Depth mixing of Attention Residuals: the softmax over earlier sources.

A :class:`DepthMixer` sits beside every sub-layer (and one at the end of the
model).  It owns no parameters -- the pseudo-query (``*_res_proj``) and key
norm (``*_res_norm``) keep FLA's names on the decoder layer so checkpoints
load unchanged -- but it owns every *precision decision* of the depth path:

* ``softmax_dtype``     -- dtype of the depth logits/max/sum-exp (fp32 default);
* ``logit_quantizer``   -- optional simulated quantizer of the logits
  (e.g. int8 or fp8) applied before the softmax;
* ``source_quantizer``  -- optional simulated quantizer of a depth source as it
  is held in memory between sub-layers (block sums, partial sums, embedding).

The quantization engine sets these attributes; the model never changes.

Two equivalent computations are provided:

* :func:`naive_mix` stacks all sources and takes a softmax (reference,
  training, and the path that returns depth weights);
* :func:`phase1` + :meth:`DepthMixer.merge` are the paper's two-phase
  inference: at a block start all pseudo-queries of the block are scored
  against the completed sources in one batched product, then each sub-layer
  merges its single partial-sum logit with online-softmax algebra.  The
  key-norm weight is folded into the query (w * g) and the inverse RMS of each
  completed source is computed once, when it is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS(x) over the last dim, in fp32: [..., D] -> [...]."""
    xf = x.float()
    # Perf: one fused reduction (sum of squares) instead of materialising x**2
    # and then taking its mean; same quantity, mean(x^2) = ||x||^2 / D.
    ss = torch.linalg.vector_norm(xf, ord=2, dim=-1).square_()
    return torch.rsqrt(ss.div_(xf.shape[-1]).add_(eps))


@dataclass
class Phase1State:
    """Online-softmax state of one pseudo-query over the completed sources."""

    max: torch.Tensor  # [B, T]
    sum_exp: torch.Tensor  # [B, T]
    acc: torch.Tensor  # [B, T, D] fp32, sum_s exp(logit_s - max) * v_s


class DepthMixer(nn.Module):
    """Precision hooks of one depth softmax (no parameters of its own)."""

    def __init__(self, sublayer: int, eps: float):
        super().__init__()
        self.sublayer = sublayer  # j in 0..2L-1, or 2L for the final mix
        self.eps = eps
        self.softmax_dtype: torch.dtype = torch.float32
        self.logit_quantizer: Quantizer | None = None
        self.source_quantizer: Quantizer | None = None

    def extra_repr(self) -> str:
        return (f"sublayer={self.sublayer}, softmax_dtype={self.softmax_dtype}, "
                f"logit_quantizer={self.logit_quantizer}, source_quantizer={self.source_quantizer}")

    @property
    def is_default(self) -> bool:
        return self.softmax_dtype == torch.float32 and self.logit_quantizer is None

    @property
    def supports_two_phase(self) -> bool:
        """A logit quantizer whose scale depends on all logits needs the naive path."""
        q = self.logit_quantizer
        return q is None or getattr(q, "elementwise", False)

    def store(self, source: torch.Tensor) -> torch.Tensor:
        """The source as held in memory between sub-layers."""
        if self.source_quantizer is None:
            return source
        return self.source_quantizer(source)

    def prepare_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits -> the values the softmax sees (quantized, in softmax dtype)."""
        if self.logit_quantizer is not None:
            logits = self.logit_quantizer(logits)
        return logits.to(self.softmax_dtype)

    def merge(self, state: Phase1State, partial: torch.Tensor | None, query: torch.Tensor,
              ) -> torch.Tensor:
        """Phase 2: fold the partial-sum logit into the phase-1 state -> mix (fp32)."""
        if partial is None:
            return state.acc / state.sum_exp.float().unsqueeze(-1)
        pf = partial.float()
        logit = self.prepare_logits((pf @ query) * inverse_rms(pf, self.eps))
        new_max = torch.maximum(state.max, logit)
        a = torch.exp(state.max - new_max).float()
        b = torch.exp(logit - new_max).float()
        den = state.sum_exp.float() * a + b
        # Perf: (acc * a + pf * b) / den as two passes over [B, T, D] (one
        # multiply, one fused multiply-add) with the 1/den folded into the
        # per-token coefficients, instead of four full-size temporaries.
        mix = pf * (b / den).unsqueeze(-1)
        return mix.addcmul_(state.acc, (a / den).unsqueeze(-1))


def folded_query(proj_weight: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """w * g in fp32: the key-norm weight folded into the pseudo-query."""
    return proj_weight.reshape(-1).float() * norm_weight.float()


def naive_mix(mixer: DepthMixer, sources: list[torch.Tensor], proj_weight: torch.Tensor,
              norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference depth mix: stack, RMSNorm keys, score, softmax over sources.

    Returns (mix fp32 [B, T, D], weights fp32 [B, T, n_sources]).
    """
    v = torch.stack(sources, dim=0).float()  # [n, B, T, D]
    keys = torch.nn.functional.rms_norm(v, (v.shape[-1],), norm_weight.float(), mixer.eps)
    logits = keys @ proj_weight.reshape(-1).float()  # [n, B, T]
    probs = mixer.prepare_logits(logits).softmax(dim=0).float()
    mix = (probs.unsqueeze(-1) * v).sum(0)
    return mix, probs.permute(1, 2, 0)


def phase1(mixers: list[DepthMixer], queries: torch.Tensor, sources: torch.Tensor,
           source_rinv: torch.Tensor) -> list[Phase1State]:
    """Batched phase 1 for every pseudo-query of a block.

    queries [q, D] (folded, fp32); sources [n, B, T, D] fp32; source_rinv [n, B, T].
    """
    logits = torch.einsum("nbtd,qd->qnbt", sources, queries) * source_rinv.unsqueeze(0)
    if all(m.is_default for m in mixers):
        mx = logits.amax(dim=1)
        e = torch.exp(logits - mx.unsqueeze(1))
        total = e.sum(dim=1)
        acc = torch.einsum("qnbt,nbtd->qbtd", e, sources)
        return [Phase1State(mx[i], total[i], acc[i]) for i in range(len(mixers))]
    states = []
    for i, mixer in enumerate(mixers):
        li = mixer.prepare_logits(logits[i])
        mx = li.amax(dim=0)
        e = torch.exp(li - mx.unsqueeze(0))
        acc = torch.einsum("nbt,nbtd->btd", e.float(), sources)
        states.append(Phase1State(mx, e.sum(dim=0), acc))
    return states
