"""Per-method contracts, checked before any model work (docs/quantization.md, "Method contracts").

Three questions every method answers:

* **options** -- which ``options:`` keys it takes, with their types (:data:`OPTIONS`, one pydantic model per
  method with ``extra="forbid"``): :func:`parse_options` turns a typo into a :class:`UserError` naming the
  variant, the key and the accepted keys;
* **settings** -- whether it applies every precision field the plan shows (:func:`check_settings`, on the
  resolved plan rows): a field it would ignore (torchao's fixed int8 granularity, its symmetric-only int8,
  static activation scales) is refused at plan time instead of being printed and dropped;
* **can_run(plan, device)** -- ``None`` when the method can run the plan on ``device``, else the reason
  (:func:`can_run`; :func:`check_can_run` raises it as a UserError). ``plan`` and the runner's preflight
  ask it, so a combination that cannot run (torchao int4 on CPU) stops before any model is loaded.
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError


# ------------------------------------------------------------------------------------------------ options
class _Options(BaseModel):
    """Options every method takes."""

    model_config = ConfigDict(extra="forbid")

    # attn.kv_cache granularity (simulated hook, any method).
    kv_granularity: Literal["per_token", "per_head"] = "per_token"


class NoneOptions(_Options):
    pass


class RtnOptions(_Options):
    pass


class GptqOptions(_Options):
    block_size: int = Field(128, gt=0)  # llm-compressor GPTQModifier.block_size
    dampening: float = Field(0.01, gt=0)  # GPTQModifier.dampening_frac
    actorder: Literal["static", "weight", "group", "dynamic"] | None = "static"  # compressed-tensors ActivationOrdering
    # One decoder layer's Hessians at a time (apply.gptq_layer_groups: last layer first, so every layer is
    # still calibrated on full-precision inputs -- the same weights as all at once, a fraction of the memory).
    layerwise: bool = True


class AwqOptions(_Options):
    duo_scaling: bool | Literal["both"] = True  # llm-compressor AWQModifier.duo_scaling
    n_grid: int = Field(20, gt=0)
    measure: bool = True  # per-layer output errors on the calibration data


class GgufOptions(_Options):
    preset: str | None = None  # a llama.cpp ftype mix (gguf_quant.PRESETS); checked below


class BnbOptions(_Options):
    threshold: float = Field(6.0, ge=0)  # LLM.int8 outlier threshold


class TorchaoOptions(_Options):
    pass


OPTIONS: dict[str, type[_Options]] = {"none": NoneOptions, "rtn": RtnOptions, "gptq": GptqOptions,
                                      "awq": AwqOptions, "gguf": GgufOptions, "bnb": BnbOptions,
                                      "torchao": TorchaoOptions}


def accepted_options(method: str) -> tuple[str, ...]:
    return tuple(OPTIONS[method].model_fields)


def parse_options(method: str, options: dict[str, Any], where: str) -> _Options:
    """Validate a variant's ``options`` for ``method``; UserError (what, where, fix) on a problem."""
    model = OPTIONS[method]
    known = accepted_options(method)
    if not isinstance(options, dict):
        raise UserError("`options` must be a mapping", where, f"write e.g. `options: {{{known[0]}: ...}}`")
    if "preset" in options and method != "gguf":
        raise UserError("option `preset` (a llama.cpp mix) needs `method: gguf`", where,
                        "set `method: gguf`, or remove `preset`")
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown option {key!r} for method {method!r}{hint}", where,
                            f"options of {method} are {', '.join(known)}; remove or rename {key!r}")
    if "kv_granularity" in options and options["kv_granularity"] not in ("per_token", "per_head"):
        raise UserError(f"unknown kv_granularity {options['kv_granularity']!r}", where,
                        "use per_token (one scale per token and KV head, the default) or per_head (one scale per "
                        "KV head)")
    try:
        parsed = model.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err.get("loc", ())) or "options"
        raise UserError(f"option {key!r} = {err.get('input')!r} is invalid for method {method!r}: {err.get('msg')}",
                        where, f"see docs/quantization.md ('Method contracts') for the type of {key!r}") from None
    if method == "gguf" and parsed.preset is not None:
        from .gguf_quant import PRESETS

        if str(parsed.preset).upper() not in PRESETS:
            raise UserError(f"unknown llama.cpp preset {parsed.preset!r}", where,
                            "use one of " + ", ".join(p.lower() for p in PRESETS))
    return parsed


