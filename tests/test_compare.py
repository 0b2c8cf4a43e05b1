"""`compare A B` (issue 21, item 4): Δ table between two studies, paired CIs where the documents align."""

from __future__ import annotations

import csv
import json
import math

import pytest

from attnres_quant.cli import main as cli_main
from attnres_quant.compare import Z95, compare_results
from attnres_quant.evaluation import stats


def task(per_sample, ids, metric="acc", extra=None):
    n = len(per_sample)
    value = sum(per_sample) / n
    r = {"metric": metric, "value": value, "stderr": stats.mean_stderr(per_sample), "n": n,
         "per_sample": per_sample, "sample_ids": ids, "filter": "none",
         "metrics": {f"{metric},none": value, f"{metric}_stderr,none": stats.mean_stderr(per_sample)},
         "per_sample_by": {}}
    for name, vec in (extra or {}).items():
        r["metrics"][f"{name},none"] = sum(vec) / len(vec)
        r["metrics"][f"{name}_stderr,none"] = stats.mean_stderr(vec)
        r["per_sample_by"][f"{name},none"] = vec
    return r


def study(name, cells):
    return {"schema": 2, "meta": {"name": name, "finished": "2026-11-29T10:00:00+00:00"},
            "cells": {k: {"status": "ok", "value": v, "wall_s": 1.0} for k, v in cells.items()}}


MC_A = [1.0] * 30 + [0.0] * 10
MC_IDS = [f"proxy_mc/{i}" for i in range(40)]
MC_B = [0.0] * 6 + [1.0] * 24 + [1.0] * 2 + [0.0] * 8   # 6 right->wrong, 2 wrong->right
MATH_A = [1.0, 0.0] * 10                                  # 20 docs
MATH_B = [1.0, 1.0, 0.0, 0.0] * 5                         # 20 docs ... but B ran 20 other documents


@pytest.fixture
def two_studies(tmp_path):
    a = study("a", {
        "tiny/int4/task:proxy_mc": {"proxy_mc": task(MC_A, MC_IDS, extra={"acc_norm": MC_A[::-1]})},
        "tiny/int4/task:proxy_math": {"proxy_math": task(MATH_A, [f"proxy_math/{i}" for i in range(20)],
                                                         "exact_match")},
        "tiny/bf16/task:proxy_mc": {"proxy_mc": task(MC_A, MC_IDS)},
    })
    b = study("b", {
        # B's documents in another order: pairing goes by document id, not by position
        "tiny/int4/task:proxy_mc": {"proxy_mc": task(MC_B[::-1], MC_IDS[::-1], extra={"acc_norm": MC_A})},
        "tiny/int4/task:proxy_math": {"proxy_math": task(MATH_B, [f"proxy_math/{i}" for i in range(20, 40)],
                                                         "exact_match")},
        "tiny/w8/task:proxy_mc": {"proxy_mc": task(MC_A, MC_IDS)},
    })
    for name, data in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    return tmp_path, a, b


def test_paired_rows_use_the_documents_and_unpaired_rows_say_why(two_studies):
    _, a, b = two_studies
    rows, notes = compare_results(a, b)
    by = {(r["variant"], r["task"], r["metric"]): r for r in rows}
    assert set(by) == {("int4", "proxy_mc", "acc"), ("int4", "proxy_mc", "acc_norm"),
                       ("int4", "proxy_math", "exact_match")}
    mc = by["int4", "proxy_mc", "acc"]
    assert mc["pairing"] == "paired (40 docs)"
    assert mc["delta"] == pytest.approx(sum(MC_B) / 40 - sum(MC_A) / 40)
    assert (mc["correct_to_wrong"], mc["wrong_to_correct"]) == (6, 2)
    assert (mc["ci_lo"], mc["ci_hi"]) == pytest.approx(stats.paired_delta(MC_A, MC_B)[1:])
    assert mc["ci_lo"] < mc["delta"] < mc["ci_hi"]
    assert by["int4", "proxy_mc", "acc_norm"]["pairing"].startswith("paired")
    math_row = by["int4", "proxy_math", "exact_match"]
    assert math_row["pairing"] == "unpaired (different documents: 20 vs 20, 0 in common)"
    half = Z95 * math.sqrt(stats.mean_stderr(MATH_A) ** 2 + stats.mean_stderr(MATH_B) ** 2)
    assert (math_row["ci_lo"], math_row["ci_hi"]) == pytest.approx((-half, half))
    assert math_row["correct_to_wrong"] is None
    assert notes == ["only in A (some or all metrics): tiny/bf16/proxy_mc",
                     "only in B (some or all metrics): tiny/w8/proxy_mc"]


def test_compare_verb_accepts_folders_prints_and_writes_only_with_out(two_studies, capsys, monkeypatch):
    tmp_path, _, _ = two_studies
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli_main(["compare", "a", "b/results.json"]) == 0
    printed = capsys.readouterr().out
    assert "| tiny | int4 | proxy_mc | acc |" in printed and "paired (40 docs)" in printed
    assert "only in A (some or all metrics): tiny/bf16/proxy_mc" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # print only: nothing written
    assert cli_main(["compare", "a", "b", "--out", "cmp"]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert len(rows) == 3 and rows[0]["pairing"]
    assert {r["metric"] for r in rows} == {"acc", "acc_norm", "exact_match"}


def test_compare_bad_inputs_are_one_paragraph(two_studies, capsys):
    tmp_path, _, _ = two_studies
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    assert "has no results.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
