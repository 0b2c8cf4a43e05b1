"""PNG plots beside the report: accuracy vs bits, depth heatmaps, sensitivity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are rendered on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    # Fixed metadata so re-rendering gives byte-identical files.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# One colour and marker per variant, the same in every panel and plot.
_MARKERS = "osD^vP*Xh<>p"


def _variant_style(i: int, n: int = 10) -> dict:
    """Colour and marker of the i-th of n variants (20 distinct colours past 10 variants)."""
    palette = "tab10" if n <= 10 else "tab20"
    return {"color": plt.get_cmap(palette)(i % (10 if n <= 10 else 20)), "marker": _MARKERS[i % len(_MARKERS)]}


def _dodge(xs: list[float], span: float) -> list[float]:
    """Spread points that share an x (e.g. three int4 variants at 4.5 bits) symmetrically around it,
    so neither markers nor error bars hide each other; the spread is a small fixed part of the axis."""
    step = 0.025 * (span or 1.0)
    groups: dict[float, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(round(x, 2), []).append(i)
    out = list(xs)
    for members in groups.values():
        for k, i in enumerate(members):
            out[i] = xs[i] + (k - (len(members) - 1) / 2) * step
    return out


def plot_accuracy_vs_bits(view, out_dir: Path) -> list[tuple[str, str]]:
    """One panel per task: score (± one standard error) against bits per *quantized* weight.

    Every variant keeps the embedding, norms and lm_head at the baseline dtype, so the average over
    all weights puts every int4 variant near 8.5 bits; the x axis is therefore the average over the
    weights the variant actually lowers (scales included), and the footnote gives the share and the
    whole-model average. Variants are told apart by colour and marker (legend), never by text next to
    the points, so nothing overlaps; tasks on which every variant scores 0 carry no information and
    are listed in the footnote instead of plotted."""
    from .render import bits_breakdown, plotted_tasks

    out = []
    for model in view.models:
        tasks, all_zero = plotted_tasks(view, model)
        if not tasks:
            continue
        bits = {v: bits_breakdown(view, model, v) for v in view.variants}
        bits = {v: b for v, b in bits.items() if b is not None}
        if not bits:
            continue
        ncols = min(3, len(tasks))
        nrows = -(-len(tasks) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 0.4, 2.9 * nrows + 1.3), squeeze=False,
                                 layout="constrained")
        span = max(b["x"] for b in bits.values()) - min(b["x"] for b in bits.values())
        for ax, sub in zip(axes.flat, tasks):
            _score_panel(ax, view, model, sub, bits, span)
        for ax in list(axes.flat)[len(tasks):]:
            ax.set_visible(False)
        handles = [plt.Line2D([], [], linestyle="none", markersize=7, label=v,
                              **_variant_style(i, len(view.variants)))
                   for i, v in enumerate(view.variants) if v in bits]
        # The title rides on the legend: a separate suptitle would collide with it.
        # Columns sized to the longest name so a many-variant legend stays inside the figure.
        longest = max((len(h.get_label()) for h in handles), default=10)
        per_col_in = (longest * 5.2 + 30) / 110  # ~5.2 px per character at fontsize 8, plus the marker
        fig.legend(handles=handles, loc="outside upper center", fontsize=8,
                   ncol=max(1, min(len(handles), 5, int(fig.get_figwidth() / per_col_in))),
                   frameon=False, title=f"{model}: task score vs bits per quantized weight",
                   title_fontproperties={"size": 10})
        fig.supxlabel(_bits_footnote(view, model, bits, all_zero, int(fig.get_figwidth() * 17)), fontsize=7,
                      x=0.01, ha="left")
        name = f"acc_vs_bits_{model}.png"
        fig.savefig(out_dir / name, dpi=110, metadata={"Software": None}, bbox_inches="tight")
        plt.close(fig)
        out.append((f"Task score vs bits per quantized weight — {model}", name))
    return out


def _score_panel(ax, view, model, sub, bits, span) -> None:
    variants = [v for v in view.variants if v in bits]
    points = []
    for v in variants:
        r = view.task_results(model, v).get(sub)
        if r is None or not _finite(r.get("value")):
            continue
        err = 100 * r["stderr"] if _finite(r.get("stderr")) else 0.0
        points.append((v, bits[v]["x"], 100 * r["value"], err))
    xs = _dodge([p[1] for p in points], span)
    for (v, _, y, err), x in zip(points, xs):
        style = _variant_style(view.variants.index(v), len(view.variants))
        ax.errorbar([x], [y], yerr=[err], linestyle="none", capsize=3, markersize=6, elinewidth=1,
                    markeredgecolor="black", markeredgewidth=0.4, **style)
    base = next((p for p in points if p[0] == view.baseline), None)
    if base is not None:
        ax.axhline(base[2], color="grey", linewidth=0.8, linestyle=":", zorder=0)
    ax.set_title(sub, fontsize=9)
    ax.set_xlabel("bits per quantized weight (incl. scales)", fontsize=8)
    ax.set_ylabel("score (%) ± 1 s.e.", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25)


def _bits_footnote(view, model, bits, all_zero, width: int) -> str:
    lowered = {v: b for v, b in bits.items() if v != view.baseline}
    parts = ["x: average bits (scales included) of the weights a variant lowers below the baseline dtype; the "
             "weights it keeps (the embedding, norms and lm_head unless a rule names them) are not counted, "
             "and a variant that lowers no weight (only computations or stored activations) sits at the "
             "baseline's bits."]
    if lowered:
        parts.append("Average bits over all weights: " + ", ".join(f"{v} {b['avg']:.1f}" for v, b in lowered.items())
                     + ".")
    parts.append("Points at the same x are spread apart slightly; dotted line: baseline score.")
    if all_zero:
        parts.append("Not plotted (every variant scores 0): " + ", ".join(all_zero) + ".")
    import textwrap

    return "\n".join(textwrap.wrap(" ".join(parts), width))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _depth_matrix(weights: list[list[float]]) -> np.ndarray:
    n_src = max((len(w) for w in weights), default=1)
    mat = np.full((max(len(weights), 1), max(n_src, 1)), np.nan)
    for j, w in enumerate(weights):
        mat[j, : len(w)] = [x if _finite(x) else np.nan for x in w]
    return mat


def plot_depth_heatmaps(view, out_dir: Path) -> list[tuple[str, str]]:
    """The mean depth softmax of the baseline and each variant (0..1), and below each variant the
    variant minus the baseline on one symmetric colour scale shared by all variants -- a change of
    1e-3 is invisible on the 0..1 scale but is what tells the variants apart."""
    out = []
    for model in view.models:
        base = view.cell(model, view.baseline, "depth")
        if not base:
            continue
        variants = [v for v in view.variants[1:] if view.cell(model, v, "depth")]
        panels = [(view.baseline, _depth_matrix(base))] + [(v, _depth_matrix(view.cell(model, v, "depth")))
                                                            for v in variants]
        diffs = [(name, _difference(mat, panels[0][1])) for name, mat in panels[1:]]
        finite = [np.nanmax(np.abs(d)) for _, d in diffs if np.isfinite(d).any()]
        span = max(finite, default=0.0) or 1e-12
        # Up to 7 panels a row; each row of weights has its row of differences right below it.
        ncols = min(7, len(panels))
        chunks = -(-len(panels) // ncols)
        rows_per_chunk = 2 if diffs else 1
        fig, axes = plt.subplots(rows_per_chunk * chunks, ncols, figsize=(2.6 * ncols + 1.2,
                                 (3.8 * rows_per_chunk) * chunks), squeeze=False, layout="constrained")
        tops, bottoms = [], []
        for k, (name, mat) in enumerate(panels):
            chunk, col = divmod(k, ncols)
            ax = axes[rows_per_chunk * chunk][col]
            tops.append(ax)
            im = ax.imshow(mat, vmin=0, vmax=1, cmap=_with_grey_gaps("viridis"), aspect="auto")
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("source (0 = embedding)", fontsize=7)
            if col == 0:
                ax.set_ylabel("sub-layer (last row = final mix)", fontsize=8)
            if not diffs:
                continue
            low = axes[rows_per_chunk * chunk + 1][col]
            bottoms.append(low)
            if k == 0:
                low.axis("off")
                low.text(0.5, 0.5, f"below each panel:\nvariant − {view.baseline}\nshared scale\n±{span:.1e}",
                         ha="center", va="center", fontsize=8, transform=low.transAxes)
                continue
            dim = low.imshow(diffs[k - 1][1], vmin=-span, vmax=span, cmap=_with_grey_gaps("RdBu_r"), aspect="auto")
            low.set_title(f"{name} − {view.baseline}", fontsize=8)
            low.set_xlabel("source (0 = embedding)", fontsize=7)
        if diffs:
            for chunk in range(chunks):
                for col in range(ncols):
                    if chunk * ncols + col >= len(panels):
                        axes[2 * chunk][col].axis("off")
                        axes[2 * chunk + 1][col].axis("off")
        for chunk in range(chunks):  # one colour bar beside each row, so bars of two rows never overlap
            row = slice(chunk * ncols, (chunk + 1) * ncols)
            fig.colorbar(im, ax=tops[row], shrink=0.85, label="mean depth weight")
            with_images = [b for b in bottoms[row] if b.images]
            if with_images:
                fig.colorbar(dim, ax=with_images, shrink=0.85, label="variant − baseline", format="%.0e")
        fig.suptitle(f"{model}: depth softmax, mean over tokens")
        name = f"depth_heatmap_{model}.png"
        fig.savefig(out_dir / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        out.append((f"Depth-attention weights, baseline vs variants, and each variant minus the baseline — {model}",
                    name))
    return out


def _with_grey_gaps(name: str):
    """The colour map with cells that do not exist (a sub-layer sees only earlier sources) in light
    grey, so they are not read as "no change" on the white centre of a diverging scale."""
    return plt.get_cmap(name).with_extremes(bad="#d9d9d9")


def _difference(mat: np.ndarray, base: np.ndarray) -> np.ndarray:
    rows, cols = min(mat.shape[0], base.shape[0]), min(mat.shape[1], base.shape[1])
    out = np.full(mat.shape, np.nan)
    out[:rows, :cols] = mat[:rows, :cols] - base[:rows, :cols]
    return out


def plot_sensitivity(view, out_dir: Path) -> list[tuple[str, str]]:
    from .render import sensitivity_rows

    out = []
    for model in view.models:
        rows = [r for r in sensitivity_rows(view, model) if r["kl_mean"] is not None]
        if len(rows) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1.5))
        ax.barh([r["variant"] for r in rows][::-1], [r["kl_mean"] for r in rows][::-1])
        ax.set_xscale("log")
        ax.set_xlabel("mean KL(baseline ‖ variant), nats/token (log)")
        ax.set_title(f"{model}: damage per variant")
        name = f"sensitivity_{model}.png"
        _save(fig, out_dir / name)
        out.append((f"Per-variant damage (KL), ranked — {model}", name))
    return out
