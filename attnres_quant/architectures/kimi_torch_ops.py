"""Exact PyTorch versions of the flash-linear-attention (FLA) kernels that Kimi models use.

Moonshot's Kimi-Linear / Kimi K3 code calls FLA's Triton kernels, which need a GPU.  This
module holds our own PyTorch implementations of the same mathematics (written from FLA's
documented semantics, not copied), used two ways:

* as the CPU path of our Kimi model (:mod:`attnres_quant.architectures.kimi_modeling`);
* as drop-in stand-ins for FLA inside Moonshot's reference code
  (``llmcompressor.modeling.kimi_k3``), so that tests can run the oracle on CPU
  (:func:`patch_moonshot_reference`).

The operations (fp32 inside, output in the input dtype):

* :func:`kda_gate` -- KDA's forget gate in log space:
  ``-exp(A_log) * softplus(g + dt_bias)`` per head, or with a lower bound ``lb``
  ``lb * sigmoid(exp(A_log) * (g + dt_bias))``;
* :func:`l2norm` -- ``x * rsqrt(sum(x^2) + 1e-6)`` over the head dimension;
* :func:`recurrent_kda` -- Kimi Delta Attention, token by token: with q, k l2-normalised,
  ``beta = sigmoid(b)``, ``S_t = diag(exp(g_t)) S_{t-1}`` then
  ``S_t += beta_t k_t (v_t - S_t^T k_t)^T`` and ``o_t = scale * q_t^T S_t``
  (scale = K^-1/2).  The state is kept as FLA's "V-first" layout ``[N, H, V, K]``
  (Moonshot passes ``transpose_state_layout=True``); an optional ``state_quantizer`` is
  applied to the state after every token, i.e. to the state as a decoder would store it;
* :func:`short_conv` -- depthwise causal conv1d (kernel W, no bias by default) + SiLU,
  with FLA's cache layout ``[N, D, W]`` (the last W inputs, newest last);
* :func:`gated_rms_norm` -- ``rms_norm(x) * weight * sigmoid(g)`` in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """FLA's l2norm: ``x * rsqrt(sum(x^2, -1) + eps)`` in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def kda_gate(g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
             lower_bound: float | None = None) -> torch.Tensor:
    """Log-space decay [..., H, K] fp32 from the raw gate projection g [..., H, K]."""
    H = g.shape[-2]
    g = g.float()
    if dt_bias is not None:
        g = g + dt_bias.float().view(H, -1)
    if lower_bound is None:
        return -A_log.float().view(H, 1).exp() * F.softplus(g)
    if A_log is not None:
        g = A_log.float().view(H, 1).exp() * g
    return lower_bound * torch.sigmoid(g)


def recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = True, use_qk_l2norm: bool = True, gate: bool = True,
                  A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                  lower_bound: float | None = None, beta_sigmoid: bool = True,
                  state_quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Kimi Delta Attention, exact recurrence.

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] (raw if ``gate`` else log-decay);
    beta [B, T, H] (logits if ``beta_sigmoid``); initial_state [B, H, V, K] fp32.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, V, K] fp32 or None).
    """
    dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    if v.shape[2] != H:
        raise NotImplementedError("grouped value heads (HV > H) are not used by Kimi models")
    if scale is None:
        scale = K ** -0.5
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k, v = q.float() * scale, k.float(), v.float()
    g = kda_gate(g, A_log, dt_bias, lower_bound) if gate else g.float()
    beta = torch.sigmoid(beta.float()) if beta_sigmoid else beta.float()
    decay = g.exp()  # [B, T, H, K]
    S = q.new_zeros(B, H, V, K)
    if initial_state is not None:
        S = S + initial_state.float()
    o = v.new_empty(B, T, H, V)
    for t in range(T):
        S = S * decay[:, t, :, None, :]
        k_t = k[:, t]  # [B, H, K]
        err = v[:, t] - (S * k_t[:, :, None, :]).sum(-1)  # [B, H, V]
        S = S + (beta[:, t, :, None] * err)[..., None] * k_t[:, :, None, :]
        if state_quantizer is not None:
            S = state_quantizer(S)
        o[:, t] = (S * q[:, t, :, None, :]).sum(-1)
    return o.to(dtype), (S if output_final_state else None)


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               cache: torch.Tensor | None = None, activation: str | None = "silu",
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d: x [B, T, D], weight [D, 1, W] (or [D, W]), cache [B, D, W].

    Returns (y [B, T, D] in x's dtype, new cache [B, D, W] in x's dtype: the last W inputs).
    ``mask`` [B, T] (1 = token, 0 = padding) zeroes padded inputs first.
    """
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    w = weight.reshape(weight.shape[0], -1)  # [D, W]
    W = w.shape[-1]
    B, T, D = x.shape
    past = cache if cache is not None else x.new_zeros(B, D, W)
    # The W - 1 previous inputs, then this call's T inputs: [B, D, W - 1 + T].
    seq = torch.cat([past[..., 1:].to(x.dtype), x.transpose(1, 2)], dim=-1)
    windows = seq.float().unfold(-1, W, 1)  # [B, D, T, W]
    y = (windows * w.float()[None, :, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.float()[None, :, None]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    new_cache = seq[..., -W:] if seq.shape[-1] >= W else F.pad(seq, (W - seq.shape[-1], 0))
    return y.transpose(1, 2).to(x.dtype), new_cache.contiguous()


def gated_rms_norm(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float,
                   activation: str = "sigmoid") -> torch.Tensor:
    """``rms_norm(x) * weight * act(g)`` computed in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    gf = g.float()
    y = y * (torch.sigmoid(gf) if activation == "sigmoid" else F.silu(gf))
    return y.to(x.dtype)


# --------------------------------------------------------------------------- stand-ins for FLA
class TorchShortConvolution(nn.Conv1d):
    """FLA's ``ShortConvolution`` (parameters ``weight`` [D, 1, W], optional ``bias``) on :func:`short_conv`."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu",
                 device=None, dtype=None, **_ignored):
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size,
                         bias=bias, device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.activation = activation

    def forward(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None,
                **_ignored):
        if cu_seqlens is not None and len(cu_seqlens) > 2:
            raise NotImplementedError("packed variable-length inputs are not supported by the torch path")
        y, new_cache = short_conv(x, self.weight, self.bias, cache=cache, activation=self.activation, mask=mask)
        if residual is not None:
            y = y + residual
        return y, (new_cache if output_final_state else None)


class TorchRMSNormGated(nn.Module):
    """FLA's ``FusedRMSNormGated`` (parameter ``weight``) on :func:`gated_rms_norm`."""

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5,
                 activation: str = "swish", device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.activation = activation
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None or prenorm:
            raise NotImplementedError("residual/prenorm are not used by Kimi models")
        return gated_rms_norm(x, g, self.weight, self.eps, self.activation)


def _kda_entry(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
               lower_bound=None, cu_seqlens=None, **kwargs):
    """FLA's ``chunk_kda`` / ``fused_recurrent_kda`` signature, state layout V-first only."""
    v_first = kwargs.pop("state_v_first", False) or kwargs.pop("transpose_state_layout", False)
    if not v_first:
        raise NotImplementedError("the torch KDA path keeps the state V-first ([N, H, V, K]) as Kimi models do")
    if cu_seqlens is not None and len(cu_seqlens) > 2:
        raise NotImplementedError("packed variable-length inputs are not supported by the torch path")
    if kwargs.get("allow_neg_eigval"):
        raise NotImplementedError("allow_neg_eigval")
    return recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm_in_kernel,
                         gate=use_gate_in_kernel, A_log=kwargs.get("A_log"), dt_bias=kwargs.get("dt_bias"),
                         lower_bound=lower_bound, beta_sigmoid=use_beta_sigmoid_in_kernel)


torch_chunk_kda = _kda_entry
torch_fused_recurrent_kda = _kda_entry


def rearrange(x: torch.Tensor, pattern: str, **sizes) -> torch.Tensor:
    """The few einops patterns Moonshot's KDA layer uses (einops is not a dependency here)."""
    p = " ".join(pattern.split())
    if p == "... (h d) -> ... h d":
        d = sizes["d"]
        return x.reshape(*x.shape[:-1], x.shape[-1] // d, d)
    if p == "b t h d -> b t (h d)":
        return x.reshape(*x.shape[:2], -1)
    if p == "b s ... -> (b s) ...":
        return x.reshape(-1, *x.shape[2:])
    raise NotImplementedError(f"rearrange pattern {pattern!r}")


@contextlib.contextmanager
def patch_moonshot_reference():
    """Run Moonshot's ``llmcompressor.modeling.kimi_k3`` code on CPU: inside this context its FLA
    imports (``chunk_kda``, ``fused_recurrent_kda``, ``ShortConvolution``, ``FusedRMSNormGated``,
    ``rearrange``) are our torch stand-ins.  Build *and* run the reference model inside it.
    Test support only: the package's own Kimi model never imports Moonshot's code."""
    from llmcompressor.modeling.kimi_k3 import modeling_kimi_linear as mk

    names = {"chunk_kda": torch_chunk_kda, "fused_recurrent_kda": torch_fused_recurrent_kda,
             "ShortConvolution": TorchShortConvolution, "FusedRMSNormGated": TorchRMSNormGated,
             "rearrange": rearrange}
    saved = {n: getattr(mk, n, None) for n in names}
    try:
        for n, obj in names.items():
            setattr(mk, n, obj)
        yield mk
    finally:
        for n, obj in saved.items():
            setattr(mk, n, obj)


__all__ = ["l2norm", "kda_gate", "recurrent_kda", "short_conv", "gated_rms_norm", "TorchShortConvolution",
           "TorchRMSNormGated", "torch_chunk_kda", "torch_fused_recurrent_kda", "patch_moonshot_reference"]
