"""Manifold-Constrained Hyper-Connections (mHC, DeepSeek-V4 style): the math, and a minimal mHC variant
of the reference dense transformer (``model_type: attnres_mhc``).

mHC replaces the single residual stream by ``hc_mult`` (n) parallel streams ``H`` [B, T, n, D]. Around
every sub-layer (attention, MLP) one *site* computes three input-dependent maps from the flattened,
RMS-normalised streams ``x = H.flatten(-2) / rms`` (one fp32 GEMM with ``fn`` [(2+n)n, nD]):

* ``pre``  = sigmoid(scale0 * x fn_pre + base_pre) + eps           [n]   collapse weights,
* ``post`` = 2 sigmoid(scale1 * x fn_post + base_post)              [n]   expand weights (range 0..2),
* ``comb`` = Sinkhorn(softmax_row(scale2 * x fn_comb + base_comb) + eps)  [n, n]  stream mixer, projected on
  the doubly-stochastic matrices: one column normalisation, then ``hc_sinkhorn_iters - 1`` (row, column)
  rounds, every division by (sum + eps).

The sub-layer reads ``collapsed = sum_k pre_k H_k`` (then its pre-norm), and the streams become
``H'_k = post_k * out + sum_j comb[j, k] H_j`` (comb used transposed).  The model starts from n copies of
the embedding and ends with a *head* collapse (``pre`` only, parameters ``hc_fn/hc_base/hc_scale``) before
the final norm.  This is the arithmetic of transformers 5.17's ``DeepseekV4HyperConnection`` /
``DeepseekV4HyperHead`` / ``DeepseekV4DecoderLayer`` (tests/test_mhc.py checks it to < 1e-5 in fp32),
written here once so that both our minimal model and a loaded DeepSeek-V4 model run it with the
quantization engine's precision hooks:

* ``compute`` of a map (component ``hc.pre`` / ``hc.post`` / ``hc.comb``): ``None``/fp32 (baseline), a float
  dtype (bf16 / fp16: every step of the map -- its GEMM inputs, scale/bias, activation and for ``comb`` every
  Sinkhorn division -- is rounded to that dtype; sums accumulate in fp32), or a logit quantizer (fp8 / int8:
  the map's logits are quantized, the rest stays fp32), like ``depth.softmax``;
* ``stream_quantizer`` (component ``hc.streams``): the n streams as held in memory between sub-layers,
  simulated at a storage precision (per token and stream, over D), like ``depth.sources``.  Each site stores
  the streams it reads (site 0: the n copies of the embedding; the head: the streams after the last layer);
  every later use of those streams (the collapse and the ``comb`` mix) sees the stored tensor.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache

from ..model.configuration_attnres import AttnResConfig
from ..model.modeling_attnres import (MLP, Attention, AttnResCausalLMOutput, AttnResModel, AttnResPreTrainedModel,
                                      RMSNorm, rope_cos_sin)

Quantizer = Callable[[torch.Tensor], torch.Tensor]
MAPS = ("pre", "post", "comb")


# --------------------------------------------------------------------------- math
def _rounder(compute) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x rounded to a float compute dtype (and back to fp32); identity for None / fp32 / quantizers."""
    if isinstance(compute, torch.dtype) and compute != torch.float32:
        return lambda x: x.to(compute).float()
    return lambda x: x


def sinkhorn(logits: torch.Tensor, iters: int, eps: float, compute=None) -> torch.Tensor:
    """Row softmax + eps, then Sinkhorn-Knopp: a column normalisation and ``iters - 1`` (row, column) rounds
    (DeepSeek-V4's order).  ``logits`` [..., n, n] fp32; ``compute``: a float dtype rounds every step."""
    r = _rounder(compute)
    comb = r(r(torch.softmax(r(logits), dim=-1)) + eps)
    comb = r(comb / r(comb.sum(dim=-2, keepdim=True) + eps))
    for _ in range(iters - 1):
        comb = r(comb / r(comb.sum(dim=-1, keepdim=True) + eps))
        comb = r(comb / r(comb.sum(dim=-2, keepdim=True) + eps))
    return comb


