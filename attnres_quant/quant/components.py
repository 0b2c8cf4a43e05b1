"""Component resolver: map every quantizable tensor and computation of a model to a
component of SPEC section 2 with its layer index.

The names come from the model's family in the architecture registry
(``attnres_quant.architectures``: ``reference`` for the AttnRes model and FLA ``transformer``
checkpoints, ``kimi`` for Kimi-Linear / K3, ``llama`` for the Llama-family comparators and any
other transformers causal LM).  A family yields :class:`~attnres_quant.architectures.FamilyPart`
records (a parameter name or a hook-holding module name, with its component, layer and expert);
this module turns them into :class:`Part` objects the plan and the methods work on:

* a weight part's ``module`` is the module holding the tensor; a tensor not called ``weight``
  (Kimi's ``A_log``, ``dt_bias``, a router's ``e_score_correction_bias``) is reached through a
  :class:`ParamView`, and ``param`` names it;
* ``is_linear``: the tensor is an ``nn.Linear``'s weight called as a module (real kernels and
  activation quantizers can replace / wrap it; the depth loop reads ``*_res_proj.weight``
  directly, which is not a call, but that component is not a Linear component anyway);
* computations (``depth.softmax`` / ``depth.sources`` per ``DepthMixer``, ``attn.kv_cache``,
  ``attn.state``) are parts of kind ``compute``; sub-layer 0's mixer reads one source (the
  embedding, weight 1), so it has no ``depth.softmax`` to lower, only its stored sources;
* a family's own computations (``Family.hooks``: mHC's ``hc.pre`` / ``hc.post`` / ``hc.comb`` /
  ``hc.streams``) carry their :class:`~attnres_quant.architectures.base.PrecisionHook` in ``Part.hook``,
  and a weight that is a slice of a parameter (one expert of fused experts) its family's ``holder``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _all_components() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(weight components, computations) over every registered family, in registry order."""
    from ..architectures import families

    weights: list[str] = []
    compute: list[str] = []
    for fam in families():
        for c in fam.components:
            target = compute if c in fam.compute_components else weights
            if c not in target:
                target.append(c)
    return tuple(weights), tuple(compute)


def known_components() -> tuple[str, ...]:
    """Every component a registered family names (weights, then computations), including families
    registered at run time (``architectures.register``)."""
    weights, compute = _all_components()
    return weights + compute


# Weight-bearing components, then computations (every family's in FAMILY_MODULES, at import).
WEIGHT_COMPONENTS, COMPUTE_COMPONENTS = _all_components()
COMPONENTS = WEIGHT_COMPONENTS + COMPUTE_COMPONENTS

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
    # A family's own computation (Family.hooks: mHC's hc.*): which field a rule sets, how the row reads, how
    # the quantizer sets it; None for weights and the built-in computations.
    hook: Any = field(default=None, repr=False, compare=False)

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


def is_attnres(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "use_attnres", False)) and hasattr(
        getattr(model, "model", None), "depth_mixers")


def num_layers(model: nn.Module) -> int:
    return int(getattr(model.config, "num_hidden_layers", 0))


def resolve_components(model: nn.Module) -> list[Part]:
    """Every quantizable tensor and computation of ``model`` (its registry family's parts, in order)."""
    from ..architectures import family_for_model

    fam = family_for_model(model)
    hooks = fam.hooks or {}
    modules = dict(model.named_modules())
    parts: list[Part] = []
    for fp in fam.parts(model):
        ref = fp.ref
        if fp.kind == "weight":
            mname, _, attr = fp.name.rpartition(".")
            module = modules[mname]
            holder = fp.holder  # a family's stand-in for a slice (mHC: one expert of fused experts), else:
            if holder is None:
                holder = module if attr == "weight" else ParamView(module, attr)
            w = holder.weight
            linear = attr == "weight" and isinstance(module, nn.Linear) and ref.component in LINEAR_COMPONENTS
            parts.append(Part(ref.component, ref.layer, mname, "weight", holder, tuple(w.shape), w.numel(), w.dtype,
                              linear, ref.expert, attr))
        else:
            module = modules[fp.name]
            if ref.component == "depth.softmax" and getattr(module, "sublayer", 1) == 0:
                continue  # sub-layer 0 mixes one source (weight 1): no softmax to lower
            parts.append(Part(ref.component, ref.layer, fp.name, "compute", module, hook=hooks.get(ref.component)))
    return parts


def available_components(parts: list[Part]) -> set[str]:
    return {p.component for p in parts}
