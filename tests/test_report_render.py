"""Issue 21 items 5-6: what the report's tables and plots say, on the committed sample studies."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from attnres_quant.report.html import markdown_text
from attnres_quant.report.render import (View, bits_breakdown, identical_variants_lines, is_sensitivity_study,
                                         latency_section, plotted_tasks, report_blocks)

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "sample_report"


@pytest.fixture(scope="module")
def default_study() -> dict:
    return json.loads((SAMPLES / "int4_hybrid" / "results.json").read_text())


@pytest.fixture(scope="module")
def sensitivity_study() -> dict:
    return json.loads((SAMPLES / "sensitivity" / "results.json").read_text())


def test_bits_count_only_the_weights_a_variant_lowers(default_study):
    view = View(default_study)
    int4 = bits_breakdown(view, "tiny-block", "int4_all")
    # int4 with a bf16 scale per group of 32: 4 + 16/32 bits; the bf16 embedding and lm_head (1.05M of
    # 3.02M weights) stay out of it, though they pull the whole-model average to ~8.5 bits.
    assert int4["x"] == pytest.approx(4.5, abs=1e-6)
    assert int4["avg"] == pytest.approx(8.4996, abs=1e-3)
    assert int4["share"] == pytest.approx(1970432 / 3021184)
    assert bits_breakdown(view, "tiny-block", "int4_hybrid")["share"] == pytest.approx(1966080 / 3021184)
    assert bits_breakdown(view, "tiny-block", "w8a8")["x"] == pytest.approx(8.1, abs=0.05)
    assert bits_breakdown(view, "tiny-block", "bf16")["x"] == 16


def test_tasks_on_which_every_variant_scores_zero_are_not_plotted(default_study):
    keep, zero = plotted_tasks(View(default_study), "tiny-block")
    assert keep == ["proxy_mc", "proxy_code", "proxy_math"] and zero == ["humaneval"]


def test_identical_variants_are_explained_by_the_skipped_rules(default_study, sensitivity_study):
    view = View(default_study)
    assert identical_variants_lines(view, "tiny-block") == []
    (line, _) = identical_variants_lines(view, "tiny-standard")
    assert "`int4_all`, `int4_hybrid` gave identical results" in line and "skipped" in line
    (line, _) = identical_variants_lines(View(sensitivity_study), "tiny-standard")
    assert "`depth_weights`, `depth_softmax`, `depth_sources` gave the baseline's results" in line


def test_report_text_names_each_quantity_once_and_shows_what_the_config_says(default_study, sensitivity_study):
    text = markdown_text(report_blocks(View(default_study)))
    assert "> Block AttnRes vs standard residual under W8A8" in text           # the config's description
    assert "rules[0] (select: depth.*) skipped: the model has no depth path" in text  # plan notes
    assert "weight bytes" not in text and "stored weights" in text and "weights in memory" in text
    assert "peak mem" not in text and "0 B" not in text                        # CPU: not measured
    assert "Component sensitivity ranking" not in text                          # not a sensitivity study
    assert not is_sensitivity_study(View(default_study)) and is_sensitivity_study(View(sensitivity_study))
    assert "Component sensitivity ranking — tiny-block" in markdown_text(report_blocks(View(sensitivity_study)))


def test_latency_rows_are_flagged_when_noisy_or_under_load(default_study):
    data = copy.deepcopy(default_study)
    data["meta"]["machine"]["load_avg_1m"] = 0.5
    cells = data["cells"]
    calm = {"prefill_ms": 100.0, "prefill_ms_iqr": 5.0, "decode_ms_per_token": 10.0,
            "decode_ms_per_token_iqr": 0.5, "load_avg_1m": 1.0, "clock": "process_cpu_time"}
    cells["tiny-block/bf16/latency"]["value"].update(calm)
    cells["tiny-block/w8a8/latency"]["value"].update({**calm, "decode_ms_per_token_iqr": 2.0})  # 20 %
    cells["tiny-block/int4_all/latency"]["value"].update({**calm, "load_avg_1m": 3.5})          # 2 CPUs
    for v in ("int4_hybrid", "gptq_int4_hybrid"):
        cells[f"tiny-block/{v}/latency"]["value"].update(calm)
    text = "\n".join(latency_section(View(data), "tiny-block"))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "variant" not in line}
    assert rows["bf16"].rstrip(" |").endswith("—")
    assert "noisy decode (IQR 20 % of median)" in rows["w8a8"]
    assert "under load (load average 3.5 on 2 CPUs)" in rows["int4_all"]
    assert "1.00x" in rows["bf16"] and "process CPU time" in text


def test_plots_render_from_the_results(default_study, tmp_path):
    from attnres_quant.report.plots import plot_accuracy_vs_bits, plot_depth_heatmaps

    view = View(default_study)
    made = plot_accuracy_vs_bits(view, tmp_path) + plot_depth_heatmaps(view, tmp_path)
    assert [name for _, name in made] == ["acc_vs_bits_tiny-block.png", "acc_vs_bits_tiny-standard.png",
                                          "depth_heatmap_tiny-block.png"]
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for _, name in made)
