"""Markdown report from results.json (``python -m attnres_quant report RESULTS``).

The report is a pure function of results.json: rendering twice gives the same
file, and a resumed run renders the same report as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..pipeline.config import model_label
from ..pipeline.results import atomic_write_text, load_results, write_error
from .html import Block, flips_block, markdown_text, render_html
from .plots import plot_accuracy_vs_bits, plot_depth_heatmaps, plot_sensitivity
from . import sensitivity_plots


def add_arguments(parser) -> None:
    parser.add_argument("results", help="a study folder (runs/<name>) or a results file in it "
                                        "(runs/<name>/results.json, a kept results.<time>.json)")
    parser.add_argument("--out", default=None, help="markdown path (default: <name>.md beside the study folder; the HTML report is written beside it with the same name)")


def main(args) -> int:
    from ..errors import UserError

    path = Path(args.results)
    if path.is_dir():  # the study folder: its current results
        folder, path = path, path / "results.json"
        if not path.is_file():
            raise UserError(f"study folder {str(folder)!r} has no results.json", str(folder),
                            "pass a folder written by `python -m attnres_quant run` (runs/<config name>) "
                            "or the path of a results file (e.g. a kept results.<time>.json)")
    if not path.is_file():
        raise UserError(f"results file {str(path)!r} does not exist", str(path.parent),
                        "pass runs/<config name> or runs/<config name>/results.json written by "
                        "`python -m attnres_quant run`")
    out = Path(args.out) if args.out else default_report_path(path)
    print(render_report(path, out))
    return 0


def default_report_path(results_path: Path) -> Path:
    """<out>/<name>.md for <out>/<name>/results.json; a kept earlier copy (results.<time>.json)
    renders beside itself, so it never replaces the current report."""
    if results_path.name == "results.json":
        return results_path.parent.parent / f"{results_path.parent.name}.md"
    return results_path.with_suffix(".md")


# --------------------------------------------------------------------------- access helpers
class View:
    """Read-only accessors over the results.json mapping."""

    def __init__(self, data: dict):
        self.data = data
        self.meta = data.get("meta", {})
        self.cells = data.get("cells", {})
        self.baseline = self.meta.get("baseline") or "bf16"
        self.variants = [self.baseline] + list(self.meta.get("variants") or [])
        self.models = [m.get("label") or model_label(m["path"], m.get("name")) for m in self.meta.get("models") or []]

    def entry(self, model, variant, cell) -> dict | None:
        return self.cells.get(f"{model}/{variant}/{cell}")

    def cell(self, model, variant, cell):
        entry = self.entry(model, variant, cell)
        return entry.get("value") if entry and entry.get("status") == "ok" else None

    def failure(self, model, variant):
        entry = self.cells.get(f"{model}/{variant}/status")
        if entry and entry.get("status") == "failed":
            value = entry.get("value")
            return (value.get("reason") if isinstance(value, dict) else None) or "failed"
        return None

    def task_limit(self, model, task) -> str:
        """The sample limit the baseline's cell of ``task`` ran with ("all" without one; "?" if not recorded)."""
        entry = self.entry(model, self.baseline, f"task:{task}") or {}
        if "limit" not in entry:
            return "?"
        return "all" if entry["limit"] is None else str(entry["limit"])

    def task_names(self) -> list[str]:
        return list(self.meta.get("tasks") or [])

    def task_results(self, model, variant) -> dict:
        """{subtask: result dict} over every configured task."""
        out = {}
        for task in self.task_names():
            value = self.cell(model, variant, f"task:{task}") or {}
            out.update(value)
        return out

    def subtasks(self, model) -> list[str]:
        names: list[str] = []
        for v in self.variants:
            for name in self.task_results(model, v):
                if name not in names:
                    names.append(name)
        return names

    def is_attnres(self, model) -> bool:
        info = self.cell(model, self.baseline, "model") or {}
        return bool(info.get("attnres_block_size")) or str(info.get("family", "")).startswith("attnres")


