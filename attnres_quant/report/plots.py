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


def plot_accuracy_vs_bits(view, out_dir: Path) -> list[tuple[str, str]]:
    out = []
    for model in view.models:
        subtasks = view.subtasks(model)
        if not subtasks:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for sub in subtasks:
            xs, ys, labels = [], [], []
            for variant in view.variants:
                plan = view.cell(model, variant, "plan") or {}
                r = view.task_results(model, variant).get(sub)
                if (r is None or not _finite(plan.get("avg_bits")) or not _finite(r.get("value"))
                        or r.get("aggregation", "mean") != "mean"):
                    continue  # perplexity-like corpus metrics are not scores in %
                xs.append(plan["avg_bits"])
                ys.append(100 * r["value"])
                labels.append(variant)
            if not xs:
                continue
            ax.scatter(xs, ys, label=sub)
            for x, y, lab in zip(xs, ys, labels):
                ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("average bits per weight")
        ax.set_ylabel("score (%)")
        ax.set_title(f"{model}: task score vs bits")
        ax.legend(fontsize=7)
        name = f"acc_vs_bits_{model}.png"
        _save(fig, out_dir / name)
        out.append((f"Task score vs average bits per weight — {model}", name))
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _depth_matrix(weights: list[list[float]]) -> np.ndarray:
    n_src = max((len(w) for w in weights), default=1)
    mat = np.full((max(len(weights), 1), max(n_src, 1)), np.nan)
    for j, w in enumerate(weights):
        mat[j, : len(w)] = [x if _finite(x) else np.nan for x in w]
    return mat


def plot_depth_heatmaps(view, out_dir: Path) -> list[tuple[str, str]]:
    out = []
    for model in view.models:
        base = view.cell(model, view.baseline, "depth")
        if not base:
            continue
        variants = [v for v in view.variants[1:] if view.cell(model, v, "depth")]
        panels = [(view.baseline, base)] + [(v, view.cell(model, v, "depth")) for v in variants]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 4), squeeze=False)
        for ax, (name, weights) in zip(axes[0], panels):
            im = ax.imshow(_depth_matrix(weights), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("source (0 = embedding)")
        axes[0][0].set_ylabel("sub-layer (last row = final mix)")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean depth weight")
        fig.suptitle(f"{model}: depth softmax, mean over tokens")
        name = f"depth_heatmap_{model}.png"
        fig.savefig(out_dir / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        out.append((f"Depth-attention weights, baseline vs variants — {model}", name))
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
