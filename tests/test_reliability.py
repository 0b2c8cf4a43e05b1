"""Issue 15: bad input and faults never lose a finished result, never write outside the output folder,
never end in a traceback.

Every bad input below runs through ``attnres_quant.cli.main`` in-process (fast) and is checked for:
the exit code, a message of at most a few lines, no "Traceback", no file written outside the sandbox's
``out`` folder, and the finished results already in ``out`` unchanged.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from attnres_quant.cli import main as cli_main
from attnres_quant.model import AttnResConfig, AttnResForCausalLM
from attnres_quant.pipeline.results import SCHEMA_VERSION, ResultStore, load_results

MAX_LINES = 4


# --------------------------------------------------------------------------- fixtures
def _make_ckpt(out: Path, block_size, seed=0):
    from attnres_quant.evaluation.testing import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=320)
    torch.manual_seed(seed)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=len(tok),
                        intermediate_size=128, attnres_block_size=block_size, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AttnResForCausalLM(cfg)
    if block_size:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "res_proj" in name:
                    p.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """One torch thread for the whole module: forked children (lock and SIGKILL tests) must use one
    thread (see _fork), and an interrupted-then-resumed run must compute exactly what the
    uninterrupted reference computed, which needs the same thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"block": _make_ckpt(root / "tiny-block", 2), "standard": _make_ckpt(root / "tiny-standard", None, 1)}


def study_dict(ckpts, two_models=False, **over):
    cfg = {
        "name": "mini", "seed": 0, "device": "cpu", "dtype": "float32",
        "variants": [{"name": "int4", "method": "rtn", "default": {"weight": "int4", "group_size": 32}}],
        "tasks": ["proxy_mc"],
        "eval": {"batch_size": 8, "limit": 3},
        "quality": {"max_tokens": 96, "seq_len": 32},
        "bench": {"enabled": False},
    }
    if two_models:
        cfg["models"] = [{"path": str(ckpts["block"]), "name": "a"}, {"path": str(ckpts["standard"]), "name": "b"}]
    else:
        cfg["model"] = {"path": str(ckpts["block"])}
    cfg.update(over)
    return cfg


