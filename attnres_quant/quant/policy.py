"""Precision policy schema (SPEC section 3): a variant = method + default precision +
ordered override rules; later rules win.

```yaml
variants:
  - name: int4_hybrid
    method: gptq
    default: {weight: int4, group_size: 128, activation: bf16}
    rules:
      - select: depth.*
        weight: bf16
        compute: bf16
      - select: lm_head
        weight: int8
```

The pydantic models here only check shapes and spellings. Checks that need the
method (``check_variant``) or the model (``resolve_plan``) raise
:class:`~attnres_quant.errors.UserError` naming the file, the variant, the rule and
the fix -- always before any model work.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import UserError
from .components import COMPUTE_COMPONENTS, LINEAR_COMPONENTS, known_components

FLOAT_WEIGHTS = ("bf16", "fp16", "fp32")
# llama.cpp quant types (method gguf, or rows of an rtn variant); written lower-case in the plan, upper-case accepted.
GGUF_WEIGHTS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
# Deployment floating formats (quant/formats.py; method rtn, simulated).
FP_FORMATS = ("fp8", "fp8_tensor", "fp8_block", "mxfp8", "mxfp4", "nvfp4")
WEIGHT_PRECISIONS = FLOAT_WEIGHTS + ("int8", "int4", "nf4", "fp4") + GGUF_WEIGHTS + FP_FORMATS
QUANT_ACTIVATIONS = ("int8", "int4", "fp8", "mxfp8", "mxfp4", "nvfp4")  # activation precisions that quantize
ACTIVATION_PRECISIONS = ("bf16", "fp16", "fp32") + QUANT_ACTIVATIONS
ACTIVATION_SCHEMES = ("dynamic", "static")
COMPUTE_PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "fp8_e5m2")
STORAGE_PRECISIONS = ("fp32", "bf16", "fp8", "int8", "int4", "fp8_e5m2", "mxfp8", "mxfp4", "nvfp4")
METHODS = ("none", "rtn", "gptq", "awq", "gguf", "bnb", "torchao")
KV_GRANULARITIES = ("per_token", "per_head")

WeightP = Literal["bf16", "fp16", "fp32", "int8", "int4", "nf4", "fp4", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                  "q4_k", "q5_k", "q6_k", "fp8", "fp8_tensor", "fp8_block", "mxfp8", "mxfp4", "nvfp4"]
ActP = Literal["bf16", "fp16", "fp32", "int8", "int4", "fp8", "mxfp8", "mxfp4", "nvfp4"]
SchemeP = Literal["dynamic", "static"]
ComputeP = Literal["fp32", "bf16", "fp16", "fp8", "int8", "fp8_e5m2"]
StorageP = Literal["fp32", "bf16", "fp8", "int8", "int4", "fp8_e5m2", "mxfp8", "mxfp4", "nvfp4"]
MethodP = Literal["none", "rtn", "gptq", "awq", "gguf", "bnb", "torchao"]

PRECISION_FIELDS = ("weight", "group_size", "symmetric", "activation", "activation_scheme", "compute",
                    "storage")
WEIGHT_FIELDS = ("weight", "group_size", "symmetric")
ACT_FIELDS = ("activation", "activation_scheme")


class Precision(BaseModel):
    """Precision fields; an unset field inherits (default -> earlier rules -> baseline).

    weight            bf16 | fp16 | fp32 | int8 | int4 | nf4 | fp4 | GGUF type (gguf, rtn: q8_0, q4_0, q4_1,
                      q5_0, q5_1, q4_k, q5_k, q6_k; upper-case accepted) | floating formats (method rtn):
                      fp8 (E4M3 per-channel, or per-group with group_size), fp8_tensor, fp8_block (group_size x
                      group_size blocks, default 128), mxfp8, mxfp4 (g32 E8M0), nvfp4 (g16 E4M3 + fp32 global)
                      (unset: keep the baseline's)
    group_size        int (per-group) or null (per-channel); default null
    symmetric         bool; default true
    activation        bf16 | fp16 | fp32 (no activation quantization) | int8 | int4 | fp8 | mxfp8 | mxfp4 | nvfp4
    activation_scheme dynamic (per-token, default) | static (per-tensor, calibrated; int8/int4/fp8)
    compute           depth.softmax: fp32 (default) | bf16 | fp16 | fp8 | fp8_e5m2 | int8 (simulated)
    storage           depth.sources / attn.kv_cache: fp32 | bf16 | fp8 | fp8_e5m2 | int8 | int4 | mxfp8 | mxfp4 |
                      nvfp4 (simulated)
    """

    model_config = ConfigDict(extra="forbid")

    weight: WeightP | None = None
    group_size: int | None = Field(default=None, gt=0)
    symmetric: bool | None = None
    activation: ActP | None = None
    activation_scheme: SchemeP | None = None
    compute: ComputeP | None = None
    storage: StorageP | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _gguf_case(cls, v):
        # GGUF type names are usually written upper-case (Q4_K); the plan uses lower-case.
        if isinstance(v, str) and v.lower() in GGUF_WEIGHTS:
            return v.lower()
        return v

    def set_fields(self) -> list[str]:
        return [f for f in PRECISION_FIELDS if f in self.model_fields_set]


class Rule(Precision):
    """An override: selectors + the precision fields it sets."""

    select: str = "*"
    layers: list[int] | str | None = None
    experts: list[int] | str | None = None  # routed expert indices (moe.experts.*), list or slice like layers
    modules: str | None = None

    @field_validator("layers", "experts")
    @classmethod
    def _check_layers(cls, v, info):
        if isinstance(v, str):
            try:
                parse_slice(v)  # raises ValueError with a clear message
            except ValueError as exc:
                raise ValueError(str(exc).replace("layers ", f"{info.field_name} ", 1)) from None
        return v

    @field_validator("modules")
    @classmethod
    def _check_regex(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"`modules` is not a valid regular expression: {exc}") from None
        return v

    def label(self, index: int) -> str:
        sel = [f"select: {self.select}"]
        if self.layers is not None:
            sel.append(f"layers: {self.layers}")
        if self.experts is not None:
            sel.append(f"experts: {self.experts}")
        if self.modules is not None:
            sel.append(f"modules: {self.modules}")
        return f"rules[{index}] ({', '.join(sel)})"


class Variant(BaseModel):
    """One quantized variant of a study (embedded in the study config's ``variants:`` list)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    method: MethodP = "rtn"
    default: Precision = Field(default_factory=Precision)
    rules: list[Rule] = Field(default_factory=list)
    # Method options (all optional; validated per method by methods.parse_options): GPTQ block_size /
    # dampening / actorder, bnb threshold, AWQ duo_scaling / n_grid / measure, gguf preset (e.g. q4_k_m),
    # kv_granularity (attn.kv_cache, every method).
    options: dict[str, Any] = Field(default_factory=dict)
    # Evaluation backend of this variant (None: the study's eval.backend): hf in-process, or vllm on the
    # exported compressed-tensors checkpoint (attnres_quant.evaluation.vllm_backend).
    backend: Literal["hf", "vllm"] | None = None

    def needs_calibration(self) -> bool:
        """GPTQ, AWQ and static activation scales need calibration data."""
        if self.method in ("gptq", "awq"):
            return True
        precs = [self.default] + list(self.rules)  # conservative: static anywhere + int activations anywhere
        if any(p.activation == "nvfp4" for p in precs):  # its fp32 global scale is calibrated
            return True
        return any(p.activation_scheme == "static" for p in precs) and any(
            p.activation in ("int8", "int4", "fp8") for p in precs)


def parse_slice(text: str) -> slice:
    """ "-2:" -> slice(-2, None); "1:3" -> slice(1, 3); "::2" ..."""
    parts = text.split(":")
    if not 1 < len(parts) <= 3:
        raise ValueError(f"layers {text!r} is not a python slice such as \"-2:\" or \"0:4\"")
    try:
        vals = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"layers {text!r} is not a python slice such as \"-2:\" or \"0:4\"") from None
    return slice(*vals)


def selected_layers(layers: list[int] | str | None, n_layers: int) -> set[int] | None:
    """Layer indices a rule's ``layers`` selects.

    Slices and negative indices count over the transformer layers 0..n_layers-1 (so
    ``"-2:"`` is the last two layers). The parts after the last layer (final norm, final
    depth mix, final pseudo-query) have layer index ``n_layers`` and are selected only by
    naming that index explicitly (e.g. ``layers: [4]`` on a 4-layer model).
    """
    if layers is None:
        return None
    universe = list(range(n_layers))
    if isinstance(layers, str):
        return set(universe[parse_slice(layers)])
    return {i if i >= 0 else n_layers + i for i in layers}


def component_matches(pattern: str, component: str) -> bool:
    return fnmatch.fnmatchcase(component, pattern)


def known_pattern(pattern: str) -> bool:
    return any(component_matches(pattern, c) for c in known_components())


# ----------------------------------------------------------------- method capabilities
def weight_capability(method: str, component: str) -> tuple[str, ...]:
    """Weight precisions ``method`` can give ``component``."""
    linear = component in LINEAR_COMPONENTS
    if method == "none":
        return FLOAT_WEIGHTS
    if method == "rtn":  # the floating formats are simulated by rtn only (quant/formats.py); the llama.cpp types
        # are data-free quantizers too, so an rtn variant may mix them with int/fp rows (search's policies do)
        return FLOAT_WEIGHTS + ("int8", "int4") + FP_FORMATS + GGUF_WEIGHTS
    if method in ("gptq", "awq"):  # awq: AWQ for attn/mlp projections, RTN for the other parts
        return FLOAT_WEIGHTS + ("int8", "int4")
    if method == "gguf":  # every weight tensor (1-D ones only when a rule names them; see plan.py)
        return FLOAT_WEIGHTS + GGUF_WEIGHTS
    if method == "bnb":
        return FLOAT_WEIGHTS + (("int8", "nf4", "fp4") if linear else ())
    if method == "torchao":  # fp8: Float8WeightOnlyConfig (CPU+CUDA) / Float8DynamicActivationFloat8WeightConfig
        return FLOAT_WEIGHTS + (("int8", "int4", "fp8") if linear else ())
    return ()


def activation_capability(method: str, component: str, weight: str | None) -> tuple[str, ...]:
    if component not in LINEAR_COMPONENTS:
        return ("bf16", "fp16", "fp32")
    if method == "rtn":
        return ACTIVATION_PRECISIONS
    if method == "gptq":
        return ("bf16", "fp16", "fp32", "int8", "int4", "fp8")
    if method == "torchao" and weight == "int8":
        return ("bf16", "fp16", "fp32", "int8")
    if method == "torchao" and weight == "fp8":
        return ("bf16", "fp16", "fp32", "fp8")
    return ("bf16", "fp16", "fp32")


def method_fix(method: str, precision: str, component: str) -> str:
    if precision in FP_FORMATS:
        return (f"{precision} (a floating deployment format) is simulated by `method: rtn` (and fp8 per-row runs on "
                "torchao's float8 kernels, `method: torchao`); use rtn for this variant, or int4/int8 with gptq/awq")
    if precision in GGUF_WEIGHTS:
        return (f"{precision.upper()} is a llama.cpp (GGUF) type: use `method: gguf` (or `rtn`, which mixes GGUF "
                f"types with int/fp rows) for GGUF types, or int4/int8 with gptq/awq")
    if method == "gguf":
        return ("`method: gguf` takes llama.cpp types (" + ", ".join(GGUF_WEIGHTS) + ", upper-case accepted) or a "
                "float (bf16/fp16/fp32); e.g. q4_0 or q4_k instead of int4, q8_0 instead of int8; or use "
                "`method: rtn`/`gptq`/`awq` for int weights")
    if method == "awq" and precision in ("nf4", "fp4"):
        return "AWQ gives int4/int8 integer weights; use `method: bnb` for nf4/fp4"
    if precision in ("nf4", "fp4"):
        return "use `method: bnb` for nf4/fp4 (bitsandbytes), or int4 with rtn/gptq"
    if method == "none":
        return "`method: none` only casts floats and sets depth/KV hooks; use `method: rtn` for int weights"
    if method == "bnb" and precision == "int4":
        return "bitsandbytes has no int4 integer format; use nf4 or fp4, or `method: rtn`/`gptq` for int4"
    if component not in LINEAR_COMPONENTS and method in ("bnb", "torchao"):
        return (f"{method} only replaces nn.Linear modules; quantize {component} with `method: rtn` in a "
                f"separate variant, or keep it at bf16")
    return "pick a precision the method supports (see docs/quantization.md, 'Methods')"


def check_variant(variant: Variant, source: str = "config") -> None:
    """Model-independent checks: known components, method can provide every precision a rule asks."""
    where0 = f"{source}, variant {variant.name!r}"
    d = variant.default
    if d.weight is not None and d.weight not in weight_capability(variant.method, "attn.q"):
        raise UserError(f"method {variant.method!r} cannot provide weight {d.weight}",
                        f"{where0}, default", method_fix(variant.method, d.weight, "attn.q"))
    if d.activation in QUANT_ACTIVATIONS and variant.method in ("none", "bnb", "awq", "gguf"):
        raise UserError(f"method {variant.method!r} cannot quantize activations to {d.activation}",
                        f"{where0}, default",
                        "use `method: rtn` or `gptq` (simulated activations) or torchao with int8 weights; "
                        "awq and gguf are weight-only")
    check_options(variant, where0)
    for label, prec in [("default", d)] + [(r.label(i), r) for i, r in enumerate(variant.rules)]:
        if variant.method == "gguf" or prec.weight in GGUF_WEIGHTS:  # rtn: only where the same place sets a GGUF type
            bad = [f for f in ("group_size", "symmetric") if f in prec.model_fields_set]
            if bad:
                raise UserError(f"`{bad[0]}` does not apply to GGUF types (their block layout is fixed: 32 "
                                "weights per block for q8_0/q4_0/q4_1/q5_0/q5_1, super-blocks of 256 for "
                                "q4_k/q5_k/q6_k)", f"{where0}, {label}",
                                f"remove `{bad[0]}`; pick the type instead (q4_0 symmetric, q4_1 with a min, ...)")
    for i, rule in enumerate(variant.rules):
        where = f"{where0}, {rule.label(i)}"
        if not known_pattern(rule.select):
            raise UserError(f"unknown component {rule.select!r}", where,
                            "use one of " + ", ".join(known_components()) + " or a glob such as `depth.*`")
        if not rule.set_fields():
            raise UserError("the rule sets no precision field", where,
                            "add e.g. `weight: bf16`, `activation: int8`, `compute: fp32` or `storage: int8`")
        comps = [c for c in known_components() if component_matches(rule.select, c)]
        if rule.weight is not None:
            ok = [c for c in comps if rule.weight in weight_capability(variant.method, c)]
            weighty = [c for c in comps if c not in COMPUTE_COMPONENTS]
            if weighty and not ok:
                raise UserError(f"method {variant.method!r} cannot provide weight {rule.weight} for "
                                f"{rule.select}", where, method_fix(variant.method, rule.weight, weighty[0]))
        if rule.activation in QUANT_ACTIVATIONS:
            if not any(rule.activation in activation_capability(variant.method, c, rule.weight or d.weight)
                       for c in comps):
                raise UserError(f"method {variant.method!r} cannot quantize activations of {rule.select} to "
                                f"{rule.activation}", where,
                                "activations are quantized only at the inputs of nn.Linear projections, with "
                                "`method: rtn`/`gptq` (simulated) or torchao int8 (int8 weights)")


def check_options(variant: Variant, where0: str) -> None:
    """Every method validates its ``options`` (``methods.OPTIONS``: one schema per method, unknown keys
    refused, types checked, the gguf preset name and kv_granularity checked)."""
    from .methods import parse_options

    parse_options(variant.method, variant.options, f"{where0}, options")


def format_validation_error(exc: ValidationError, source: str, variant_name: str | None = None,
                            data: Any = None) -> UserError:
    """Turn a pydantic error on a variant into a UserError naming file, variant, rule and fix."""
    err = exc.errors()[0]
    loc = list(err.get("loc", ()))
    where = source
    if variant_name:
        where += f", variant {variant_name!r}"
    if loc[:1] == ["rules"] and len(loc) > 1 and isinstance(loc[1], int):
        idx = loc[1]
        sel = None
        try:
            sel = data["rules"][idx].get("select")
        except Exception:  # noqa: BLE001
            pass
        where += f", rules[{idx}]" + (f" (select: {sel})" if sel else "")
        loc = loc[2:]
    key = ".".join(str(p) for p in loc)
    if key:
        where += f", key {key!r}"
    allowed = {
        "weight": WEIGHT_PRECISIONS, "activation": ACTIVATION_PRECISIONS, "activation_scheme": ACTIVATION_SCHEMES,
        "compute": COMPUTE_PRECISIONS, "storage": STORAGE_PRECISIONS, "method": METHODS,
    }
    last = str(loc[-1]) if loc else ""
    if err.get("type") == "extra_forbidden":
        fix = (f"remove {last!r}; precision keys are {', '.join(PRECISION_FIELDS)}, rule selectors are select, "
               "layers, experts, modules")
        what = f"unknown key {last!r}"
    elif last in allowed:
        what = f"unknown {last} precision {err.get('input')!r}"
        fix = f"use one of {', '.join(allowed[last])}"
    else:
        what = err.get("msg", "invalid value")
        fix = "see docs/quantization.md for the policy schema"
    return UserError(what, where, fix)


def parse_variant(data: Any, source: str = "config") -> Variant:
    """dict -> checked Variant (UserError on any problem)."""
    name = data.get("name") if isinstance(data, dict) else None
    try:
        variant = Variant.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source, name, data) from None
    check_variant(variant, source)
    return variant


def parse_variants(items: Any, source: str = "config") -> list[Variant]:
    """The ``variants:`` list of a config -> checked Variants (UserError on any problem, incl. duplicates)."""
    if not isinstance(items, list):
        raise UserError("`variants` must be a list of variants", source, "see SPEC section 3 for the format")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"variants[{i}] is not a mapping", source,
                            "write each variant as `- name: ...` with method/default/rules")
        out.append(parse_variant(item, source))
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"variant names must be unique; {dupes} appear more than once", source,
                        "rename the variants")
    return out
