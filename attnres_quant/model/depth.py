"""Depth mixing of Attention Residuals: the softmax over earlier sources.

A :class:`DepthMixer` sits beside every sub-layer (and one at the end of the
model).  It owns no parameters -- the pseudo-query (``*_res_proj``) and key
norm (``*_res_norm``) keep FLA's names on the decoder layer so checkpoints
load unchanged -- but it owns every *precision decision* of the depth path:

* ``softmax_dtype``     -- simulated precision of the depth softmax (fp32 default;
  see "Low-precision softmax semantics" below);
* ``logit_quantizer``   -- optional simulated quantizer of the logits
  (e.g. int8 or fp8) applied before the softmax;
* ``source_quantizer``  -- optional simulated quantizer of a depth source as it
  is held in memory between sub-layers.  Every source is written once and
  stored by the mixer of the sub-layer that reads it first: mixer 0 stores the
  embedding, mixer j >= 1 the partial sum written after sub-layer j - 1 (which
  becomes a block sum when a boundary closes it), and the final mixer the last
  partial sum.  Every later reader sees that same stored tensor.

The quantization engine sets these attributes; the model never changes.

Two equivalent computations are provided:

* :func:`naive_mix` stacks all sources and takes a softmax (reference and
  training);
* :func:`phase1` + :meth:`DepthMixer.merge` are the paper's two-phase
  inference: at a block start all pseudo-queries of the block are scored
  against the completed sources in one batched product, then each sub-layer
  merges its single partial-sum logit with online-softmax algebra.  The
  key-norm weight is folded into the query (w * g) and each completed source
  is scored once, when it is stored.  Both return the depth weights: the
  two-phase ones are the phase-1 probabilities times the merge's per-token
  factor, and the merge's partial-sum weight (``merge(..., with_weights=True)``).

Low-precision softmax semantics (``softmax_dtype`` bf16 / fp16), defined once
and implemented identically by both paths -- a flash-attention style kernel
whose probability tile is held in the low precision while its statistics
accumulate in fp32, run with two tiles, the completed sources (embedding and
block sums) and then the partial sum of the current block:

1. logits l_s = w . RMSNorm(v_s; g) in fp32, then the logit quantizer (if any),
   then rounded to ``softmax_dtype``;
2. tile 1 (completed sources): m1 = max l_s; p_s = round(exp(l_s - m1)) with the
   exponent evaluated in fp32 and the result rounded to ``softmax_dtype``;
   sum1 = sum p_s and acc1 = sum p_s v_s in fp32;
3. tile 2 (partial sum, when non-empty): m = max(m1, l_p); c = exp(m1 - m) in
   fp32 (the online rescale); p_p = round(exp(l_p - m));
   mix = (c * acc1 + p_p v_p) / (c * sum1 + p_p), in fp32.

Only the logits and the probabilities are rounded; every sum and the final
normalisation are fp32, as in real low-precision attention kernels.  The
effective depth weights are c p_s / den and p_p / den.  With ``softmax_dtype``
fp32 this is exactly the softmax.  fp8 / int8 ``compute`` quantize the logits
(the logit quantizer) and keep the rest fp32.
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

    max: torch.Tensor  # [B, T] fp32 (values of the softmax dtype under low precision)
    sum_exp: torch.Tensor  # [B, T] fp32
    acc: torch.Tensor  # [B, T, D] fp32, sum_s exp(logit_s - max) * v_s (may be a strided view)
    # Default precision only (fp32 softmax, no logit quantizer): max + log(sum_exp)
    # and 1 / sum_exp, precomputed for the whole block so that phase 2 is a
    # sigmoid and one fused multiply-add (see DepthMixer.merge).
    lse: torch.Tensor | None = None  # [B, T, 1] fp32
    inv_sum: torch.Tensor | None = None  # [B, T, 1] fp32
    # Tile-1 probabilities p_s (exp(l_s - max), rounded under a low-precision softmax) of the
    # completed sources, [B, T, n] fp32 (a strided view): the depth weights of the completed
    # sources up to the merge's per-token factor (DepthMixer.merge(..., with_weights=True)).
    probs: torch.Tensor | None = None


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
        """fp32 logits -> the values the softmax sees (step 1 of the semantics in the module
        docstring): quantized, rounded to the softmax dtype, held in fp32."""
        if self.logit_quantizer is not None:
            logits = self.logit_quantizer(logits)
        return logits.to(self.softmax_dtype).float()

    def round_probs(self, p: torch.Tensor) -> torch.Tensor:
        """Unnormalised probabilities exp(l - m) (fp32) rounded to the softmax dtype, held in fp32."""
        if self.softmax_dtype == torch.float32:
            return p
        return p.to(self.softmax_dtype).float()

    def merge(self, state: Phase1State, partial: torch.Tensor | None, query: torch.Tensor,
              with_weights: bool = False):
        """Phase 2: fold the partial-sum logit into the phase-1 state -> mix (fp32).

        ``with_weights``: return (mix, weights) with the effective depth weights [B, T, n (+1)]
        (fp32; the completed sources first, then the partial sum), the same numbers as
        :func:`naive_mix` returns.
        """
        if partial is None:
            if state.inv_sum is not None:
                mix = state.acc * state.inv_sum
                return (mix, state.probs * state.inv_sum) if with_weights else mix
            total = state.sum_exp.unsqueeze(-1)
            mix = state.acc / total
            return (mix, state.probs / total) if with_weights else mix
        pf = partial.float()
        if query.dim() == 1:
            query = query.unsqueeze(-1)
        # w . RMSNorm(partial; g) with g folded into the query: [B, T, 1].  (Written as
        # inverse_rms(partial) * (partial @ w g) it would skip a [B, T, D] temporary, but it rounds
        # differently: fp32 logits moved by up to 1e-5 relative; kept bit-identical instead.)
        logit = F.rms_norm(pf, (pf.shape[-1],), eps=self.eps) @ query
        if state.lse is not None:
            # phase1 sets lse only when every mixer of the block has the default precision, where
            # prepare_logits is the identity (two no-op casts per sub-layer skipped: in a decode step
            # the depth path is dominated by per-op dispatch, not arithmetic).
            # Perf: the softmax over [completed..., partial] is
            #   mix = (acc / sum_exp) * (1 - p) + partial * p,  p = sigmoid(logit - lse)
            # the partial sum's weight: the same online-softmax merge in a handful of per-token
            # ops and two full-size passes (one multiply, one fused multiply-add); 1 - p is taken
            # as sigmoid(lse - logit) for accuracy.
            d = logit.sub_(state.lse)
            p_partial = torch.sigmoid(d)
            coef = torch.sigmoid(d.neg_()) * state.inv_sum
            mix = torch.mul(pf, p_partial).addcmul_(state.acc, coef)
            if not with_weights:
                return mix
            return mix, torch.cat([state.probs * coef, p_partial], dim=-1)
        # Tile 2 of the low-precision semantics (module docstring), same expressions as
        # naive_mix's _tiled_weights.
        logit = self.prepare_logits(logit).squeeze(-1)
        a, b, den = _merge_coefficients(self, state.max, state.sum_exp, logit)
        # Perf: (acc * a + pf * b) / den as two passes over [B, T, D] (one
        # multiply, one fused multiply-add) with the 1/den folded into the
        # per-token coefficients, instead of four full-size temporaries.
        coef_p, coef_c = (b / den).unsqueeze(-1), (a / den).unsqueeze(-1)
        mix = (pf * coef_p).addcmul_(state.acc, coef_c)
        if not with_weights:
            return mix
        return mix, torch.cat([state.probs * coef_c, coef_p], dim=-1)


def _tile1(mixer: DepthMixer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile 1 (completed sources, dim 0) of prepared logits -> (max, rounded p_s, fp32 sum of p_s)."""
    mx = logits.amax(dim=0)
    p = mixer.round_probs(torch.exp(logits - mx))
    return mx, p, p.sum(dim=0)


