"""``python -m attnres_quant compare A B``: the score differences between two studies.

A and B are results.json files or study folders. For every (model, variant, task, metric) that both
hold, the table gives A's and B's scores and Δ = B − A with a 95% confidence interval:

* **paired** when both studies scored the same documents (identical per-sample ids): a paired
  bootstrap over the documents (``evaluation.stats.paired_delta``, 2000 resamples, fixed seed), plus
  the flips (documents right in A and wrong in B, and the reverse);
* **unpaired** otherwise (different documents or limits, or a metric without per-sample records):
  Δ ± 1.96·√(se_A² + se_B²) from each study's standard error; the table says which, and why.

Rows in only one study are listed under the table. The table is printed; with ``--out DIR`` it is
also written as ``DIR/compare.md`` and ``DIR/compare.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

Z95 = 1.959963984540054
COLUMNS = ["model", "variant", "task", "metric", "A", "B", "delta", "ci_lo", "ci_hi", "pairing", "n_A", "n_B",
           "correct_to_wrong", "wrong_to_correct"]


@dataclass
class Score:
    value: float
    stderr: float
    n: int
    ids: list[str] | None = None       # document ids, aligned with per_sample
    per_sample: list[float] | None = None


def add_arguments(parser) -> None:
    parser.add_argument("a", metavar="A", help="the reference study: its folder or results.json")
    parser.add_argument("b", metavar="B", help="the study compared with it (Δ = B − A)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="also write compare.md and compare.csv into DIR (default: print only)")


def results_path(path: str | Path) -> Path:
    """A study folder's results.json, or the file itself."""
    path = Path(path)
    if path.is_dir():
        if not (path / "results.json").is_file():
            raise UserError(f"study folder {str(path)!r} has no results.json", str(path),
                            "pass a study folder written by `run` (reports/<name>) or its results.json")
        return path / "results.json"
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist", "compare A B",
                        "pass two study folders or results.json files written by `run`")
    return path


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def _metric_scores(r: dict) -> dict[str, Score]:
    """Metric name -> Score of one task result (primary metric first, then the others lm-eval reported)."""
    primary_key = f"{r.get('metric')},{r.get('filter', 'none')}"
    ids = r.get("sample_ids") or None
    metrics = r.get("metrics") or {}
    out = {}

    def name(key: str) -> str:
        return key[:-len(",none")] if key.endswith(",none") else key

    out[name(primary_key)] = Score(_num(r.get("value")), _num(r.get("stderr")), int(r.get("n") or 0), ids,
                                   r.get("per_sample") or None)
    for key, value in metrics.items():
        metric = key.split(",", 1)[0]
        if key == primary_key or metric.endswith("_stderr") or name(key) in out:
            continue
        stderr_key = f"{metric}_stderr,{key.split(',', 1)[1]}" if "," in key else ""
        vector = (r.get("per_sample_by") or {}).get(key)
        aligned = vector is not None and ids is not None and len(vector) == len(ids)
        out[name(key)] = Score(_num(value), _num(metrics.get(stderr_key)), len(vector) if vector else 0,
                               ids if aligned else None, vector if aligned else None)
    return out


def task_scores(data: dict) -> dict[tuple[str, str, str, str], Score]:
    """(model, variant, task, metric) -> Score of every finished task cell of a results dict."""
    scores = {}
    for key, cell in data.get("cells", {}).items():
        parts = key.split("/", 2)
        if len(parts) != 3:
            continue
        model, variant, kind = parts
        if not kind.startswith("task:") or cell.get("status") != "ok" or not isinstance(cell.get("value"), dict):
            continue
        for task, r in cell["value"].items():
            for metric, score in _metric_scores(r).items():
                scores[(model, variant, task, metric)] = score
    return scores


def _paired(a: Score, b: Score, iters: int, seed: int) -> dict | None:
    """Paired Δ and bootstrap CI when both score the same documents; None otherwise."""
    from .evaluation import stats

    if a.ids is None or b.ids is None or a.per_sample is None or b.per_sample is None:
        return None
    if len(a.ids) != len(a.per_sample) or len(b.ids) != len(b.per_sample) or len(a.ids) != len(b.ids) \
            or len(set(a.ids)) != len(a.ids) or set(a.ids) != set(b.ids):
        return None
    by_id = dict(zip(b.ids, b.per_sample))
    pairs = [(x, by_id[i]) for i, x in zip(a.ids, a.per_sample)]
    if not all(math.isfinite(_num(x)) and math.isfinite(_num(y)) for x, y in pairs):
        return None
    base, var = [float(x) for x, _ in pairs], [float(y) for _, y in pairs]
    delta, lo, hi = stats.paired_delta(base, var, iters=iters, seed=seed)
    row = {"delta": delta, "ci_lo": lo, "ci_hi": hi, "pairing": f"paired ({len(pairs)} docs)"}
    if all(v in (0.0, 1.0) for v in base + var):
        row["correct_to_wrong"], row["wrong_to_correct"] = stats.flips(base, var)
    return row