def _map_logits(flat: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, compute
                ) -> torch.Tensor:
    """scale * (flat @ fn^T) + base for one map; ``compute`` rounds the GEMM inputs and each step (float
    dtype) or quantizes the logits (a callable quantizer)."""
    r = _rounder(compute)
    logits = r(r(F.linear(r(flat), r(fn.float())) * r(scale.float())) + r(base.float()))
    if callable(compute) and not isinstance(compute, torch.dtype):
        logits = compute(logits)
    return logits


def normalised_flat(streams: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """[B, T, n, D] -> [B, T, nD] fp32 divided by its RMS (DeepSeek-V4's unweighted RMSNorm of the flat streams)."""
    flat = streams.flatten(start_dim=-2).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)


def hc_maps(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, iters: int,
            eps: float, norm_eps: float, compute: dict | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre [.., n], post [.., n], comb [.., n, n]) in fp32 of one mHC site; ``compute``: map -> precision."""
    compute = compute or {}
    n = streams.shape[-2]
    flat = normalised_flat(streams, norm_eps)
    fns = fn.split([n, n, n * n], dim=0)
    bases = base.split([n, n, n * n], dim=0)
    logits = {m: _map_logits(flat, f, b, scale[i], compute.get(m))
              for i, (m, f, b) in enumerate(zip(MAPS, fns, bases))}
    r_pre, r_post = _rounder(compute.get("pre")), _rounder(compute.get("post"))
    pre = r_pre(r_pre(torch.sigmoid(logits["pre"])) + eps)
    post = r_post(2 * r_post(torch.sigmoid(logits["post"])))
    comb = sinkhorn(logits["comb"].unflatten(-1, (n, n)), iters, eps, compute.get("comb"))
    return pre, post, comb


def collapse(pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """sum_k pre_k H_k in fp32, returned in the streams' dtype (the sub-layer's input)."""
    return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)


def expand(out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """H'_k = post_k out + sum_j comb[j, k] H_j, in the streams' dtype (comb applied transposed)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


# --------------------------------------------------------------------------- modules
class _Hooks:
    """The precision hooks every mHC site and head carries (set by ``attnres_quant.quant``)."""

    def _init_hooks(self) -> None:
        self.compute: dict = {}  # map name -> None | torch dtype | logit quantizer
        self.stream_quantizer: Quantizer | None = None

    def store(self, streams: torch.Tensor) -> torch.Tensor:
        """The streams as held in memory between sub-layers (``hc.streams`` storage)."""
        q = self.stream_quantizer
        return streams if q is None else q(streams)


class HyperConnection(nn.Module, _Hooks):
    """One mHC site (DeepSeek-V4's ``attn_hc`` / ``ffn_hc``): parameters ``fn`` [(2+n)n, nD], ``base`` [(2+n)n],
    ``scale`` [3]."""

    def __init__(self, hc_mult: int, hidden_size: int, iters: int, eps: float, norm_eps: float):
        super().__init__()
        self.hc_mult, self.iters, self.eps, self.norm_eps = hc_mult, iters, eps, norm_eps
        mix = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(mix, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.empty(mix))
        self.scale = nn.Parameter(torch.empty(3))
        self._init_hooks()

    def maps(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return hc_maps(streams, self.fn, self.base, self.scale, iters=self.iters, eps=self.eps,
                       norm_eps=self.norm_eps, compute=self.compute)

    def sublayer(self, streams: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Store the streams, collapse them into ``fn``'s input, expand its output into the new streams."""
        streams = self.store(streams)
        pre, post, comb = self.maps(streams)
        return expand(fn(collapse(pre, streams)), post, comb, streams)

    def forward(self, streams: torch.Tensor):
        """DeepSeek-V4's contract: (post, comb, collapsed)."""
        pre, post, comb = self.maps(streams)
        return post, comb, collapse(pre, streams)

    def extra_repr(self) -> str:
        return f"hc_mult={self.hc_mult}, sinkhorn_iters={self.iters}, eps={self.eps}"


class HyperHead(nn.Module, _Hooks):
    """The final collapse (DeepSeek-V4's ``hc_head``): ``pre`` only, parameters ``hc_fn`` [n, nD], ``hc_base`` [n],
    ``hc_scale`` [1]."""

    def __init__(self, hc_mult: int, hidden_size: int, eps: float, norm_eps: float):
        super().__init__()
        self.hc_mult, self.eps, self.norm_eps = hc_mult, eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))
        self.hc_base = nn.Parameter(torch.empty(hc_mult))
        self.hc_scale = nn.Parameter(torch.empty(1))
        self._init_hooks()

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        streams = self.store(streams)
        compute = self.compute.get("pre")
        r = _rounder(compute)
        logits = _map_logits(normalised_flat(streams, self.norm_eps), self.hc_fn, self.hc_base, self.hc_scale[0],
                             compute)
        pre = r(r(torch.sigmoid(logits)) + self.eps)
        return collapse(pre, streams)