def write_yaml(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(root: Path, exclude: Path) -> dict[str, bytes]:
    """Every file under root except under ``exclude`` (the output folder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and exclude not in p.parents:
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


FINISHED = {
    "schema": SCHEMA_VERSION,
    "meta": {"config_name": "mini", "baseline": "bf16", "variants": [], "tasks": ["proxy_mc"],
             "models": [{"path": "zoo:tiny-block", "label": "tiny-block"}]},
    "cells": {"tiny-block/bf16/task:proxy_mc": {
        "status": "ok", "value": {"proxy_mc": {"metric": "acc", "value": 0.5, "stderr": 0.1, "n": 4,
                                               "per_sample": [1, 0, 1, 0]}},
        "provenance": {"git_commit": "abc", "versions": {"torch": "2.13.0"}}}},
}


@pytest.fixture
def sandbox(tmp_path, ckpts):
    """tmp/ with a config, an out/ holding a finished study, and a file to check nothing escapes."""
    out = tmp_path / "out"
    (out / "mini").mkdir(parents=True)
    finished = json.dumps(FINISHED, indent=1)
    (out / "mini" / "results.json").write_text(finished)
    (out / "mini.md").write_text("# finished report\n")
    (tmp_path / "victim.txt").write_text("do not touch\n")
    config = write_yaml(tmp_path / "mini.yaml", study_dict(ckpts))
    two = write_yaml(tmp_path / "two.yaml", study_dict(ckpts, two_models=True))
    return {"root": tmp_path, "out": out, "config": config, "two": two, "finished": finished}


def _cells_kept(out: Path) -> bool:
    """The finished cell is still on disk: in results.json or in a kept earlier copy."""
    for p in (out / "mini").glob("results*.json"):
        try:
            if json.loads(p.read_text())["cells"].get("tiny-block/bf16/task:proxy_mc") == \
                    FINISHED["cells"]["tiny-block/bf16/task:proxy_mc"]:
                return True
        except (ValueError, KeyError):
            pass
    return False


def check_clean(capsys, sandbox, rc, expect_rc, expect_text, before):
    captured = capsys.readouterr()
    err = (captured.err + captured.out) if expect_rc else captured.err
    assert rc == expect_rc, err
    assert "Traceback" not in captured.err + captured.out
    if expect_rc:
        lines = [line for line in captured.err.strip().splitlines() if line.strip()]
        assert 1 <= len(lines) <= MAX_LINES, captured.err
        assert len(captured.err) < 2500, f"message of {len(captured.err)} characters"
    for text in ([expect_text] if isinstance(expect_text, str) else expect_text):
        assert text in captured.err + captured.out, captured.err
    after = snapshot(sandbox["root"], sandbox["out"])
    assert after == before, "a file outside --out was written or changed: " + \
        ", ".join(sorted(set(after) ^ set(before)) or [k for k in after if after[k] != before.get(k)])
    assert _cells_kept(sandbox["out"]), "a finished cell was lost"
    if expect_rc:
        assert (sandbox["out"] / "mini" / "results.json").read_text() == sandbox["finished"]
        assert (sandbox["out"] / "mini.md").read_text() == "# finished report\n"


# --------------------------------------------------------------------------- bad inputs, in-process
def _binary(sb):
    p = sb["root"] / "binary.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    return p


def _bomb(sb, levels=9):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"description: *a{levels - 1}")
    p = sb["root"] / "bomb.yaml"
    p.write_text(sb["config"].read_text() + "\n".join(lines) + "\n")
    return p


def _recursive(sb):
    p = sb["root"] / "rec.yaml"
    p.write_text(sb["config"].read_text() + "datasets: &d {x: *d}\n")
    return p


def _deep(sb):
    p = sb["root"] / "deep.yaml"
    p.write_text(sb["config"].read_text() + "description: " + "[" * 5000 + "]" * 5000 + "\n")
    return p


def _huge_datasets(sb):
    p = sb["root"] / "huge.yaml"
    with open(p, "w") as fh:
        fh.write(sb["config"].read_text() + "datasets:\n")
        for i in range(400_000):
            fh.write(f"  k{i}: /data/x{i}\n")
    return p


def _with(sb, **over):
    cfg = yaml.safe_load(sb["config"].read_text())
    for key, value in over.items():
        cfg[key] = value
    return write_yaml(sb["root"] / "variant.yaml", cfg)


def _model_named(sb, name):
    cfg = yaml.safe_load(sb["config"].read_text())
    cfg["model"]["name"] = name
    return write_yaml(sb["root"] / "named.yaml", cfg)


def _variant_named(sb, name):
    cfg = yaml.safe_load(sb["config"].read_text())
    cfg["variants"][0]["name"] = name
    return write_yaml(sb["root"] / "vnamed.yaml", cfg)


def _list_config(sb):
    p = sb["root"] / "list.yaml"
    p.write_text("- a\n- b\n")
    return p


def _results(sb, content: bytes | str):
    p = sb["out"] / "other" / "results.json"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _damaged(mutate):
    data = copy.deepcopy(FINISHED)
    mutate(data)
    return json.dumps(data)


RUN = "run"
# (id, argv builder, expected rc, expected text in the output)
CASES = [
    # 1. config readers
    ("binary-config-run", lambda sb: [RUN, str(_binary(sb)), "--out", str(sb["out"])], 2, "binary"),
    ("binary-config-plan", lambda sb: ["plan", str(_binary(sb))], 2, "binary"),
    ("binary-config-train", lambda sb: ["train", str(_binary(sb))], 2, "binary"),
    ("set-unclosed-list", lambda sb: [RUN, str(sb["config"]), "--set", "eval.limit=[", "--out", str(sb["out"])],
     2, "not valid YAML"),
    ("set-into-scalar", lambda sb: [RUN, str(sb["config"]), "--set", "seed.x=1", "--out", str(sb["out"])],
     2, "`seed` is a number"),
    ("set-two-deep-into-scalar", lambda sb: [RUN, str(sb["config"]), "--set", "eval.batch_size.x.y=1",
                                             "--out", str(sb["out"])], 2, "`eval.batch_size` is a number"),
    ("set-empty-key", lambda sb: [RUN, str(sb["config"]), "--set", "=1", "--out", str(sb["out"])], 2, "empty"),
    ("set-plan-bad-yaml", lambda sb: ["plan", str(sb["config"]), "--set", "variants=[{"], 2, "not valid YAML"),
    ("config-is-a-list", lambda sb: [RUN, str(_list_config(sb)), "--out", str(sb["out"])], 2, "YAML mapping"),
    # 2. overrides do what the user reads
    ("model-path-on-two-models", lambda sb: [RUN, str(sb["two"]), "--set", "model.path=/x", "--out",
                                             str(sb["out"])], 2, "models.N.path"),
    ("limit-zero", lambda sb: [RUN, str(sb["config"]), "--limit", "0", "--out", str(sb["out"])], 2, "--limit"),
    ("limit-text", lambda sb: [RUN, str(sb["config"]), "--limit", "abc", "--out", str(sb["out"])], 2, "--limit"),
    ("tasks-empty", lambda sb: [RUN, str(sb["config"]), "--tasks", ",", "--out", str(sb["out"])], 2, "--tasks"),
    ("tasks-unknown", lambda sb: [RUN, str(sb["config"]), "--tasks", "no_such_task", "--out", str(sb["out"])],
     2, "no_such_task"),
    # 4. names never become paths outside --out
    ("name-dotdot", lambda sb: [RUN, str(sb["config"]), "--set", "name=../victim", "--out", str(sb["out"])],
     2, "not a safe name"),
    ("name-absolute", lambda sb: [RUN, str(sb["config"]), "--set", f"name={sb['root']}/x", "--out", str(sb["out"])],
     2, "not a safe name"),
    ("model-name-slash", lambda sb: [RUN, str(_model_named(sb, "a/b")), "--out", str(sb["out"])], 2,
     "not a safe name"),
    ("variant-name-slash", lambda sb: [RUN, str(_variant_named(sb, "a/b")), "--out", str(sb["out"])], 2,
     "not a safe name"),
    ("baseline-name-dotdot", lambda sb: [RUN, str(_with(sb, baseline={"name": ".."})), "--out", str(sb["out"])],
     2, "not a safe name"),
    # 12. alias bombs and other oversized YAML
    ("alias-bomb", lambda sb: [RUN, str(_bomb(sb)), "--out", str(sb["out"])], 2, "too large"),
    ("alias-bomb-plan", lambda sb: ["plan", str(_bomb(sb))], 2, "too large"),
    ("recursive-alias", lambda sb: [RUN, str(_recursive(sb)), "--out", str(sb["out"])], 2, "refers to itself"),
    ("deep-nesting", lambda sb: [RUN, str(_deep(sb)), "--out", str(sb["out"])], 2, "YAML"),
    ("huge-datasets-mapping", lambda sb: [RUN, str(_huge_datasets(sb)), "--out", str(sb["out"])], 2, "bytes"),
    ("set-alias-bomb", lambda sb: [RUN, str(sb["config"]), "--set",
                                   "description=" + "{a: &a [x,x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]"
                                   + ", c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]"
                                   + ", e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}", "--out", str(sb["out"])], 2, "too large"),
    # 7. damaged results.json: report refuses and overwrites nothing
    ("report-truncated", lambda sb: ["report", str(_results(sb, sb["finished"][:50]))], 2, "not valid JSON"),
    ("report-list", lambda sb: ["report", str(_results(sb, "[]"))], 2, "not an object"),
    ("report-empty-object", lambda sb: ["report", str(_results(sb, "{}"))], 2, "schema"),
    ("report-missing-cells", lambda sb: ["report", str(_results(sb, _damaged(lambda d: d.pop("cells"))))], 2,
     "`cells`"),
    ("report-binary", lambda sb: ["report", str(_results(sb, bytes(range(256))))], 2, "binary"),
    ("report-wrong-types", lambda sb: ["report", str(_results(sb, _damaged(
        lambda d: d["cells"]["tiny-block/bf16/task:proxy_mc"]["value"]["proxy_mc"].update(value="high"))))], 2,
     "not a number"),
    ("report-bad-status", lambda sb: ["report", str(_results(sb, _damaged(
        lambda d: d["cells"]["tiny-block/bf16/task:proxy_mc"].update(status=3))))], 2, "status"),
    ("report-unsafe-model-name", lambda sb: ["report", str(_results(sb, _damaged(
        lambda d: d["meta"]["models"][0].update(label="../../x"))))], 2, "safe name"),
    ("report-schema-99", lambda sb: ["report", str(_results(sb, _damaged(lambda d: d.update(schema=99))))], 2,
     "schema"),
    ("report-missing-file", lambda sb: ["report", str(sb["root"] / "nope" / "results.json")], 2, "does not exist"),
    ("report-nan-stats-valid", lambda sb: ["report", str(_results(sb, _damaged(
        lambda d: d["cells"]["tiny-block/bf16/task:proxy_mc"]["value"]["proxy_mc"].update(stderr=None)))),
        "--out", str(sb["out"] / "other.md")], 0, ""),
    # 13. bench validates every argument before any work
    ("bench-layers-negative", lambda sb: ["bench", "overhead", "--layers", "-1"], 2, "--layers"),
    ("bench-hidden-zero", lambda sb: ["bench", "overhead", "--hidden-size", "0"], 2, "--hidden-size"),
    ("bench-heads-3", lambda sb: ["bench", "overhead", "--num-heads", "3"], 2, "multiple"),
    ("bench-batch-zero", lambda sb: ["bench", "overhead", "--batch-size", "0"], 2, "--batch-size"),
    ("bench-repeats-zero", lambda sb: ["bench", "kernels", "--repeats", "0"], 2, "--repeats"),
    ("bench-warmup-negative", lambda sb: ["bench", "kernels", "--warmup", "-2"], 2, "--warmup"),
    ("bench-device-tpu", lambda sb: ["bench", "overhead", "--device", "tpu"], 2, "tpu"),
    ("bench-dtype-int3", lambda sb: ["bench", "overhead", "--dtype", "int3"], 2, "int3"),
    ("bench-block-size-odd", lambda sb: ["bench", "overhead", "--block-size", "3"], 2, "--block-size"),
    ("bench-seq-len-zero", lambda sb: ["bench", "kernels", "--seq-len", "0"], 2, "--seq-len"),
    ("bench-output-missing-folder", lambda sb: ["bench", "overhead", "--output", str(sb["out"] / "no" / "x.json")],
     2, "does not exist"),
    ("bench-output-is-folder", lambda sb: ["bench", "overhead", "--output", str(sb["out"])], 2, "is a folder"),
    # train
    ("train-set-bad-yaml", lambda sb: ["train", "configs/train/tiny_block.yaml", "--set", "train.lr=["], 2,
     "not valid YAML"),
    ("train-set-into-scalar", lambda sb: ["train", "configs/train/tiny_block.yaml", "--set", "train.lr.x=1"], 2,
     "unknown config key"),
    ("train-set-wrong-type", lambda sb: ["train", "configs/train/tiny_block.yaml", "--set", "train.steps=abc"], 2,
     "whole number"),
    ("train-steps-zero", lambda sb: ["train", "configs/train/tiny_block.yaml", "--steps", "0"], 2, "--steps"),
    ("train-section-not-mapping", lambda sb: ["train", str(_with_train(sb, "model: 5\n"))], 2, "mapping"),
    ("train-alias-bomb", lambda sb: ["train", str(_bomb(sb))], 2, "too large"),
    # 11. output folder problems
    ("out-is-a-file", lambda sb: [RUN, str(sb["config"]), "--out", str(sb["out"] / "mini.md")], 2, "file"),
    # unknown verb / no args
    ("unknown-verb", lambda sb: ["frobnicate"], 2, "unknown verb"),
    ("run-no-config", lambda sb: [RUN], 2, "config"),
]


def _with_train(sb, text):
    p = sb["root"] / "train.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("argv,expect_rc,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_paragraph(sandbox, capsys, monkeypatch, argv, expect_rc, expect):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = argv(sandbox)
    before = snapshot(sandbox["root"], sandbox["out"])
    capsys.readouterr()
    rc = cli_main(args)
    check_clean(capsys, sandbox, rc, expect_rc, expect, before)


def test_adversarial_case_count():
    """The parametrized suite above is the adversarial list of issue 15 (plus the run-level cases below)."""
    assert len(CASES) >= 50


# --------------------------------------------------------------------------- overrides that do what they say
def test_model_path_replaces_the_model_of_a_one_model_study(tmp_path, ckpts):
    from attnres_quant.pipeline.config import load_config

    cfg = study_dict(ckpts, two_models=True)
    cfg["models"] = cfg["models"][:1]
    path = write_yaml(tmp_path / "one.yaml", cfg)
    config, raw = load_config(path, ["model.path=/ckpt/other"])
    assert [m.path for m in config.models] == ["/ckpt/other"] and "model" not in raw
    two = write_yaml(tmp_path / "two.yaml", study_dict(ckpts, two_models=True))
    config, _ = load_config(two, ["models.1.path=/x"])
    assert [m.path for m in config.models] == [str(ckpts["block"]), "/x"]


def test_limit_flag_and_command_line_limit_override_per_task_limits(tmp_path, ckpts):
    from attnres_quant.pipeline.config import load_config

    path = write_yaml(tmp_path / "s.yaml", study_dict(ckpts, tasks=[{"name": "proxy_mc", "limit": 50},
                                                                     {"name": "proxy_math", "limit": 9}]))
    config, _ = load_config(path)
    assert [t.limit for t in config.tasks] == [50, 9]  # in the file, the specific setting wins
    config, _ = load_config(path, limit=4)
    assert config.eval.limit == 4 and [t.limit for t in config.tasks] == [None, None]
    config, _ = load_config(path, ["eval.limit=5"])
    assert config.eval.limit == 5 and [t.limit for t in config.tasks] == [None, None]
    config, _ = load_config(path, tasks=["proxy_math", "proxy_code"])
    assert [(t.name, t.limit) for t in config.tasks] == [("proxy_math", 9), ("proxy_code", None)]


def test_derived_names_are_made_safe(tmp_path, ckpts):
    from attnres_quant.pipeline.config import load_config

    cfg = study_dict(ckpts)
    del cfg["name"]
    cfg["model"] = {"path": "/some where/my model!"}
    config, _ = load_config(write_yaml(tmp_path / "odd name!.yaml", cfg))
    assert config.name == "odd_name_" and config.models[0].label == "my_model_"


# --------------------------------------------------------------------------- results store
def test_results_json_is_0644_and_non_finite_is_null(tmp_path):
    old = os.umask(0o022)
    try:
        store = ResultStore(tmp_path / "s" / "results.json", provenance={"git_commit": "x", "versions": {}})
        store.put("m", "v", "task:t", {"t": {"value": 1.0, "stderr": float("nan"), "n": 1}})
    finally:
        os.umask(old)
    assert (tmp_path / "s" / "results.json").stat().st_mode & 0o777 == 0o644
    data = json.loads((tmp_path / "s" / "results.json").read_text())
    assert data["cells"]["m/v/task:t"]["value"]["t"]["stderr"] is None
    assert data["cells"]["m/v/task:t"]["provenance"]["git_commit"] == "x"
    assert load_results(tmp_path / "s" / "results.json")["schema"] == SCHEMA_VERSION


def test_schema_1_files_still_render(tmp_path):
    """Committed reports were written with schema 1 ("nan" strings): they load, with null for the strings."""
    data = copy.deepcopy(FINISHED)
    data["schema"] = 1
    data["cells"]["tiny-block/bf16/task:proxy_mc"]["value"]["proxy_mc"]["stderr"] = "nan"
    path = tmp_path / "r" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    loaded = load_results(path)
    assert loaded["cells"]["tiny-block/bf16/task:proxy_mc"]["value"]["proxy_mc"]["stderr"] is None
    assert cli_main(["report", str(path)]) == 0
    assert "n/a" in (tmp_path / "r.md").read_text()


def test_disk_full_mid_write_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results.json")
    store.put("m", "v", "a", 1)
    before = (tmp_path / "results.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    from attnres_quant.errors import UserError

    with pytest.raises(UserError, match="disk is full"):
        store.put("m", "v", "b", 2)
    assert (tmp_path / "results.json").read_bytes() == before
    assert "m/v/b" not in store.cells and not list(tmp_path.glob("*.tmp"))


def test_read_only_output_folder_is_one_paragraph(sandbox, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if sandbox["out"] in (self, *self.parents) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    before = snapshot(sandbox["root"], sandbox["out"])
    rc = cli_main([RUN, str(sandbox["config"]), "--set", "name=fresh", "--out", str(sandbox["out"])])
    check_clean(capsys, sandbox, rc, 2, "read-only", before)


def test_bench_output_write_failure_prints_the_numbers_first(tmp_path, capsys, monkeypatch):
    import attnres_quant.bench.cli as bench_cli
    import attnres_quant.bench.overhead as overhead

    monkeypatch.setattr(overhead, "run_overhead", lambda **k: {"fake": 1})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    rc = cli_main(["bench", "overhead", "--json", "--output", str(tmp_path / "b.json"), "--layers", "1",
                   "--dtype", "float32", "--batch-size", "1"])  # one run: its JSON is run_overhead's own
    out = capsys.readouterr()
    assert rc == 2 and '"fake": 1' in out.out and "read-only" in out.err and "Traceback" not in out.err
    assert bench_cli  # imported for the patch target's module
    assert not (tmp_path / "b.json").exists()


# --------------------------------------------------------------------------- convert
def test_convert_overwrite_removes_only_checkpoint_files(tmp_path, ckpts, capsys):
    target = tmp_path / "conv"
    assert cli_main(["convert", str(ckpts["standard"]), str(target), "-S", "2", "--verify", "no"]) == 0
    (target / "NOTES.md").write_text("mine\n")
    (target / "model-00009-of-00009.safetensors").write_bytes(b"stale shard")
    assert cli_main(["convert", str(ckpts["standard"]), str(target), "-S", "4", "--verify", "no",
                     "--overwrite"]) == 0
    assert (target / "NOTES.md").read_text() == "mine\n"
    assert not (target / "model-00009-of-00009.safetensors").exists()
    assert json.loads((target / "config.json").read_text())["attnres_block_size"] == 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("keep\n")
    capsys.readouterr()
    assert cli_main(["convert", str(ckpts["standard"]), str(other), "-S", "2", "--overwrite"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert (other / "data.txt").read_text() == "keep\n"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli_main(["convert", str(ckpts["standard"]), str(afile), "-S", "2"]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "x"


def test_convert_into_read_only_folder_is_one_paragraph(tmp_path, ckpts, capsys, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    rc = cli_main(["convert", str(ckpts["standard"]), str(tmp_path / "ro" / "out"), "-S", "2", "--verify", "no"])
    err = capsys.readouterr().err
    assert rc == 2 and "read-only" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- malicious pickle
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_with_allow_pickle_is_refused_naming_the_file(sandbox, ckpts, capsys):
    import shutil

    bad = sandbox["root"] / "evil"
    shutil.copytree(ckpts["block"], bad)
    (bad / "model.safetensors").unlink()
    marker = sandbox["root"] / "PWNED"
    with open(bad / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embeddings.weight": _Payload(marker)}, fh)
    cfg = study_dict(ckpts)
    cfg["model"] = {"path": str(bad), "allow_pickle": True}
    config = write_yaml(sandbox["root"] / "evil.yaml", cfg)
    rc = cli_main([RUN, str(config), "--set", "name=evil", "--out", str(sandbox["out"])])
    err = capsys.readouterr().err
    assert rc == 2 and "pytorch_model.bin" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= MAX_LINES
    assert not marker.exists(), "the payload ran"
    assert (sandbox["out"] / "mini" / "results.json").read_text() == sandbox["finished"]


# --------------------------------------------------------------------------- run-level faults
def run(config, out, *extra):
    return cli_main([RUN, str(config), "--out", str(out), *extra])


def test_nan_baseline_fails_its_model_the_other_continues_and_n1_stats_render(tmp_path, ckpts, capsys, monkeypatch):
    import attnres_quant.loading as loading

    real = loading.load_model

    def poisoned(path, **kw):
        model, tok = real(path, **kw)
        if path == str(ckpts["block"]):
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))
        return model, tok

    monkeypatch.setattr(loading, "load_model", poisoned)
    config = write_yaml(tmp_path / "two.yaml", study_dict(ckpts, two_models=True, eval={"batch_size": 4, "limit": 1}))
    out = tmp_path / "out"
    assert run(config, out) == 0
    cells = json.loads((out / "mini" / "results.json").read_text())["cells"]
    assert cells["a/bf16/status"]["status"] == "failed" and "non-finite" in cells["a/bf16/status"]["value"]["reason"]
    assert cells["a/int4/status"]["status"] == "failed"
    assert cells["b/int4/task:proxy_mc"]["status"] == "ok"
    assert cells["b/bf16/task:proxy_mc"]["value"]["proxy_mc"]["stderr"] is None  # n=1: no standard error
    report = (out / "mini.md").read_text()
    assert "Baseline failed" in report and "n/a" in report
    assert "sample limit per task: proxy_mc 1" in report
    assert cli_main(["report", str(out / "mini" / "results.json")]) == 0


def test_resume_refuses_another_schema_and_reports_mixed_provenance(tmp_path, ckpts, capsys):
    config = write_yaml(tmp_path / "s.yaml", study_dict(ckpts, variants=[]))
    out = tmp_path / "out"
    assert run(config, out) == 0
    path = out / "mini" / "results.json"
    data = json.loads(path.read_text())
    # Cells of another commit/torch: resume keeps them and the report says so.
    data["cells"]["tiny-block/bf16/plan"]["provenance"] = {"git_commit": "0ldc0de", "versions": {"torch": "2.0"}}
    del data["cells"]["tiny-block/bf16/quality"]
    path.write_text(json.dumps(data))
    assert run(config, out, "--resume") == 0
    report = (out / "mini.md").read_text()
    assert "Mixed provenance" in report and "0ldc0de" in report
    # Another schema: refused, file untouched.
    data = json.loads(path.read_text())
    data["schema"] = 99
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    capsys.readouterr()
    assert run(config, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "schema" in err and "Traceback" not in err and path.read_bytes() == before


def test_two_restarts_without_resume_keep_every_earlier_result(tmp_path, ckpts):
    config = write_yaml(tmp_path / "s.yaml", study_dict(ckpts, variants=[], quality={"enabled": False}))
    out = tmp_path / "out"
    for _ in range(3):
        assert run(config, out) == 0
    files = sorted((out / "mini").glob("results*.json"))
    assert len(files) == 3, files
    for f in files:
        assert load_results(f)["cells"]["tiny-block/bf16/task:proxy_mc"]["status"] == "ok"


def test_interrupt_message_is_true(tmp_path, ckpts, capsys, monkeypatch):
    import attnres_quant.evaluation as evaluation

    real = evaluation.evaluate
    calls = []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "evaluate", interrupt_second)
    config = write_yaml(tmp_path / "s.yaml", study_dict(ckpts, quality={"enabled": False}))
    out = tmp_path / "out"
    assert run(config, out) == 130
    err = capsys.readouterr().err
    path = out / "mini" / "results.json"
    assert str(path) in err and "--resume" in err
    finished = sum(c["status"] == "ok" for c in load_results(path)["cells"].values())
    assert f"{finished} finished cells" in err
    assert not (out / "mini" / ".lock").exists()


# --------------------------------------------------------------------------- lock
def _fork(fn) -> int:
    """Run ``fn`` in a forked child (modules already imported: fast); returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            # The parent's OpenMP thread pool does not survive fork(): a child entering a parallel
            # region after the parent ran multi-threaded torch ops hangs. One thread never does.
            import torch

            torch.set_num_threads(1)
            code = fn()
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code if isinstance(code, int) else 1)
    return pid


