"""Resolve a variant against a model: the precision of every tensor and computation,
and which rule decided it.

Semantics (docs/quantization.md):

* every part starts at the baseline (``weight: keep``, softmax fp32, sources as the model
  dtype, activations unquantized);
* ``default`` applies to every part whose method can provide it, except the
  ``embed``, ``norm`` and ``lm_head`` components (kept at baseline unless a rule names
  them -- the usual practice of weight-only quantization studies); where the method
  cannot provide the default for a part (e.g. bnb's nf4 on a pseudo-query, which is not
  a module call) the part keeps its baseline precision and the plan says so;
* rules apply in order, each setting only the fields it names; later rules win;
* a rule that matches nothing, names an unknown component, asks a precision the method
  cannot provide for a part it matches, or changes nothing is a UserError.  A rule that
  selects only ``depth.*`` components on a model without a depth path (standard
  residual, Llama) is skipped and noted, so one variant can serve AttnRes and
  standard models in the same study.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .bnb import BNB_BLOCK_N
from .components import LINEAR_COMPONENTS, Part, is_attnres, num_layers, resolve_components
from .policy import (
    ACT_FIELDS,
    FLOAT_WEIGHTS,
    FP_FORMATS,
    GGUF_WEIGHTS,
    QUANT_ACTIVATIONS,
    WEIGHT_FIELDS,
    Precision,
    Rule,
    Variant,
    activation_capability,
    check_variant,
    component_matches,
    method_fix,
    selected_layers,
    weight_capability,
)

DEFAULT_EXCLUDED = ("embed", "norm", "lm_head")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4, "nf4": 4, "fp4": 4}


def dtype_name(dtype: torch.dtype | None) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class Resolved:
    """Effective precision of one part."""

    weight: str | None = None  # None: keep baseline
    group_size: int | None = None
    symmetric: bool = True
    activation: str | None = None  # None / float name: unquantized
    activation_scheme: str = "dynamic"
    compute: str | None = None  # depth.softmax
    storage: str | None = None  # depth.sources / attn.kv_cache
    decided_by: dict[str, str] = field(default_factory=dict)  # field -> rule label


@dataclass
class PlanRow:
    component: str
    layer: int | None
    name: str  # tensor name (weights) or module name (computations)
    method: str  # rtn | gptq | bnb | torchao | cast | keep | sim (simulated depth/kv hooks)
    precision: str  # weight precision, or compute/storage precision of a computation
    granularity: str  # per-channel sym, g128 asym, per-token, -
    activation: str  # activation precision and scheme, or -
    rule: str  # the rule(s) that decided it
    numel: int = 0
    bits: float = 0.0  # bits per weight incl. scale/zero overhead (weights only)
    tied_to: str | None = None  # the same storage as an earlier row (counted once)
    fallback: str | None = None  # gguf: the requested type when llama.cpp's fallback replaced it
    part: Part | None = field(default=None, repr=False, compare=False)
    resolved: Resolved | None = field(default=None, repr=False, compare=False)

    @property
    def is_weight(self) -> bool:
        return self.part is None or self.part.kind == "weight"

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("component", "layer", "name", "method", "precision", "granularity",
                                              "activation", "rule", "numel", "bits", "tied_to", "fallback")}


@dataclass
class Plan:
    variant: Variant
    rows: list[PlanRow]
    notes: list[str] = field(default_factory=list)
    model_dtype: str = "bf16"

    def weight_rows(self) -> list[PlanRow]:
        return [r for r in self.rows if r.is_weight]

    def summary(self) -> dict:
        """avg bits per weight (incl. scale overhead) and total weight bytes (tied tensors once)."""
        rows = [r for r in self.weight_rows() if r.tied_to is None]
        n = sum(r.numel for r in rows)
        bits = sum(r.numel * r.bits for r in rows)
        by_prec: dict[str, int] = {}
        for r in rows:
            by_prec[r.precision] = by_prec.get(r.precision, 0) + r.numel
        return {"variant": self.variant.name, "method": self.variant.method, "n_weights": n,
                "avg_bits": bits / n if n else 0.0, "weight_bytes": int(math.ceil(bits / 8)),
                "weights_by_precision": by_prec}

    def row(self, name: str) -> PlanRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_table(self) -> str:
        head = ("component", "layer", "tensor / computation", "method", "precision", "granularity", "activation",
                "rule")
        body = [(r.component, "-" if r.layer is None else str(r.layer), r.name + (f" (tied to {r.tied_to})"
                 if r.tied_to else ""), r.method, r.precision, r.granularity, r.activation, r.rule)
                for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*b) for b in body]
        s = self.summary()
        lines.append("")
        lines.append(f"summary: {s['n_weights']:,} weights, {s['avg_bits']:.3f} bits/weight on average "
                     f"(incl. scales), {s['weight_bytes']:,} bytes of weights")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- bits
def weight_bits(method: str, precision: str, shape: tuple[int, ...], group_size: int | None, symmetric: bool,
                baseline_bits: int) -> float:
    """Bits per weight as stored, including scale (and zero-point) overhead."""
    if precision in FLOAT_WEIGHTS:
        return float(min(_BITS[precision], baseline_bits))
    if precision in FP_FORMATS:  # fp8 scales are stored in the model dtype (compressed-tensors)
        from .formats import bits_per_weight

        scale_bits = 32 if method == "torchao" else baseline_bits  # torchao's Float8Tensor keeps fp32 scales
        return bits_per_weight(precision, shape, group_size, scale_bits)
    cols = shape[-1] if shape else 1
    if method == "bnb":
        if precision == "int8":  # LLM.int8: int8 + one fp32 scale per output row
            return 8 + 32 / cols
        block = group_size or 64  # nf4/fp4: fp32 absmax per block
        return 4 + 32 / block
    group = effective_group(shape, group_size)
    bits = _BITS[precision]
    overhead = 16 + (0 if symmetric else (16 if method == "torchao" else bits))  # bf16 scale (+ zero point)
    if method == "torchao" and precision == "int4":
        overhead = 32  # bf16 scale and zero per group
    return bits + overhead / group


def effective_group(shape: tuple[int, ...], group_size: int | None) -> int:
    """Elements sharing one scale: the group, or the whole row (per-channel; 1-D: per-tensor)."""
    cols = shape[-1] if shape else 1
    if group_size is None or group_size >= cols:
        return cols
    return group_size


def granularity(shape: tuple[int, ...], group_size: int | None, symmetric: bool) -> str:
    sym = "sym" if symmetric else "asym"
    if len(shape) <= 1:
        return f"per-tensor {sym}" if group_size is None or group_size >= (shape[0] if shape else 1) else \
            f"g{group_size} {sym}"
    if group_size is None or group_size >= shape[-1]:
        return f"per-channel {sym}"
    return f"g{group_size} {sym}"


# --------------------------------------------------------------------------- resolve
def _matches(rule, part: Part, n_layers: int, n_experts: int = 0) -> bool:
    if not component_matches(rule.select, part.component):
        return False
    if rule.layers is not None:
        layers = selected_layers(rule.layers, n_layers)
        if part.layer is None or part.layer not in layers:
            return False
    experts = getattr(rule, "experts", None)
    if experts is not None:  # routed experts only; slices and negative indices count over 0..n_experts-1
        if part.expert is None or part.expert not in selected_layers(experts, n_experts):
            return False
    if rule.modules is not None and not re.search(rule.modules, part.name):
        return False
    return True


def _relevant(fields: list[str], part: Part) -> list[str]:
    if part.kind == "weight":
        ok = list(WEIGHT_FIELDS) + (list(ACT_FIELDS) if part.component in LINEAR_COMPONENTS else [])
    elif part.component == "depth.softmax":
        ok = ["compute"]
    elif part.hook is not None:  # a family's own computation (mHC: hc.comb compute, hc.streams storage)
        ok = [part.hook.field]
    else:  # depth.sources, attn.kv_cache
        ok = ["storage"]
    return [f for f in fields if f in ok]


def _apply(res: Resolved, prec: Precision, fields: list[str], label: str) -> None:
    for f in fields:
        setattr(res, f, getattr(prec, f))
        res.decided_by[f] = label
    if res.symmetric is None:
        res.symmetric = True
    if res.activation_scheme is None:
        res.activation_scheme = "dynamic"


def effective_rules(variant: Variant, n_layers: int, *, tied_embeddings: bool = False
                    ) -> tuple[Precision, list[tuple[str, Rule]]]:
    """The default and the ordered (label, rule) list a variant resolves with: a gguf ``preset``
    option (e.g. ``q4_k_m``) contributes llama.cpp's mix -- its base type as the default unless
    ``default.weight`` is set, then its rules (``gguf_quant.preset_rules``: the _M/_S bumps, the output
    tensor and the token embedding) -- before the user's rules."""
    rules = [(r.label(i), r) for i, r in enumerate(variant.rules)]
    preset = variant.options.get("preset") if variant.method == "gguf" else None
    if not preset:
        return variant.default, rules
    from .gguf_quant import _PRESET_BASE, preset_rules

    p = str(preset).upper()
    default = variant.default
    if default.weight is None:
        default = default.model_copy(update={"weight": _PRESET_BASE[p].lower()})
        default.model_fields_set.add("weight")
    pre = []
    for r in preset_rules(p, n_layers, tied_embeddings=tied_embeddings):
        rule = Rule.model_validate(r)
        sel = f"select: {rule.select}" + (f", layers: {rule.layers}" if rule.layers is not None else "")
        pre.append((f"preset {p.lower()} ({sel})", rule))
    return default, pre + rules