# --------------------------------------------------------------------------- our minimal mHC model
class MHCConfig(AttnResConfig):
    """The reference dense transformer with mHC residuals (``model_type: attnres_mhc``).

    Every field of :class:`AttnResConfig` (same sub-layers: RMSNorm, RoPE, GQA attention, SwiGLU MLP) plus
    ``hc_mult`` (streams, default 4), ``hc_sinkhorn_iters`` (default 20) and ``hc_eps`` (default 1e-6), as
    DeepSeek-V4 names them; ``attnres_block_size`` must stay null (the residual is mHC).
    """

    model_type = "attnres_mhc"

    def __init__(self, hc_mult: int = 4, hc_sinkhorn_iters: int = 20, hc_eps: float = 1e-6, **kwargs):
        if kwargs.get("attnres_block_size") is not None:
            raise ValueError("attnres_mhc models have mHC residuals; attnres_block_size must be null")
        if not isinstance(hc_mult, int) or isinstance(hc_mult, bool) or hc_mult < 1:
            raise ValueError(f"hc_mult must be a positive integer; got {hc_mult!r}")
        if not isinstance(hc_sinkhorn_iters, int) or isinstance(hc_sinkhorn_iters, bool) or hc_sinkhorn_iters < 1:
            raise ValueError(f"hc_sinkhorn_iters must be a positive integer; got {hc_sinkhorn_iters!r}")
        if not isinstance(hc_eps, (int, float)) or isinstance(hc_eps, bool) or hc_eps < 0:
            raise ValueError(f"hc_eps must be a non-negative number; got {hc_eps!r}")
        self.hc_mult = hc_mult
        self.hc_sinkhorn_iters = hc_sinkhorn_iters
        self.hc_eps = float(hc_eps)
        super().__init__(**kwargs)