def _merge_coefficients(mixer: DepthMixer, m1: torch.Tensor, sum1: torch.Tensor, logit: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile 2: (c, p_p, den) so that mix = (c * acc1 + p_p * v_p) / den (all fp32)."""
    m = torch.maximum(m1, logit)
    c = torch.exp(m1 - m)
    b = mixer.round_probs(torch.exp(logit - m))
    return c, b, sum1 * c + b


def folded_query(proj_weight: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """w * g in fp32: the key-norm weight folded into the pseudo-query."""
    return proj_weight.reshape(-1).float() * norm_weight.float()


def naive_mix(mixer: DepthMixer, sources: list[torch.Tensor], proj_weight: torch.Tensor,
              norm_weight: torch.Tensor, n_completed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference depth mix: stack, RMSNorm keys, score, softmax over sources.

    ``n_completed``: how many leading sources are completed (embedding, block sums); the
    rest (at most one) is the partial sum of the current block.  It matters only under a
    low-precision softmax, whose semantics (module docstring) process the two as tiles;
    None means every source is completed.
    Returns (mix fp32 [B, T, D], weights fp32 [B, T, n_sources]).
    """
    v = torch.stack(sources, dim=0).float()  # [n, B, T, D]
    keys = torch.nn.functional.rms_norm(v, (v.shape[-1],), norm_weight.float(), mixer.eps)
    logits = keys @ proj_weight.reshape(-1).float()  # [n, B, T]
    if mixer.softmax_dtype == torch.float32:
        # Nothing is rounded after the (possibly quantized) logits: the tiles of the semantics
        # compose to exactly the softmax.
        probs = mixer.prepare_logits(logits).softmax(dim=0)
    else:
        probs = _tiled_weights(mixer, mixer.prepare_logits(logits),
                               len(sources) if n_completed is None else n_completed)
    mix = (probs.unsqueeze(-1) * v).sum(0)
    return mix, probs.permute(1, 2, 0)


def _tiled_weights(mixer: DepthMixer, logits: torch.Tensor, n_completed: int) -> torch.Tensor:
    """Effective depth weights [n, B, T] of prepared logits under the low-precision semantics:
    the same expressions as phase1 (tile 1) and DepthMixer.merge (tile 2)."""
    if not 0 < n_completed <= logits.shape[0] <= n_completed + 1:
        raise ValueError(f"{logits.shape[0]} sources with {n_completed} completed: at most one partial sum")
    m1, p1, sum1 = _tile1(mixer, logits[:n_completed])
    if logits.shape[0] == n_completed:
        return p1 / sum1
    c, b, den = _merge_coefficients(mixer, m1, sum1, logits[n_completed])
    return torch.cat([p1 * (c / den), (b / den).unsqueeze(0)])


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
            # Tile 1 of the low-precision semantics (module docstring).
            mx, p, total = _tile1(mixer, mixer.prepare_logits(logits[..., i]))  # over n of [n, B, T]
            maxes.append(mx)
            sums.append(total)
            ws.append(p)
        w = torch.stack(ws, dim=-1).permute(1, 2, 3, 0)
    acc = torch.bmm(w.reshape(b * t, q, n), sources.reshape(b * t, n, d)).view(b, t, q, d).unbind(2)
    probs = w.unbind(2)  # q x [B, T, n]
    return [Phase1State(maxes[i], sums[i], acc[i],
                        None if lse is None else lse[i], None if inv_sum is None else inv_sum[i], probs[i])
            for i in range(q)]
