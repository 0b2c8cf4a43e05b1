"""Study config validation, --set overrides and the atomic results store."""

import json

import pytest

from attnres_quant.errors import UserError
from attnres_quant.pipeline.config import load_config
from attnres_quant.pipeline.results import ResultStore

GOOD = """
model: {path: zoo:tiny-block}
variants:
  - name: int4
    method: rtn
    default: {weight: int4, group_size: 32}
tasks: [proxy_mc]
eval: {limit: 8}
"""


def write(tmp_path, text, name="study.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_config_defaults_and_name(tmp_path):
    cfg, raw = load_config(write(tmp_path, GOOD))
    assert cfg.name == "study"
    assert [m.path for m in cfg.models] == ["zoo:tiny-block"]
    assert cfg.models[0].label == "tiny-block"
    assert cfg.tasks[0].name == "proxy_mc" and cfg.eval.limit == 8
    assert cfg.eval.allow_code_execution is False  # consent is never implied


def test_set_overrides_nested_and_typed(tmp_path):
    cfg, raw = load_config(write(tmp_path, GOOD), ["model.path=/ckpt/x", "eval.limit=3", "seed=7"])
    assert cfg.models[0].path == "/ckpt/x" and cfg.eval.limit == 3 and cfg.seed == 7
    assert raw["model"]["path"] == "/ckpt/x"


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, GOOD + "eval_settings: {limit: 3}\n")
    with pytest.raises(UserError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "eval_settings" in msg and "unknown key" in msg and str(p) in msg and "Fix:" in msg


def test_bad_value_and_nested_unknown_key(tmp_path):
    with pytest.raises(UserError, match=r"eval\.batch_size"):
        load_config(write(tmp_path, GOOD.replace("{limit: 8}", "{limit: 8, batch_size: 0}")))
    with pytest.raises(UserError, match=r"eval\.batchsize.*unknown key"):
        load_config(write(tmp_path, GOOD.replace("{limit: 8}", "{batchsize: 2}")))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {path: [unclosed\n"))


def test_no_model_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no model given"):
        load_config(write(tmp_path, "tasks: [proxy_mc]\n"))


def test_bad_set_syntax(tmp_path):
    with pytest.raises(UserError, match="has no `=`"):
        load_config(write(tmp_path, GOOD), ["model.path"])
    with pytest.raises(UserError, match="not an index"):
        load_config(write(tmp_path, "models: [{path: a}]\n"), ["models.3.path=b"])


def test_result_store_atomic_roundtrip_and_csv(tmp_path):
    path = tmp_path / "r" / "results.json"
    store = ResultStore(path)
    store.put("m", "v", "task:x", {"x": {"value": 0.5, "n": 4}})
    store.put("m", "v", "quality", {"bpb": float("nan"), "kl_mean": 0.1})
    store.put("m", "w", "status", {"reason": "boom"}, status="failed")
    again = ResultStore.load(path)
    assert again.done("m", "v", "task:x") and not again.done("m", "w", "status")
    assert again.variant_failed("m", "w")["value"]["reason"] == "boom"
    # NaN is stored as a string so the file is standard JSON.
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert "kl_mean" in path.with_suffix(".csv").read_text()
    assert not list(path.parent.glob("*.tmp"))