# ------------------------------------------------------------------------------------------------ settings
TORCHAO_INT4_GROUPS = (32, 64, 128, 256)  # tinygemm / tile_packed_to_4d group sizes


def _effective_group(row) -> int | None:
    g = row.resolved.group_size
    cols = row.part.shape[-1] if row.part.shape else 0
    return None if g is None or g >= cols else g


def torchao_setting_problem(row) -> tuple[str, str] | None:
    """(what, fix) when torchao 0.18 cannot apply a setting of this torchao plan row, else None."""
    res = row.resolved
    explicit = res.decided_by
    act_int = res.activation in ("int8", "int4")
    if row.precision == "int8":
        if not res.symmetric:
            return ("torchao's int8 weights (Int8WeightOnlyConfig / Int8DynamicActivationInt8WeightConfig) are "
                    "symmetric only; `symmetric: false` cannot be applied",
                    "remove `symmetric: false`, or use `method: rtn`/`gptq` for asymmetric int8 (simulated)")
        if act_int and _effective_group(row) is not None:
            return (f"torchao's Int8DynamicActivationInt8WeightConfig quantizes weights per output row only; "
                    f"group_size {res.group_size} cannot be applied",
                    "set `group_size: null` for torchao int8 activations, use int8 weight-only (PerGroup "
                    "granularity), or `method: rtn`/`gptq` for grouped W8A8 (simulated)")
    if row.precision == "int4":
        g = _effective_group(row)
        if g not in TORCHAO_INT4_GROUPS:
            return (f"torchao's int4 weight-only kernel needs group_size in {TORCHAO_INT4_GROUPS}; this row asks "
                    + ("per-channel (group_size null)" if g is None else f"group_size {g}"),
                    "set `group_size: 128` (or 32/64/256), or use `method: rtn`/`gptq` for other int4 grids")
        if "symmetric" in explicit and res.symmetric:
            return ("torchao's int4 weight-only format is asymmetric (a scale and a zero point per group); "
                    "`symmetric: true` cannot be applied",
                    "remove `symmetric`, or use `method: rtn`/`gptq` for symmetric int4 (simulated)")
    if row.precision == "fp8":
        if _effective_group(row) is not None:
            return (f"torchao's float8 configs scale fp8 weights per output row; group_size {res.group_size} cannot "
                    "be applied", "remove `group_size`, or use `method: rtn` for grouped fp8 (simulated)")
        if res.activation == "fp8" and res.activation_scheme == "static":
            return ("torchao's Float8DynamicActivationFloat8WeightConfig computes activation scales per token at run "
                    "time; `activation_scheme: static` cannot be applied",
                    "use `activation_scheme: dynamic`, or `method: rtn` for static fp8 activations (simulated)")
    if act_int and res.activation_scheme == "static":
        return ("torchao runs int8 activations with per-token scales computed at run time (dynamic); "
                "`activation_scheme: static` (calibrated per-tensor scales) cannot be applied",
                "use `activation_scheme: dynamic` with torchao, or `method: rtn`/`gptq` for static activation "
                "scales (simulated)")
    return None


def check_settings(rows, variant, where0: str) -> None:
    """Refuse, at plan time, a precision field that the method would not apply to a row."""
    if variant.method != "torchao":
        return
    for row in rows:
        if row.method != "torchao":
            continue
        problem = torchao_setting_problem(row)
        if problem:
            what, fix = problem
            decided = "; ".join(sorted(set(row.resolved.decided_by.values()))) or "default"
            raise UserError(f"{what} ({row.name})", f"{where0}, {decided}", fix)


# ------------------------------------------------------------------------------------------------ can_run
def _device_type(device) -> str:
    s = str(getattr(device, "type", device) or "cpu")
    return s.split(":", 1)[0]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _needs(module: str, pip: str):
    def check(plan, dev: str, rows) -> str | None:
        if not _has(module):
            return f"method {plan.variant.method!r} needs the {pip} package, which is not installed"
        return None
    return check


