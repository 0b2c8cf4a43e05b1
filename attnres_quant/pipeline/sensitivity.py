"""``python -m attnres_quant sensitivity CONFIG``: one part of the model at a time at a target precision.

A *probe* quantizes one unit -- a component group (``attn.q``, ``mlp.down``, ``lm_head``,
``depth.query`` ...), or with ``--per-layer`` one layer of it, with ``--experts`` one routed
expert -- and leaves everything else at the baseline. Its damage is the KL(baseline || probe) on
the study's quality text (mean with its standard error over tokens, percentiles, top-1 agreement)
and, when the config lists tasks, the task scores. The depth path is probed beside the projections:
pseudo-queries (``depth.query``) and key norms (``depth.key_norm``) as weights, the depth softmax at
a lowered compute precision (``depth.softmax``) and the stored depth sources at a lowered storage
precision (``depth.sources``).

The study config schema is reused as it is (models, baseline, quality, tasks, eval, calibration;
its ``variants`` are not probed). Results go to ``<out>/<config name>-sensitivity/results.json``
(the results store of ``run``: one variant per probe, with its ``plan`` and ``quality`` cells and
task cells; ``--resume`` skips finished probes), and the report, rendered by ``report``, ranks the
probes by KL with error bars.

Every KL of this module and of ``search`` goes through :func:`measure_kl`.
"""

from __future__ import annotations

import gc
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from ..argtypes import int_in
from ..errors import UserError
from .runner import DEFAULT_OUT

# Components that are never probed: norms stay at the baseline in every policy of this project, `other`
# is unnamed, the KV cache and KDA state are runtime memories of another issue.
SKIPPED_COMPONENTS = ("norm", "other", "attn.kv_cache", "attn.state")
FREE_COMPONENTS = ("depth.softmax", "depth.sources")  # computations: no weight bits


# --------------------------------------------------------------------------- the one KL measurement
def measure_kl(baseline, model, tokenizer, text_ids, seq_len: int, batch_size: int = 4) -> dict:
    """KL(baseline || model) per token on the quality text, as the study's quality step computes it
    (``evaluation.metrics``: same windows; per-token KL from ``evaluation.kl``'s chunked float64 pass, memory
    bounded for any vocabulary), summarised with the standard error of the mean over tokens. The one place
    sensitivity and search measure damage."""
    import torch

    from ..evaluation import metrics as m
    from ..evaluation.kl import exact_kl_one_pass

    ids = [int(x) for x in text_ids.flatten().tolist()]
    windows = m._windows(ids, m._seq_len([baseline, model], seq_len), m._prefix_token(tokenizer))
    kls, agree = [], 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            for w, c in m._group(windows[i:i + batch_size]):
                lb = _baseline_logits(baseline, w)
                lv, _ = m._forward(model, w, False)
                for r in range(w.shape[0]):
                    b, v = lb[r, c - 1:-1].float().cpu(), lv[r, c - 1:-1].float().cpu()
                    kls.append(exact_kl_one_pass(b, v)[0])
                    agree += int((b.argmax(-1) == v.argmax(-1)).sum())
    return kl_summary(torch.cat(kls).double(), agree)


_BASELINE_LOGITS = weakref.WeakKeyDictionary()  # baseline model -> {window batch: logits}; dies with the model
_CACHE_MAX_VALUES = 64 * 2 ** 20  # 256 MiB of fp32 logits: a probe run re-reads the baseline's, never recomputes


def _baseline_logits(baseline, batch):
    """The baseline's logits of one batch of windows, computed once per baseline (every probe reuses them;
    a weak reference to the baseline keys the cache, so it goes with the model and is not deep-copied into variants)."""
    from ..evaluation import metrics as m

    cache = _BASELINE_LOGITS.setdefault(baseline, {})
    key = (tuple(batch.shape), tuple(batch.flatten().tolist()))
    if key in cache:
        return cache[key]
    logits, _ = m._forward(baseline, batch, False)
    if sum(t.numel() for t in cache.values()) + logits.numel() <= _CACHE_MAX_VALUES:
        cache[key] = logits.float().cpu()
    return logits


