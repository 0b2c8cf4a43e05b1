"""Component resolver: map every quantizable tensor and computation of a model to a
component of SPEC section 2 with its layer index.

Two naming schemes are recognised:

* the reference AttnRes model (flash-linear-attention names: ``model.embeddings``,
  ``model.layers.N.attn.q_proj``, ``model.layers.N.attn_res_proj`` ...), whose depth
  path also yields the computations ``depth.softmax`` and ``depth.sources`` (one per
  :class:`~attnres_quant.model.depth.DepthMixer`; layer index = sub-layer j // 2, the
  final mix has layer index ``num_hidden_layers``) and ``attn.kv_cache`` (one per
  attention layer, through its ``kv_quantizer`` hook);
* Hugging Face Llama-family models (Llama, Qwen2/3, Mistral: ``model.embed_tokens``,
  ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
  ``post_attention_layernorm``, ``model.norm``, ``lm_head``), which have no depth parts.

Any other ``nn.Linear`` / ``nn.Embedding`` becomes component ``other`` (selectable by a
``modules`` regex); any other norm-like 1-D weight is not a part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# Weight-bearing components, then computations.
WEIGHT_COMPONENTS = ("embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
                     "lm_head", "norm", "depth.query", "depth.key_norm", "other")
COMPUTE_COMPONENTS = ("depth.softmax", "depth.sources", "attn.kv_cache")
COMPONENTS = WEIGHT_COMPONENTS + COMPUTE_COMPONENTS

# Components whose weight is an nn.Linear called as a module (so real kernels and
# activation quantizers can replace / wrap it).
LINEAR_COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "lm_head",
                     "other")


@dataclass
class Part:
    """One quantizable tensor (kind="weight") or computation (kind="compute")."""

    component: str
    layer: int | None  # transformer layer index; None for embed / lm_head / other
    name: str  # module name (weights: tensor name is name + ".weight")
    kind: str  # "weight" | "compute"
    module: nn.Module = field(repr=False, compare=False)
    shape: tuple[int, ...] = ()
    numel: int = 0
    dtype: torch.dtype | None = None
    is_linear: bool = False  # an nn.Linear called as a module

    @property
    def tensor_name(self) -> str:
        return f"{self.name}.weight" if self.kind == "weight" else self.name


_ATTNRES_RULES = [
    (r"model\.embeddings", "embed"),
    (r"model\.layers\.(\d+)\.attn\.(q|k|v|o)_proj", "attn.{1}"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj", "mlp.{1}"),
    (r"model\.layers\.(\d+)\.(attn_norm|mlp_norm)", "norm"),
    (r"model\.layers\.(\d+)\.(attn|mlp)_res_proj", "depth.query"),
    (r"model\.layers\.(\d+)\.(attn|mlp)_res_norm", "depth.key_norm"),
    (r"model\.res_proj", "depth.query"),
    (r"model\.res_norm", "depth.key_norm"),
    (r"model\.norm", "norm"),
    (r"lm_head", "lm_head"),
]

_LLAMA_RULES = [
    (r"model\.embed_tokens", "embed"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj", "attn.{1}"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj", "mlp.{1}"),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)", "norm"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)", "norm"),
    (r"model\.norm", "norm"),
    (r"lm_head", "lm_head"),
]


def is_attnres(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "use_attnres", False)) and hasattr(
        getattr(model, "model", None), "depth_mixers")


def num_layers(model: nn.Module) -> int:
    return int(getattr(model.config, "num_hidden_layers", 0))


def _classify(name: str, rules) -> tuple[str, int | None] | None:
    for pattern, comp in rules:
        m = re.fullmatch(pattern, name)
        if m:
            groups = m.groups()
            layer = int(groups[0]) if groups and groups[0] is not None and groups[0].isdigit() else None
            return comp.format(*groups) if "{" in comp else comp, layer
    return None


def resolve_components(model: nn.Module) -> list[Part]:
    """Every quantizable tensor and computation of ``model``, in module order."""
    attnres = is_attnres(model) or type(model).__name__.startswith(("AttnRes", "FLATransformer"))
    rules = _ATTNRES_RULES if attnres else _LLAMA_RULES
    L = num_layers(model)
    parts: list[Part] = []
    for name, module in model.named_modules():
        hit = _classify(name, rules)
        if hit is None:
            if isinstance(module, (nn.Linear, nn.Embedding)) and name:
                hit = ("other", None)
            else:
                continue
        comp, layer = hit
        if comp == "norm" and name == "model.norm":
            layer = L  # the final norm sits after the last layer, like the final depth mix
        if comp in ("depth.query", "depth.key_norm") and name.startswith("model.res_"):
            layer = L
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        # The model's depth loop reads *_res_proj.weight directly; it is not a module call.
        linear = isinstance(module, nn.Linear) and comp in LINEAR_COMPONENTS
        parts.append(Part(comp, layer, name, "weight", module, tuple(w.shape), w.numel(), w.dtype, linear))
    if attnres:
        for mname, module in model.named_modules():
            if type(module).__name__ == "DepthMixer":
                j = module.sublayer
                # Sub-layer 0 reads one source (the embedding, weight 1): it has no depth softmax
                # to lower, only the stored embedding.
                for comp in ("depth.softmax", "depth.sources") if j > 0 else ("depth.sources",):
                    parts.append(Part(comp, j // 2, mname, "compute", module))
            elif hasattr(module, "kv_quantizer"):
                parts.append(Part("attn.kv_cache", getattr(module, "layer_idx", None), mname, "compute", module))
    return parts


def available_components(parts: list[Part]) -> set[str]:
    return {p.component for p in parts}
