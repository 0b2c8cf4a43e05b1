"""Quantization engine: components -> policy (Variant) -> plan -> methods (rtn, depth hooks, gptq, awq, gguf, bnb,
torchao; attn.kv_cache via kv_cache.make_kv_quantizer).

Public API::

    from attnres_quant.quant import Variant, Precision, Rule, parse_variant, check_variant
    from attnres_quant.quant import resolve_plan, Plan, PlanRow, quantize, QuantizedModel
    from attnres_quant.quant import parse_variants, baseline_plan, calibration_batches
"""

from .apply import QuantizedModel, as_batches, calibration_batches, layer_output_error, quantize
from .components import COMPONENTS, Part, resolve_components
from .plan import Plan, PlanRow, baseline_plan, resolve_plan
from .policy import Precision, Rule, Variant, check_variant, parse_variant, parse_variants

__all__ = ["COMPONENTS", "Part", "resolve_components", "Precision", "Rule", "Variant", "check_variant",
           "parse_variant", "parse_variants", "Plan", "PlanRow", "resolve_plan", "baseline_plan", "QuantizedModel",
           "quantize", "calibration_batches", "as_batches", "layer_output_error"]
