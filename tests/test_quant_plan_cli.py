"""`python -m attnres_quant plan CONFIG`: table, json, and UserErrors before any model loading."""

import json

import pytest
import torch

from attnres_quant import cli
from attnres_quant.quant.testing import tiny_attnres

CONFIG = """
model: {path: zoo:tiny-block}
variants:
  - name: int4_hybrid
    method: rtn
    default: {weight: int4, group_size: 32, activation: bf16}
    rules:
      - select: depth.*
        weight: bf16
        compute: bf16
      - select: lm_head
        weight: int8
  - name: w8a8
    method: rtn
    default: {weight: int8, activation: int8}
"""


@pytest.fixture
def fake_loader(monkeypatch):
    import attnres_quant.loading as loading

    calls = []

    def load_model(path, **kw):
        calls.append(path)
        return tiny_attnres(layers=2), None

    def structure_model(path, **kw):
        calls.append(path)
        with torch.device("meta"):
            return tiny_attnres(layers=2, seed=0)

    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(loading, "structure_model", structure_model)
    return calls


def test_plan_cli_prints_table(tmp_path, fake_loader, capsys):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(CONFIG)
    assert cli.main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "variant int4_hybrid" in out and "variant w8a8" in out
    assert "model.layers.0.attn.q_proj.weight" in out and "g32 sym" in out
    assert "rules[0] (select: depth.*)" in out and "int8 per-token dyn" in out
    assert "bits/weight on average" in out
    assert fake_loader == ["zoo:tiny-block"]


def test_plan_cli_json(tmp_path, fake_loader, capsys):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(CONFIG)
    assert cli.main(["plan", str(cfg), "--variant", "w8a8", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 1 and data[0]["variant"] == "w8a8"
    assert any(r["component"] == "depth.softmax" for r in data[0]["rows"])


def test_plan_cli_bad_rule_fails_before_loading(tmp_path, fake_loader, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(CONFIG + "    rules:\n      - {select: mlp.gates, weight: int4}\n")
    assert cli.main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown component 'mlp.gates'" in err and "bad.yaml" in err and "variant 'w8a8'" in err
    assert fake_loader == []