def bits_breakdown(view: View, model: str, variant: str) -> dict | None:
    """Bits of one variant's weights: ``avg`` over all weights (the plan's figure), ``x`` over the
    weights it lowers below the baseline (what the accuracy plot's axis shows; the baseline's own
    bits for the baseline and for a variant that lowers nothing) and ``share``, the fraction lowered.

    Weights held in a precision the baseline also uses (bf16 embedding, norms, lm_head, a bf16 depth
    path) count as kept; the plan's bits include scale and zero-point overhead."""
    plan = view.cell(model, variant, "plan") or {}
    base = view.cell(model, view.baseline, "plan") or {}
    n, avg = plan.get("n_weights"), plan.get("avg_bits")
    if not (_finite(n) and _finite(avg) and n > 0):
        return None
    base_bits = base.get("avg_bits") if _finite(base.get("avg_bits")) else avg
    base_precisions = set(base.get("weights_by_precision") or {})
    by_prec = plan.get("weights_by_precision") or {}
    kept = sum(c for p, c in by_prec.items() if p in base_precisions) if by_prec and base_precisions else n
    lowered = n - kept
    if variant == view.baseline or lowered <= 0:
        return {"avg": avg, "x": avg, "share": 0.0 if variant != view.baseline else 1.0}
    return {"avg": avg, "x": (avg * n - kept * base_bits) / lowered, "share": lowered / n}


def plotted_tasks(view: View, model: str) -> tuple[list[str], list[str]]:
    """(tasks scored as a mean -- accuracies, pass rates -- with some non-zero score, tasks on which
    every variant scored 0). Corpus metrics (perplexities) are not scores in %."""
    keep, zero = [], []
    for sub in view.subtasks(model):
        results = [r for v in view.variants if (r := view.task_results(model, v).get(sub))]
        values = [r.get("value") for r in results if _is_mean(r) and _finite(r.get("value"))]
        if not values:
            continue
        (keep if any(v != 0 for v in values) else zero).append(sub)
    return keep, zero


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x, missing="—"):
    """A fraction as a percentage; ``missing`` for no value, "n/a" for a non-finite or non-numeric one."""
    if x is None:
        return missing
    return f"{100 * x:.1f}" if _finite(x) else "n/a"


def _mean_delta(res: dict, base: dict) -> float | None:
    deltas = [res[s]["value"] - base[s]["value"] for s in res  # mean metrics only (not perplexities)
              if s in base and _is_mean(res[s]) and _finite(res[s].get("value")) and _finite(base[s].get("value"))]
    return sum(deltas) / len(deltas) if deltas else None


def _bytes(n):
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "_(no rows)_"
    return pd.DataFrame(rows).to_markdown(index=False)


def _machine_text(machine: dict) -> str:
    """One line from :func:`attnres_quant.bench.machine.machine_info` (older results carry
    ``processor`` / ``cpu_count`` / ``gpu`` instead; they still render)."""
    if "device_name" not in machine:
        return (f"{machine.get('gpu') or machine.get('processor')}, {machine.get('cpu_count')} cores, "
                f"torch threads {machine.get('torch_threads')}")
    parts = [machine["device_name"]]
    if machine.get("device_memory_gib"):
        parts.append(f"{machine['device_memory_gib']} GiB")
    if str(machine.get("device", "cpu")).startswith("cuda"):
        parts.append(f"host {machine.get('cpu_model')}")
    flags = machine.get("cpu_flags")
    parts.append(f"{machine.get('physical_cores')} cores" + (f" ({'/'.join(flags)})" if flags else ""))
    parts.append(f"torch threads {machine.get('torch_threads')}")
    if machine.get("load_avg_1m") is not None:
        parts.append(f"load average {machine['load_avg_1m']} at start")
    return ", ".join(parts)


# --------------------------------------------------------------------------- sections
def header(view: View) -> list[str]:
    m = view.meta
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    machine = m.get("machine") or {}
    lines = [
        f"# Quantization study: {m.get('config_name', '?')}",
        "",
        *([f"> {description}", ""] if (description := str((m.get("config") or {}).get("description") or "")
                                       .strip()) else []),
        f"- **Config**: `{m.get('config_path')}`" + (f" (overrides: {', '.join(map(str, m['overrides']))})"
                                                      if m.get("overrides") else ""),
        f"- **Models**: " + ", ".join(f"`{x['path']}`" for x in m.get("models") or []),
        f"- **Device**: {m.get('device')} ({_machine_text(machine)}); baseline dtype {m.get('dtype')}",
        f"- **Seed**: {m.get('seed')}; **date**: {m.get('finished') or m.get('started')}; "
        f"**git commit**: {m.get('git_commit') or 'unknown'}; **wall time** (last run): "
        f"{_fmt(m.get('wall_s_last_run'), 1)} s",
        f"- **Libraries**: {versions}",
    ]
    lines += provenance_lines(view)
    lines += [
        "",
        "Numbers marked *simulated* come from quantize-dequantize simulation (weights stored and computed in "
        "the baseline dtype); *real* rows run low-precision kernels. Accuracies are ± one standard error; "
        "Δ is against the baseline on the same samples with a 95 % paired bootstrap CI; flips are "
        "correct→wrong / wrong→correct.",
        "",
    ]
    return lines


