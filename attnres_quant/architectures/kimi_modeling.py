"""Kimi-Linear / Kimi K3 text model (KDA + no-RoPE MLA + MoE + Block AttnRes), our implementation.

Semantics and parameter names follow Moonshot's code (``llmcompressor.modeling.kimi_k3``,
``KimiLinearForCausalLM``), so a Moonshot checkpoint loads with no renaming; the tests
compare our logits against that code run on CPU.  What is ours:

* the depth path is the reference model's: one :class:`~attnres_quant.model.depth.DepthMixer`
  per sub-layer (attention 2i, MLP 2i+1) and one for the output mix, with the same precision
  hooks (``softmax_dtype``, ``logit_quantizer``, ``source_quantizer``), the same naive and
  two-phase computations, and ``output_depth_attentions``.  Moonshot's block of
  ``attn_res_block_size`` *decoder layers* is exactly FLA's block of ``2 * attn_res_block_size``
  *sub-layers* (a block starts at the attention sub-layer of layer i when i % k == 0; sources
  are the embedding, the completed block sums and the running sum of the current block),
  so the reference depth loop runs unchanged with S = 2k;
* the mix is computed in fp32 and cast to the model dtype before the sub-layer's pre-norm,
  sources and running sums are held in the model dtype -- as in Moonshot's code;
* KDA, short convolutions and the gated output norm run on our exact PyTorch ops
  (:mod:`.kimi_torch_ops`); FLA's Triton kernels are not used (a CUDA fast path is future work);
* MLA caches its *latent* (normalised ``c_kv`` and the shared no-RoPE key part), not the
  decompressed keys/values; ``kv_quantizer`` (component ``attn.kv_cache``) is applied to the
  latent as stored.  KDA exposes ``state_quantizer`` (component ``attn.state``), applied to
  the recurrent state after every token, so prefill and decode see the same stored states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from ..model.depth import DepthMixer
from ..model.modeling_attnres import AttnResCausalLMOutput, AttnResModel, SubLayer
from .kimi_torch_ops import TorchRMSNormGated, TorchShortConvolution, recurrent_kda, short_conv


class KimiAttnResConfig(PretrainedConfig):
    """Moonshot's ``KimiLinearConfig`` fields (the text model of Kimi-Linear and Kimi K3)."""

    model_type = "kimi_linear"
    keys_to_ignore_at_inference = ["past_key_values"]

    _DEFAULTS = dict(
        vocab_size=163840, hidden_size=4096, head_dim=None, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, rope_theta=10000.0, rope_scaling=None,
        moe_intermediate_size=None, moe_renormalize=True, moe_router_activation_func="sigmoid",
        num_experts=None, num_experts_per_token=None, num_shared_experts=0, routed_scaling_factor=1.0,
        first_k_dense_replace=0, moe_layer_freq=1, use_grouped_topk=True, num_expert_group=1, topk_group=1,
        q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None,
        mla_use_nope=False, mla_use_output_gate=False, num_nextn_predict_layers=0, linear_attn_config=None,
        attn_res_block_size=None, latent_moe_use_norm=False, activation_situ_beta=None,
        activation_situ_linear_beta=None, max_position_embeddings=4096, routed_expert_hidden_size=None,
        topk_method="noaux_tc",
    )

    def __init__(self, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                 attnres_two_phase: bool = True, **kwargs):
        kwargs.pop("model_type", None)
        for key, default in self._DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_router_activation_func not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_activation_func must be softmax or sigmoid; got "
                             f"{self.moe_router_activation_func!r}")
        k = self.attn_res_block_size
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"attn_res_block_size must be null or a positive integer (decoder layers); got {k!r}")
        if self.linear_attn_config is not None:
            for key in ("kda_layers", "full_attn_layers"):
                if self.linear_attn_config.get(key) is None:
                    raise ValueError(f"linear_attn_config needs {key!r}")
        # Inference path of the depth mix: two-phase (default) or the naive reference.
        self.attnres_two_phase = attnres_two_phase
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    # Moonshot's predicates.
    @property
    def is_mla(self) -> bool:
        return (self.q_lora_rank is not None or self.kv_lora_rank is not None or self.qk_nope_head_dim is not None
                or self.qk_rope_head_dim is not None or self.v_head_dim is not None or self.mla_use_nope is True)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def is_kda_layer(self, layer_idx: int) -> bool:
        # Moonshot lists KDA layers 1-based.
        return self.linear_attn_config is not None and (layer_idx + 1) in self.linear_attn_config["kda_layers"]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.num_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % (self.moe_layer_freq or 1) == 0)

    # The reference depth loop's names (attnres_quant.model): block size in *sub-layers*.
    @property
    def use_attnres(self) -> bool:
        return self.attn_res_block_size is not None

    @property
    def attnres_block_size(self) -> int | None:
        return None if self.attn_res_block_size is None else 2 * self.attn_res_block_size

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_hidden_layers


