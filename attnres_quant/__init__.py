"""attnres_quant: quantization study tool for Attention-Residual language models.

``import attnres_quant`` registers the reference ``attnres`` model with transformers' Auto classes
(as ``import fla`` does for FLA's), so ``AutoModelForCausalLM.from_pretrained(dir)`` loads our
checkpoints; the import itself stays light (see ``_autoregister``). ``run_study`` is the Python API
of ``python -m attnres_quant run``; ``quantize`` applies a variant to a model.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "run_study", "Study", "quantize"]


def __getattr__(name):  # PEP 562: the API imports torch and friends only when used
    if name in ("run_study", "Study"):
        from . import api

        return getattr(api, name)
    if name == "quantize":
        from .quant.apply import quantize

        return quantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from ._autoregister import install as _install_auto_classes  # noqa: E402

_install_auto_classes()
