"""Llama-family comparators (standard residual): ``llama``, ``qwen2``, ``qwen3``, ``mistral`` -- and, as the
registry's fallback family, any other causal LM transformers knows (loaded with a warning: untested, and
precision-policy components may not all resolve).

* Loading: transformers' ``AutoModelForCausalLM`` (remote code only with ``trust_remote_code``); missing or
  mis-shaped weights are an error, unexpected ones a warning.
* Components (Hugging Face names): ``embed`` (``model.embed_tokens``), ``attn.{q,k,v,o}`` (``self_attn``),
  ``mlp.{gate,up,down}``, ``norm`` (``input_layernorm``, ``post_attention_layernorm``, Qwen3's q/k norms, the
  final ``model.norm`` at layer ``num_hidden_layers``), ``lm_head``; any other Linear / Embedding is ``other``.
  No depth path; the KV cache is not a hookable computation here.
* AWQ: llm-compressor's own mappings for these architectures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import UserError
from . import hf
from .base import ComponentRef, Family, FamilyPart, rule_component, rule_weight_parts

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

RULES = [
    (r"model\.embed_tokens", "embed"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj", "attn.{1}"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj", "mlp.{1}"),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)", "norm"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)", "norm"),
    (r"model\.norm", "norm"),
    (r"lm_head", "lm_head"),
]
AFTER_LAST = ("model.norm",)
WEIGHT_COMPONENTS = ("embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
                     "lm_head", "norm", "other")


def component(name: str, num_layers: int | None = None) -> ComponentRef | None:
    return rule_component(name, RULES, num_layers, AFTER_LAST)


def parts(model) -> Iterator[FamilyPart]:
    yield from rule_weight_parts(model, RULES, AFTER_LAST)


def handles_model(model) -> bool:
    return True  # the fallback: any model no other family claims


def check_config(config: dict, where: str, trust_remote_code: bool) -> tuple[str, str, int | None, list[str]]:
    """(model_type, model_type, None, notes): a transformers causal LM; untested types get a note."""
    notes = hf.check_remote_code(config, where, trust_remote_code)
    model_type = config.get("model_type")
    if not model_type:
        raise UserError("config.json has no `model_type`", where=where,
                        fix="use a transformers-format checkpoint (config.json with model_type)")
    if not config.get("auto_map"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            raise UserError(f"Unknown model_type {model_type!r}", where=f"{where} (config.json)",
                            fix="use an AttnRes/FLA checkpoint (model_type attnres or transformer) or a "
                                "transformers causal LM such as llama, qwen2, qwen3 or mistral")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserError(f"model_type {model_type!r} is not a causal language model", where=f"{where}",
                            fix="use a decoder-only causal LM checkpoint")
        if model_type not in MODEL_TYPES:
            from . import families

            tested = [t for fam in families() for t in fam.model_types]
            notes.append(f"{where}: model_type {model_type!r} is not one of the tested families "
                         f"({', '.join(tested)}); loading it through transformers "
                         "as a standard-residual model, and precision-policy components may not all resolve")
    return model_type, model_type, None, notes


def load(src, directory: Path, trust_remote_code: bool):
    return hf.load(src, directory, trust_remote_code, strict_unexpected=False)


def describe(model) -> dict:
    common = hf.describe_common(model)
    return {**common, "family": common["model_type"], "block_size": None}


FAMILY = Family(
    name="llama", model_types=MODEL_TYPES, components=WEIGHT_COMPONENTS, compute_components=(),
    handles_model=handles_model, check_config=check_config, tokenizer_status=hf.tokenizer_status,
    structure=hf.structure, load=load, describe=describe, parts=parts, component=component,
    awq_components=("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"), fallback=True,
)

__all__ = ["FAMILY", "MODEL_TYPES", "RULES", "component", "parts", "check_config"]