def _provenance_text(prov: dict) -> str:
    versions = prov.get("versions") if isinstance(prov.get("versions"), dict) else {}
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("torch", "transformers", "lm_eval",
                                                                       "attnres_quant"))
    return f"commit {prov.get('git_commit') or 'unknown'}" + (f" ({libs})" if libs else "")


def provenance_lines(view: View) -> list[str]:
    """One line when every cell came from one commit and library set; an explicit breakdown when not."""
    groups: dict[str, list[str]] = {}
    for key, entry in view.cells.items():
        prov = entry.get("provenance")
        text = _provenance_text(prov) if isinstance(prov, dict) else "not recorded (older results file)"
        groups.setdefault(text, []).append(key)
    if len(groups) <= 1:
        return []
    lines = ["- **Mixed provenance**: the cells of this report were produced by different code or libraries "
             "(resumed across versions):"]
    for text, keys in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = ", ".join(f"`{k}`" for k in keys[:3]) + (" ..." if len(keys) > 3 else "")
        lines.append(f"  - {len(keys)} cells from {text}: {example}")
    return lines


def task_scores_lines(view: View, model: str) -> list[str]:
    """The task-score table of one model (scores ± s.e., Δ with CI, flip counts linked to the logs)."""
    from ..evaluation.stats import flips, paired_delta

    base = view.task_results(model, view.baseline)
    rows = []
    for variant in view.variants:
        res = view.task_results(model, variant)
        failure = view.failure(model, variant)
        row = {"variant": variant + (" (baseline)" if variant == view.baseline else "")}
        for sub in view.subtasks(model):
            r = res.get(sub)
            if r is None:
                row[sub] = "failed" if failure else "—"
                continue
            cell = _score(r)
            b = base.get(sub)
            if variant != view.baseline and b and b.get("per_sample") and r.get("per_sample") \
                    and len(b["per_sample"]) == len(r["per_sample"]) \
                    and all(_finite(x) for x in b["per_sample"] + r["per_sample"]):
                d, lo, hi = paired_delta(b["per_sample"], r["per_sample"])
                cw, wc = flips(b["per_sample"], r["per_sample"])
                cell += f" (Δ {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]; {_samples_link(view, r, f'{cw}/{wc}')})"
            row[sub] = cell
        rows.append(row)
    ns = {sub: (base.get(sub) or {}).get("n") for sub in view.subtasks(model)}
    metrics = {sub: _metric_label(base.get(sub) or {}) for sub in view.subtasks(model)}
    legend = "; ".join(f"{s}: {metrics[s]}, n={ns[s]}" for s in ns)
    limits = [f"{t} {view.task_limit(model, t)}" for t in view.task_names()]
    if any(not lim.endswith(" ?") for lim in limits):
        legend += "; sample limit per task: " + ", ".join(limits)
    return [f"### Task scores — {model}", "", _table(rows), "", f"_{legend}_", ""]


def task_section(view: View, model: str) -> list[str]:
    return task_scores_lines(view, model) + code_execution_lines(view, model) + task_settings_section(view, model)


# --------------------------------------------------------------------------- lm-eval details (issue 14)
def _is_mean(r: dict) -> bool:
    return r.get("aggregation", "mean") == "mean"


def _score(r: dict) -> str:
    """Mean metrics (accuracies) in % ± stderr; corpus metrics (perplexities, bits/byte) as numbers."""
    if _is_mean(r):
        return f"{_pct(r.get('value'), 'n/a')} ± {_pct(r.get('stderr'), 'n/a')}"
    return _fmt(r.get("value"), 4)


