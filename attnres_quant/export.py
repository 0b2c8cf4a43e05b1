"""``python -m attnres_quant export CONFIG --variant NAME --model LABEL OUT``: write a quantized variant as a
Hugging Face checkpoint in compressed-tensors format, and a model card.

The checkpoint is written by compressed-tensors' own path (``apply_quantization_config`` -> scales set ->
``ModelCompressor.compress_model`` -> ``save_pretrained`` -> ``update_config``): packed weights
(``weight_packed`` for fp4/int4, fp8 / int8 tensors, E8M0 / E4M3 scales), a ``quantization_config`` whose
``config_groups`` come from the plan (one group per distinct weight/activation setting, targets the exact module
names ``re:^name$``), and compressed-tensors' ``ignore`` list -- every nn.Linear the plan leaves unquantized,
including the pseudo-queries ``*_res_proj`` (the depth loop reads them as tensors, so they are never a quantized
module call), plus, by name, every kept component of :data:`ALWAYS_IGNORE` that is not an nn.Linear (Kimi's MoE
router). Kimi-family models export the same way (their parameter-named rows -- ``A_log``, ``dt_bias``, the
router bias -- bake through their own attribute) and load back with ``attnres_quant.loading.load_model``.

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
# Components always named in `ignore` when kept dense, even if their module is not an nn.Linear.
ALWAYS_IGNORE = ("depth.query", "moe.router")
_INT = ("int8", "int4")


def add_arguments(parser) -> None:
    parser.add_argument("config", help="study config (YAML) with `model`/`models` and `variants`")
    parser.add_argument("out", help="output directory (created; must be empty or absent), or a FILE.gguf for a "
                                    "`method: gguf` variant of a Llama-family model")
    parser.add_argument("--variant", required=True, help="the variant to export")
    parser.add_argument("--model", default=None, help="model label or path (default: the config's first model)")
    parser.add_argument("--results", default=None,
                        help="results.json of the study (default: runs/<config name>/results.json if present); "
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
        guess = Path("runs") / Path(args.config).stem / "results.json"
        results = str(guess) if guess.is_file() else None
    from .loading import load_model

    model, tokenizer = load_model(spec["path"], dtype=dtype, allow_pickle=bool(spec.get("allow_pickle", False)),
                                  trust_remote_code=bool(spec.get("trust_remote_code", False)))
    if str(args.out).endswith(".gguf"):
        info = export_gguf(model, variant, args.out, source=args.config)
        print(f"wrote {info['out']}: {len(info['tensors'])} tensors ({info['arch']})")
        return 0
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
    if w in _INT + ("fp8",) and (g is None or g >= row.part.shape[-1]):
        g = None  # per-channel
    a = res.activation if res.activation in ("int8", "int4", "fp8", "mxfp8", "mxfp4", "nvfp4") else None
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
        aq = res.activation in ("int8", "int4", "fp8", "mxfp8", "mxfp4", "nvfp4")
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
            # r.part.param: "weight", or a family's other tensor (Kimi's A_log, dt_bias, router bias)
            src, dst = getattr(qmods[name], r.part.param), getattr(emods[name], r.part.param)
            if not torch.equal(src, dst):
                dst.data.copy_(src.data)
                baked.append(f"{r.part.tensor_name} ({r.component}, {r.precision}, {r.method})")

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
    nv_amax = formats.fused_global_amax({r.part.name: emods[r.part.name].weight.data for r in ct_rows
                                         if _scheme_key(r)[0] == "nvfp4"})
    with torch.no_grad():
        for r in ct_rows:
            mod = emods[r.part.name]
            key = _scheme_key(r)
            w, g, sym, a, scheme = key
            if w in FP_FORMATS:
                for pname, val in formats.weight_qparams(mod.weight, w, g,
                                                         global_amax=nv_amax.get(r.part.name)).items():
                    _set_param(mod, pname, val)
            elif w in _INT:
                xg = rtn._group_view(mod.weight.float(), g)
                scale, zp = rtn.qparams(xg, w, sym)
                _set_param(mod, "weight_scale", scale.squeeze(-1))
                if hasattr(mod, "weight_zero_point"):
                    _set_param(mod, "weight_zero_point", zp.squeeze(-1))
            if a == "nvfp4":
                _set_param(mod, "input_global_scale", qmods[r.part.name]._act_quantizer.global_scale)
            elif a and scheme == "static":
                aq = qmods[r.part.name]._act_quantizer
                if a == "fp8":
                    _set_param(mod, "input_scale", aq.scale)
                else:
                    qmax = {"int8": 127.5, "int4": 7.5}[a]
                    _set_param(mod, "input_scale", (aq.amax / qmax).clamp(min=rtn.EPS))
            mod.quantization_status = QuantizationStatus.FROZEN
            n_quantized += 1
    compressor = ModelCompressor.from_pretrained_model(exp)
    # compressed-tensors lists only unquantized modules of a quantized class (nn.Linear); a MoE router that is
    # not an nn.Linear (Kimi's KimiRouter) is added by name -- the K3 ignore lesson: it stays dense.
    extra = [r.part.name for r in plan.weight_rows() if r.component in ALWAYS_IGNORE and r.part.param == "weight"
             and r.part.name not in ct_names and r.part.name not in compressor.quantization_config.ignore]
    compressor.quantization_config.ignore += list(dict.fromkeys(extra))
    compressor.compress_model(exp)
    out.mkdir(parents=True, exist_ok=True)
    exp.save_pretrained(out)
    compressor.update_config(str(out))
    from .model.remote_code import AUTO_CLASSES, write_remote_code

    if getattr(exp.config, "model_type", None) in AUTO_CLASSES:  # self-describing (trust_remote_code)
        write_remote_code(out)
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
               "avg_bits": q.avg_bits, "weight_bytes": q.weight_bytes, "model_type": cfg.get("model_type")}
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


# --------------------------------------------------------------------------------------------- GGUF
# llama.cpp architectures for HF model types (the comparators); AttnRes is unknown to llama.cpp.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def gguf_tensor_name(hf_name: str) -> str | None:
    """HF parameter name -> GGUF tensor name (llama.cpp's convention), or None if unknown."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        mod, suffix = ".".join(parts[3:-1]), parts[-1]
        if mod in _GGUF_NAMES:
            return f"blk.{parts[2]}.{_GGUF_NAMES[mod]}.{suffix}"
    return None


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Llama q/k projections (its rotary pairs interleaved, HF's in halves): rows
    grouped per head as [2, head_dim/2] become [head_dim/2, 2]. Works on any tensor whose dim 0 is the rows."""
    n = rows.shape[0]
    return rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def export_gguf(model: nn.Module, variant: Variant, out: str | Path, *, source: str = "config") -> dict:
    """Write the GGUF file of a ``method: gguf`` variant of a Llama-family model: every tensor the plan quantizes
    as llama.cpp's blocks from :func:`quant.gguf_quant.quantize_packed` (the same codes the simulation
    dequantizes, so the reader's dequantized tensors equal the simulated weights), fp16 fallbacks as F16, every
    other tensor as F32 (an exact widening of bf16); Llama/Mistral q/k rows in llama.cpp's rotary order.
    Architecture hyper-parameters are written; tokenizer metadata is not (llama.cpp needs it to run the file)."""
    import gguf

    from .quant.apply import quantize
    from .quant.gguf_quant import quantize_packed

    where = f"{source}, variant {variant.name!r}"
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if variant.method != "gguf":
        raise UserError(f"GGUF export needs a `method: gguf` variant (this one is {variant.method!r})", where,
                        "export it as a compressed-tensors checkpoint (no .gguf suffix), or use method gguf")
    if mtype not in GGUF_ARCH:
        raise UserError(f"llama.cpp does not know the architecture {mtype!r}", where,
                        "GGUF export covers the Llama-family comparators (" + ", ".join(GGUF_ARCH) + "); export "
                        "AttnRes models as compressed-tensors checkpoints")
    arch = GGUF_ARCH[mtype]
    cfg = model.config
    q = quantize(model, variant, source=source)
    rows = {f"{r.part.name}.weight": r for r in q.plan.weight_rows()}
    base = dict(model.named_parameters())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), arch)
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
    w.add_name(variant.name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or
                               (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(int(cfg.vocab_size))
    written = {}
    for name, param in q.model.named_parameters():
        gname = gguf_tensor_name(name)
        if gname is None:
            raise UserError(f"no GGUF name for tensor {name!r}", where, "GGUF export covers Llama-family layouts")
        row = rows.get(name)
        if row is not None and row.tied_to is not None:
            continue  # llama.cpp reads a missing output.weight from token_embd
        perm = None
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            perm = n_head if "attn_q" in gname else n_kv
        if row is not None and row.method == "gguf" and row.precision != "fp16":
            qt = row.precision.upper()
            data = torch.from_numpy(quantize_packed(base[name].detach(), qt))
            kind = gguf.GGMLQuantizationType[qt]
        elif row is not None and row.precision == "fp16":
            data, kind = param.detach().to(torch.float16), gguf.GGMLQuantizationType.F16
        else:
            data, kind = param.detach().float(), gguf.GGMLQuantizationType.F32
        if perm:
            data = rope_permute(data, perm)
        arr = data.contiguous().numpy()
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, arr, raw_dtype=kind)  # uint8 blocks; the writer derives the element shape
        written[gname] = kind.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"out": str(out), "arch": arch, "tensors": written, "avg_bits": q.avg_bits, "weight_bytes": q.weight_bytes}


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
             *_load_snippet(summary), "", "## Policy", "", "```yaml", pol, "```", "",
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


def _load_snippet(summary: dict) -> list[str]:
    if summary.get("model_type") in ("kimi_linear", "kimi_k3"):  # transformers' own kimi_linear has no AttnRes
        return ["Load with attnres_quant's Kimi loader (it decompresses every packed module with compressed-tensors' "
                "decompressors; MXFP4 with its own decoder):", "", "```python",
                "from attnres_quant.loading import load_model",
                f"model, tokenizer = load_model(\"{summary['out']}\", dtype=\"bfloat16\")", "```"]
    return ["Load with plain transformers (compressed-tensors decompresses on load):", "", "```python",
            "import attnres_quant.model  # registers the AttnRes model type", "from transformers import "
            "AutoModelForCausalLM", f"model = AutoModelForCausalLM.from_pretrained(\"{summary['out']}\")", "```"]


def _short(args: dict | None):
    if not args:
        return None
    keep = ("num_bits", "type", "strategy", "group_size", "block_structure", "symmetric", "dynamic", "scale_dtype")
    return {k: args[k] for k in keep if args.get(k) is not None}


__all__ = ["add_arguments", "main", "export_variant", "export_gguf", "gguf_tensor_name", "model_card"]
