"""Report parts of the sensitivity and search verbs (issue 18): the ranked damage plot with error bars,
the Pareto plot (bits per weight vs KL), the KL percentiles table and the search summary.

They read only the results mapping (through ``render.View``), so ``report`` re-renders them. A study's
quality cells give ``kl_sem`` (the standard error of the mean KL over tokens) when they were measured by
``sensitivity`` / ``search``; without it the bars have no error bar.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .plots import _finite, _save  # noqa: E402

PERCENTILE_KEYS = (("kl_p50", "p50"), ("kl_p90", "p90"), ("kl_p95", "p95"), ("kl_p99", "p99"),
                   ("kl_p999", "p99.9"), ("kl_max", "max"))


def _dig(node, *keys) -> dict:
    """node[k1][k2]... where each level is a mapping; {} otherwise (a hand-edited results file renders)."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def probes(view, model: str) -> dict:
    """{probe name: record} of a sensitivity/search results file (empty for a study)."""
    for key in ("sensitivity", "search"):
        recs = _dig(view.meta, key, "probes", model)
        if recs:
            return {k: v for k, v in recs.items() if isinstance(v, dict)}
    return {}


def search_meta(view, model: str) -> dict:
    s = _dig(view.meta, "search", "models", model)
    needed = ("policy", "levels", "n_units", "kept")
    return s if all(k in s for k in needed) and isinstance(s["kept"], dict) else {}


def searched_policies(view, model: str) -> dict:
    """{name: search summary} of every policy searched into this results file (all budgets)."""
    return _dig(view.meta, "search", "policies", model)


def ranking_rows(view, model: str) -> list[dict]:
    """Probes (or, in a study, variants) ranked by mean KL, worst first, with KL s.e., bits and task Δ."""
    from .render import _mean_delta

    names = list(probes(view, model)) or view.variants[1:]
    base = view.task_results(model, view.baseline)
    rows = []
    for name in names:
        q = view.cell(model, name, "quality") or {}
        if not _finite(q.get("kl_mean")):
            continue
        plan = view.cell(model, name, "plan") or {}
        rows.append({"variant": name, "kl_mean": q["kl_mean"],
                     "kl_sem": q["kl_sem"] if _finite(q.get("kl_sem")) else 0.0,
                     "avg_bits": plan.get("avg_bits"),
                     "mean_delta": _mean_delta(view.task_results(model, name), base)})
    rows.sort(key=lambda r: -r["kl_mean"])
    return rows


def is_probe_study(view) -> bool:
    return bool(_dig(view.meta, "sensitivity") or _dig(view.meta, "search"))


# --------------------------------------------------------------------------- markdown
def ranking_section(view, model: str) -> list[str]:
    rows = ranking_rows(view, model)
    if not rows:
        return []
    recs = probes(view, model)
    table = []
    for i, r in enumerate(rows):
        rec = recs.get(r["variant"], {})
        table.append({"rank": i + 1, "probe": r["variant"], "part": rec.get("unit", "—"),
                      "level": rec.get("level", "—"),
                      "KL mean ± s.e.": f"{r['kl_mean']:.5f} ± {r['kl_sem']:.5f}",
                      "avg bits/weight": "—" if r["avg_bits"] is None else f"{r['avg_bits']:.3f}",
                      "mean task Δ (pts)": "—" if r["mean_delta"] is None else f"{100 * r['mean_delta']:+.1f}"})
    from .render import _table

    return [f"### Sensitivity ranking (one part at a time) — {model}", "", _table(table), "",
            "_Each probe quantizes one part (a component group, or one layer / expert of it) and keeps the rest "
            "at the baseline. KL(baseline ‖ probe) per token in nats, mean ± standard error over tokens; "
            "depth.softmax is a compute precision and depth.sources a storage precision (no weight bits)._", ""]


def percentiles_section(view, model: str) -> list[str]:
    """KL percentiles of every variant whose quality cell has them (not the probes: see the ranking)."""
    from .render import _table

    skip = set(probes(view, model))
    rows = []
    for name in view.variants[1:]:
        q = view.cell(model, name, "quality") or {}
        if name in skip or not _finite(q.get("kl_mean")):
            continue
        have = [(k, h) for k, h in PERCENTILE_KEYS if _finite(q.get(k))]
        if not have:
            continue
        row = {"variant": name, "KL mean": f"{q['kl_mean']:.5f}"
               + (f" ± {q['kl_sem']:.5f}" if _finite(q.get("kl_sem")) else "")}
        row.update({h: f"{q[k]:.4f}" for k, h in have})
        rows.append(row)
    if not rows:
        return []
    return [f"### KL percentiles — {model}", "", _table(rows), "",
            "_Per-token KL(baseline ‖ variant) in nats over the quality text: mean (± standard error where "
            "measured) and percentiles._", ""]