def _metric_label(r: dict) -> str:
    name = r.get("metric") or "?"
    if r.get("filter") and r["filter"] != "none":
        name += f" ({r['filter']})"
    return name + (" in %" if _is_mean(r) else f" ({r.get('aggregation')})")


def _samples_link(view: View, r: dict, text: str) -> str:
    """``text`` linked to the result's per-sample log (path relative to the report)."""
    path = r.get("samples_path")
    prefix = getattr(view, "link_prefix", None)
    if not path or prefix is None:
        return text
    return f"[{text}]({prefix}{path})"


def task_settings_section(view: View, model: str) -> list[str]:
    """What each task ran with (lm-eval task, metric/filter, n-shot, generation limit) and every
    metric/filter lm-eval reported for the baseline, with links to the per-sample logs."""
    base = view.task_results(model, view.baseline)
    rows = []
    for sub in view.subtasks(model):
        r = base.get(sub) or next((view.task_results(model, v).get(sub) for v in view.variants
                                   if view.task_results(model, v).get(sub)), None) or {}
        others = {k: v for k, v in (r.get("metrics") or r.get("extra") or {}).items()  # extra: older results
                  if "_stderr," not in k and k != f"{r.get('metric')},{r.get('filter', 'none')}"}
        logs = [_samples_link(view, rv, v) for v in view.variants
                if (rv := view.task_results(model, v).get(sub)) and rv.get("samples_path")]
        rows.append({"task": sub, "lm-eval task": r.get("lm_eval_task") or "—", "metric": _metric_label(r),
                     "n-shot": _fmt(r.get("num_fewshot")) if r.get("num_fewshot") is not None
                     else (", ".join(f"{k}: {v}" for k, v in (r.get("n_shot") or {}).items()) or "—"),
                     "max gen tokens": _fmt(r.get("max_gen_toks")), "n": _fmt(r.get("n")),
                     "other metrics (baseline)": ", ".join(f"{k} {_fmt(v, 4)}" for k, v in others.items()) or "—",
                     "per-sample logs": ", ".join(logs) or "—"})
    if not rows:
        return []
    return [f"#### Task settings — {model}", "", _table(rows), "",
            "_Scores are lm-eval's own aggregates (its `results`, per metric and filter); Δ, CIs and flips use "
            "per-document values and exist only for metrics lm-eval averages over documents. n-shot is lm-eval's "
            "effective `n-shot`; max gen tokens is the generation limit used. Flip counts link to the variant's "
            "per-sample log (lm-eval's records: prompt, target, response, filtered answer, metrics; JSONL.gz)._", ""]


def code_execution_lines(view: View, model: str) -> list[str]:
    """How generated code ran (time limit, containment) for the code tasks of ``model``."""
    seen: dict[str, dict] = {}
    for variant in view.variants:
        for sub, r in view.task_results(model, variant).items():
            ex = (r or {}).get("execution") or {}
            if ex and (sub not in seen or not ex.get("network_isolated", True)):
                seen[sub] = ex
    if not seen:
        return []
    lines = []
    for sub, ex in sorted(seen.items()):
        iso = ex.get("isolation") or {}
        warn = "" if ex.get("network_isolated") else " **Network NOT isolated.**"
        lines.append(f"- `{sub}`: each program in a sandbox, time limit {_fmt(ex.get('timeout_s'), 1)} s; "
                     f"network: {iso.get('network', 'unknown')}; filesystem: {iso.get('filesystem', 'unknown')}; "
                     f"processes: {iso.get('processes', 'unknown')}; user: {iso.get('user', 'unknown')}.{warn}")
    return ["**Generated code** (docs/evaluation.md, \"What is and is not contained\"):", "", *lines, ""]


def quality_section(view: View, model: str) -> list[str]:
    rows = []
    attnres = view.is_attnres(model)
    for variant in view.variants:
        q = view.cell(model, variant, "quality")
        if q is None:
            continue
        row = {"variant": variant, "bits/byte": _fmt(q.get("bpb"), 4), "ppl": _fmt(q.get("ppl"), 3),
               "KL mean": _fmt(q.get("kl_mean"), 5), "KL p99": _fmt(q.get("kl_p99"), 4),
               "top-1 agree %": _pct(q.get("top1_agreement"))}
        if attnres:
            js = [x for x in (q.get("depth_js") or []) if _finite(x)]
            row["depth JS mean"] = _fmt(sum(js) / len(js), 5) if js else "—"
            row["depth JS max (sub-layer)"] = (f"{max(js):.5f} ({js.index(max(js))})" if js else "—")
        rows.append(row)
    n = (view.cell(model, view.baseline, "quality") or {}).get("tokens")
    return [f"### Quality vs baseline — {model}", "", _table(rows), "",
            f"_Fixed text: HumanEval prompts + canonical solutions, {n} tokens. KL(baseline ‖ variant) per "
            "token in nats; depth JS = Jensen–Shannon divergence (bits) of the depth softmax per sub-layer, "
            "averaged over tokens._", ""]