def kl_summary(kl, agree: int | None = None) -> dict:
    """Mean, standard error of the mean, percentiles and max of per-token KLs (a 1-D float64 tensor)."""
    import torch

    n = kl.numel()
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.95, 0.99], dtype=torch.float64)).tolist()
    sem = float(kl.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    out = {"tokens": n, "kl_mean": float(kl.mean()), "kl_sem": sem, "kl_p50": q[0], "kl_p90": q[1],
           "kl_p95": q[2], "kl_p99": q[3], "kl_max": float(kl.max())}
    if agree is not None:
        out["top1_agreement"] = agree / n
    return out


# --------------------------------------------------------------------------- units and levels
@dataclass(frozen=True)
class ProbeUnit:
    name: str  # e.g. "attn.q", "mlp.down.L3", "moe.experts.up.L1.E5"
    component: str
    layer: int | None
    expert: int | None

    @property
    def free(self) -> bool:
        return self.component in FREE_COMPONENTS

    def selectors(self) -> dict:
        sel = {"select": self.component}
        if self.layer is not None:
            sel["layers"] = [self.layer]
        if self.expert is not None:
            sel["experts"] = [self.expert]
        return sel


def probe_units(parts, *, per_layer: bool = False, experts: bool = False) -> list[ProbeUnit]:
    """The units of a model's parts (``quant.resolve_components``), in model order, each once."""
    seen: dict[str, ProbeUnit] = {}
    for p in parts:
        if p.component in SKIPPED_COMPONENTS:
            continue
        layer = p.layer if per_layer else None
        expert = p.expert if experts else None
        if expert is not None and layer is None:
            layer = p.layer  # an expert index means something only within its layer
        name = p.component + (f".L{layer}" if layer is not None else "") + (f".E{expert}" if expert is not None
                                                                             else "")
        seen.setdefault(name, ProbeUnit(name, p.component, layer, expert))
    return list(seen.values())


def parse_level(text: str) -> dict:
    """``int4:32`` -> {weight: int4, group_size: 32}; ``int8`` -> per-channel int8; ``Q4_K`` / ``q8_0`` -> a
    llama.cpp type (fixed blocks, no group) -- the precision fields of a rule (method rtn takes them all)."""
    from ..quant.policy import GGUF_WEIGHTS, WEIGHT_PRECISIONS

    prec, _, group = text.strip().partition(":")
    if prec.lower() in GGUF_WEIGHTS:
        prec = prec.lower()
    if prec not in WEIGHT_PRECISIONS:
        raise UserError(f"unknown weight precision {prec!r} in level {text!r}", "command line",
                        "write PRECISION or PRECISION:GROUP, e.g. int4:32, int4:128, int8, int8:32, fp8, or a "
                        "llama.cpp type: q4_k, q5_k, q6_k, q8_0, q4_0, q4_1, q5_0, q5_1")
    if group and prec in GGUF_WEIGHTS:
        raise UserError(f"level {text!r}: a llama.cpp type has fixed blocks, no group size", "command line",
                        f"write {prec} alone (q4_0/q8_0 blocks of 32, K-quants super-blocks of 256)")
    fields = {"weight": prec}
    if group:
        if not group.isdigit() or int(group) < 1:
            raise UserError(f"group size {group!r} in level {text!r} is not a positive whole number",
                            "command line", "write e.g. int4:32")
        fields["group_size"] = int(group)
    return fields


def level_name(fields: dict) -> str:
    """A slug of a rule's precision fields: int4g32, int8, depth compute int8 -> c-int8, storage -> s-int4."""
    if "compute" in fields:
        return f"c-{fields['compute']}"
    if "storage" in fields:
        return f"s-{fields['storage']}"
    return fields["weight"] + (f"g{fields['group_size']}" if fields.get("group_size") else "")


def free_fields(component: str, weight_precision: str) -> dict:
    """The lowered precision of a computation for a weight target: the depth softmax has no int4/fp4 compute
    (int8 logits, fp8 for the floating formats); sources are stored at the target where storage allows it."""
    from ..quant.policy import STORAGE_PRECISIONS

    floating = weight_precision.startswith(("fp", "mx", "nv"))
    if component == "depth.softmax":
        return {"compute": "fp8" if floating else "int8"}
    return {"storage": weight_precision if weight_precision in STORAGE_PRECISIONS else
            ("fp8" if floating else "int8")}


def unit_levels(unit: ProbeUnit, weight_levels: list[dict], ladders: bool = True) -> list[dict]:
    """The levels a unit is probed at, low precision first. Computations: their own ladders (``search``), or
    with ``ladders=False`` (``sensitivity``) the one lowered precision that matches the weight target."""
    if unit.free and not ladders:
        return [free_fields(unit.component, weight_levels[0]["weight"])]
    if unit.component == "depth.softmax":
        return [{"compute": "int8"}, {"compute": "bf16"}]
    if unit.component == "depth.sources":
        return [{"storage": "int4"}, {"storage": "int8"}]
    return list(weight_levels)


def probe_variant(unit: ProbeUnit, fields: dict) -> dict:
    return {"name": f"{unit.name}.{level_name(fields)}", "method": "rtn", "rules": [{**unit.selectors(), **fields}]}


def unit_bits(plan, rows_of_unit: set[str] | None = None) -> tuple[float, set[str]]:
    """Weight bits (numel x bits per weight) of the rows a probe's rule decided, and their names."""
    names = rows_of_unit or {r.name for r in plan.weight_rows() if r.rule != "baseline"}
    bits = sum(r.numel * r.bits for r in plan.weight_rows() if r.name in names and r.tied_to is None)
    return bits, names


# --------------------------------------------------------------------------- running probes
def _log(msg: str) -> None:
    from .runner import _log as log

    log(msg)


class ProbeContext:
    """What every probe of one model needs: the study, its store, the loaded baseline and the quality text."""

    def __init__(self, store, config, spec, device: str, source: str):
        from .runner import load_baseline, quality_text_ids

        self.store, self.config, self.spec, self.source = store, config, spec, source
        if config.bench.threads:  # as `run`: the study's thread count (1 is fastest for tiny models)
            import torch

            torch.set_num_threads(config.bench.threads)
        self.label = spec.label
        _log(f"{self.label}: loading {spec.path} ({config.dtype}, {device})")
        self.baseline, self.tokenizer = load_baseline(spec, config, device)
        self.text_ids = quality_text_ids(self.tokenizer, config.quality.max_tokens)
        self.calibration = None
        self.large = sum(p.numel() for p in self.baseline.parameters()) > 50_000_000

    def baseline_cells(self) -> None:
        from .runner import CELL_PLAN, baseline_plan, check_finite, describe, eval_settings, run_tasks

        store, label, name = self.store, self.label, self.config.baseline.name
        check_finite(self.baseline, self.text_ids)
        if not store.done(label, name, "model"):
            store.put(label, name, "model", describe(self.spec, self.baseline))
        if not store.done(label, name, CELL_PLAN):
            store.put(label, name, CELL_PLAN, baseline_plan(self.baseline, name))
        run_tasks(store, label, name, self.baseline, self.tokenizer, self.config, eval_settings(self.config))

    def cells_done(self, vname: str) -> bool:
        cells = ["plan", "quality"] + [f"task:{t.name}" for t in self.config.tasks]
        return self.store.variant_failed(self.label, vname) is not None or all(
            self.store.done(self.label, vname, c) for c in cells)

    def measure(self, variant) -> None:
        """plan, task and quality (KL) cells of one variant; a crash or NaN marks it failed, the run goes on."""
        import torch

        from ..quant import calibration_batches, quantize
        from .runner import (CELL_PLAN, CELL_QUALITY, CELL_STATUS, _failure_value, check_finite, eval_settings,
                             plan_summary, run_tasks)

        store, label, vname = self.store, self.label, variant.name
        if self.cells_done(vname):
            return
        t0 = time.perf_counter()
        quantized = None
        try:
            if self.calibration is None and variant.needs_calibration():
                c = self.config.calibration
                self.calibration = calibration_batches(self.tokenizer, c.samples, c.seq_len, self.config.seed)
            torch.manual_seed(self.config.seed)
            quantized = quantize(self.baseline, variant, calibration=self.calibration, source=self.source)
            qmodel = quantized.model.eval()
            check_finite(qmodel, self.text_ids)
            if not store.done(label, vname, CELL_PLAN):
                store.put(label, vname, CELL_PLAN, plan_summary(quantized))
            run_tasks(store, label, vname, qmodel, self.tokenizer, self.config, eval_settings(self.config))
            if not store.done(label, vname, CELL_QUALITY):
                q = measure_kl(self.baseline, qmodel, self.tokenizer, self.text_ids, self.config.quality.seq_len)
                if not math.isfinite(q["kl_mean"]):
                    raise ValueError(f"KL is not finite ({q['kl_mean']})")
                store.put(label, vname, CELL_QUALITY, q, wall_s=round(time.perf_counter() - t0, 2))
            store.put(label, vname, CELL_STATUS, {"wall_s": round(time.perf_counter() - t0, 2)})
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a probe that breaks the model is a result, not the end of the run
            failure = _failure_value(exc)
            _log(f"{label}: {vname} FAILED: {failure['reason']}")
            store.put(label, vname, CELL_STATUS, failure, status="failed")
        finally:
            del quantized
            if self.large:  # a full collection costs seconds on a big heap: only worth it for big models
                gc.collect()


def build_probes(skeleton, weight_levels: list[dict], *, per_layer: bool, experts: bool,
                 components: list[str] | None, source: str, ladders: bool = True):
    """(probe records {name: {unit, component, layer, expert, level, fields}}, checked Variants)."""
    from ..quant import parse_variant, resolve_components
    from ..quant.policy import component_matches

    units = probe_units(resolve_components(skeleton), per_layer=per_layer, experts=experts)
    if components:
        units = [u for u in units if any(component_matches(c, u.component) for c in components)]
        if not units:
            raise UserError(f"--components {','.join(components)} selects no probed part of the model", source,
                            "name components the model has (`plan` lists them), e.g. attn.q,mlp.down,depth.*")
    records, variants = {}, {}
    for unit in units:
        seen: dict[tuple, tuple[str, bool]] = {}  # what the plan does to the unit's rows -> (probe, via fallback)
        for fields in unit_levels(unit, weight_levels, ladders):
            raw = probe_variant(unit, fields)
            variant = parse_variant(raw, source=f"{source} (probe {raw['name']})")
            effect, fallback = unit_effect(skeleton, variant, source)
            if effect in seen:  # e.g. q6_k on rows of 128 is llama.cpp's fallback q8_0: one probe, named q8_0
                if fallback or not seen[effect][1]:
                    continue
                del records[seen[effect][0]], variants[seen[effect][0]]
            seen[effect] = (raw["name"], fallback)
            records[raw["name"]] = {"unit": unit.name, "component": unit.component, "layer": unit.layer,
                                    "expert": unit.expert, "level": level_name(fields), "fields": fields,
                                    "free": unit.free}
            variants[raw["name"]] = variant
    return records, list(variants.values())


def unit_effect(skeleton, variant, source: str) -> tuple[tuple, bool]:
    """(row, method, precision, granularity) of every row a probe changes, as its plan resolves on the model,
    and whether a llama.cpp fallback made any of them: two levels with the same effect on a unit are one probe
    (the fallbacks make e.g. Q6_K on rows of 128 the same tensor as Q8_0)."""
    from ..quant import resolve_plan

    plan = resolve_plan(skeleton, variant, source=source)
    rows = [r for r in plan.rows if r.rule != "baseline" and r.method != "keep"]
    return (tuple((r.name, r.method, r.precision, r.granularity.split(", fallback from")[0]) for r in rows),
            any(getattr(r, "fallback", None) for r in rows))


def open_probe_store(config, raw, args, source: str, device: str, folder_suffix: str, options: dict, variants):
    """The results store of a sensitivity/search run (a run's store, with its lock, provenance and --resume)."""
    from .results import ensure_dir
    from .runner import _git_commit, config_fingerprint, library_versions, open_store, stamp_meta

    out_dir = Path(args.out)
    study_dir = ensure_dir(out_dir / f"{config.name}-{folder_suffix}")
    results_path = study_dir / "results.json"
    fingerprint = config_fingerprint({"config": raw, folder_suffix: options})
    provenance = {"git_commit": _git_commit(outputs=out_dir), "versions": library_versions()}
    store = open_store(results_path, args.resume, fingerprint, provenance, source)
    meta_args = SimpleNamespace(set=list(args.set), tasks=None, limit=None)
    stamp_meta(store, config, raw, meta_args, source, device, fingerprint, provenance, variants)
    return store, study_dir


def select_model(config, wanted: str | None, source: str):
    if wanted is None:
        return config.models
    hits = [m for m in config.models if wanted in (m.label, m.path)]
    if not hits:
        raise UserError(f"--model {wanted!r} is not a model of this config", source,
                        "use one of: " + ", ".join(m.label for m in config.models))
    return hits


# --------------------------------------------------------------------------- verb
def add_arguments(parser) -> None:
    parser.add_argument("config", help="study config YAML (models, baseline, quality, tasks), "
                                       "e.g. configs/sensitivity.yaml; its variants are not probed")
    parser.add_argument("--target", default="int4", help="precision of every probe (default int4): int4, int8, "
                        "fp8, mxfp4, nvfp4, a llama.cpp type (q4_k, q8_0, ...) (the depth softmax is lowered to "
                        "int8 / fp8 logits)")
    parser.add_argument("--group-size", type=int_in(1), default=32, metavar="G",
                        help="group size of the target (default 32; 0 is not allowed, use --per-channel)")
    parser.add_argument("--per-channel", action="store_true", help="no groups: one scale per output channel")
    parser.add_argument("--per-layer", action="store_true", help="one probe per layer of each component")
    parser.add_argument("--experts", action="store_true", help="one probe per routed expert (MoE models)")
    parser.add_argument("--components", default=None, metavar="C1,C2",
                        help="only these components (globs allowed, e.g. attn.*,depth.*)")
    parser.add_argument("--model", default=None, help="only the model with this label or path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for `run` (e.g. --set tasks=[] for KL only)")
    parser.add_argument("--resume", action="store_true", help="skip probes already in results.json")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT}/, as `run`)")


