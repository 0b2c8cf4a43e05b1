"""A self-contained HTML report beside the markdown one (``reports/<name>.html``).

The HTML is rendered from the same blocks as the markdown (markdown-it-py, the CommonMark parser
that rich already depends on), so the two never disagree. Differences, all for reading in a browser:
plots are inlined as base64 PNG (the file can be mailed or attached on its own), long reference
sections (precision plans, task settings) fold into ``<details>``, and each model gets a folded list
of the samples that flipped between the baseline and each variant, linked to the per-sample logs
(those stay files beside the report, relative links as in the markdown).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; white-space: nowrap; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
details { margin: 0.5em 0 1em; border: 1px solid #ddd; border-radius: 4px; padding: 0.3em 0.8em; }
summary { cursor: pointer; font-weight: 600; }
blockquote { margin: 0.5em 0; padding: 0.2em 1em; border-left: 4px solid #8aa; background: #f6f9f9; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
"""


@dataclass
class Block:
    """A run of markdown lines. ``summary``: fold it under this title in the HTML. ``html_only``: not
    part of the markdown report (per-sample detail that only a browser makes readable)."""

    lines: list[str]
    summary: str | None = None
    html_only: bool = False


def markdown_text(blocks: list[Block]) -> str:
    lines = [line for b in blocks if not b.html_only for line in b.lines]
    return "\n".join(lines).rstrip() + "\n"


def _parser():
    from markdown_it import MarkdownIt

    # html=False: text from results.json (task names, failure reasons) is escaped, never markup.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _inline_images(fragment: str, plot_dir: Path, link_prefix: str) -> str:
    """Replace ``<img src="<prefix>NAME.png">`` with the PNG's bytes as a data URI."""
    for png in sorted(plot_dir.glob("*.png")):
        src = html.escape(f"{link_prefix}{png.name}", quote=True)
        if f'src="{src}"' in fragment:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            fragment = fragment.replace(f'src="{src}"', f'src="data:image/png;base64,{data}"')
    return fragment


def render_html(blocks: list[Block], title: str, plot_dir: Path, link_prefix: str) -> str:
    md = _parser()
    body = []
    for block in blocks:
        fragment = _inline_images(md.render("\n".join(block.lines)), plot_dir, link_prefix)
        if block.summary:
            fragment = (f"<details><summary>{html.escape(block.summary)}</summary>\n{fragment}</details>\n")
        body.append(fragment)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "".join(body) + "</body>\n</html>\n")


def flips_block(view, model: str) -> Block | None:
    """Which samples flipped (correct -> wrong, wrong -> correct) for every variant and task, with
    the sample ids and a link to the variant's per-sample log. Same threshold as the flip counts."""
    from .render import _samples_link

    base = view.task_results(model, view.baseline)
    lines = []
    for variant in view.variants[1:]:
        for sub, r in view.task_results(model, variant).items():
            b = base.get(sub) or {}
            bs, vs = b.get("per_sample") or [], r.get("per_sample") or []
            if not bs or len(bs) != len(vs):
                continue
            ids = r.get("sample_ids") or [str(i) for i in range(len(vs))]
            lost = [ids[i] for i, (x, y) in enumerate(zip(bs, vs)) if _num(x) >= 0.5 > _num(y)]
            won = [ids[i] for i, (x, y) in enumerate(zip(bs, vs)) if _num(x) < 0.5 <= _num(y)]
            if not lost and not won:
                continue
            log = _samples_link(view, r, "per-sample log")
            lines.append(f"- **{variant}**, {sub} ({log}): correct→wrong {len(lost)}"
                         + (f" ({', '.join(f'`{i}`' for i in lost)})" if lost else "")
                         + f"; wrong→correct {len(won)}"
                         + (f" ({', '.join(f'`{i}`' for i in won)})" if won else ""))
    if not lines:
        return None
    return Block(lines + [""], summary=f"Per-sample flips against the baseline — {model}", html_only=True)


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")