def depth_js_section(view: View, model: str) -> list[str]:
    """Depth JS of every mixing point (sub-layers 0..2L-1, then the output mix), one row per variant."""
    if not view.is_attnres(model):
        return []
    rows = []
    for variant in view.variants:
        js = (view.cell(model, variant, "quality") or {}).get("depth_js") or []
        if js and variant != view.baseline:
            rows.append({"variant": variant, **{("out" if j == len(js) - 1 else f"j={j}"): f"{x:.2e}"
                                                for j, x in enumerate(js)}})
    if not rows:
        return []
    return [f"#### Depth JS per mixing point — {model}", "", _table(rows), "",
            "_Jensen–Shannon divergence (bits) between the baseline's and the variant's depth softmax at each "
            "mixing point: sub-layer j (attention 2i, MLP 2i + 1 of layer i; j = 0 reads only the embedding), "
            "`out` = the final mix before the last norm._", ""]


NOISY_IQR_FRACTION = 0.10  # a timing whose IQR exceeds this share of its median is flagged


def _latency_flags(lat: dict, machine: dict) -> list[str]:
    """Why a latency row should be read with care: a spread (IQR) above 10 % of the median, or a load
    average above the machine's CPU count while it ran (other jobs competed for the cores)."""
    flags = []
    for key, what in (("prefill_ms", "prefill"), ("decode_ms_per_token", "decode")):
        med, iqr = lat.get(key), lat.get(f"{key}_iqr")
        if _finite(med) and _finite(iqr) and med > 0 and iqr > NOISY_IQR_FRACTION * med:
            flags.append(f"noisy {what} (IQR {100 * iqr / med:.0f} % of median)")
    cpus = machine.get("logical_cpus")
    load = lat.get("load_avg_1m")
    if _finite(load) and _finite(cpus) and load > cpus:
        flags.append(f"under load (load average {load:.1f} on {cpus} CPUs)")
    return flags


def _clock_text(clock: str | None) -> str:
    return {"process_cpu_time": "process CPU time (all threads summed; other jobs on the machine do not "
                                "count)", "cuda_events": "CUDA events", "wall": "wall clock"}.get(clock or "wall",
                                                                                            str(clock))


