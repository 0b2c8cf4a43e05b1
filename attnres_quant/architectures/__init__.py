"""Model families beyond the reference AttnRes model (SPEC section 1, "Model families").

One module per family: ``kimi`` (Kimi-Linear / Kimi K3: loading, component names) with its
modelling code ``kimi_modeling`` and the exact PyTorch versions of FLA's kernels
``kimi_torch_ops``; ``mhc`` (Manifold-Constrained Hyper-Connections: our minimal ``attnres_mhc`` model
in ``mhc_modeling`` and transformers' DeepSeek-V4) whose computation components are precision hooks
(``hooks.PrecisionHook``).

A small registry (:func:`family_for_config`, :func:`family_for_model`) is consulted by
``loading`` (preflight / structure / load / describe) and ``quant.components`` / ``quant.plan``.
Only the Kimi family is registered; the reference model and the Llama comparators are still
handled by the rule tables in ``loading.py`` and ``quant/components.py`` (moving them here is
the remaining part of the registry refactor, issue 16 item 1).
"""

from __future__ import annotations

from typing import Any

_FAMILY_MODULES = ("kimi", "mhc")
# Class-name prefixes of the models the families load (a cheap test before any family module is imported).
_MODEL_CLASS_PREFIXES = ("Kimi", "MHC", "DeepseekV4")


def families() -> list[Any]:
    """Every registered family (``Family`` records), imported lazily."""
    import importlib

    return [importlib.import_module(f"{__name__}.{name}").FAMILY for name in _FAMILY_MODULES]


def family_for_config(config: dict) -> Any | None:
    """The registered family that loads a config.json dict (by ``model_type``), or None."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        return None
    for fam in families():
        if fam.handles_config(config):
            return fam
    return None


def family_for_model(model) -> Any | None:
    """The registered family a loaded (or meta-device) model belongs to, or None."""
    cls = type(model).__name__
    if not cls.startswith(_MODEL_CLASS_PREFIXES):  # cheap: no family import for the reference / HF models
        return None
    for fam in families():
        if fam.handles_model(model):
            return fam
    return None


def family_components() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(weight components, computation components) that registered families add to the built-in ones."""
    weights: list[str] = []
    compute: list[str] = []
    for fam in families():
        compute += [c for c in fam.compute_components if c not in compute]
        weights += [c for c in fam.components if c not in fam.compute_components and c not in weights]
    return tuple(weights), tuple(compute)


def precision_hook(component: str):
    """The :class:`~attnres_quant.architectures.hooks.PrecisionHook` a family declares for a computation
    component (mHC's hc.pre/post/comb/streams), or None (the built-in computations)."""
    for fam in families():
        hook = (getattr(fam, "hooks", None) or {}).get(component)
        if hook is not None:
            return hook
    return None


__all__ = ["families", "family_for_config", "family_for_model", "family_components", "precision_hook"]
