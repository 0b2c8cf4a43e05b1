"""``python -m attnres_quant export CONFIG --variant NAME --model LABEL OUT``: write a quantized variant as a
Hugging Face checkpoint in compressed-tensors format, and a model card.

The checkpoint is written by compressed-tensors' own path (``apply_quantization_config`` -> scales set ->
``ModelCompressor.compress_model`` -> ``save_pretrained`` -> ``update_config``): packed weights
(``weight_packed`` for fp4/int4, fp8 / int8 tensors, E8M0 / E4M3 scales), a ``quantization_config`` whose
``config_groups`` come from the plan (one group per distinct weight/activation setting, targets the exact module
names ``re:^name$``), and compressed-tensors' ``ignore`` list -- every nn.Linear the plan leaves unquantized,
including the pseudo-queries ``*_res_proj`` (the depth loop reads them as tensors, so they are never a quantized
module call).

What a compressed-tensors checkpoint cannot express is *baked*: a part the plan quantizes that is not a module
call of an nn.Linear (embedding, norms, pseudo-queries / key norms, float casts) is stored dense holding its
simulated (dequantized) values, and the model card lists it. The simulated depth-path and KV-cache hooks
(``depth.softmax``, ``depth.sources``, ``attn.kv_cache``) are run-time computations, not weights: the card lists
them as not carried by the checkpoint.

Weights are quantized from the baseline weights with the scales :mod:`attnres_quant.quant.formats` computes
(compressed-tensors' arithmetic), so decompression gives the simulated variant's weights bit for bit for the
floating formats (int formats: our RTN rounds in fp32 with a fp32 scale that the checkpoint stores in the model
dtype -- equal within one bf16 step of the scale; see docs/deployment.md).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .quant.policy import FP_FORMATS, Variant

EXPORT_METHODS = ("rtn", "none")
_INT = ("int8", "int4")


def add_arguments(parser) -> None:
    parser.add_argument("config", help="study config (YAML) with `model`/`models` and `variants`")
    parser.add_argument("out", help="output directory (created; must be empty or absent)")
    parser.add_argument("--variant", required=True, help="the variant to export")
    parser.add_argument("--model", default=None, help="model label or path (default: the config's first model)")
    parser.add_argument("--results", default=None,
                        help="results.json of the study (default: reports/<config name>/results.json if present); "
                             "its KL / task deltas for this variant go in the model card")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted), as for `run`")


def main(args) -> int:
    from .quant.plan_cli import _label, _read_config
    from .quant.policy import parse_variant

    models, raw_variants, dtype, _device = _read_config(args.config, args.overrides)
    variants = {v.get("name"): v for v in raw_variants if isinstance(v, dict)}
    if args.variant not in variants:
        raise UserError(f"no variant named {args.variant!r}", args.config,
                        "choose from " + ", ".join(str(n) for n in variants))
    variant = parse_variant(variants[args.variant], args.config)
    if args.model:
        models = [m for m in models if args.model in (_label(m), m["path"])]
        if not models:
            raise UserError(f"no model {args.model!r} in the config", args.config, "use a model label or path")
    spec = models[0]
    results = args.results
    if results is None:
        guess = Path("reports") / Path(args.config).stem / "results.json"
        results = str(guess) if guess.is_file() else None
    from .loading import load_model

    model, tokenizer = load_model(spec["path"], dtype=dtype, allow_pickle=bool(spec.get("allow_pickle", False)),
                                  trust_remote_code=bool(spec.get("trust_remote_code", False)))
    calibration = None
    if variant.needs_calibration():
        from .quant.apply import calibration_batches

        calibration = calibration_batches(tokenizer, 16, 256, 0)
    info = export_variant(model, variant, args.out, tokenizer=tokenizer, calibration=calibration,
                          source=args.config, model_label=_label(spec), model_path=str(spec["path"]),
                          results=results)
    print(f"wrote {info['out']}: {info['n_quantized']} quantized Linear modules in {len(info['config_groups'])} "
          f"config group(s), {len(info['ignore'])} ignored, {len(info['baked'])} baked tensors")
    return 0


# --------------------------------------------------------------------------------------------- config
def _scheme_key(row) -> tuple:
    res = row.resolved
    w = row.precision if row.method == "rtn" else None
    g = res.group_size if w in _INT + ("fp8", "fp8_block") else None
    if w in _INT and (g is None or g >= row.part.shape[-1]):
        g = None
    a = res.activation if res.activation in ("int8", "int4", "fp8", "mxfp8", "mxfp4") else None
    return (w, g, bool(res.symmetric) if w in _INT else True, a, res.activation_scheme if a else None)


def _args_for(key: tuple, cols: int):
    from compressed_tensors.quantization import QuantizationScheme

    from .quant import formats

    w, g, sym, a, scheme = key
    wargs = None
    if w in FP_FORMATS:
        wargs = formats.weight_args(w, g)
    elif w in _INT:
        wargs = formats.int_weight_args(w, g, sym, cols)
    iargs = formats.activation_args(a, scheme) if a else None
    return lambda targets: QuantizationScheme(targets=targets, weights=wargs, input_activations=iargs)


def _ct_rows(plan) -> list:
    """Plan rows that become compressed-tensors quantized modules: nn.Linear module calls with a quantized
    weight (rtn) and/or quantized input activations."""
    out = []
    for r in plan.weight_rows():
        if r.tied_to is not None or not r.part.is_linear or r.component.startswith("depth."):
            continue
        res = r.resolved
        wq = r.method == "rtn" and r.precision in FP_FORMATS + _INT
        aq = res.activation in ("int8", "int4", "fp8", "mxfp8", "mxfp4")
        if wq or aq:
            out.append(r)
    return out


def export_variant(model: nn.Module, variant: Variant, out: str | Path, *, tokenizer=None, calibration=None,
                   source: str = "config", model_label: str | None = None, model_path: str | None = None,
                   results: str | Path | dict | None = None) -> dict:
    """Quantize ``model`` with ``variant`` and write it to ``out`` as a compressed-tensors checkpoint plus
    README.md (model card). Returns a summary dict (config groups, ignore list, baked tensors, hooks)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    from .quant import formats, rtn
    from .quant.apply import quantize

    where = f"{source}, variant {variant.name!r}"
    if variant.method not in EXPORT_METHODS:
        raise UserError(f"export supports methods {', '.join(EXPORT_METHODS)}; this variant uses "
                        f"{variant.method!r}", where,
                        "export an rtn variant (its scales are recomputed exactly from the baseline weights); "
                        "gptq/awq/gguf/bnb/torchao export is not built yet")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {str(out)!r} is not empty", where, "pass a new or empty directory")
    q = quantize(model, variant, calibration, source=source)  # the simulated variant (and its plan)
    plan = q.plan
    ct_rows = _ct_rows(plan)
    ct_names = {r.part.name for r in ct_rows}
    exp = copy.deepcopy(model).eval()
    # Untie exactly as quantize() did, then bake every non-CT weight with its simulated value.
    qmods = dict(q.model.named_modules())
    if not getattr(q.model.config, "tie_word_embeddings", True) and getattr(exp.config, "tie_word_embeddings",
                                                                           False):
        exp.config.tie_word_embeddings = False
        head = exp.get_output_embeddings()
        if head is not None:
            head.weight = nn.Parameter(head.weight.detach().clone())
    baked = []
    emods = dict(exp.named_modules())
    with torch.no_grad():
        for r in plan.weight_rows():
            name = r.part.name
            if name in ct_names and r.method == "rtn":
                continue  # quantized by compressed-tensors from the baseline weight
            src, dst = qmods[name].weight, emods[name].weight
            if not torch.equal(src, dst):
                dst.data.copy_(src.data)
                baked.append(f"{name}.weight ({r.component}, {r.precision}, {r.method})")

    groups: dict[tuple, list] = {}
    for r in ct_rows:
        groups.setdefault(_scheme_key(r), []).append(r)
    config_groups = {}
    for i, (key, rows) in enumerate(groups.items()):
        make = _args_for(key, rows[0].part.shape[-1])
        config_groups[f"group_{i}"] = make([f"re:^{r.part.name}$" for r in rows])
    hooks = [f"{r.component}@{r.name}={r.precision}" for r in plan.rows if not r.is_weight and r.method == "sim"]
    if not config_groups:
        raise UserError("the variant quantizes no nn.Linear module call, so there is nothing for "
                        "compressed-tensors to pack", where,
                        "export a variant with int/fp weights or activations on attn.*/mlp.*/lm_head")
    qcfg = QuantizationConfig(config_groups=config_groups, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(exp, qcfg)
    n_quantized = 0
    with torch.no_grad():
        for r in ct_rows:
            mod = emods[r.part.name]
            key = _scheme_key(r)
            w, g, sym, a, scheme = key
            if w in FP_FORMATS:
                for pname, val in formats.weight_qparams(mod.weight, w, g).items():
                    _set_param(mod, pname, val)
            elif w in _INT:
                xg = rtn._group_view(mod.weight.float(), g)
                scale, zp = rtn.qparams(xg, w, sym)
                _set_param(mod, "weight_scale", scale.squeeze(-1))
                if hasattr(mod, "weight_zero_point"):
                    _set_param(mod, "weight_zero_point", zp.squeeze(-1))
            if a and scheme == "static":
                aq = qmods[r.part.name]._act_quantizer
                if a == "fp8":
                    _set_param(mod, "input_scale", aq.scale)
                else:
                    qmax = {"int8": 127.5, "int4": 7.5}[a]
                    _set_param(mod, "input_scale", (aq.amax / qmax).clamp(min=rtn.EPS))
            mod.quantization_status = QuantizationStatus.FROZEN
            n_quantized += 1
    compressor = ModelCompressor.from_pretrained_model(exp)
    compressor.compress_model(exp)
    out.mkdir(parents=True, exist_ok=True)
    exp.save_pretrained(out)
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.get("quantization_config", {})
    ignore = list(qc.get("ignore") or [])
    summary = {"out": str(out), "variant": variant.name, "method": variant.method, "n_quantized": n_quantized,
               "config_groups": {k: {"targets": len(v.get("targets", [])), "format": v.get("format"),
                                     "weights": v.get("weights"), "input_activations": v.get("input_activations")}
                                 for k, v in qc.get("config_groups", {}).items()},
               "format": qc.get("format"), "ignore": ignore, "baked": baked, "hooks_not_exported": hooks,
               "avg_bits": q.avg_bits, "weight_bytes": q.weight_bytes}
    (out / "README.md").write_text(model_card(variant, plan, summary, model_label=model_label,
                                              model_path=model_path, results=results,
                                              calibrated=calibration is not None))
    (out / "attnres_quant_export.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    p = getattr(mod, name, None)
    if p is None:
        mod.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
        return
    p.data = value.detach().to(p.dtype).reshape(p.shape).clone()


# --------------------------------------------------------------------------------------------- model card
def _results_for(results, variant_name: str, model_label: str | None) -> list[dict]:
    if results is None:
        return []
    data = results
    if not isinstance(results, dict):
        p = Path(results)
        if not p.is_file():
            return []
        data = json.loads(p.read_text())
    out = []

    def walk(obj):
        if isinstance(obj, dict):
            if obj.get("variant") == variant_name and (model_label is None or obj.get("model") in (None,
                                                                                                   model_label)):
                out.append(obj)
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
    walk(data)
    return out


def _fmt_metric(rec: dict) -> list[str]:
    lines = []
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            flat[prefix] = obj
    walk("", rec)
    for k, v in flat.items():
        low = k.lower()
        if any(t in low for t in ("kl", "delta", "top1", "ppl", "bpb")) and "stderr" not in low:
            lines.append(f"| {k} | {v:.6g} |")
    return lines[:40]


def model_card(variant: Variant, plan, summary: dict, *, model_label=None, model_path=None, results=None,
               calibrated: bool = False) -> str:
    import yaml

    pol = yaml.safe_dump(variant.model_dump(exclude_defaults=True), sort_keys=False).rstrip()
    lines = [f"# {model_label or 'model'} — {variant.name} (compressed-tensors)", "",
             f"Exported by `attnres_quant export` from `{model_path or model_label}`, variant `{variant.name}`, "
             f"method `{variant.method}` (round-to-nearest; formats follow compressed-tensors' arithmetic).", "",
             "Load with plain transformers (compressed-tensors decompresses on load):", "", "```python",
             "import attnres_quant.model  # registers the AttnRes model type", "from transformers import "
             "AutoModelForCausalLM", f"model = AutoModelForCausalLM.from_pretrained(\"{summary['out']}\")", "```",
             "", "## Policy", "", "```yaml", pol, "```", "",
             f"Average {summary['avg_bits']:.3f} bits per weight including scales; {summary['weight_bytes']:,} "
             "bytes of weights as the format stores them.", "",
             f"Calibration: {'16 x 256 tokens of the training mix (proxy-task train split + stdlib train files)' if calibrated else 'none (no static scales)'}.",
             "", "## quantization_config", ""]
    for k, g in summary["config_groups"].items():
        lines.append(f"- `{k}` ({g['targets']} modules): weights {json.dumps(_short(g['weights']))}, input "
                     f"activations {json.dumps(_short(g['input_activations']))}")
    lines += ["", f"Format: `{summary['format']}`. Ignored (kept dense, listed in `ignore`): "
              f"{len(summary['ignore'])} modules, including every `*_res_proj` pseudo-query "
              f"({', '.join(f'`{n}`' for n in summary['ignore'][:6])}{' ...' if len(summary['ignore']) > 6 else ''}).",
              ""]
    if summary["baked"]:
        lines += ["Baked (stored dense with the simulated quantized values; compressed-tensors has no format for a "
                  "tensor that is not an nn.Linear module call):", ""]
        lines += [f"- `{b}`" for b in summary["baked"]] + [""]
    if summary["hooks_not_exported"]:
        lines += ["**Not carried by the checkpoint** (run-time simulations of the study; a serving engine runs "
                  "these at its own precision):", ""]
        kinds = sorted({h.split("@")[0] + "=" + h.rsplit("=", 1)[-1] for h in summary["hooks_not_exported"]})
        lines += [f"- {k}" for k in kinds] + [""]
    recs = _results_for(results, variant.name, model_label)
    lines += ["## Measured quality", ""]
    metric_lines = []
    for rec in recs:
        metric_lines += _fmt_metric(rec)
    if metric_lines:
        lines += [f"From `{results if not isinstance(results, dict) else 'results'}` (variant vs baseline):", "",
                  "| metric | value |", "|---|---|"] + list(dict.fromkeys(metric_lines)) + [""]
    else:
        lines += ["No study results were found for this variant (run `python -m attnres_quant run CONFIG` first, "
                  "or pass `--results`).", ""]
    return "\n".join(lines)


def _short(args: dict | None):
    if not args:
        return None
    keep = ("num_bits", "type", "strategy", "group_size", "block_structure", "symmetric", "dynamic", "scale_dtype")
    return {k: args[k] for k in keep if args.get(k) is not None}


__all__ = ["add_arguments", "main", "export_variant", "model_card"]