def latency_section(view: View, model: str) -> list[str]:
    rows = []
    base = view.cell(model, view.baseline, "latency") or {}
    machine = view.meta.get("machine") or {}
    lats = [(v, lat) for v in view.variants if (lat := view.cell(model, v, "latency")) is not None]
    # On CPU the peak is RSS growth, which stays 0 B whenever the allocator reuses freed memory: not a
    # measurement of anything, so the column is shown only where it is measured (CUDA allocator).
    show_peak = any(lat.get("peak_mem_kind") == "cuda_max_allocated" for _, lat in lats)
    for variant, lat in lats:
        sim = lat.get("simulated")
        speed = None
        if _finite(base.get("decode_ms_per_token")) and _finite(lat.get("decode_ms_per_token")) \
                and base["decode_ms_per_token"] and lat["decode_ms_per_token"] \
                and base.get("clock", "wall") == lat.get("clock", "wall"):
            speed = base["decode_ms_per_token"] / lat["decode_ms_per_token"]
        row = {
            "variant": variant, "kernels": ("simulated" if sim else "real") + f" ({lat.get('kernel')})",
            "prefill ms": _fmt(lat.get("prefill_ms"), 2), "prefill IQR": _fmt(lat.get("prefill_ms_iqr"), 2),
            "decode ms/tok": _fmt(lat.get("decode_ms_per_token"), 2),
            "tok/s": _fmt(lat.get("tokens_per_s"), 1),
            "decode speedup": "—" if speed is None else f"{speed:.2f}x" + (" (sim)" if sim else ""),
        }
        if show_peak:
            row["peak mem"] = _bytes(lat.get("peak_mem_bytes")) if lat.get("peak_mem_kind") == "cuda_max_allocated" \
                else "—"
        row["weights in memory"] = _bytes(lat.get("weight_bytes"))
        row["flags"] = "; ".join(_latency_flags(lat, machine)) or "—"
        rows.append(row)
    if not rows:
        return [f"### Latency and memory — {model}", "", _table(rows), ""]
    cfg = lats[0][1]
    clocks = sorted({lat.get("clock", "wall") for _, lat in lats})
    note = (f"Prompt {cfg.get('prompt_len')} tokens, batch {cfg.get('batch_size')}, {cfg.get('decode_tokens')} "
            f"decode tokens; median of {cfg.get('repeats')} repeats after {cfg.get('warmup')} warm-up; "
            f"threads {cfg.get('threads')}; timed with {' / '.join(_clock_text(c) for c in clocks)}. "
            "Simulated variants run dequantized weights, so their speed says nothing about real low-bit "
            "kernels. *Weights in memory* is what the loaded model holds (a simulated variant keeps "
            "dequantized weights, hence the baseline's size); the planned storage of a real deployment is "
            "*stored weights* in the precision-plan table. ")
    if not show_peak:
        note += ("Peak memory is not shown: on CPU it could only be read as growth of the resident set, "
                 "which is 0 whenever the allocator reuses freed memory. ")
    note += (f"*flags*: spread (IQR) above {100 * NOISY_IQR_FRACTION:.0f} % of the median, or a 1-minute load "
             "average above the CPU count while the row ran.")
    load0 = machine.get("load_avg_1m")
    if _finite(load0) and _finite(machine.get("logical_cpus")) and load0 > machine["logical_cpus"] \
            and not any("load_avg_1m" in lat for _, lat in lats):
        note += (f" The study started under load (load average {load0} on {machine['logical_cpus']} CPUs) "
                 "and these rows did not record their own: read every timing with care.")
    return [f"### Latency and memory — {model}", "", _table(rows), "", "_" + note.strip() + "_", ""]


def plan_section(view: View, model: str) -> list[str]:
    rows = []
    for variant in view.variants:
        plan = view.cell(model, variant, "plan")
        failure = view.failure(model, variant)
        if plan is None:
            if failure:
                rows.append({"variant": variant, "method": "—", "avg bits/weight": "—",
                             "bits/quantized weight": "—", "quantized share": "—", "stored weights": "—",
                             "precision policy": f"**failed**: {failure}"})
            continue
        bits = bits_breakdown(view, model, variant) or {}
        lowered = variant != view.baseline and bits.get("share", 0) > 0
        rows.append({"variant": variant, "method": plan.get("method"),
                     "avg bits/weight": _fmt(plan.get("avg_bits"), 2),
                     "bits/quantized weight": _fmt(bits.get("x"), 2) if lowered else "—",
                     "quantized share": f"{100 * bits['share']:.1f} %" if lowered else "—",
                     "stored weights": _bytes(plan.get("weight_bytes")),
                     "precision policy": plan.get("description", "")})
    return ([f"### Precision plans — {model}", "", _table(rows), "",
             "_avg bits/weight: over every weight, scales included; bits/quantized weight: over the weights the "
             "variant lowers below the baseline dtype (the accuracy plot's x axis), which are the *quantized "
             "share* of all weights -- embedding, norms and lm_head stay at the baseline unless a rule names "
             "them; stored weights: the planned size of all weights in the plan's formats._", ""]
            + plan_notes_lines(view, model) + identical_variants_lines(view, model))


def plan_notes_lines(view: View, model: str) -> list[str]:
    """The plan's notes (rules skipped on this model, precisions raised to what a method supports),
    one bullet per note with the variants it applies to."""
    by_note: dict[str, list[str]] = {}
    for variant in view.variants:
        for note in (view.cell(model, variant, "plan") or {}).get("notes") or []:
            by_note.setdefault(str(note), []).append(variant)
    if not by_note:
        return []
    return ([f"**Plan notes — {model}**", ""]
            + [f"- {', '.join(f'`{v}`' for v in variants)}: {note}" for note, variants in by_note.items()] + [""])


