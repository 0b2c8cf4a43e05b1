"""Reference Attention-Residual (AttnRes) causal LM.

Decoder-only PreNorm transformer (RMSNorm, RoPE, GQA attention through
``scaled_dot_product_attention``, SwiGLU MLP) whose residual stream is either
the standard sum (``attnres_block_size=None``), Full AttnRes (``1``) or Block
AttnRes (even S).  Semantics and parameter names follow flash-linear-attention's
``TransformerForCausalLM`` so FLA checkpoints load with no missing or
unexpected keys; unlike FLA it needs no CUDA/Triton and runs anywhere.

A model of L layers has 2L sub-layers j = 0..2L-1 (attention at even j, MLP at
odd j).  Block AttnRes: sources start as [embedding]; at a block boundary
(j % S == 0, j > 0) the running partial sum is closed and appended as a
source; sub-layer j reads the softmax-weighted mix of the completed sources
plus the non-empty partial sum, applies its pre-norm and adds its output to
the partial sum.  A final pseudo-query (``model.res_proj``) mixes all sources
before ``model.norm`` and ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_attnres import AttnResConfig, FLATransformerConfig
from .depth import DepthMixer, naive_mix, phase1


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; returns ``out_dtype`` (default: the input's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(out_dtype or x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, 1, T, head_dim] for the given positions (non-interleaved RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        # Hook for the quantization engine's KV-cache precision (component attn.kv_cache).
        self.kv_quantizer = None

    def forward(self, x, cos, sin, mask, past_key_values: Cache | None, token_mask=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_quantizer is not None:
            k, v = self._store_kv(k, v, past_key_values, token_mask)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _store_kv(self, k, v, cache: Cache | None, token_mask=None):
        """k and v as the (simulated) cache stores them; ``token_mask`` [B, T]: False at padding."""
        q = self.kv_quantizer
        if not getattr(q, "stateful", False):
            return q(k), q(v)
        # A scale that depends on the tokens written so far (a per-head running maximum) is
        # part of the cache: keep it with the cache object, per layer, so that decode steps
        # continue from the prefill.  Without a cache one call holds the whole sequence.
        if cache is None:
            state = {}
        else:
            if not hasattr(cache, "_kv_quant_state"):
                cache._kv_quant_state = {}
            state = cache._kv_quant_state.setdefault(self.layer_idx, {})
        return q(k, state, "k", token_mask), q(v, state, "v", token_mask)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: AttnResConfig):
        super().__init__()
        inter = config.mlp_intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AttnResDecoderLayer(nn.Module):
    """One transformer layer = two sub-layers (attention 2i, MLP 2i+1)."""

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(d, config.norm_eps)
        self.mlp = MLP(config)
        if config.use_attnres:
            self.attn_res_proj = nn.Linear(d, 1, bias=False)
            self.attn_res_norm = RMSNorm(d, config.norm_eps)
            self.mlp_res_proj = nn.Linear(d, 1, bias=False)
            self.mlp_res_norm = RMSNorm(d, config.norm_eps)
            self.attn_res_proj._is_attnres_proj = True
            self.mlp_res_proj._is_attnres_proj = True
            self.attn_depth = DepthMixer(2 * layer_idx, config.norm_eps)
            self.mlp_depth = DepthMixer(2 * layer_idx + 1, config.norm_eps)


@dataclass
class SubLayer:
    """Everything the depth loop needs about sub-layer j (or the final mix)."""

    index: int
    mixer: DepthMixer | None
    proj: nn.Linear | None
    key_norm: RMSNorm | None
    pre_norm: RMSNorm
    fn: nn.Module | None  # None for the final mix
    is_attn: bool


class AttnResPreTrainedModel(PreTrainedModel):
    config_class = AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["AttnResDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "_is_attnres_proj", False):
            # Zero pseudo-queries: the depth softmax starts uniform (paper section 5).
            init.zeros_(module.weight)


class AttnResModel(AttnResPreTrainedModel):
    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(AttnResDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        if config.use_attnres:
            self.res_proj = nn.Linear(config.hidden_size, 1, bias=False)
            self.res_norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.res_proj._is_attnres_proj = True
            self.res_depth = DepthMixer(config.num_sublayers, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    # ------------------------------------------------------------------ helpers
    def sublayers(self) -> list[SubLayer]:
        """Sub-layers 0..2L-1 in order, then the final mix (index 2L)."""
        out = []
        for layer in self.layers:
            for is_attn in (True, False):
                kind = "attn" if is_attn else "mlp"
                out.append(SubLayer(
                    index=len(out),
                    mixer=getattr(layer, f"{kind}_depth", None),
                    proj=getattr(layer, f"{kind}_res_proj", None),
                    key_norm=getattr(layer, f"{kind}_res_norm", None),
                    pre_norm=getattr(layer, f"{kind}_norm"),
                    fn=layer.attn if is_attn else layer.mlp,
                    is_attn=is_attn,
                ))
        out.append(SubLayer(len(out), getattr(self, "res_depth", None), getattr(self, "res_proj", None),
                            getattr(self, "res_norm", None), self.norm, None, False))
        return out

    def depth_mixers(self) -> list[DepthMixer]:
        return [s.mixer for s in self.sublayers() if s.mixer is not None]

    @staticmethod
    def _mask(attention_mask, t: int, past: int, device) -> torch.Tensor | None:
        """Boolean SDPA mask [B, 1, T, past+T], or None when plain causal suffices."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and past == 0:
            return None  # is_causal=True in SDPA
        if not padded and t == 1:
            return None  # one query attends to every cached key
        q_pos = torch.arange(past, past + t, device=device)
        k_pos = torch.arange(past + t, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if padded:
            mask = mask & attention_mask[:, None, None, -(past + t):].bool()
        # A query with no visible key (left padding) would give NaN; let it see
        # everything -- its output is padding and never read.
        return mask | ~mask.any(-1, keepdim=True)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_depth_attentions=False, **kwargs):
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
        # Which new tokens are real (for KV-cache scales that pool over tokens); None: all are.
        token_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            token_mask = attention_mask[:, -t:].bool()

        def run(sub: SubLayer, x):
            if sub.is_attn:
                return sub.fn(x, cos, sin, mask, past_key_values, token_mask)
            return sub.fn(x)

        subs = self.sublayers()
        depth_weights = None
        if not cfg.use_attnres:
            h = inputs_embeds
            for sub in subs[:-1]:
                h = h + run(sub, sub.pre_norm(h))
            hidden = self.norm(h)
        else:
            hidden, depth_weights = self._attnres_forward(inputs_embeds, subs, run, output_depth_attentions)
        return hidden, past_key_values, depth_weights

    @staticmethod
    def _folded_queries(subs: list[SubLayer]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Every sub-layer's folded pseudo-query w * g as columns: ([D, 2L+1] fp32, its columns
        as [D, 1] views); column j belongs to sub-layer j (column 0 is unused).

        Recomputed on every forward, never cached: a cache keyed on the parameters
        cannot see writes through ``w.data`` (which bypass the version counter), so a
        weight quantized after a forward would leave the two-phase path on stale
        queries while the naive path reads the new ones.  The fold is three small ops on
        [2L+1, D] (tens of microseconds, about what the cache lookup cost).
        """
        w = torch.cat([s.proj.weight for s in subs]).float()  # [2L+1, D]: each proj weight is [1, D]
        g = torch.stack([s.key_norm.weight for s in subs]).float()
        # The same elementwise product as depth.folded_query; laid out [D, 2L+1] contiguous so the
        # scoring GEMM (and so every logit) is the one the path has always used.
        queries_t = (w * g).t().contiguous()
        return queries_t, queries_t.split(1, dim=1)

    def _attnres_forward(self, e, subs: list[SubLayer], run, output_depth_attentions: bool):
        """The depth loop of Full/Block AttnRes (see module docstring)."""
        cfg = self.config
        S = cfg.attnres_block_size
        n_sub = cfg.num_sublayers
        dtype = e.dtype
        # Depth weights come from either path (two-phase: phase-1 probabilities and the merge's
        # partial-sum weight; the same numbers as the naive softmax).
        two_phase = (cfg.attnres_two_phase and not self.training
                     and all(s.mixer.supports_two_phase for s in subs))
        boundaries = [j for j in range(1, n_sub) if j % S == 0]

        # Every depth source is written once, stored by the mixer of the sub-layer that reads it
        # first (mixer 0: the embedding; mixer j: the partial sum after sub-layer j - 1; the final
        # mixer: the last partial sum), and every reader sees that stored tensor.
        completed: list[torch.Tensor] = [subs[0].mixer.store(e)]
        weights: list[torch.Tensor] = []
        partial = None
        states = {}
        if two_phase:
            # Perf: pseudo-queries do not depend on the input, so each completed
            # source is scored against *every* folded query once, when it is
            # closed (one [B*T, D] @ [D, 2L+1] product, inverse RMS applied), and
            # its fp32 copy is written once into a preallocated token-major
            # buffer [B, T, n, D].  Phase 1 of a block then only slices the
            # logits and does one batched [q, n] @ [n, D] product per token,
            # instead of re-stacking, re-casting and re-scoring all sources.
            n_max = 1 + len(boundaries)
            queries_t, q_cols = self._folded_queries(subs)  # [D, 2L+1] fp32; q_cols[j]: [D, 1]
            d_model = e.shape[-1]
            eps = subs[0].mixer.eps
            # With autograd on (eval-mode gradients) buffers written in place
            # would invalidate saved tensors: keep lists and stack them instead.
            functional = torch.is_grad_enabled()
            if functional:
                src_list: list[torch.Tensor] = []
                logit_list: list[torch.Tensor] = []
            else:
                src_buf = e.new_empty((*e.shape[:-1], n_max, d_model), dtype=torch.float32)
                logit_buf = e.new_empty((n_max, *e.shape[:-1], queries_t.shape[1]), dtype=torch.float32)

            def close_source(k: int, source: torch.Tensor) -> None:
                if functional:
                    sf = source.float()
                    src_list.append(sf)
                else:
                    # Perf: the fp32 copy is written once, straight into the buffer (a casting
                    # copy in a bf16 model: no full-size fp32 temporary), and scored from there.
                    sf = src_buf[:, :, k]
                    sf.copy_(source)
                # w . RMSNorm(v; g) for every query at once (g folded into w).  (A GEMM with
                # out=logit_buf[k] takes another kernel path and moves the fp32 logits by an ulp.)
                logits = F.rms_norm(sf, (d_model,), eps=eps) @ queries_t
                if functional:
                    logit_list.append(logits)
                else:
                    logit_buf[k].copy_(logits)

            def phase1_inputs(n: int, j: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
                """(logits [n, B, T, end - j], sources [B, T, n, D]) of the first n sources."""
                if functional:
                    return torch.stack(logit_list)[..., j:end], torch.stack(src_list, dim=2)
                return logit_buf[:n, :, :, j:end], src_buf[:, :, :n]

            close_source(0, completed[0])
        for sub in subs:
            j = sub.index
            if j > 0 and j in boundaries:
                completed.append(partial)
                if two_phase:
                    close_source(len(completed) - 1, partial)
                partial = None
            if j == 0:
                # One source: the softmax weight is 1 and the mix is the stored embedding itself.
                x = sub.pre_norm(completed[0])
                if output_depth_attentions:
                    weights.append(e.new_ones(e.shape[0], e.shape[1], 1, dtype=torch.float32))
            else:
                if two_phase and (j == 1 or j in boundaries):
                    # Phase 1: every pseudo-query up to the next boundary (and the
                    # final one after the last block) against the completed sources.
                    end = next((k for k in boundaries if k > j), n_sub + 1)
                    block = subs[j:end]
                    n = len(completed)
                    st = phase1([s.mixer for s in block], *phase1_inputs(n, j, end))
                    states = {s.index: state for s, state in zip(block, st)}
                if two_phase:
                    if output_depth_attentions:
                        mix, w = sub.mixer.merge(states.pop(j), partial, q_cols[j], with_weights=True)
                        weights.append(w)
                    else:
                        mix = sub.mixer.merge(states.pop(j), partial, q_cols[j])
                else:
                    sources = completed + ([partial] if partial is not None else [])
                    mix, w = naive_mix(sub.mixer, sources, sub.proj.weight, sub.key_norm.weight,
                                       n_completed=len(completed))
                    if output_depth_attentions:
                        weights.append(w)
                x = sub.pre_norm(mix, out_dtype=dtype)
            if sub.fn is None:
                return x, (tuple(weights) if output_depth_attentions else None)
            out = run(sub, x)
            # Sub-layer j + 1 (the final mix after the last one) reads this partial sum first.
            partial = subs[j + 1].mixer.store(out if partial is None else partial + out)
        raise AssertionError("unreachable: the final mix returns")


@dataclass
class AttnResCausalLMOutput(CausalLMOutputWithPast):
    depth_attentions: tuple[torch.Tensor, ...] | None = None


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = AttnResModel(config)
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
                inputs_embeds=None, labels=None, use_cache=None, output_depth_attentions=False,
                logits_to_keep: int = 0, return_dict=None, **kwargs):
        hidden, past_key_values, depth = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_depth_attentions=output_depth_attentions)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return AttnResCausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values,
                                     depth_attentions=depth)


class FLATransformerForCausalLM(AttnResForCausalLM):
    """The reference model under flash-linear-attention's ``transformer`` model type."""

    config_class = FLATransformerConfig
