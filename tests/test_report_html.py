"""The self-contained HTML report, opened in a real headless browser (Chromium).

Chromium comes from Debian's packages (`apt-get install -y chromium`; .ci/run installs it). Without
it these tests skip on a developer machine but fail under CI (CI=true), so they can never be skipped
silently where they are meant to run.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "docs" / "sample_report" / "int4_hybrid"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    message = "Chromium is not installed (Debian: apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + "; CI must run the browser test")
    pytest.skip(message)


def browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Chromium headless on ``page`` with its console messages logged to stderr."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
            *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


def console_errors(stderr: str) -> list[str]:
    """Console messages of the page (uncaught exceptions, console.error, failed resources)."""
    return [line for line in stderr.splitlines()
            if ("CONSOLE" in line and ("rror" in line or "Uncaught" in line)) or "Failed to load resource" in line]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from attnres_quant.report.render import render_report

    out = tmp_path_factory.mktemp("report")
    shutil.copytree(SAMPLE, out / "int4_hybrid", ignore=shutil.ignore_patterns("*.png"))
    render_report(out / "int4_hybrid" / "results.json", out / "int4_hybrid.md")
    return out / "int4_hybrid.html"


def test_html_report_is_self_contained(rendered):
    text = rendered.read_text(encoding="utf-8")
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 7, ("both accuracy plots, the depth heatmap, both sensitivity charts and both "
                              "Pareto plots, inline")
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert not re.search(r'<img src="(?!data:)', text), "no image refers to a file"
    assert "<details>" in text and "Precision plans and plan notes" in text
    assert "Per-sample flips against the baseline" in text
    assert 'href="int4_hybrid/samples/tiny-block/int4_all/proxy_math.jsonl.gz"' in text


def test_html_report_renders_in_chromium_without_console_errors(rendered, tmp_path):
    dom = browse(rendered, tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_errors(dom.stderr) == [], console_errors(dom.stderr)
    html = dom.stdout
    assert html.count("<table") >= 10, "task, quality, latency and plan tables of both models"
    assert html.count("<img") == 7 and html.count("<details>") >= 6
    assert "Task scores — tiny-block" in html and "Latency and memory — tiny-standard" in html

    shot = tmp_path / "page.png"
    run = browse(rendered, tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1300
    inked = (pixels[..., :3].mean(axis=-1) < 0.9).mean()
    assert inked > 0.01, "the screenshot shows rendered content, not a blank page"


def test_console_error_detection_catches_a_broken_page(tmp_path):
    """The check above would see a page error: a script that throws is reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><table><tr><td>x</td></tr></table>"
                    "<script>undefined_function_called()</script></body></html>")
    dom = browse(page, tmp_path, "--dump-dom")
    assert any("undefined_function_called" in line for line in console_errors(dom.stderr)), dom.stderr[-2000:]