def _wait(pid, timeout=300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def test_second_concurrent_run_is_refused_and_the_first_finishes(tmp_path, ckpts, capsys, monkeypatch):
    import attnres_quant.evaluation as evaluation

    config = write_yaml(tmp_path / "s.yaml", study_dict(ckpts, variants=[], quality={"enabled": False}))
    out = tmp_path / "out"
    go = tmp_path / "go"
    real = evaluation.evaluate

    def first():
        def gated(*a, **k):
            while not go.exists():
                time.sleep(0.05)
            return real(*a, **k)

        monkeypatch.setattr(evaluation, "evaluate", gated)
        return run(config, out)

    pid = _fork(first)
    try:
        lock = out / "mini" / ".lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text()):
            assert time.time() < deadline, "first run never took the lock"
            time.sleep(0.05)
        capsys.readouterr()
        assert run(config, out) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and str(pid) in err and "Traceback" not in err
    finally:
        go.write_text("go")
    assert _wait(pid) == 0
    cells = load_results(out / "mini" / "results.json")["cells"]
    assert cells["tiny-block/bf16/task:proxy_mc"]["status"] == "ok"
    assert len(list((out / "mini").glob("results*.json"))) == 1, "the refused run moved nothing aside"


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, ckpts, capsys):
    config = write_yaml(tmp_path / "s.yaml", study_dict(ckpts, variants=[], quality={"enabled": False}))
    out = tmp_path / "out"
    (out / "mini").mkdir(parents=True)
    dead = _fork(lambda: 0)
    _wait(dead)
    import socket

    (out / "mini" / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                                    "started": "2026-01-01T00:00:00+00:00", "command": "x"}))
    assert run(config, out) == 0
    assert "stale lock" in capsys.readouterr().out


