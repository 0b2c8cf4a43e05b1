"""End-to-end `run`: results cells, report, re-render, resume after a kill, failed variants, bad configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attnres_quant.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from attnres_quant.evaluation.testing import write_tiny_attnres

    return write_tiny_attnres(tmp_path_factory.mktemp("ckpt") / "tiny-block", intermediate_size=128)


def study(tmp_path, ckpt, **over):
    cfg = {
        "name": "mini",
        "seed": 0,
        "device": "cpu",
        "dtype": "float32",
        "model": {"path": str(ckpt)},
        "variants": [
            {"name": "int4_all", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
             "rules": [{"select": "depth.*", "weight": "int4", "group_size": 32},
                       {"select": "depth.sources", "storage": "int4"}]},
            {"name": "int4_hybrid", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
             "rules": [{"select": "depth.*", "weight": "bf16"}]},
        ],
        "tasks": ["proxy_mc"],
        "eval": {"batch_size": 8, "limit": 6},
        "quality": {"max_tokens": 200, "seq_len": 64},
        "bench": {"prompt_len": 8, "decode_tokens": 2, "warmup": 0, "repeats": 1, "threads": 1},
    }
    cfg.update(over)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path, out, *extra):
    return cli_main(["run", str(path), "--out", str(out), *extra])


def task_values(results):
    return {k: v["value"] for k, v in results["cells"].items() if "/task:" in k}


def test_run_writes_every_cell_and_a_report_that_rerenders(tmp_path, tiny_ckpt):
    out = tmp_path / "reports"
    assert run(study(tmp_path, tiny_ckpt, tasks=["proxy_mc", "proxy_math"]), out) == 0
    results = json.loads((out / "mini" / "results.json").read_text())
    cells = results["cells"]
    for variant in ("bf16", "int4_all", "int4_hybrid"):
        for cell in ("plan", "task:proxy_mc", "task:proxy_math", "quality", "depth", "latency"):
            assert cells[f"tiny-block/{variant}/{cell}"]["status"] == "ok", (variant, cell)
    # Hybrid keeps the depth path at baseline precision; int4_all does not.
    hybrid_q = cells["tiny-block/int4_hybrid/quality"]["value"]
    all_q = cells["tiny-block/int4_all/quality"]["value"]
    assert all_q["depth_js_mean"] > hybrid_q["depth_js_mean"]
    assert cells["tiny-block/int4_all/latency"]["value"]["simulated"] is True
    assert cells["tiny-block/bf16/latency"]["value"]["simulated"] is False
    report = (out / "mini.md").read_text()
    for heading in ("# Quantization study: mini", "### Task scores", "### Quality vs baseline",
                    "### Latency and memory", "### Precision plans", "## Plots"):
        assert heading in report
    assert "simulated" in report and (out / "mini" / "depth_heatmap_tiny-block.png").exists()
    # lm-eval's per-sample records for every task cell, linked from the report; n-shot recorded
    from attnres_quant.evaluation.harness import read_samples

    task_cells = [k for k in cells if "/task:" in k]
    assert len(task_cells) == 6
    for key in task_cells:
        _, variant, cell = key.split("/")
        task = cell.split(":", 1)[1]
        r = cells[key]["value"][task]
        assert r["samples_path"] == f"samples/tiny-block/{variant}/{task}.jsonl.gz"
        recs = read_samples(out / "mini" / r["samples_path"])
        assert [x["doc_id"] for x in recs] == list(range(6)) and r["num_fewshot"] == 0
        assert {"arguments", "target", "resps", "filtered_resps", r["metric"]} <= set(recs[0])
        assert [x[r["metric"]] for x in recs] == r["per_sample"]
        assert f"(mini/samples/tiny-block/{variant}/{task}.jsonl.gz)" in report
    assert cells["tiny-block/bf16/task:proxy_math"]["value"]["proxy_math"]["max_gen_toks"] == 16
    assert "#### Task settings" in report and "n-shot" in report
    assert (out / "mini" / "results.csv").exists()
    # Re-rendering from results.json alone reproduces the report byte for byte (no model needed:
    # loading one fails here).
    import attnres_quant.loading as loading

    before = report
    saved = loading.load_model
    loading.load_model = lambda *a, **k: pytest.fail("re-rendering loaded a model")
    try:
        assert cli_main(["report", str(out / "mini" / "results.json")]) == 0
    finally:
        loading.load_model = saved
    assert (out / "mini.md").read_text() == before


def test_resume_after_kill_skips_finished_cells(tmp_path, tiny_ckpt, monkeypatch):
    import attnres_quant.evaluation as evaluation

    path = study(tmp_path, tiny_ckpt, bench={"enabled": False})
    out = tmp_path / "reports"
    real = evaluation.evaluate
    calls = []

    def killed_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # baseline and int4_all finished; killed inside int4_hybrid
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", killed_on_third)
    assert run(path, out) == 130
    partial = json.loads((out / "mini" / "results.json").read_text())
    assert "tiny-block/int4_all/task:proxy_mc" in partial["cells"]
    assert "tiny-block/int4_hybrid/task:proxy_mc" not in partial["cells"]

    counted = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (counted.append(1), real(*a, **k))[1])
    assert run(path, out, "--resume") == 0
    assert len(counted) == 1, "only the unfinished task cell is recomputed"
    resumed = json.loads((out / "mini" / "results.json").read_text())
    for key, value in partial["cells"].items():
        assert resumed["cells"][key] == value, f"finished cell {key} was recomputed"

    fresh_out = tmp_path / "fresh"
    monkeypatch.setattr(evaluation, "evaluate", real)
    assert run(path, fresh_out) == 0
    fresh = json.loads((fresh_out / "mini" / "results.json").read_text())
    assert task_values(fresh) == task_values(resumed)


def test_nan_variant_is_marked_failed_and_others_continue(tmp_path, tiny_ckpt, monkeypatch):
    import attnres_quant.quant as quant

    real = quant.quantize

    def poison(model, variant, *args, **kwargs):
        q = real(model, variant, *args, **kwargs)
        if variant.name == "int4_all":
            with torch.no_grad():
                q.model.lm_head.weight.fill_(float("nan"))
        return q

    monkeypatch.setattr(quant, "quantize", poison)
    out = tmp_path / "reports"
    assert run(study(tmp_path, tiny_ckpt, bench={"enabled": False}), out) == 0
    cells = json.loads((out / "mini" / "results.json").read_text())["cells"]
    status = cells["tiny-block/int4_all/status"]
    assert status["status"] == "failed" and "non-finite" in status["value"]["reason"]
    assert cells["tiny-block/int4_hybrid/task:proxy_mc"]["status"] == "ok"
    assert "failed" in (out / "mini.md").read_text()


@pytest.mark.parametrize("mutate,expect", [
    (lambda c: c.update(evaluation={"limit": 2}), "unknown key"),
    (lambda c: c["variants"][0]["default"].update(weight="int3"), "unknown weight precision 'int3'"),
    (lambda c: c["variants"][1]["rules"].append({"select": "attn.q", "layers": [7], "weight": "int8"}),
     "matches nothing"),
    (lambda c: c["model"].update(path="/nonexistent/ckpt"), "does not exist"),
    (lambda c: c.update(tasks=["proxy_code"]), "allow_code_execution"),
])
def test_malformed_configs_fail_fast_with_one_paragraph(tmp_path, tiny_ckpt, capsys, mutate, expect):
    path = study(tmp_path, tiny_ckpt)
    cfg = yaml.safe_load(path.read_text())
    mutate(cfg)
    path.write_text(yaml.safe_dump(cfg))
    assert run(path, tmp_path / "reports") == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert err.startswith("error: ") and "Traceback" not in err and err.strip().count("\n") == 0
    assert not (tmp_path / "reports" / "mini" / "results.json").exists(), "nothing runs before validation"


def test_missing_config_file_in_a_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attnres_quant", "run", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("quality,alive", [(False, 1), (True, 2), ({"kl_top_k": "all"}, 1)])
def test_variants_quantize_a_fresh_load_in_place_never_a_second_copy(tmp_path, tiny_ckpt, monkeypatch, quality, alive):
    """Memory: each variant is a fresh load quantized in place; the baseline stays resident only for the
    quality step (KL against the variant) when it has no saved baseline (`kl_top_k`), otherwise one model
    is alive when a variant is quantized."""
    import gc
    import weakref

    import attnres_quant.quant as quant
    from attnres_quant.pipeline import runner

    loaded, seen = [], []
    real_load, real_quantize = runner.load_baseline, quant.quantize

    def tracking_load(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, tok

    def tracking_quantize(model, variant, *args, **kwargs):
        gc.collect()
        seen.append((sum(r() is not None for r in loaded), kwargs.get("inplace")))
        q = real_quantize(model, variant, *args, **kwargs)
        assert q.model is model  # quantized in place: quantize made no copy
        return q

    monkeypatch.setattr(runner, "load_baseline", tracking_load)
    monkeypatch.setattr(quant, "quantize", tracking_quantize)
    out = tmp_path / "reports"
    extra = quality if isinstance(quality, dict) else {"enabled": quality}
    cfg = study(tmp_path, tiny_ckpt, bench={"enabled": False}, quality={**extra, "max_tokens": 200, "seq_len": 64})
    assert run(cfg, out) == 0
    assert seen == [(alive, True), (alive, True)]
    assert len(loaded) == 3  # the baseline, then one fresh load per variant
    gc.collect()
    assert all(r() is None for r in loaded)  # nothing kept after the run
    cells = json.loads((out / "mini" / "results.json").read_text())["cells"]
    assert cells["tiny-block/int4_all/status"]["status"] == "ok"


def test_saved_baseline_all_gives_the_resident_baselines_quality_cells(tmp_path, tiny_ckpt):
    """`quality.kl_top_k: all` frees the baseline during variants, and every quality figure (KL statistics,
    perplexities, agreement, depth JS) equals the resident-baseline run's."""
    cells = {}
    for name, extra in (("resident", {}), ("saved", {"kl_top_k": "all"})):
        out = tmp_path / name
        (tmp_path / f"c{name}").mkdir()
        cfg = study(tmp_path / f"c{name}", tiny_ckpt, bench={"enabled": False},
                    quality={**extra, "max_tokens": 200, "seq_len": 64})
        assert run(cfg, out) == 0
        cells[name] = json.loads((out / "mini" / "results.json").read_text())["cells"]
    keys = [k for k, c in cells["resident"].items() if k.endswith("/quality") and "kl_mean" in c["value"]]
    assert keys
    for key in keys:
        a, b = cells["resident"][key]["value"], cells["saved"][key]["value"]
        assert b["kl_source"] == "exact, from the saved baseline" and a["kl_source"] == "exact"
        assert b["depth_js"] is not None and len(b["depth_js"]) == len(a["depth_js"])
        for k, v in a.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (key, k)
        for x, y in zip(a["depth_js"], b["depth_js"]):
            assert y == pytest.approx(x, rel=1e-6, abs=1e-12)