def _outcome_tasks(view: View, model: str, variant: str) -> dict:
    return {sub: (r.get("value"), tuple(r.get("per_sample") or ())) for sub, r in
            view.task_results(model, variant).items()}


def _outcome(view: View, model: str, variant: str):
    """Everything measured about a variant's outputs (per-sample task values, quality metrics): equal
    outcomes mean the two variants computed the same model."""
    tasks = _outcome_tasks(view, model, variant)
    q = view.cell(model, variant, "quality") or {}
    quality = tuple(q.get(k) for k in ("kl_mean", "kl_p99", "bpb", "top1_agreement"))
    if not tasks and all(x is None for x in quality):
        return None
    return repr((sorted(tasks.items()), quality))


def identical_variants_lines(view: View, model: str) -> list[str]:
    """Variants that produced identical results (every sample, every quality metric) on this model,
    with the reason when the plan notes give one (rules that tell them apart were skipped)."""
    groups: dict[str, list[str]] = {}
    for variant in view.variants[1:]:
        key = _outcome(view, model, variant)
        if key is not None and not view.failure(model, variant):
            groups.setdefault(key, []).append(variant)
    base_tasks = _outcome_tasks(view, model, view.baseline)
    lines = []
    for variants in groups.values():
        q = view.cell(model, variants[0], "quality") or {}
        if base_tasks and _outcome_tasks(view, model, variants[0]) == base_tasks and q.get("kl_mean") == 0:
            names = ", ".join(f"`{v}`" for v in variants)
            lines += [f"**{names} gave the baseline's results on `{model}`** (the same value on every sample, "
                      "KL 0): nothing the variant lowers exists in this model (see the plan notes).", ""]
            continue
        if len(variants) < 2:
            continue
        skipped = any("skipped" in str(n) for v in variants for n in (view.cell(model, v, "plan") or {})
                      .get("notes") or [])
        why = (" The rules that tell them apart do not apply to this model (see the plan notes: skipped "
               "rules), so the same weights were quantized the same way." if skipped else "")
        names = ", ".join(f"`{v}`" for v in variants)
        lines.append(f"**{names} gave identical results on `{model}`** (the same value on every sample and the "
                     f"same quality metrics).{why}")
        lines.append("")
    return lines


def is_sensitivity_study(view: View) -> bool:
    """A study that lowers one component (or group) at a time: no variant sets a `default` precision,
    each quantizes only what its rules select (configs/sensitivity.yaml). Only there does a ranking
    of variants rank components."""
    variants = [v for v in (view.meta.get("config") or {}).get("variants") or [] if isinstance(v, dict)]
    return len(variants) > 1 and all(not v.get("default") and v.get("rules") for v in variants)


def sensitivity_rows(view: View, model: str) -> list[dict]:
    """Variants ranked by damage (mean KL against the baseline), with their mean task-score change."""
    base = view.task_results(model, view.baseline)
    rows = []
    for variant in view.variants[1:]:
        q = view.cell(model, variant, "quality") or {}
        res = view.task_results(model, variant)
        kl = q.get("kl_mean") if _finite(q.get("kl_mean")) else None
        rows.append({"variant": variant, "kl_mean": kl, "mean_delta": _mean_delta(res, base)})
    rows.sort(key=lambda r: (-(r["kl_mean"] if r["kl_mean"] is not None else -1)))
    return rows


def findings(view: View) -> list[str]:
    """Headline numbers: mean task-score change of each variant, per model."""
    lines = ["## Summary", ""]
    rows = []
    for model in view.models:
        base = view.task_results(model, view.baseline)
        row = {"model": model}
        for variant in view.variants[1:]:
            res = view.task_results(model, variant)
            q = view.cell(model, variant, "quality") or {}
            if view.failure(model, variant):
                row[variant] = "failed"
                continue
            mean = _mean_delta(res, base)
            row[variant] = ("—" if mean is None else f"{100 * mean:+.1f} pts") + \
                (f", KL {q['kl_mean']:.4f}" if _finite(q.get("kl_mean")) else "")
        rows.append(row)
    lines += [_table(rows), "",
              "_Mean change of the task scores (percentage points, averaged over tasks) against each model's "
              "own baseline, and mean per-token KL(baseline ‖ variant)._", ""]
    return lines


