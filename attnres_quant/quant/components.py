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

Families of the architecture registry (``attnres_quant.architectures``: Kimi-Linear / K3)
name their own parts (:func:`_family_parts`): one part per *parameter* (``A_log``,
``dt_bias`` and the router's ``e_score_correction_bias`` have no module ``.weight``; such a
part's ``module`` is a :class:`ParamView` and its ``param`` names the tensor), routed experts
carry their ``expert`` index, and KDA layers add the computation ``attn.state``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# Weight-bearing components, then computations.
WEIGHT_COMPONENTS = ("embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
                     "lm_head", "norm", "depth.query", "depth.key_norm", "other")
COMPUTE_COMPONENTS = ("depth.softmax", "depth.sources", "attn.kv_cache", "attn.state")
# Components only the Kimi family has (KDA / MLA / MoE; SPEC section 2).
FAMILY_WEIGHT_COMPONENTS = ("attn.gate", "attn.conv", "attn.decay", "attn.q_a", "attn.q_b", "attn.kv_a",
                            "attn.kv_b", "moe.router", "moe.experts.gate", "moe.experts.up", "moe.experts.down",
                            "moe.shared.gate", "moe.shared.up", "moe.shared.down", "moe.latent.down",
                            "moe.latent.up")

def _registry_components() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from ..architectures import family_components

    return family_components()


# Components further registered families add (mHC: hc.fn; computations hc.pre/post/comb/streams).
_REG_WEIGHTS, _REG_COMPUTE = _registry_components()
FAMILY_WEIGHT_COMPONENTS += tuple(c for c in _REG_WEIGHTS
                                  if c not in WEIGHT_COMPONENTS + FAMILY_WEIGHT_COMPONENTS + COMPUTE_COMPONENTS)
COMPUTE_COMPONENTS += tuple(c for c in _REG_COMPUTE if c not in COMPUTE_COMPONENTS)
COMPONENTS = WEIGHT_COMPONENTS + FAMILY_WEIGHT_COMPONENTS + COMPUTE_COMPONENTS

# Components whose weight is an nn.Linear called as a module (so real kernels and
# activation quantizers can replace / wrap it).
LINEAR_COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "lm_head",
                     "other", "attn.gate", "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b", "moe.experts.gate",
                     "moe.experts.up", "moe.experts.down", "moe.shared.gate", "moe.shared.up", "moe.shared.down",
                     "moe.latent.down", "moe.latent.up")


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
    expert: int | None = None  # routed expert index (moe.experts.*), selected by a rule's `experts:`
    param: str = "weight"  # the module attribute holding the tensor (A_log, dt_bias, e_score_correction_bias)

    @property
    def tensor_name(self) -> str:
        return f"{self.name}.{self.param}" if self.kind == "weight" else self.name


class ParamView:
    """Stands in for a module whose quantizable tensor is not called ``weight`` (``A_log``, ``dt_bias``,
    a router's ``e_score_correction_bias``): ``view.weight`` reads and writes ``module.<param>``, so the
    plan and the RTN / cast code treat it like any weight."""

    def __init__(self, module: nn.Module, param: str):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_param", param)

    @property
    def weight(self):
        return getattr(self._module, self._param)

    @weight.setter
    def weight(self, value):
        setattr(self._module, self._param, value)

    def __repr__(self) -> str:
        return f"ParamView({type(self._module).__name__}.{self._param})"


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


def _family_parts(model: nn.Module, fam) -> list[Part]:
    """Parts of a registry family's model (Kimi): one per parameter, then its computations."""
    modules = dict(model.named_modules())
    parts: list[Part] = []
    for kp in fam.parts(model):
        ref = kp.ref
        if kp.kind == "weight":
            mname, _, attr = kp.name.rpartition(".")
            module = modules[mname]
            holder = getattr(kp, "holder", None)  # a family's own stand-in (mHC: one expert of fused experts)
            if holder is None:
                holder = module if attr == "weight" else ParamView(module, attr)
            w = holder.weight
            linear = attr == "weight" and isinstance(module, nn.Linear) and ref.component in LINEAR_COMPONENTS
            parts.append(Part(ref.component, ref.layer, mname, "weight", holder, tuple(w.shape), w.numel(), w.dtype,
                              linear, ref.expert, attr))
        else:
            module = modules[kp.name]
            # Sub-layer 0 mixes one source (weight 1): no depth softmax to lower (as on the reference model).
            if ref.component == "depth.softmax" and getattr(module, "sublayer", 1) == 0:
                continue
            parts.append(Part(ref.component, ref.layer, kp.name, "compute", module))
    return parts


def resolve_components(model: nn.Module) -> list[Part]:
    """Every quantizable tensor and computation of ``model``, in module order."""
    from ..architectures import family_for_model

    fam = family_for_model(model)
    if fam is not None:
        return _family_parts(model, fam)
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