def target_levels(args) -> list[dict]:
    fields = parse_level(args.target)
    if "group_size" not in fields and not args.per_channel and fields["weight"] in ("int4", "int8"):
        fields["group_size"] = args.group_size
    return [fields]


def main(args) -> int:
    from ..loading import structure_model
    from .config import load_config
    from .lock import StudyLock
    from .runner import quiet_libraries, resolve_device

    quiet_libraries()
    source = str(args.config)
    config, raw = load_config(args.config, args.set)
    device = resolve_device(args.device or config.device)
    models = select_model(config, args.model, source)
    levels = target_levels(args)
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    options = {"levels": levels, "per_layer": args.per_layer, "experts": args.experts, "components": components,
               "models": [m.label for m in models]}
    plans = []
    for spec in models:  # every probe resolves against its model before any weights load
        skeleton = structure_model(spec.path, trust_remote_code=spec.trust_remote_code, dtype=config.dtype)
        plans.append((spec, *build_probes(skeleton, levels, per_layer=args.per_layer, experts=args.experts,
                                          components=components, source=f"{source} (model {spec.label})",
                                          ladders=False)))
    all_variants = list({v.name: v for _, _, vs in plans for v in vs}.values())
    config.models = models
    store, study_dir = open_probe_store(config, raw, args, source, device, "sensitivity", options, all_variants)
    with StudyLock(study_dir):
        store.meta["sensitivity"] = {"options": options,
                                     "probes": {spec.label: recs for spec, recs, _ in plans}}
        store.save()
        run_probes(store, config, plans, device, source)
        from ..report.render import render_report
        from ..report.sensitivity_plots import ranking_rows

        report = render_report(study_dir / "results.json", Path(args.out) / f"{study_dir.name}.md")
    from .results import load_results
    from ..report.render import View

    view = View(load_results(study_dir / "results.json"))
    for spec in models:
        print(f"\n{spec.label}: damage per probe (KL mean ± s.e., nats/token), worst first")
        for i, r in enumerate(ranking_rows(view, spec.label)[:20]):
            print(f"  {i + 1:>3}. {r['variant']:<32} {r['kl_mean']:.5f} ± {r['kl_sem']:.5f}")
    _log(f"report: {report}")
    return 0


def run_probes(store, config, plans, device: str, source: str) -> None:
    for spec, _records, variants in plans:
        pending = [v for v in variants if not _done(store, config, spec.label, v.name)]
        base_done = all(store.done(spec.label, config.baseline.name, c) for c in ("model", "plan"))
        if not pending and base_done:
            _log(f"{spec.label}: all probes finished, nothing to do")
            continue
        ctx = ProbeContext(store, config, spec, device, source)
        ctx.baseline_cells()
        for i, variant in enumerate(pending):
            _log(f"{spec.label}: probe {i + 1}/{len(pending)} {variant.name}")
            ctx.measure(variant)
        del ctx
        gc.collect()


def _done(store, config, label: str, vname: str) -> bool:
    cells = ["plan", "quality"] + [f"task:{t.name}" for t in config.tasks]
    return store.variant_failed(label, vname) is not None or all(store.done(label, vname, c) for c in cells)
