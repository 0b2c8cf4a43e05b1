"""The record every model family supplies to the registry (:class:`Family`), and helpers families share.

A family module (``reference``, ``llama``, ``kimi`` ...) ends with ``FAMILY = Family(...)``; the
registry in :mod:`attnres_quant.architectures` lists it, and loading / plan / quantize / the runner
only ever talk to that record.  Fields (all callables are plain functions of the family module):

* identity: ``name``; ``model_types`` (config.json ``model_type`` values it loads); ``handles_model``
  (is a loaded or meta-device model one of ours?); ``fallback`` (the family for model types no family
  claims: transformers' causal LMs, at most one);
* loading: ``check_config(config, where, trust_remote_code) -> (model_type, family label, block size in
  sub-layers or None, notes)``; ``tokenizer_status(directory, files, tokenizer, trust_remote_code, where)
  -> (has tokenizer, note or None)``; ``structure(directory, config, dtype, trust_remote_code)`` -> the
  model on the meta device; ``load(src, directory, trust_remote_code) -> (model, tokenizer)``;
  ``describe(model) -> dict`` (``family``, ``model_type``, ``block_size`` and family extras for
  ``loading.describe_model``);
* components: ``components`` / ``compute_components`` (names it can yield), ``parts(model)`` ->
  :class:`FamilyPart` records (one per quantizable tensor, then one per computation hook, each with its
  :class:`ComponentRef`), ``component(name, num_layers)`` (the pure name rule);
* quantization: ``default_keep`` (components a method's default never reaches), ``method_problem(method,
  options)`` (why a method cannot run here, or None), ``calibration_context(model)`` (a context manager
  around calibration forwards, e.g. all experts see every token), ``awq_components`` (components whose
  Linears AWQ quantizes) and ``awq_mappings(model)`` (llm-compressor smoothing mappings, None = the
  library's own), ``kv_cache_bytes(config, precision, granularity)`` (bytes per token of context of its
  cache, None = the standard K/V formula), ``keep_reason`` (why ``default_keep`` holds what it holds, for
  the plan's note);
* computations of its own: ``hooks`` (component -> :class:`PrecisionHook`: which precision field a rule
  sets on it, how its plan row reads, how the quantizer sets it on the module; e.g. mHC's ``hc.pre`` /
  ``hc.post`` / ``hc.comb`` / ``hc.streams``; None = only the built-in computations ``depth.softmax``,
  ``depth.sources``, ``attn.kv_cache``, ``attn.state``, which the plan and quantizer handle themselves).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class ComponentRef:
    component: str
    layer: int | None  # decoder layer; num_hidden_layers for the final norm / output mix; None for embed, lm_head
    expert: int | None = None  # routed expert index (moe.experts.*)


@dataclass
class FamilyPart:
    """A weight tensor (kind "weight", name = parameter name, e.g. ``model.layers.0.attn.q_proj.weight``)
    or a computation (kind "compute", name = module name holding the precision hook).

    ``holder``: for a tensor that is a slice of a parameter (mHC: one routed expert of DeepSeek-V4's fused
    3-D expert Parameters, name ``...experts.gate_up_proj[e,0:I]``), an object whose ``.weight`` reads and
    writes that slice; None for a whole parameter (reached through its module)."""

    name: str
    ref: ComponentRef
    kind: str
    holder: Any = None


@dataclass(frozen=True)
class PrecisionHook:
    """One computation component a family brings (``Family.hooks``), as the plan and the quantizer see it."""

    field: str  # the precision field a rule sets on it: "compute" (like depth.softmax) or "storage"
    suffix: str  # appended to the module name in the plan row (".comb", ".streams")
    # (resolved value of ``field`` or None, model dtype name) -> (precision, granularity, kept at baseline?)
    row: Callable[[str | None, str], tuple[str, str, bool]]
    # (module, resolved value of ``field`` or None, model torch dtype) -> None: sets (or clears) the hook
    apply: Callable[[Any, str | None, Any], None]


def _no_problem(method: str, options: dict | None = None) -> str | None:
    return None


def _no_context(model):
    return contextlib.nullcontext(model)


def _no_mappings(model):
    return None


@dataclass(frozen=True)
class Family:
    """What the registry needs from one model family (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    components: tuple[str, ...]
    compute_components: tuple[str, ...]
    handles_model: Callable[[Any], bool]
    check_config: Callable
    tokenizer_status: Callable
    structure: Callable
    load: Callable
    describe: Callable
    parts: Callable[[Any], Iterator[FamilyPart]]
    component: Callable
    default_keep: tuple[str, ...] = ()
    method_problem: Callable = _no_problem
    calibration_context: Callable = _no_context
    awq_components: tuple[str, ...] = ()
    awq_mappings: Callable = _no_mappings
    hooks: dict[str, PrecisionHook] | None = None
    kv_cache_bytes: Callable | None = None
    keep_reason: str | None = None  # the plan's note on default_keep (None: no reason given)
    awq_note: str | None = None  # the plan's note on where AWQ folds its scales (None: the reference wording)
    fallback: bool = False

    def handles_config(self, config: dict) -> bool:
        return config.get("model_type") in self.model_types

    def num_experts(self, model) -> int:
        if not any(c.startswith("moe.experts.") for c in self.components):
            return 0
        return int(getattr(model.config, "num_experts", None) or 0)

    @property
    def has_experts(self) -> bool:
        """Whether this family can have routed experts (a rule's ``experts:`` selector)."""
        return any(c.startswith("moe.experts.") for c in self.components)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def torch_dtype(dtype: Any):
    """torch dtype from a torch.dtype or a name (bfloat16 / bf16 / float16 / fp16 / float32 / fp32); None for auto."""
    import torch

    from ..errors import UserError

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name == "auto":
        return None
    name = _DTYPE_ALIASES.get(name, name)
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(f"Unknown model dtype {dtype!r}", where="model dtype",
                        fix="use bfloat16, float16, float32 or auto (the checkpoint's own dtype)")
    return getattr(torch, name)


# --------------------------------------------------------------------------- name rules
Rules = list[tuple[str, str]]  # (regex over a module name, component; ``{1}`` = the second group)


def classify(name: str, rules: Rules) -> tuple[str, int | None] | None:
    """(component, layer) of a module name under regex ``rules`` (first group = layer index)."""
    for pattern, comp in rules:
        m = re.fullmatch(pattern, name)
        if m:
            groups = m.groups()
            layer = int(groups[0]) if groups and groups[0] is not None and groups[0].isdigit() else None
            return comp.format(*groups) if "{" in comp else comp, layer
    return None


def rule_component(name: str, rules: Rules, num_layers: int | None, after_last: tuple[str, ...] = ()) -> \
        ComponentRef | None:
    """Component of a module name (``.weight`` suffix allowed); modules in ``after_last`` sit after the
    last layer (the final norm, the final depth mix) and get layer ``num_layers``."""
    base = name[:-len(".weight")] if name.endswith(".weight") else name
    hit = classify(base, rules)
    if hit is None:
        return None
    comp, layer = hit
    if base in after_last:
        layer = num_layers
    return ComponentRef(comp, layer)


def rule_weight_parts(model, rules: Rules, after_last: tuple[str, ...] = ()) -> Iterator[FamilyPart]:
    """One weight part per module with a ``weight`` tensor that ``rules`` name, in module order; any
    other ``nn.Linear`` / ``nn.Embedding`` is component ``other`` (selectable by a ``modules`` regex);
    other norm-like modules are not parts."""
    import torch
    from torch import nn

    L = int(getattr(model.config, "num_hidden_layers", 0))
    for name, module in model.named_modules():
        ref = rule_component(name, rules, L, after_last)
        if ref is None:
            if not (isinstance(module, (nn.Linear, nn.Embedding)) and name):
                continue
            ref = ComponentRef("other", None)
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            yield FamilyPart(f"{name}.weight", ref, "weight")


__all__ = ["ComponentRef", "FamilyPart", "PrecisionHook", "Family", "Rules", "torch_dtype", "classify",
           "rule_component", "rule_weight_parts"]
