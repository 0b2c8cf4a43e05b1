"""Reference AttnRes model, registered with transformers' Auto classes.

``model_type: attnres`` is ours; ``model_type: transformer`` is
flash-linear-attention's ``TransformerConfig``, which loads into the same
reference implementation (same field and parameter names).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_attnres import AttnResConfig, FLATransformerConfig
from .depth import DepthMixer, naive_mix
from .modeling_attnres import AttnResForCausalLM, AttnResModel, FLATransformerForCausalLM


def _register() -> None:
    for cfg, model in ((AttnResConfig, AttnResForCausalLM), (FLATransformerConfig, FLATransformerForCausalLM)):
        try:
            AutoConfig.register(cfg.model_type, cfg)
            AutoModelForCausalLM.register(cfg, model)
        except ValueError:  # already registered (module re-import)
            pass


_register()

__all__ = ["AttnResConfig", "AttnResForCausalLM", "AttnResModel", "DepthMixer", "naive_mix",
           "FLATransformerConfig", "FLATransformerForCausalLM"]