def _default_ok(variant: Variant, part: Part, fields: list[str], default: Precision | None = None,
                keep: tuple[str, ...] = ()) -> list[str]:
    """Default fields that apply to ``part`` (those the method can provide); ``keep``: a family's
    DEFAULT_KEEP components, which the default never reaches."""
    if part.component in DEFAULT_EXCLUDED or part.component in keep:
        return []
    d = default if default is not None else variant.default
    if (variant.method == "gguf" or d.weight in GGUF_WEIGHTS) and part.kind == "weight" and \
            ggml_n_dims(part.shape) < 2:
        # llama.cpp quantizes only tensors with ggml_n_dims >= 2: norms, key norms and the [1, d]
        # pseudo-queries (ggml ne = [d, 1]) keep their stored type.
        fields = [f for f in fields if f not in WEIGHT_FIELDS]
    out = []
    for f in fields:
        if f == "weight" and d.weight not in weight_capability(variant.method, part.component):
            continue
        if f in ("group_size", "symmetric") and (d.weight is None or
                                                  d.weight not in weight_capability(variant.method,
                                                                                     part.component)):
            continue
        if f == "activation" and d.activation not in activation_capability(variant.method, part.component,
                                                                           d.weight):
            continue
        out.append(f)
    return out


def resolve_plan(model: nn.Module, variant: Variant, source: str = "config") -> Plan:
    """The precision plan of ``variant`` on ``model`` (UserError on a bad rule; no model work)."""
    check_variant(variant, source)
    parts = resolve_components(model)
    n_layers = num_layers(model)
    attnres = is_attnres(model)
    method = variant.method
    where0 = f"{source}, variant {variant.name!r}"
    notes: list[str] = []
    from ..architectures import family_for_model

    fam = family_for_model(model)
    problem = fam.method_problem(method, variant.options)
    if problem:
        raise UserError(f"method {method!r} cannot run on the {fam.name} family: {problem}", where0,
                        "use `method: rtn`, `gptq`, `gguf` (plain types) or `bnb` (or `none` for depth/cache "
                        "hooks only) on this model")
    keep: tuple[str, ...] = tuple(fam.default_keep)
    n_experts = fam.num_experts(model)
    if not fam.has_experts and any(r.experts is not None for r in variant.rules):
        bad = next(i for i, r in enumerate(variant.rules) if r.experts is not None)
        raise UserError("`experts:` selects routed experts, and this model has none", f"{where0}, "
                        f"{variant.rules[bad].label(bad)}", "remove `experts:` or use it on a MoE model (Kimi)")
    resolved = {id(p): Resolved() for p in parts}
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    default, rule_list = effective_rules(variant, n_layers, tied_embeddings=tied)

    dfields = default.set_fields()
    kept_by_family: set[str] = set()
    for p in parts:
        fields = _default_ok(variant, p, _relevant(dfields, p), default, keep)
        _apply(resolved[id(p)], default, fields, "default")
        if p.component in keep and p.kind == "weight" and _default_ok(variant, p, _relevant(dfields, p), default):
            resolved[id(p)].decided_by["weight"] = f"kept: {fam.name} default-keep"
            kept_by_family.add(p.component)
    if kept_by_family:
        reason = f"DEFAULT_KEEP: {fam.keep_reason}" if fam.keep_reason else "DEFAULT_KEEP"
        notes.append(f"{fam.name} family: the default does not reach {', '.join(sorted(kept_by_family))} "
                     f"({reason}); a rule that names them quantizes them")

    for label, rule in rule_list:
        where = f"{where0}, {label}"
        hits = [p for p in parts if _matches(rule, p, n_layers, n_experts)]
        if not hits:
            depth_only = all(c.startswith("depth.") for c in
                             [c for c in {p.component for p in parts} | {"depth.query", "depth.key_norm",
                                                                          "depth.softmax", "depth.sources"}
                              if component_matches(rule.select, c)])
            if depth_only and not attnres and rule.select.startswith("depth"):
                notes.append(f"{label} skipped: the model has no depth path (not an AttnRes model)")
                continue
            present = sorted({p.component for p in parts})
            raise UserError("the rule matches nothing in this model", where,
                            f"check the selector; this model has components {', '.join(present)}"
                            f" and layers 0..{n_layers - 1} (layer {n_layers} = final norm / final depth mix; slices "
                            f"and negative indices count over 0..{n_layers - 1})")
        fields = rule.set_fields()
        changed = False
        for p in hits:
            rel = _relevant(fields, p)
            if not rel:
                continue
            changed = True
            res = resolved[id(p)]
            if "weight" in rel and rule.weight not in weight_capability(method, p.component):
                raise UserError(f"method {method!r} cannot provide weight {rule.weight} for {p.component} "
                                f"({p.tensor_name})", where, method_fix(method, rule.weight, p.component))
            if "activation" in rel:
                w = rule.weight if "weight" in rel else res.weight
                if rule.activation not in activation_capability(method, p.component, w):
                    raise UserError(f"method {method!r} cannot quantize the activations of {p.tensor_name} to "
                                    f"{rule.activation}", where,
                                    "use `method: rtn`/`gptq` (simulated) or torchao int8 activations with int8 "
                                    "weights")
            _apply(res, rule, rel, label)
        if not changed:
            raise UserError(f"the rule sets {', '.join(fields)}, which applies to none of the parts it selects "
                            f"({', '.join(sorted({p.component for p in hits}))})", where,
                            "weight/group_size/symmetric apply to weights, activation* to nn.Linear inputs, "
                            "compute to depth.softmax and hc.pre/post/comb, storage to depth.sources, hc.streams, "
                            "attn.kv_cache and attn.state")

    # Cross-field checks per part.
    bnb_kept: dict[str, list[str]] = {}
    for p in parts:
        res = resolved[id(p)]
        if p.kind != "weight" or res.weight is None:
            continue
        if method == "bnb" and res.weight in ("nf4", "fp4") and p.is_linear:
            from .bnb import cpu_packing_problem

            problem = cpu_packing_problem(p.shape[0], p.shape[-1], res.group_size or 64)
            if problem:  # keep it at baseline on every machine, so results do not depend on the CPU
                bnb_kept.setdefault(problem, []).append(p.tensor_name)
                res.weight, res.group_size = None, None
                res.decided_by["weight"] = "kept: bnb 4-bit CPU packing"
                continue
        if res.weight in FP_FORMATS:
            from .formats import check_weight

            problem = check_weight(res.weight, p.shape, res.group_size, res.symmetric, res.decided_by)
            if problem:
                decided = "; ".join(sorted({res.decided_by.get(f, "default") for f in ("weight", "group_size",
                                                                                        "symmetric")
                                            if f in res.decided_by}))
                raise UserError(f"{problem[0]} ({p.tensor_name})", f"{where0} ({decided or 'default'})", problem[1])
        if method == "torchao" and res.activation == "int8" and res.weight != "int8":
            raise UserError(f"torchao's dynamic int8 activations need int8 weights, {p.tensor_name} has "
                            f"{res.weight}", where0, "set `weight: int8` with `activation: int8` for torchao")
        if res.weight.startswith("int") and res.group_size is not None and len(p.shape) in (1, 2):
            cols = p.shape[-1]
            if res.group_size < cols and cols % res.group_size:
                raise UserError(f"group_size {res.group_size} does not divide the {cols} input features of "
                                f"{p.tensor_name}", f"{where0} ({res.decided_by.get('group_size', 'default')})",
                                "choose a group_size that divides every selected layer's input size, or "
                                "null (per-channel)")

    cfg = getattr(model, "config", None)
    for p in parts:
        res = resolved[id(p)]
        if p.kind != "weight" and res.storage in ("mxfp8", "mxfp4", "nvfp4") and cfg is not None:
            from .formats import FIXED_GROUP

            hidden = int(getattr(cfg, "hidden_size", 0) or 0)
            heads = int(getattr(cfg, "num_heads", 0) or getattr(cfg, "num_attention_heads", 0) or 1)
            dim = (int(getattr(cfg, "head_dim", 0) or hidden // heads) if p.component == "attn.kv_cache"
                   else hidden)
            g = FIXED_GROUP[res.storage]
            if dim % g:
                what = "head_dim" if p.component == "attn.kv_cache" else "hidden size"
                raise UserError(f"{res.storage} storage groups {g} values along the {what}; {dim} is not a "
                                f"multiple ({p.name})", f"{where0} ({res.decided_by.get('storage', 'default')})",
                                "use fp8/int8 storage for this model, or a model whose dimension is a multiple of "
                                f"{g}")
        if p.kind == "weight" and p.is_linear and res.activation in ("mxfp8", "mxfp4", "nvfp4"):
            g = 16 if res.activation == "nvfp4" else 32
            if p.shape[-1] % g:
                raise UserError(f"{res.activation} activations group {g} input features; {p.tensor_name} has "
                                f"{p.shape[-1]}", f"{where0} ({res.decided_by.get('activation', 'default')})",
                                "keep this projection's activations at bf16 with a rule")
        if p.kind == "weight" and res.activation in ("mxfp8", "mxfp4") and res.activation_scheme == "static":
            raise UserError(f"{res.activation} activations are dynamic (a shared E8M0 scale per 32 values, computed "
                            f"at run time); `activation_scheme: static` cannot be applied ({p.tensor_name})",
                            f"{where0} ({res.decided_by.get('activation_scheme', 'default')})",
                            "remove `activation_scheme: static`, or use `activation: fp8` for static per-tensor scales")
    for problem, names in bnb_kept.items():
        notes.append(f"bnb 4-bit: {len(names)} tensor(s) kept at baseline precision ({', '.join(names[:4])}"
                     f"{' ...' if len(names) > 4 else ''}): {problem}. bitsandbytes' CPU kernel on AVX512-BF16 "
                     f"machines repacks 4-bit weights in blocks of {BNB_BLOCK_N} output rows and whole 4-bit blocks "
                     "per row (it asserts otherwise); such tensors are kept on every machine so results do not "
                     "depend on the CPU")
    rows = _rows(parts, resolved, variant, model)
    from .methods import check_settings

    check_settings(rows, variant, where0)  # a setting the method would ignore is refused here
    if method == "awq":
        settings = {(r.precision, r.resolved.group_size, bool(r.resolved.symmetric)) for r in rows
                    if r.method == "awq"}
        if len(settings) > 1:
            desc = "; ".join(f"{w} group_size {g} {'sym' if sy else 'asym'}" for w, g, sy in sorted(
                settings, key=str))
            raise UserError(f"AWQ runs one quantization setting for all the projections it quantizes; this plan "
                            f"asks for several ({desc})", where0,
                            "give every int attn.*/mlp.* projection the same weight/group_size/symmetric in an awq "
                            "variant (keep others at bf16), or use rtn/gptq for mixed precisions")
        family_note = fam.awq_note
        if any(r.method == "awq" for r in rows) and family_note:
            notes.append(family_note)
        elif any(r.method == "awq" for r in rows):
            notes.append("awq folds its smoothing scales into attn_norm/mlp_norm gains and, where o_proj/down_proj "
                         "are balanced, into v_proj/up_proj rows: those rows say keep/awq but change exactly in "
                         "fp32 (rounded once to the model dtype); the depth path (depth.query/key_norm) is never "
                         "rescaled")
    if any(r.method == "gguf" for r in rows):
        notes += _gguf_notes(rows)
    plan = Plan(variant, rows, notes, dtype_name(_model_dtype(model)))
    return plan


def _gguf_notes(rows: list[PlanRow]) -> list[str]:
    from .gguf_quant import block_size

    notes = []
    groups: dict[tuple, list[PlanRow]] = {}
    for r in rows:
        if r.method == "gguf" and r.fallback and r.tied_to is None:
            groups.setdefault((r.fallback, r.precision, r.part.shape[-1]), []).append(r)
    for (req, got, cols), rs in groups.items():
        comps = sorted({r.component for r in rs})
        notes.append(f"gguf fallback (llama.cpp's rule): {req} -> {got} for {len(rs)} tensor(s) whose rows of {cols} "
                     f"are not a multiple of {req}'s block of {block_size(req)} ({', '.join(comps)})")
    depth = [r for r in rows if r.method == "gguf" and r.component in ("depth.query", "depth.key_norm")
             and r.tied_to is None]
    if depth:
        kinds = sorted({f"{r.component}={r.precision}" + (f" (from {r.fallback})" if r.fallback else "")
                        for r in depth})
        notes.append("gguf on the depth path: " + ", ".join(kinds) + "; a K-quant the rows do not fit takes "
                     "llama.cpp's legacy fallback (q4_k->q5_0, q5_k->q5_1, q6_k->q8_0), fp16 if none fits")
    ones = [r for r in rows if r.method == "gguf" and r.part is not None and ggml_n_dims(r.part.shape) < 2 and
            r.tied_to is None]
    if ones:
        notes.append(f"gguf on {len(ones)} tensor(s) with fewer than 2 ggml dims "
                     f"({', '.join(sorted({r.component for r in ones}))}): llama-quantize never quantizes them "
                     "(ggml_n_dims < 2: norms, key norms, [1, d] pseudo-queries); simulated here because a rule "
                     "names them")
    return notes


def _storage_gran(prec: str) -> str:
    from .formats import storage_granularity

    return storage_granularity(prec)


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """``gguf_quant.ggml_n_dims`` (imported lazily: the gguf package is only needed for method gguf)."""
    from .gguf_quant import ggml_n_dims as n_dims

    return n_dims(shape)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _method_for(method: str, part: Part, res: Resolved, baseline: str, awq_components: tuple[str, ...] = ()) -> str:
    if part.kind == "compute":
        return "hook"
    w = res.weight
    if w is None or w == baseline or w == "fp32":  # float precisions never raise the baseline's
        return "keep"
    if w in FLOAT_WEIGHTS:
        return "cast"
    if w in GGUF_WEIGHTS:  # method gguf, or a llama.cpp row of an rtn variant (policy.weight_capability)
        return "gguf"
    if method == "gptq":
        return "gptq" if part.is_linear else "rtn"
    if method == "awq":  # AWQ's targets: the family's awq_components (attention / MLP projections); RTN for the rest
        return "awq" if part.is_linear and part.component in awq_components else "rtn"
    if method == "gguf":
        return "gguf"
    if method in ("bnb", "torchao"):
        return method
    return "rtn"


def _rows(parts: list[Part], resolved: dict, variant: Variant, model: nn.Module) -> list[PlanRow]:
    method = variant.method
    rows: list[PlanRow] = []
    seen: dict[int, tuple] = {}
    mdtype = dtype_name(_model_dtype(model))
    from ..architectures import family_for_model

    awq_components = tuple(family_for_model(model).awq_components)
    for p in parts:
        res = resolved[id(p)]
        rule = "; ".join(sorted(set(res.decided_by.values()), key=lambda s: (s != "default", s))) or "baseline"
        if p.kind == "compute" and p.component == "attn.state":  # the KDA recurrent state: fp32 in every model
            prec = res.storage or "fp32"
            gran = "per-row" if prec in ("int8", "int4", "fp8") else "-"
            rows.append(PlanRow(p.component, p.layer, p.name + ".state", "keep" if prec == "fp32" else "sim", prec,
                                gran, "-", rule, part=p, resolved=res))
            continue
        if p.hook is not None:  # a family's own computation: the family says how its row reads
            prec, gran, keep = p.hook.row(getattr(res, p.hook.field), mdtype)
            rows.append(PlanRow(p.component, p.layer, p.name + p.hook.suffix, "keep" if keep else "sim", prec, gran,
                                "-", rule, part=p, resolved=res))
            continue
        if p.kind == "compute":
            if p.component == "depth.softmax":
                prec = res.compute or "fp32"
            else:
                prec = res.storage or ("bf16" if mdtype == "bf16" else mdtype)
                if p.component == "attn.kv_cache" and res.storage is None:
                    prec = mdtype
            gran = {"depth.softmax": "per-token" if prec == "int8" else "elementwise",
                    "depth.sources": "per-token" if prec in ("int8", "int4", "fp8") else
                    _storage_gran(prec),
                    "attn.kv_cache": ("per-head" if variant.options.get("kv_granularity") == "per_head" else
                                      "per-token-head") if prec in ("int8", "int4", "fp8") else
                    _storage_gran(prec)}[p.component]
            base_prec = "fp32" if p.component == "depth.softmax" else mdtype
            keep = prec == base_prec or (prec == "fp32" and p.component != "depth.softmax")
            suffix = {"depth.softmax": ".softmax", "depth.sources": ".sources", "attn.kv_cache": ".kv_cache"}
            rows.append(PlanRow(p.component, p.layer, p.name + suffix[p.component], "keep" if keep else "sim", prec,
                                gran, "-", rule, part=p, resolved=res))
            continue
        w = p.module.weight
        base = dtype_name(w.dtype)
        m = _method_for(method, p, res, base, awq_components)
        prec = base if m == "keep" else res.weight
        fallback = None
        if m == "gguf":
            from .gguf_quant import bits_per_weight, block_size, fallback_type

            got = fallback_type(prec.upper(), p.shape[-1] if p.shape else 0).lower()
            if got != prec:
                fallback, prec = prec, got
            if prec == "f16":
                prec = "fp16"
                gran = f"fp16 cast (no {fallback} block fits rows of {p.shape[-1] if p.shape else 0})"
                bits = float(min(16, _BITS.get(base, 32)))
            else:
                bs = block_size(prec)
                gran = (f"super-block {bs}" if prec in ("q4_k", "q5_k", "q6_k") else f"block {bs}") + (
                    f", fallback from {fallback}" if fallback else "")
                bits = bits_per_weight(prec)
        elif m in ("keep", "cast"):
            gran = "-"
            bits = float(min(_BITS.get(prec, 32), _BITS.get(base, 32)))
        else:
            gran = granularity(p.shape, res.group_size, res.symmetric)
            if prec in FP_FORMATS:
                from .formats import granularity as fmt_granularity

                gran = fmt_granularity(prec, p.shape, res.group_size)
            if m == "torchao" and prec == "int4":  # tinygemm int4: scale + zero point per group
                gran = granularity(p.shape, res.group_size, False)
            if m == "bnb":
                gran = "per-row (LLM.int8)" if prec == "int8" else f"block {res.group_size or 64}"
            bits = weight_bits(m if m in ("bnb", "torchao") else "rtn", prec, p.shape, res.group_size,
                               res.symmetric, _BITS.get(base, 32))
        act = "-"
        if p.is_linear:
            a = res.activation
            act = a if a in QUANT_ACTIVATIONS else "bf16" if a is None else a
            if a in ("mxfp8", "mxfp4"):
                act += " g32 dyn"
            elif a == "nvfp4":
                act += " g16 dyn + calibrated global"
            elif a in QUANT_ACTIVATIONS:
                act += " per-token dyn" if res.activation_scheme == "dynamic" else " per-tensor static"
        key = (m, prec, gran)
        first = seen.get(id(w))  # tied weights are one Parameter object (works on the meta device too)
        tied = first[0] if first is not None and first[1] == key else None
        seen.setdefault(id(w), (p.tensor_name, key))
        rows.append(PlanRow(p.component, p.layer, p.tensor_name, m, prec, gran, act, rule, p.numel, bits,
                            tied, fallback, part=p, resolved=res))
    return rows


def baseline_plan(model: nn.Module, dtype: str | None = None) -> dict:
    """The plan record of the unquantized baseline (same shape as ``QuantizedModel.plan_summary()``)."""
    variant = Variant(name="baseline", method="none")
    plan = resolve_plan(model, variant, "baseline")
    name = dtype_name(_model_dtype(model))
    return {**plan.summary(), "variant": "baseline", "dtype": dtype or name, "simulated": False,
            "kernel": f"dense-{dtype or name}", "notes": plan.notes, "rows": [r.as_dict() for r in plan.rows]}
