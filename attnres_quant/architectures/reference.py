"""The reference AttnRes model family (``attnres_quant.model``).

* Model types: ``attnres`` (ours) and ``transformer`` (flash-linear-attention's ``TransformerConfig``,
  same field and parameter names; ``python -m attnres_quant convert`` writes such checkpoints from
  Llama-family ones). Both load through transformers into :class:`~attnres_quant.model.AttnResForCausalLM`
  (registered with ``AutoConfig`` / ``AutoModelForCausalLM``); unexpected weights are an error (parts the
  model does not implement).
* Config options the reference model does not implement (QK-norm, sliding windows, weightless norms,
  no RoPE, activations other than SiLU) are refused before any weight is read.
* Components (FLA names): ``embed``, ``attn.{q,k,v,o}``, ``mlp.{gate,up,down}``, ``norm``,
  ``depth.query`` (``*_res_proj``, the final ``model.res_proj``), ``depth.key_norm`` (``*_res_norm``), and
  the computations ``depth.softmax`` / ``depth.sources`` (one per :class:`~attnres_quant.model.depth.DepthMixer`;
  layer index = sub-layer j // 2, the final mix has layer ``num_hidden_layers``) and ``attn.kv_cache``
  (each attention's ``kv_quantizer`` hook).
* AWQ smooths ``attn_norm`` -> q/k/v, v -> o, ``mlp_norm`` -> gate/up, up -> down (:data:`AWQ_MAPPINGS`):
  the depth mix happens before those norms, so the depth path is untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import UserError
from . import hf
from .base import ComponentRef, Family, FamilyPart, rule_component, rule_weight_parts

MODEL_TYPES = ("attnres", "transformer")

RULES = [
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
AFTER_LAST = ("model.norm", "model.res_proj", "model.res_norm")  # layer index num_hidden_layers

WEIGHT_COMPONENTS = ("embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
                     "lm_head", "norm", "depth.query", "depth.key_norm", "other")
COMPUTE_COMPONENTS = ("depth.softmax", "depth.sources", "attn.kv_cache")

AWQ_MAPPINGS = (
    ("re:.*attn_norm$", ("re:.*attn\\.q_proj$", "re:.*attn\\.k_proj$", "re:.*attn\\.v_proj$")),
    ("re:.*attn\\.v_proj$", ("re:.*attn\\.o_proj$",)),
    ("re:.*mlp_norm$", ("re:.*mlp\\.gate_proj$", "re:.*mlp\\.up_proj$")),
    ("re:.*mlp\\.up_proj$", ("re:.*mlp\\.down_proj$",)),
)


def component(name: str, num_layers: int | None = None) -> ComponentRef | None:
    return rule_component(name, RULES, num_layers, AFTER_LAST)


def parts(model) -> Iterator[FamilyPart]:
    """Weights in module order, then the depth mixers' and attentions' computation hooks."""
    yield from rule_weight_parts(model, RULES, AFTER_LAST)
    for mname, module in model.named_modules():
        if type(module).__name__ == "DepthMixer":
            # (sub-layer 0 reads one source, the embedding: the registry drops its depth.softmax)
            for comp in ("depth.softmax", "depth.sources"):
                yield FamilyPart(mname, ComponentRef(comp, module.sublayer // 2), "compute")
        elif hasattr(module, "kv_quantizer"):
            yield FamilyPart(mname, ComponentRef("attn.kv_cache", getattr(module, "layer_idx", None)), "compute")


def handles_model(model) -> bool:
    if type(model).__name__.startswith(("AttnRes", "FLATransformer")):
        return True
    return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPES


def check_config(config: dict, where: str, trust_remote_code: bool) -> tuple[str, str, int | None, list[str]]:
    """(model_type, family, block size, notes); options the reference model lacks are a UserError."""
    notes = hf.check_remote_code(config, where, trust_remote_code)
    block = config.get("attnres_block_size")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool)
                              or not (block == 1 or (block >= 2 and block % 2 == 0))):
        raise UserError(f"attnres_block_size must be null, 1 or an even integer; got {block!r}",
                        where=f"{where} (config.json)", fix="fix attnres_block_size in config.json")
    unsupported = []
    if config.get("qk_norm"):
        unsupported.append("qk_norm=true (query/key RMSNorm)")
    if config.get("window_size") is not None:
        unsupported.append(f"window_size={config['window_size']} (sliding-window attention)")
    if config.get("elementwise_affine") is False:
        unsupported.append("elementwise_affine=false (weightless norms)")
    if "rope_theta" in config and config["rope_theta"] is None:
        unsupported.append("rope_theta=null (attention without RoPE)")
    if config.get("hidden_act", "swish") not in ("swish", "silu"):
        unsupported.append(f"hidden_act={config['hidden_act']!r}")
    if unsupported:
        raise UserError(
            "The reference AttnRes model does not implement " + ", ".join(unsupported),
            where=f"{where} (config.json)",
            fix="use a checkpoint without these options, or run it with flash-linear-attention itself")
    return config["model_type"], _family_label(block), block, notes


def _family_label(block: int | None) -> str:
    return "standard" if block is None else ("attnres-full" if block == 1 else "attnres-block")


def load(src, directory: Path, trust_remote_code: bool):
    return hf.load(src, directory, trust_remote_code, strict_unexpected=True)


def describe(model) -> dict:
    block = getattr(model.config, "attnres_block_size", None)
    return {**hf.describe_common(model), "family": _family_label(block), "block_size": block}


FAMILY = Family(
    name="reference", model_types=MODEL_TYPES, components=WEIGHT_COMPONENTS + COMPUTE_COMPONENTS,
    compute_components=COMPUTE_COMPONENTS, handles_model=handles_model, check_config=check_config,
    tokenizer_status=hf.tokenizer_status, structure=hf.structure, load=load, describe=describe, parts=parts,
    component=component, awq_components=("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"),
    awq_mappings=lambda model: AWQ_MAPPINGS,
)

__all__ = ["FAMILY", "MODEL_TYPES", "RULES", "AWQ_MAPPINGS", "component", "parts", "check_config"]
