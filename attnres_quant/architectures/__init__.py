"""The architecture registry: one module per model family (SPEC section 1, "Model families").

Registered families, in lookup order:

* ``reference`` -- our AttnRes model (``model_type`` ``attnres``) and flash-linear-attention
  ``transformer`` checkpoints (:mod:`.reference`);
* ``kimi`` -- Kimi-Linear / Kimi K3 (KDA + MLA + MoE + Block AttnRes) on attnres_quant's own model
  (:mod:`.kimi`, with :mod:`.kimi_modeling`, the exact torch kernels :mod:`.kimi_torch_ops` and the
  compressed-tensors reader :mod:`.compressed`);
* ``mhc`` -- Manifold-Constrained Hyper-Connections: our minimal ``attnres_mhc`` model
  (:mod:`.mhc_modeling`) and transformers' DeepSeek-V4; its computations ``hc.*`` are precision hooks
  (:mod:`.mhc`, ``Family.hooks``);
* ``llama`` -- the Llama-family comparators (llama, qwen2, qwen3, mistral) and, as the *fallback*, any
  other transformers causal LM (:mod:`.llama`; both transformers-loaded families share :mod:`.hf`).

Each family module ends with ``FAMILY = Family(...)`` (:class:`.base.Family`: model types, config
check, loading, meta-device structure, describe, component rules and parts, default-keep components,
method limits, calibration mode, AWQ mappings, precision hooks of its own computations).  ``loading`` (preflight /
structure / load / describe), ``quant.components`` / ``quant.plan`` (parts, rules, method limits),
``quant.apply`` / ``quant.awq`` (calibration, AWQ mappings, hooks) and hence the pipeline runner only
consult :func:`family_for_config` / :func:`family_for_model`.

Adding a family (docs/ARCHITECTURE.md, "Adding a model family"): write ``architectures/<name>.py``
ending in ``FAMILY = Family(...)`` and add ``"<name>"`` to :data:`FAMILY_MODULES` before the fallback.
:func:`register` adds a ``Family`` at run time (tests use it to prove the plug-in point).
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import ComponentRef, Family, FamilyPart, PrecisionHook

# Lookup order: the first family whose model_types (config) / handles_model (model) match wins;
# the fallback family (llama: any transformers causal LM) comes last.
FAMILY_MODULES = ("reference", "kimi", "mhc", "llama")

_extra: list[Family] = []  # families registered at run time (register / unregister)


def families() -> list[Family]:
    """Every registered family, run-time registrations first, the fallback last."""
    found = list(_extra) + [importlib.import_module(f"{__name__}.{name}").FAMILY for name in FAMILY_MODULES]
    return [f for f in found if not f.fallback] + [f for f in found if f.fallback]


def family(name: str) -> Family:
    """The registered family called ``name`` (KeyError when there is none)."""
    for fam in families():
        if fam.name == name:
            return fam
    raise KeyError(name)


def register(fam: Family) -> Family:
    """Register a family at run time (looked up before the built-in ones); returns it."""
    unregister(fam.name)
    _extra.insert(0, fam)
    return fam


def unregister(name: str) -> None:
    _extra[:] = [f for f in _extra if f.name != name]


def family_for_config(config: dict) -> Family | None:
    """The family that loads a config.json dict (by ``model_type``), else the fallback family (which
    checks that transformers knows the type); None only for a non-dict."""
    if not isinstance(config, dict):
        return None
    fams = families()
    for fam in fams:
        if not fam.fallback and fam.handles_config(config):
            return fam
    return next((f for f in fams if f.fallback), None)


def family_for_model(model) -> Family | None:
    """The family a loaded (or meta-device) model belongs to; the fallback family claims the rest."""
    for fam in families():
        if fam.handles_model(model):
            return fam
    return None


__all__ = ["Family", "FamilyPart", "PrecisionHook", "ComponentRef", "FAMILY_MODULES", "families", "family", "register",
           "unregister", "family_for_config", "family_for_model"]