def search_section(view, model: str) -> list[str]:
    """The searched policy, what it keeps above the cheapest level, and the comparison with the hand-written
    policies (measured the same way, on the same text)."""
    from .render import _table

    s = search_meta(view, model)
    if not s:
        return []
    name = s["policy"]
    q = view.cell(model, name, "quality") or {}
    plan = view.cell(model, name, "plan") or {}
    budget = (f"target {s['target_bits']} bits/weight" if s.get("target_bits") is not None
              else f"KL budget {s['max_kl']}")
    lines = [f"### Mixed-precision search — {model}", "",
             f"- **Budget**: {budget}; levels {', '.join(map(str, s['levels'] or []))} per unit ({s['n_units']} units); "
             f"greedy on each unit's convex hull of (bits, KL), by KL saved per bit (docs/quantization.md).",
             f"- **Found** `{name}`: {_f(plan.get('avg_bits'), 3)} bits/weight (plan), predicted KL "
             f"{_f(s.get('predicted_kl'), 5)}, measured KL {_f(q.get('kl_mean'), 5)} ± {_f(q.get('kl_sem'), 5)}; "
             f"written to `{s.get('yaml')}`.",
             f"- **Kept above the cheapest level**: " + (", ".join(f"{u} at {lvl}" for u, lvl in s["kept"].items())
                                                         or "nothing"), ""]
    rows = []
    searched_kl = q.get("kl_mean")
    policies = searched_policies(view, model)
    others = [p for p in policies if p != name and not (policies[p] or {}).get("matched")]
    for v in [name] + others + list(s.get("compared") or []):
        qv = view.cell(model, v, "quality") or {}
        pv = view.cell(model, v, "plan") or {}
        failed = view.failure(model, v)
        bits = pv.get("avg_bits")
        rows.append({"policy": v + (" (searched)" if v == name else " (searched earlier)" if v in others else ""),
                     "avg bits/weight": _f(bits, 3),
                     "KL mean ± s.e.": "failed" if failed else f"{_f(qv.get('kl_mean'), 5)} ± {_f(qv.get('kl_sem'), 5)}",
                     "searched KL ≤ this": "—" if v == name or not _finite(qv.get("kl_mean")) or not
                     _finite(searched_kl) else ("yes" if searched_kl <= qv["kl_mean"] else "**no**")})
    rows[1:] = sorted(rows[1:], key=lambda r: float(r["avg bits/weight"]) if r["avg bits/weight"] != "—" else 99)
    lines += [_table(rows), "", "_All policies quantized and measured in this run (same text, same KL code)._", ""]
    return lines + matched_section(view, model)


def matched_rows(view, model: str) -> list[dict]:
    """Per hand-written policy: its bits and KL, and the policy searched at its bits (``--match-compared``)."""
    def measured(v):
        q, p = view.cell(model, v, "quality") or {}, view.cell(model, v, "plan") or {}
        return p.get("avg_bits"), q.get("kl_mean"), q.get("kl_sem")

    rows = []
    for pname, summary in searched_policies(view, model).items():
        for hand in (summary or {}).get("matched") or []:
            hb, hk, hs = measured(hand)
            sb, sk, ss = measured(pname)
            ok = all(_finite(x) for x in (hb, hk, sb, sk))
            rows.append({"hand-written policy": hand, "bits": _f(hb, 3), "KL ± s.e.": f"{_f(hk, 6)} ± {_f(hs, 6)}",
                         "searched at its bits": pname, "searched bits": _f(sb, 3),
                         "searched KL ± s.e.": f"{_f(sk, 6)} ± {_f(ss, 6)}",
                         "searched ≤ hand-written (KL and bits)": "—" if not ok else
                         "yes" if sk <= hk and sb <= hb + 1e-9 else "**no**",
                         "_sort": hb if _finite(hb) else 99})
    rows.sort(key=lambda r: (r.pop("_sort"), r["hand-written policy"]))
    return rows


def matched_section(view, model: str) -> list[str]:
    from .render import _table

    rows = matched_rows(view, model)
    if not rows:
        return []
    wins = sum(r["searched ≤ hand-written (KL and bits)"] == "yes" for r in rows)
    return [f"#### Searched at each hand-written policy's bits — {model}", "", _table(rows), "",
            f"_`search --match-compared`: one search per hand-written policy's bits per weight (the plan's count, "
            f"the same for every policy), each verified by a real measurement on the same text; the searched "
            f"policy is at or below the hand-written one in KL and bits for {wins} of {len(rows)}._", ""]


def _f(x, digits):
    return f"{x:.{digits}f}" if _finite(x) else "—"


def extra_sections(view, model: str) -> list[str]:
    """The issue-18 sections of a model, in report order."""
    lines = search_section(view, model)
    if probes(view, model):
        lines += ranking_section(view, model)
    return lines + percentiles_section(view, model)