def _unpaired(a: Score, b: Score) -> dict:
    if a.ids is None or b.ids is None:
        why = "no per-sample records"
    elif set(a.ids) != set(b.ids):
        common = len(set(a.ids) & set(b.ids))
        why = f"different documents: {len(a.ids)} vs {len(b.ids)}, {common} in common"
    else:
        why = "per-sample values missing"
    delta = b.value - a.value
    half = Z95 * math.sqrt(a.stderr ** 2 + b.stderr ** 2)
    return {"delta": delta, "ci_lo": delta - half, "ci_hi": delta + half, "pairing": f"unpaired ({why})"}


def compare_results(a: dict, b: dict, *, iters: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Rows of the Δ table (COLUMNS) and notes on what only one study holds."""
    sa, sb = task_scores(a), task_scores(b)
    rows = []
    for key in sorted(set(sa) & set(sb)):
        x, y = sa[key], sb[key]
        row = dict(zip(("model", "variant", "task", "metric"), key))
        row.update(A=x.value, B=y.value, n_A=x.n, n_B=y.n, correct_to_wrong=None, wrong_to_correct=None)
        row.update(_paired(x, y, iters, seed) or _unpaired(x, y))
        rows.append({c: row.get(c) for c in COLUMNS})
    notes = []
    for side, keys in (("A", set(sa) - set(sb)), ("B", set(sb) - set(sa))):
        tasks = sorted({"/".join(k[:3]) for k in keys})  # model/variant/task, each listed once
        if tasks:
            notes.append(f"only in {side} (some or all metrics): " + ", ".join(tasks[:20])
                         + (f" and {len(tasks) - 20} more" if len(tasks) > 20 else ""))
    return rows, notes


def _fmt(x) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.4f}"


def render_markdown(rows: list[dict], notes: list[str], a_label: str, b_label: str) -> str:
    lines = ["# Δ between studies: B − A", "", f"- A: {a_label}", f"- B: {b_label}",
             "- 95% CI: paired bootstrap over the documents when both studies scored the same documents; "
             "otherwise unpaired, Δ ± 1.96·√(se_A² + se_B²).", ""]
    if not rows:
        lines.append("The two studies share no (model, variant, task, metric).")
    else:
        lines += ["| model | variant | task | metric | A | B | Δ (B − A) | 95% CI | pairing | flips c→w / w→c |",
                  "|---|---|---|---|---:|---:|---:|---|---|---|"]
        for r in rows:
            flips = ("—" if r["correct_to_wrong"] is None
                     else f"{r['correct_to_wrong']} / {r['wrong_to_correct']}")
            ci = f"[{r['ci_lo']:+.4f}, {r['ci_hi']:+.4f}]" if math.isfinite(r["ci_lo"]) else "—"
            lines.append(f"| {r['model']} | {r['variant']} | {r['task']} | {r['metric']} | {_fmt(r['A'])} | "
                         f"{_fmt(r['B'])} | {r['delta']:+.4f} | {ci} | {r['pairing']} | {flips} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def _label(path: Path, data: dict) -> str:
    meta = data.get("meta") or {}
    bits = [str(path)]
    if meta.get("name"):
        bits.append(f"study {meta['name']}")
    if meta.get("finished"):
        bits.append(f"finished {meta['finished']}")
    return ", ".join(bits)


def main(args) -> int:
    import pandas as pd

    from .pipeline.results import atomic_write_text, ensure_dir, load_results

    pa, pb = results_path(args.a), results_path(args.b)
    a, b = load_results(pa), load_results(pb)
    rows, notes = compare_results(a, b)
    text = render_markdown(rows, notes, _label(pa, a), _label(pb, b))
    print(text, end="")
    if args.out:
        out = ensure_dir(Path(args.out), "compare --out folder")
        atomic_write_text(out / "compare.md", text)
        atomic_write_text(out / "compare.csv", pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
        print(f"wrote {out / 'compare.md'} and {out / 'compare.csv'}")
    return 0
