"""Quantization engine: components -> policy (Variant) -> plan -> methods (rtn, depth hooks, gptq, bnb, torchao).

Public API::

    from attnres_quant.quant import Variant, Precision, Rule, parse_variant, check_variant
    from attnres_quant.quant import resolve_plan, Plan, PlanRow, quantize, QuantizedModel
"""

from .apply import QuantizedModel, calibration_batches, layer_output_error, quantize
from .components import COMPONENTS, Part, resolve_components
from .plan import Plan, PlanRow, resolve_plan
from .policy import Precision, Rule, Variant, check_variant, parse_variant

__all__ = ["COMPONENTS", "Part", "resolve_components", "Precision", "Rule", "Variant", "check_variant",
           "parse_variant", "Plan", "PlanRow", "resolve_plan", "QuantizedModel", "quantize",
           "calibration_batches", "layer_output_error"]
