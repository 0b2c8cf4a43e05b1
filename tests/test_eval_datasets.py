"""Local benchmark copies: the layouts users get from the hub, read without lm-eval."""

from __future__ import annotations

import json

import pytest

from attnres_quant.errors import UserError
from attnres_quant.evaluation import datasets as D
from attnres_quant.evaluation import testing as T


def test_hub_cache_folder_uses_its_snapshot(tmp_path):
    snap = tmp_path / "datasets--cais--mmlu" / "snapshots" / "abc123"
    T.write_mmlu(snap, n_test=3, n_dev=1, subjects=("anatomy",))
    rows = D.load_split(tmp_path / "datasets--cais--mmlu", "mmlu", "anatomy", "test")
    assert [r["question"] for r in rows] == ["anatomy q0", "anatomy q1", "anatomy q2"]
    assert rows[1]["choices"] == ["test1 option 0", "test1 option 1", "test1 option 2", "test1 option 3"]
    assert rows[1]["answer"] == 1


def test_gpqa_single_csv_file_and_folder(tmp_path):
    T.write_gpqa(tmp_path, n=3)
    for root in (tmp_path, tmp_path / "gpqa_diamond.csv"):
        rows = D.load_split(root, "gpqa", "gpqa_diamond", "train")
        assert len(rows) == 3 and rows[2]["Correct Answer"] == "right 2"


def test_math_original_release_nested(tmp_path):
    folder = tmp_path / "MATH" / "test" / "geometry"
    folder.mkdir(parents=True)
    (folder / "7.json").write_text(json.dumps({"problem": "p", "level": "Level 2", "type": "Geometry",
                                               "solution": "$\\boxed{3}$"}))
    assert D.load_split(tmp_path, "math", "geometry", "test")[0]["solution"] == "$\\boxed{3}$"


def test_jsonl_per_config_and_schema_check(tmp_path):
    (tmp_path / "algebra").mkdir()
    (tmp_path / "algebra" / "test.jsonl").write_text(json.dumps({"problem": "p", "solution": "s"}) + "\n")
    assert D.load_split(tmp_path, "math", "algebra", "test") == [{"problem": "p", "solution": "s"}]
    (tmp_path / "geometry").mkdir()
    (tmp_path / "geometry" / "test.jsonl").write_text(json.dumps({"question": "p"}) + "\n")
    with pytest.raises(UserError, match="lacks columns"):
        D.load_split(tmp_path, "math", "geometry", "test")
    with pytest.raises(UserError, match="no 'precalculus' test split"):
        D.load_split(tmp_path, "math", "precalculus", "test")