def fp8_gemm_available(dev: str, capability: tuple[int, int] | None = None) -> bool:
    """torchao 0.18's FP8 GEMM (Float8DynamicActivationFloat8WeightConfig) needs CUDA compute capability >= 8.9
    (Ada, Hopper, Blackwell); ``capability`` defaults to the current CUDA device's."""
    if dev != "cuda":
        return False
    if capability is None:
        import torch

        if not torch.cuda.is_available():
            return True  # planning for a CUDA machine from one without: assume a recent GPU
        capability = torch.cuda.get_device_capability()
    return tuple(capability) >= (8, 9)


def _can_run_torchao(plan, dev: str, rows) -> str | None:
    fp8_dyn = [r.name for r in rows if r.precision == "fp8" and r.resolved.activation == "fp8"]
    if fp8_dyn and not fp8_gemm_available(dev):
        return (f"torchao's FP8 GEMM (fp8 weights with fp8 activations) needs a CUDA GPU with compute capability >= "
                f"8.9; there is no {dev.upper()} FP8 GEMM kernel in torchao 0.18 ({len(fp8_dyn)} tensor(s), e.g. "
                f"{fp8_dyn[0]}); fp8 weight-only (Float8WeightOnlyConfig) does run on CPU")
    int4 = [r.name for r in rows if r.precision == "int4"]
    if int4 and dev != "cuda":
        return (f"torchao int4 weight-only has no {dev.upper()} kernel in torchao 0.18 (its int4 packings need "
                f"CUDA tinygemm or FBGEMM's mslk); {len(int4)} tensor(s) ask for it, e.g. {int4[0]}")
    return None


def _can_run_bnb(plan, dev: str, rows) -> str | None:
    if rows and dev not in ("cpu", "cuda", "meta"):
        return f"bitsandbytes has no kernels for device {dev!r} in this build"
    return None


# Per method: the checks its can_run runs (library present, kernels for the device). rtn / none: simulated in
# plain torch, run anywhere torch runs.
CAN_RUN = {
    "none": [],
    "rtn": [],
    "gptq": [_needs("llmcompressor", "llm-compressor")],
    "awq": [_needs("llmcompressor", "llm-compressor")],
    "gguf": [_needs("gguf", "gguf")],
    "bnb": [_needs("bitsandbytes", "bitsandbytes"), _can_run_bnb],
    "torchao": [_needs("torchao", "torchao"), _can_run_torchao],
}


def can_run(plan, device) -> str | None:
    """``None`` when ``plan``'s method can run it on ``device`` ("cpu", "cuda", a torch.device), else the reason.

    Cheap (no model, no heavy import): libraries are looked up with importlib, kernels by device type. A method
    whose plan has no row for it (everything kept) needs nothing.
    """
    method = plan.variant.method
    rows = [r for r in plan.weight_rows() if r.method == method]
    if not rows:
        return None
    dev = _device_type(device)
    for check in CAN_RUN[method]:
        reason = check(plan, dev, rows)
        if reason:
            return reason
    return None


_CAN_RUN_FIX = {
    "torchao": "run on a CUDA device (--device cuda), or use `method: rtn`/`gptq` (simulated int4 / fp8 activations) "
               "or `method: bnb` with nf4/fp4 (real CPU kernels)",
}


def check_can_run(plan, device, where: str) -> None:
    """UserError when :func:`can_run` gives a reason."""
    reason = can_run(plan, device)
    if reason:
        method = plan.variant.method
        fix = _CAN_RUN_FIX.get(method, f"install the missing package (pip install ...) or pick another method "
                                       f"than {method!r} for this device")
        raise UserError(f"variant {plan.variant.name!r} cannot run on device {_device_type(device)}: {reason}",
                        where, fix)


__all__ = ["OPTIONS", "accepted_options", "parse_options", "check_settings", "torchao_setting_problem",
           "CAN_RUN", "can_run", "check_can_run", "TORCHAO_INT4_GROUPS"]