class MHCDecoderLayer(nn.Module):
    """The reference layer's sub-layers (same parameter names) with an mHC site around each."""

    def __init__(self, config: MHCConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(d, config.norm_eps)
        self.mlp = MLP(config)
        site = (config.hc_mult, d, config.hc_sinkhorn_iters, config.hc_eps, config.norm_eps)
        self.attn_hc = HyperConnection(*site)
        self.ffn_hc = HyperConnection(*site)


class MHCPreTrainedModel(AttnResPreTrainedModel):
    config_class = MHCConfig
    _no_split_modules = ["MHCDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        # DeepSeek-V4's initialisation: fn ~ N(0, initializer_range), base 0, scale 1.
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, HyperConnection):
                module.fn.normal_(0.0, std)
                module.base.zero_()
                module.scale.fill_(1.0)
            elif isinstance(module, HyperHead):
                module.hc_fn.normal_(0.0, std)
                module.hc_base.zero_()
                module.hc_scale.fill_(1.0)


class MHCModel(MHCPreTrainedModel):
    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MHCDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(config.hc_mult, config.hidden_size, config.hc_eps, config.norm_eps)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def sites(self) -> list[HyperConnection | HyperHead]:
        """Every mHC site in order (attn_hc, ffn_hc of each layer), then the head."""
        return [hc for layer in self.layers for hc in (layer.attn_hc, layer.ffn_hc)] + [self.hc_head]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        cfg = self.config
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        b, t, _ = inputs_embeds.shape
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=inputs_embeds.device).expand(b, t)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype)
        mask = self._mask(attention_mask, t, past, inputs_embeds.device)
        token_mask = attention_mask[:, -t:].bool() if attention_mask is not None and not bool(
            attention_mask.all()) else None
        # n copies of the embedding: the streams entering the first site.
        streams = inputs_embeds.unsqueeze(-2).expand(b, t, cfg.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer.attn_hc.sublayer(
                streams, lambda x, ly=layer: ly.attn(ly.attn_norm(x), cos, sin, mask, past_key_values, token_mask))
            streams = layer.ffn_hc.sublayer(streams, lambda x, ly=layer: ly.mlp(ly.mlp_norm(x)))
        return self.norm(self.hc_head(streams)), past_key_values

    _mask = staticmethod(AttnResModel._mask)  # the reference model's SDPA mask (padding, cache)


class MHCForCausalLM(MHCPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.model = MHCModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, return_dict=None,
                **kwargs):
        hidden, past_key_values = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                             position_ids=position_ids, past_key_values=past_key_values,
                                             inputs_embeds=inputs_embeds, use_cache=use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        # The reference model's output type (depth_attentions None: mHC has no depth softmax).
        return AttnResCausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values)


# --------------------------------------------------------------------------- DeepSeek-V4 (transformers' classes)
def _dsv4_layer_forward(self, hidden_states, input_ids=None, **kwargs):
    """``DeepseekV4DecoderLayer.forward`` with its two mHC sites run by :class:`HyperConnection` (same math,
    plus the storage hook on the streams each site reads)."""
    hidden_states = self.attn_hc.sublayer(
        hidden_states, lambda x: self.self_attn(self.input_layernorm(x), **kwargs)[0])
    return self.ffn_hc.sublayer(
        hidden_states, lambda x: self.mlp(self.post_attention_layernorm(x), input_ids=input_ids))


def attach_hc_hooks(model) -> int:
    """Give a transformers ``DeepseekV4ForCausalLM`` our mHC sites: every ``DeepseekV4HyperConnection`` /
    ``DeepseekV4HyperHead`` is replaced by a :class:`HyperConnection` / :class:`HyperHead` holding the *same*
    Parameter objects (no copy; state-dict names unchanged), and each decoder layer runs its sites through
    them.  Returns the number of sites replaced."""
    import types

    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as dsv4

    cfg = model.config
    n = 0
    for layer in model.model.layers:
        for attr in ("attn_hc", "ffn_hc"):
            old = getattr(layer, attr)
            if not isinstance(old, dsv4.DeepseekV4HyperConnection):
                continue
            new = HyperConnection(old.hc_mult, cfg.hidden_size, old.hc_sinkhorn_iters, old.hc_eps, cfg.rms_norm_eps)
            new.fn, new.base, new.scale = old.fn, old.base, old.scale
            setattr(layer, attr, new)
            n += 1
        layer.forward = types.MethodType(_dsv4_layer_forward, layer)
    old = model.model.hc_head
    if isinstance(old, dsv4.DeepseekV4HyperHead):
        head = HyperHead(old.hc_mult, cfg.hidden_size, old.eps, cfg.rms_norm_eps)
        head.hc_fn, head.hc_base, head.hc_scale = old.hc_fn, old.hc_base, old.hc_scale
        model.model.hc_head = head
        n += 1
    return n


__all__ = ["MHCConfig", "MHCForCausalLM", "MHCModel", "HyperConnection", "HyperHead", "hc_maps", "sinkhorn",
           "collapse", "expand", "attach_hc_hooks", "MAPS"]


def _register() -> None:
    """``attnres_mhc`` with transformers' Auto classes (AutoConfig reads our checkpoints, e.g. for the tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MHCConfig.model_type, MHCConfig)
        AutoModelForCausalLM.register(MHCConfig, MHCForCausalLM)
    except ValueError:  # already registered
        pass


_register()