# --------------------------------------------------------------------------- SIGKILL, then --resume
def _strip_timing(report: str) -> str:
    """Timing and where-it-ran lines aside (date, wall time, load average at start, the config's tmp path)."""
    return "\n".join(line for line in report.splitlines()
                     if not any(f"**{k}**" in line for k in ("wall time", "date", "Device", "Config")))


def _kill_then_resume(tmp_path, ckpts, monkeypatch, kill_after_puts: int, reference: dict):
    config = write_yaml(tmp_path / "two.yaml", study_dict(ckpts, two_models=True))
    out = tmp_path / f"out{kill_after_puts}"

    def killed():
        real_put = ResultStore.put
        count = []

        def put(self, *a, **k):
            real_put(self, *a, **k)
            count.append(1)
            if len(count) == kill_after_puts:
                os.kill(os.getpid(), signal.SIGKILL)

        monkeypatch.setattr(ResultStore, "put", put)
        return run(config, out)

    assert _wait(_fork(killed)) == -signal.SIGKILL
    partial = json.loads((out / "mini" / "results.json").read_text())
    assert partial["cells"], "the kill came before any cell"
    assert run(config, out, "--resume") == 0
    resumed = json.loads((out / "mini" / "results.json").read_text())
    for key, value in partial["cells"].items():
        assert json.dumps(resumed["cells"][key]) == json.dumps(value), f"finished cell {key} changed"
    assert set(resumed["cells"]) == set(reference["cells"])
    for key, value in reference["cells"].items():
        a, b = copy.deepcopy(value), copy.deepcopy(resumed["cells"][key])
        for entry in (a, b):
            entry.pop("wall_s", None)
            if key.endswith("/status") and isinstance(entry.get("value"), dict):
                entry["value"].pop("wall_s", None)
        assert a == b, key
    assert _strip_timing((out / "mini.md").read_text()) == _strip_timing(reference["report"])
    return len(partial["cells"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ckpts):
    tmp = tmp_path_factory.mktemp("ref")
    config = write_yaml(tmp / "two.yaml", study_dict(ckpts, two_models=True))
    assert run(config, tmp / "out") == 0
    return {"cells": json.loads((tmp / "out" / "mini" / "results.json").read_text())["cells"],
            "report": (tmp / "out" / "mini.md").read_text()}


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, ckpts, monkeypatch, uninterrupted):
    # Killed inside the second model's baseline (after model a finished).
    assert _kill_then_resume(tmp_path, ckpts, monkeypatch, 10, uninterrupted) == 10


