"""Model families beyond the reference AttnRes model (SPEC section 1, "Model families").

One module per family: ``kimi`` (Kimi-Linear / Kimi K3: loading, component names) with its
modelling code ``kimi_modeling`` and the exact PyTorch versions of FLA's kernels
``kimi_torch_ops``.

A small registry (:func:`family_for_config`, :func:`family_for_model`) is consulted by
``loading`` (preflight / structure / load / describe) and ``quant.components`` / ``quant.plan``.
Only the Kimi family is registered; the reference model and the Llama comparators are still
handled by the rule tables in ``loading.py`` and ``quant/components.py`` (moving them here is
the remaining part of the registry refactor, issue 16 item 1).
"""

from __future__ import annotations

from typing import Any

_FAMILY_MODULES = ("kimi",)


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
    if not cls.startswith("Kimi"):  # cheap: no family import for the reference / HF models
        return None
    for fam in families():
        if fam.handles_model(model):
            return fam
    return None


__all__ = ["families", "family_for_config", "family_for_model"]
