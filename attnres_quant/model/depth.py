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
import torch.nn.functional as F
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
    acc: torch.Tensor  # [B, T, D] fp32, sum_s exp(logit_s - max) * v_s (may be a strided view)
    # Default precision only (fp32 softmax, no logit quantizer): max + log(sum_exp)
    # and 1 / sum_exp, precomputed for the whole block so that phase 2 is a
    # sigmoid and one fused multiply-add (see DepthMixer.merge).
    lse: torch.Tensor | None = None  # [B, T, 1] fp32
    inv_sum: torch.Tensor | None = None  # [B, T, 1] fp32


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
            if state.inv_sum is not None:
                return state.acc * state.inv_sum
            return state.acc / state.sum_exp.float().unsqueeze(-1)
        pf = partial.float()
        if query.dim() == 1:
            query = query.unsqueeze(-1)
        # w . RMSNorm(partial; g) with g folded into the query: [B, T, 1].
        logit = self.prepare_logits(F.rms_norm(pf, (pf.shape[-1],), eps=self.eps) @ query)
        if state.lse is not None:
            # Perf (default precision): the softmax over [completed..., partial]
            # is  mix = (acc / sum_exp) * (1 - p) + partial * p  with
            # p = sigmoid(logit - lse) the partial sum's weight -- the same
            # online-softmax merge in fewer ops (decode) and two full-size
            # passes (prefill); 1 - p is taken as sigmoid(lse - logit) for accuracy.
            d = logit - state.lse
            mix = pf * torch.sigmoid(d)
            return mix.addcmul_(state.acc, torch.sigmoid(d.neg_()) * state.inv_sum)
        logit = logit.squeeze(-1)
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


def phase1(mixers: list[DepthMixer], logits: torch.Tensor, sources: torch.Tensor) -> list[Phase1State]:
    """Batched phase 1 for every pseudo-query of a block.

    logits [n, B, T, q] fp32: the folded query of each of the block's q
    sub-layers against each of the n completed sources, already multiplied by
    the source's inverse RMS (i.e. w . RMSNorm(v; g));
    sources [B, T, n, D] fp32, token-major so that the weighted sum over sources
    is one batched [q, n] @ [n, D] product per token.
    """
    n, b, t, q = logits.shape
    d = sources.shape[-1]
    lse = inv_sum = None
    if all(m.is_default for m in mixers):
        mx = logits.amax(dim=0)  # [B, T, q]
        e = torch.exp(logits - mx)  # [n, B, T, q]
        total = e.sum(dim=0)
        w = e.permute(1, 2, 3, 0)  # [B, T, q, n]
        lse = (mx + torch.log(total)).split(1, dim=-1)  # q x [B, T, 1]
        inv_sum = torch.reciprocal(total).split(1, dim=-1)
        maxes, sums = mx.unbind(-1), total.unbind(-1)
    else:
        maxes, sums, ws = [], [], []
        for i, mixer in enumerate(mixers):
            li = mixer.prepare_logits(logits[..., i])  # [n, B, T]
            mx = li.amax(dim=0)
            e = torch.exp(li - mx.unsqueeze(0))
            maxes.append(mx)
            sums.append(e.sum(dim=0))
            ws.append(e.float())
        w = torch.stack(ws, dim=-1).permute(1, 2, 3, 0)
    acc = torch.bmm(w.reshape(b * t, q, n), sources.reshape(b * t, n, d)).view(b, t, q, d).unbind(2)
    return [Phase1State(maxes[i], sums[i], acc[i],
                        None if lse is None else lse[i], None if inv_sum is None else inv_sum[i])
            for i in range(q)]