# --------------------------------------------------------------------------- plots
def plot_ranked_sensitivity(view, out_dir: Path, top: int = 40) -> list[tuple[str, str]]:
    """Ranked horizontal bars of mean KL with ± 1 s.e. error bars (the worst ``top`` probes)."""
    out = []
    for model in view.models:
        rows = ranking_rows(view, model)[:top]
        if len(rows) < 2 or not probes(view, model):
            continue
        rows = rows[::-1]
        recs = probes(view, model)
        colors = ["tab:orange" if str(recs.get(r["variant"], {}).get("component", "")).startswith("depth.")
                  else "tab:blue" for r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.6))
        ax.barh(range(len(rows)), [r["kl_mean"] for r in rows], xerr=[r["kl_sem"] for r in rows],
                color=colors, ecolor="black", capsize=2)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["variant"] for r in rows], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("mean KL(baseline ‖ probe), nats/token (log), ± 1 s.e.")
        ax.set_title(f"{model}: damage of one part at a time (orange: depth path)", fontsize=9)
        name = f"sensitivity_ranked_{model}.png"
        _save(fig, out_dir / name)
        out.append((f"Sensitivity ranking with standard errors — {model}", name))
    return out


def _spread_labels(ax, items, fontsize: float) -> None:
    """Annotate points so that no two labels overlap: labels are placed top to bottom in display space and
    pushed down until clear of every label already placed; a moved label gets a thin leader line."""
    ax.autoscale_view()
    fig = ax.figure
    px_per_pt = fig.dpi / 72.0
    height, char_w = (fontsize + 2) * px_per_pt, 0.6 * fontsize * px_per_pt
    placed: list[tuple[float, float, float]] = []  # (x0, x1, y) of placed labels, display pixels
    pts = sorted(((name, *ax.transData.transform((x, y)), x, y) for name, x, y in items), key=lambda t: -t[2])
    for name, px, py, x, y in pts:
        x0, x1, ly = px + 3 * px_per_pt, px + 3 * px_per_pt + char_w * len(name), py + 2 * px_per_pt
        while any(a < x1 and x0 < b and abs(ly - c) < height for a, b, c in placed):
            ly -= height / 2
        placed.append((x0, x1, ly))
        moved = abs(ly - (py + 2 * px_per_pt)) > 0.5
        ax.annotate(name, (x, y), fontsize=fontsize, xytext=(3, (ly - py) / px_per_pt), textcoords="offset points",
                    va="bottom" if not moved else "center",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if moved else None)


def plot_pareto(view, out_dir: Path) -> list[tuple[str, str]]:
    """Bits per weight vs mean KL: every variant (probes small and grey), the searched policy as a star, and
    the lower-left frontier of the measured policies."""
    out = []
    for model in view.models:
        recs = probes(view, model)
        searched = set(searched_policies(view, model)) | {search_meta(view, model).get("policy")}
        pts = []
        for name in view.variants[1:]:
            q, plan = view.cell(model, name, "quality") or {}, view.cell(model, name, "plan") or {}
            if _finite(q.get("kl_mean")) and _finite(plan.get("avg_bits")) and q["kl_mean"] > 0:
                pts.append((name, plan["avg_bits"], q["kl_mean"], q.get("kl_sem") if _finite(q.get("kl_sem"))
                            else 0.0))
        policies = [p for p in pts if p[0] not in recs]
        if len(policies) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        probe_pts = [p for p in pts if p[0] in recs]
        if probe_pts:
            ax.scatter([p[1] for p in probe_pts], [p[2] for p in probe_pts], s=8, color="0.7",
                       label="probes (one part quantized)")
        others = [p for p in policies if p[0] not in searched]
        ax.errorbar([p[1] for p in others], [p[2] for p in others], yerr=[p[3] for p in others], fmt="o",
                    color="tab:blue", ms=5, capsize=2, label="policies")
        front = _frontier(policies)
        ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:blue", lw=0.8, alpha=0.5,
                label="Pareto frontier")
        main = search_meta(view, model).get("policy")
        labelled = False
        for name, x, y, e in policies:
            if name in searched:  # the main budget's policy named; the others (other budgets) one legend entry
                is_main = name == main
                ax.errorbar([x], [y], yerr=[e], fmt="*", color="tab:red", ms=14 if is_main else 9, capsize=2,
                            label=f"searched: {name}" if is_main else None if labelled else "searched (other budgets)")
                labelled = labelled or not is_main
                if is_main:
                    ax.annotate(name, (x, y), fontsize=7, color="tab:red", xytext=(5, -9), textcoords="offset points")
        ax.set_yscale("log")
        _spread_labels(ax, [(name, x, y) for name, x, y, _ in others], fontsize=6)
        ax.set_xlabel("average bits per weight (plan, incl. scales)")
        ax.set_ylabel("mean KL(baseline ‖ variant), nats/token (log)")
        ax.set_title(f"{model}: size vs damage")
        ax.legend(fontsize=7)
        name = f"pareto_{model}.png"
        _save(fig, out_dir / name)
        out.append((f"Bits per weight vs KL (Pareto) — {model}", name))
    return out


def _frontier(points):
    """Points not beaten by another with fewer-or-equal bits and lower KL, by bits."""
    best, front = float("inf"), []
    for p in sorted(points, key=lambda p: (p[1], p[2])):
        if p[2] < best:
            front.append(p)
            best = p[2]
    return front


def plot_all(view, out_dir: Path) -> list[tuple[str, str]]:
    return plot_ranked_sensitivity(view, out_dir) + plot_pareto(view, out_dir)