@pytest.mark.parametrize("kill_after", [2, 6, 12])  # a's baseline; a's variant; b's variant
def test_sigkill_at_three_points_then_resume(tmp_path, ckpts, monkeypatch, uninterrupted, kill_after):
    assert _kill_then_resume(tmp_path, ckpts, monkeypatch, kill_after, uninterrupted) == kill_after


def test_disk_full_during_a_run_stops_cleanly_and_resume_finishes(tmp_path, ckpts, capsys, monkeypatch):
    config = write_yaml(tmp_path / "s.yaml", study_dict(ckpts))
    out = tmp_path / "out"
    real_fsync = os.fsync
    calls = []

    def fills_up(fd):
        calls.append(1)
        if len(calls) > 9:  # meta, then a few cells (each cell = results.json + results.csv)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fills_up)
    assert run(config, out) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "--resume" in errors[0] and "Traceback" not in err
    partial = load_results(out / "mini" / "results.json")  # still valid
    assert partial["cells"] and not list((out / "mini").glob("*.tmp"))
    assert not (out / "mini" / ".lock").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert run(config, out, "--resume") == 0
    resumed = load_results(out / "mini" / "results.json")
    for key, value in partial["cells"].items():
        assert resumed["cells"][key] == value, key
    assert resumed["cells"]["tiny-block/int4/status"]["status"] == "ok"


@pytest.mark.parametrize("damage", [lambda s: s[: len(s) // 2], lambda s: "[]", lambda s: "\x00\x01binary",
                                    lambda s: s.replace('"cells"', '"cellz"')],
                         ids=["truncated", "list", "binary", "no-cells"])
def test_resume_on_a_damaged_results_file_is_refused_and_overwrites_nothing(sandbox, capsys, damage):
    path = sandbox["out"] / "mini" / "results.json"
    path.write_text(damage(sandbox["finished"]))
    before = path.read_bytes()
    rc = cli_main([RUN, str(sandbox["config"]), "--resume", "--out", str(sandbox["out"])])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "results" in errors[0] and "Traceback" not in err, err
    assert path.read_bytes() == before and (sandbox["out"] / "mini.md").read_text() == "# finished report\n"
    assert sorted(p.name for p in (sandbox["out"] / "mini").iterdir()) == ["results.json"]