def report_blocks(view: View) -> list[Block]:
    """The report as blocks of markdown lines (see :mod:`.html`): everything but the plots."""
    blocks = [Block(header(view) + findings(view))]
    for model in view.models:
        lines = [f"## Model `{model}`", ""]
        base_failure = view.failure(model, view.baseline)
        if base_failure:
            lines += [f"**Baseline failed**: {base_failure}. This model's variants were not evaluated.", ""]
        info = view.cell(model, view.baseline, "model") or {}
        if info:
            lines += ["_" + ", ".join(f"{k}: {v}" for k, v in info.items()) + "_", ""]
        blocks.append(Block(lines + task_scores_lines(view, model) + code_execution_lines(view, model)))
        settings = task_settings_section(view, model)
        if settings:
            blocks.append(Block(settings, summary=f"Task settings and per-sample logs — {model}"))
        flips_detail = flips_block(view, model)
        if flips_detail:
            blocks.append(flips_detail)
        blocks.append(Block(quality_section(view, model) + depth_js_section(view, model)
                            + latency_section(view, model)))
        blocks.append(Block(plan_section(view, model), summary=f"Precision plans and plan notes — {model}"))
        extra = sensitivity_plots.extra_sections(view, model)  # issue 18: search, ranking with s.e., percentiles
        if extra:
            blocks.append(Block(extra))
        sens = (sensitivity_rows(view, model)
                if is_sensitivity_study(view) and not sensitivity_plots.is_probe_study(view) else [])
        if len(sens) > 1:
            blocks.append(Block([f"### Component sensitivity ranking — {model}", "",
                                 _table([{"rank": i + 1, "variant": r["variant"], "KL mean": _fmt(r["kl_mean"], 5),
                                          "mean task Δ (pts)": "—" if r["mean_delta"] is None
                                          else f"{100 * r['mean_delta']:+.1f}"} for i, r in enumerate(sens)]),
                                 ""]))
    return blocks


def render_report(results_path: Path, out_path: Path) -> Path:
    """Render ``out_path`` (markdown) and the self-contained HTML beside it (same name, ``.html``)
    from a validated results file; a damaged file is a ``UserError`` and nothing is written (the
    existing report stays)."""
    results_path, out_path = Path(results_path), Path(out_path)
    data = load_results(results_path)
    plot_dir = results_path.parent
    view = View(data)
    view.link_prefix = (plot_dir.relative_to(out_path.parent).as_posix() + "/"
                        if plot_dir.is_relative_to(out_path.parent) else plot_dir.as_posix() + "/")
    blocks = report_blocks(view)
    plots = []
    try:
        plots += plot_accuracy_vs_bits(view, plot_dir)
        plots += plot_depth_heatmaps(view, plot_dir)
        plots += [] if sensitivity_plots.is_probe_study(view) else plot_sensitivity(view, plot_dir)
        plots += sensitivity_plots.plot_all(view, plot_dir)
    except OSError as exc:
        raise write_error(Path(getattr(exc, "filename", None) or plot_dir), exc,
                          "the report was not written") from None
    if plots:
        lines = ["## Plots", ""]
        for title, name in plots:
            lines += [f"**{title}**", "", f"![{title}]({view.link_prefix}{name})", ""]
        blocks.append(Block(lines))
    html_path = out_path.with_suffix(".html")
    title = f"Quantization study: {view.meta.get('config_name', '?')}"
    atomic_write_text(out_path, markdown_text(blocks))
    atomic_write_text(html_path, render_html(blocks, title, plot_dir, view.link_prefix))
    return out_path


def summary_table(data: dict) -> str:
    """Compact console table printed at the end of `run`."""
    view = View(data)
    rows = []
    for model in view.models:
        for variant in view.variants:
            row = {"model": model, "variant": variant}
            if view.failure(model, variant):
                row["status"] = "FAILED"
            for sub, r in view.task_results(model, variant).items():
                row[sub] = _pct(r.get("value"), "n/a") if _is_mean(r) else _fmt(r.get("value"), 4)
            q = view.cell(model, variant, "quality") or {}
            row["bpb"] = _fmt(q.get("bpb"), 4)
            if q.get("kl_mean") is not None:
                row["KL"] = _fmt(q.get("kl_mean"), 5)
            rows.append(row)
    return pd.DataFrame(rows).fillna("").to_markdown(index=False)