class KimiRMSNorm(nn.Module):
    """Moonshot's RMSNorm: normalise in fp32, cast back, multiply by the weight in the model dtype.

    ``out_dtype`` (used by the depth loop): the fp32 depth mix is first cast to it, as Moonshot's
    ``_apply_attn_res`` returns the mix in the sources' dtype before the pre-norm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if out_dtype is not None:
            x = x.to(out_dtype)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def _situ(gate: torch.Tensor, up: torch.Tensor, beta: float, linear_beta: float | None) -> torch.Tensor:
    dtype = gate.dtype
    g, u = gate.float(), up.float()
    a = beta * torch.tanh(g / beta) * torch.sigmoid(g)
    if linear_beta is not None:
        u = linear_beta * torch.tanh(u / linear_beta)
    return (a * u).to(dtype)


class _GatedMLPMixin:
    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        cfg = self.config_ref
        if cfg.hidden_act == "situ":
            return _situ(gate, up, cfg.activation_situ_beta or 1.0, cfg.activation_situ_linear_beta)
        if cfg.hidden_act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act {cfg.hidden_act!r}")
        return F.silu(gate) * up


class KimiMLP(nn.Module, _GatedMLPMixin):
    """Dense / shared-expert SwiGLU (``gate_proj``, ``up_proj``, ``down_proj``)."""

    def __init__(self, config: KimiAttnResConfig, intermediate_size: int | None = None):
        super().__init__()
        self.config_ref = config
        inter = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self._act(self.gate_proj(x), self.up_proj(x)))


class KimiExpert(nn.Module, _GatedMLPMixin):
    """One routed expert (``w1`` gate, ``w3`` up, ``w2`` down)."""

    def __init__(self, config: KimiAttnResConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.config_ref = config
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(self._act(self.w1(x), self.w3(x)))


class KimiRouter(nn.Module):
    """Sigmoid (or softmax) router with score-correction bias, optional group-limited top-k."""

    def __init__(self, config: KimiAttnResConfig):
        super().__init__()
        self.config_ref = config
        self.top_k = config.num_experts_per_token
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config_ref
        n = x.shape[0]
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.moe_router_activation_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float().unsqueeze(0)
        groups, topk_groups = cfg.num_expert_group or 1, cfg.topk_group or 1
        if groups > 1 and groups > topk_groups:
            group_scores = choice.view(n, groups, -1).topk(2, dim=-1)[0].sum(-1)
            group_idx = group_scores.topk(topk_groups, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
            keep = keep.unsqueeze(-1).expand(n, groups, self.num_experts // groups).reshape(n, -1)
            choice = choice.masked_fill(~keep, float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weight = scores.gather(1, idx)
        if self.top_k > 1 and cfg.moe_renormalize:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return idx, weight * cfg.routed_scaling_factor


class KimiSparseMoe(nn.Module):
    """Routed experts (optionally in a latent space) plus the shared expert."""

    def __init__(self, config: KimiAttnResConfig):
        super().__init__()
        self.config_ref = config
        self.latent = config.routed_expert_hidden_size is not None
        # Calibration mode (GPTQ Hessians, kimi.calibrate_all_experts): every routed expert runs on every
        # token so that each one is calibrated; the output still uses only the routed experts' results.
        self.calibrate_all_experts = False
        inner = config.routed_expert_hidden_size if self.latent else config.hidden_size
        self.experts = nn.ModuleList(KimiExpert(config, inner, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.gate = KimiRouter(config)
        if config.num_shared_experts is not None:
            self.shared_experts = KimiMLP(config, config.moe_intermediate_size * config.num_shared_experts)
        if self.latent:
            self.routed_expert_down_proj = nn.Linear(config.hidden_size, inner, bias=False)
            self.routed_expert_up_proj = nn.Linear(inner, config.hidden_size, bias=False)
            if config.latent_moe_use_norm:
                self.routed_expert_norm = KimiRMSNorm(inner, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        idx, weight = self.gate(x)
        if self.latent:
            x = self.routed_expert_down_proj(x)
        y = x.new_zeros(x.shape, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if self.calibrate_all_experts:
                out = expert(x)[tok]
            elif tok.numel() == 0:
                continue
            else:
                out = expert(x[tok])
            y.index_add_(0, tok, out.float() * weight[tok, pos, None])
        y = y.to(x.dtype)
        if self.latent:
            if self.config_ref.latent_moe_use_norm:
                y = self.routed_expert_norm(y)
            y = self.routed_expert_up_proj(y)
        y = y.view(shape)
        if self.config_ref.num_shared_experts is not None:
            y = y + self.shared_experts(hidden)
        return y


class KimiCache:
    """Per-layer inference state: MLA latent (c_kv, k_rope) or KDA (conv states, recurrent state)."""

    def __init__(self, config: KimiAttnResConfig):
        n = config.num_hidden_layers
        self.mla_layers = [i for i in range(n) if not config.is_kda_layer(i)]
        self.latent: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self.conv_states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n
        self.recurrent_states: list[torch.Tensor | None] = [None] * n
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def update_latent(self, layer_idx: int, c: torch.Tensor, k_rope: torch.Tensor):
        prev = self.latent[layer_idx]
        if prev is not None:
            c, k_rope = torch.cat([prev[0], c], dim=1), torch.cat([prev[1], k_rope], dim=1)
        self.latent[layer_idx] = (c, k_rope)
        return c, k_rope

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for i in range(len(self.latent)):
            if self.latent[i] is not None:
                self.latent[i] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.latent[i])
            if self.conv_states[i] is not None:
                self.conv_states[i] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.conv_states[i])
                s = self.recurrent_states[i]
                self.recurrent_states[i] = s.index_select(0, beam_idx.to(s.device))
        for layer_state in getattr(self, "_kv_quant_state", {}).values():  # per-head running KV scales
            for slot, (lo, hi) in list(layer_state.items()):
                layer_state[slot] = (lo.index_select(0, beam_idx.to(lo.device)),
                                     hi.index_select(0, beam_idx.to(hi.device)))


class KimiMLAAttention(nn.Module):
    """No-RoPE multi-head latent attention; the cache holds the latent."""

    def __init__(self, config: KimiAttnResConfig, layer_idx: int):
        super().__init__()
        if not config.mla_use_nope:
            raise NotImplementedError("Kimi MLA layers without mla_use_nope (RoPE MLA) are not implemented")
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope = config.qk_nope_head_dim
        self.rope = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.q_head_dim = self.nope + self.rope
        self.scaling = self.q_head_dim ** -0.5
        d, h = config.hidden_size, self.num_heads
        if self.q_lora_rank is not None:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = KimiRMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.q_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = KimiRMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=False)
        self.use_output_gate = bool(config.mla_use_output_gate)
        if self.use_output_gate:
            self.g_proj = nn.Linear(d, h * self.v_head_dim, bias=False)
        # Hook of component attn.kv_cache: applied to the latent [B, 1, T, C] and to the shared
        # key part [B, 1, T, rope] before they are cached (and used), prefill and decode alike.
        self.kv_quantizer = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KimiCache | None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank is not None else self.q_proj(x)
        q = q.view(b, t, h, self.q_head_dim).transpose(1, 2)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c = self.kv_a_layernorm(c)
        if self.kv_quantizer is not None:
            c, k_rope = self._store_latent(c, k_rope, cache, token_mask)
        if cache is not None:
            c, k_rope = cache.update_latent(self.layer_idx, c, k_rope)
        n = c.shape[1]
        kv = self.kv_b_proj(c).view(b, n, h, self.nope + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.view(b, 1, n, self.rope).expand(b, h, n, self.rope)], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1 and n == t,
                                             scale=self.scaling)
        out = out.transpose(1, 2).reshape(b, t, h * self.v_head_dim)
        if self.use_output_gate:
            out = out * self.g_proj(x).sigmoid()
        return self.o_proj(out)

    def _store_latent(self, c, k_rope, cache: KimiCache | None, token_mask=None):
        """The latent and the shared key part as the (simulated) cache stores them, each as [B, 1, T, C].

        The reference model's KV-cache protocol (``Attention._store_kv``): a ``stateful`` quantizer
        (per-head running maximum) is called ``q(x, state, slot, token_mask)`` with a dict kept beside
        the cache per layer, so decode steps continue from the prefill's scales; ``token_mask`` [B, T]
        is False at padding, which never widens a scale."""
        q = self.kv_quantizer
        c4, r4 = c.unsqueeze(1), k_rope.unsqueeze(1)
        if not getattr(q, "stateful", False):
            return q(c4).squeeze(1), q(r4).squeeze(1)
        if cache is None:
            state = {}
        else:
            if not hasattr(cache, "_kv_quant_state"):
                cache._kv_quant_state = {}
            state = cache._kv_quant_state.setdefault(self.layer_idx, {})
        return q(c4, state, "latent", token_mask).squeeze(1), q(r4, state, "k_rope", token_mask).squeeze(1)


class KimiDeltaAttention(nn.Module):
    """Kimi Delta Attention on the exact torch recurrence (state V-first [B, H, V, K], fp32)."""

    def __init__(self, config: KimiAttnResConfig, layer_idx: int):
        super().__init__()
        lac = config.linear_attn_config
        self.layer_idx = layer_idx
        self.head_dim = lac["head_dim"]
        self.num_heads = lac["num_heads"]
        self.conv_size = lac["short_conv_kernel_size"]
        d, proj = config.hidden_size, self.head_dim * self.num_heads
        self.q_proj = nn.Linear(d, proj, bias=False)
        self.k_proj = nn.Linear(d, proj, bias=False)
        self.v_proj = nn.Linear(d, proj, bias=False)
        self.q_conv1d = TorchShortConvolution(proj, self.conv_size, activation="silu")
        self.k_conv1d = TorchShortConvolution(proj, self.conv_size, activation="silu")
        self.v_conv1d = TorchShortConvolution(proj, self.conv_size, activation="silu")
        self.A_log = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32))
        self.f_a_proj = nn.Linear(d, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, proj, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(proj, dtype=torch.float32))
        self.b_proj = nn.Linear(d, self.num_heads, bias=False)
        self.use_full_rank_gate = bool(lac.get("use_full_rank_gate", False))
        self.gate_lower_bound = lac.get("gate_lower_bound", None)
        if self.use_full_rank_gate:
            self.g_proj = nn.Linear(d, proj, bias=False)
        else:
            self.g_a_proj = nn.Linear(d, self.head_dim, bias=False)
            self.g_b_proj = nn.Linear(self.head_dim, proj, bias=False)
        self.o_norm = TorchRMSNormGated(self.head_dim, eps=config.rms_norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(proj, d, bias=False)
        # Hook of component attn.state: applied to the recurrent state after every token.
        self.state_quantizer = None

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: KimiCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        H, D = self.num_heads, self.head_dim
        convs = cache.conv_states[self.layer_idx] if cache is not None else None
        state = cache.recurrent_states[self.layer_idx] if cache is not None else None
        cq, ck, cv = convs if convs is not None else (None, None, None)
        q, cq = short_conv(self.q_proj(x), self.q_conv1d.weight, self.q_conv1d.bias, cache=cq, mask=pad_mask)
        k, ck = short_conv(self.k_proj(x), self.k_conv1d.weight, self.k_conv1d.bias, cache=ck, mask=pad_mask)
        v, cv = short_conv(self.v_proj(x), self.v_conv1d.weight, self.v_conv1d.bias, cache=cv, mask=pad_mask)
        g = self.f_b_proj(self.f_a_proj(x)).view(b, t, H, D)
        beta = self.b_proj(x).float()
        o, state = recurrent_kda(q.view(b, t, H, D), k.view(b, t, H, D), v.view(b, t, H, D), g, beta,
                                 initial_state=state, output_final_state=True, A_log=self.A_log,
                                 dt_bias=self.dt_bias, lower_bound=self.gate_lower_bound,
                                 state_quantizer=self.state_quantizer)
        if cache is not None:
            cache.conv_states[self.layer_idx] = (cq, ck, cv)
            cache.recurrent_states[self.layer_idx] = state
        gate = self.g_proj(x) if self.use_full_rank_gate else self.g_b_proj(self.g_a_proj(x))
        o = self.o_norm(o, gate.view(b, t, H, D))
        return self.o_proj(o.reshape(b, t, H * D))


class KimiDecoderLayer(nn.Module):
    def __init__(self, config: KimiAttnResConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.is_linear_attn = config.is_kda_layer(layer_idx)
        if self.is_linear_attn:
            self.self_attn = KimiDeltaAttention(config, layer_idx)
        elif config.is_mla:
            self.self_attn = KimiMLAAttention(config, layer_idx)
        else:
            raise NotImplementedError("Kimi layers are KDA or MLA")
        if config.is_moe_layer(layer_idx):
            self.block_sparse_moe = KimiSparseMoe(config)
        else:
            self.mlp = KimiMLP(config)
        self.input_layernorm = KimiRMSNorm(d, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KimiRMSNorm(d, eps=config.rms_norm_eps)
        if config.use_attnres:
            self.self_attention_res_norm = KimiRMSNorm(d, eps=config.rms_norm_eps)
            self.mlp_res_norm = KimiRMSNorm(d, eps=config.rms_norm_eps)
            self.self_attention_res_proj = nn.Linear(d, 1, bias=False)
            self.mlp_res_proj = nn.Linear(d, 1, bias=False)
            self.self_attention_res_proj._is_attnres_proj = True
            self.mlp_res_proj._is_attnres_proj = True
            self.attn_depth = DepthMixer(2 * layer_idx, config.rms_norm_eps)
            self.mlp_depth = DepthMixer(2 * layer_idx + 1, config.rms_norm_eps)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp


class KimiPreTrainedModel(PreTrainedModel):
    config_class = KimiAttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["KimiDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_is_attnres_proj", False):
                init.zeros_(module.weight)  # uniform depth softmax at init (paper section 5)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (KimiRMSNorm, TorchRMSNormGated)):
            init.ones_(module.weight)
        elif isinstance(module, TorchShortConvolution):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, KimiRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, KimiDeltaAttention):
            with torch.no_grad():
                module.A_log.copy_(torch.log(torch.linspace(1, 16, module.num_heads)))
            init.zeros_(module.dt_bias)


class KimiAttnResModel(KimiPreTrainedModel):
    # The reference model's depth loop and folded queries, reused as they are (taken from the class
    # dict so a staticmethod stays one): the config's attnres_block_size / num_sublayers /
    # attnres_two_phase give it the Kimi block in sub-layers.
    _attnres_forward = AttnResModel.__dict__["_attnres_forward"]
    _folded_queries = AttnResModel.__dict__["_folded_queries"]

    def __init__(self, config: KimiAttnResConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(KimiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.use_attnres:
            self.output_attn_res_norm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.output_attn_res_proj = nn.Linear(config.hidden_size, 1, bias=False)
            self.output_attn_res_proj._is_attnres_proj = True
            self.output_depth = DepthMixer(config.num_sublayers, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def sublayers(self) -> list[SubLayer]:
        """Sub-layers 0..2L-1 (attention 2i, MLP/MoE 2i+1), then the output mix (index 2L)."""
        out = []
        for layer in self.layers:
            out.append(SubLayer(len(out), getattr(layer, "attn_depth", None),
                                getattr(layer, "self_attention_res_proj", None),
                                getattr(layer, "self_attention_res_norm", None), layer.input_layernorm,
                                layer.self_attn, True))
            out.append(SubLayer(len(out), getattr(layer, "mlp_depth", None), getattr(layer, "mlp_res_proj", None),
                                getattr(layer, "mlp_res_norm", None), layer.post_attention_layernorm, layer.ffn,
                                False))
        out.append(SubLayer(len(out), getattr(self, "output_depth", None), getattr(self, "output_attn_res_proj", None),
                            getattr(self, "output_attn_res_norm", None), self.norm, None, False))
        return out

    def depth_mixers(self) -> list[DepthMixer]:
        return [s.mixer for s in self.sublayers() if s.mixer is not None]

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_depth_attentions=False, **kwargs):
        cfg = self.config
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        use_cache = cfg.use_cache if use_cache is None else use_cache
        cache = past_key_values if use_cache else None
        if use_cache and cache is None:
            cache = KimiCache(cfg)
        past = cache.get_seq_length() if cache is not None else 0
        padded = attention_mask is not None and not bool(attention_mask.all())
        mla_mask = AttnResModel._mask(attention_mask, t, past, inputs_embeds.device)
        # KDA: left padding is handled by zeroing padded inputs of the short convolutions, which
        # keeps the recurrent state at zero until the first real token (prefill only).
        kda_mask = attention_mask[:, -t:] if padded and past == 0 else None
        token_mask = attention_mask[:, -t:].bool() if padded else None  # MLA latent cache scales (per_head)
        if padded and past > 0 and t > 1:
            raise NotImplementedError("padded chunked prefill after a cache is not supported")

        def run(sub: SubLayer, x):
            if sub.is_attn:
                fn = sub.fn
                if isinstance(fn, KimiDeltaAttention):
                    return fn(x, kda_mask, cache)
                return fn(x, mla_mask, cache, token_mask)
            return sub.fn(x)

        subs = self.sublayers()
        depth = None
        if not cfg.use_attnres:
            h = inputs_embeds
            for sub in subs[:-1]:
                h = h + run(sub, sub.pre_norm(h))
            hidden = self.norm(h)
        else:
            hidden, depth = self._attnres_forward(inputs_embeds, subs, run, output_depth_attentions)
        if cache is not None:
            cache.seen_tokens += t
        return hidden, cache, depth


class KimiAttnResForCausalLM(KimiPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _is_stateful = True  # KDA's recurrent state cannot be cropped or rolled back

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must let the model create its own KimiCache

    def __init__(self, config: KimiAttnResConfig):
        super().__init__(config)
        self.model = KimiAttnResModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_depth_attentions=False,
                logits_to_keep: int = 0, return_dict=None, **kwargs):
        hidden, cache, depth = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                          past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                          use_cache=use_cache, output_depth_attentions=output_depth_attentions)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return AttnResCausalLMOutput(loss=loss, logits=logits, past_key_values=cache, depth_attentions=depth)


__all__ = ["KimiAttnResConfig", "KimiAttnResForCausalLM", "KimiAttnResModel", "KimiCache", "KimiRMSNorm",
           "KimiDeltaAttention", "KimiMLAAttention", "KimiSparseMoe"]
