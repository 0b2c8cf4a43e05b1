"""Self-describing checkpoints (issue 21, item 1): saved AttnRes checkpoints carry ``auto_map`` and
the modelling code, so plain transformers / lm-eval load them with ``trust_remote_code=True``
on a machine without attnres_quant."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnres_quant.model.remote_code import (AUTO_CLASSES, auto_map, shipped_files, stale_remote_code,
                                             write_remote_code)

ZOO = Path(__file__).resolve().parents[1] / "attnres_quant" / "zoo"
SHIPPED = {"configuration_attnres.py", "depth.py", "modeling_attnres.py"}


def _without_package_env(tmp_path: Path) -> dict:
    """Environment whose ``import attnres_quant`` fails: a stub package first on PYTHONPATH."""
    stub = tmp_path / "stub" / "attnres_quant"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("attnres_quant is not installed here (test stub)")\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(stub.parent), HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.parametrize("name", ["tiny-block", "tiny-standard"])
def test_committed_zoo_ships_exactly_what_the_package_writes_now(name):
    assert stale_remote_code(ZOO / name) == [], \
        f"run `python -m attnres_quant.model.remote_code attnres_quant/zoo/{name}` and commit the result"
    config = json.loads((ZOO / name / "config.json").read_text())
    assert config["auto_map"] == auto_map("attnres")


def test_shipped_code_is_the_package_modules_and_only_imports_siblings():
    files = shipped_files()
    assert set(files) == SHIPPED
    model_dir = Path(__file__).resolve().parents[1] / "attnres_quant" / "model"
    for name, text in files.items():
        assert text.endswith((model_dir / name).read_text())  # a header, then the module verbatim
        assert not re.search(r"^\s*(from|import)\s+attnres_quant", text, re.M)


def test_write_remote_code_refuses_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        write_remote_code(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_transformers_loads_the_copy_without_the_package_and_our_loader_uses_the_package(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ZOO / "tiny-block", ckpt)
    script = (
        "import torch, sys\n"
        "torch.set_num_threads(1)  # same reduction order as the in-process side\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        "assert type(m).__module__.startswith('transformers_modules.'), type(m).__module__\n"
        "ids = torch.tensor([[5, 17, 99, 3, 250]])\n"
        "with torch.no_grad():\n    torch.save(m(ids).logits, sys.argv[1])\n"
        "try:\n    import attnres_quant\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('package importable')\n")
    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=_without_package_env(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    import torch

    from attnres_quant.loading import load_model

    # our loader: the package's classes, never the copy (no trust_remote_code needed, no refusal)
    model, _ = load_model(str(ckpt), dtype="float32")
    assert type(model).__module__ == "attnres_quant.model.modeling_attnres"
    threads = torch.get_num_threads()  # earlier tests may have changed it: float sums depend on it
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ours = model(torch.tensor([[5, 17, 99, 3, 250]])).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.load(out), ours)


def test_convert_and_export_write_self_describing_checkpoints(tmp_path):
    from attnres_quant.convert import convert_checkpoint
    from attnres_quant.export import export_variant
    from attnres_quant.loading import load_model
    from attnres_quant.quant.policy import parse_variant

    src = tmp_path / "std"
    shutil.copytree(ZOO / "tiny-standard", src)
    for name in SHIPPED:  # a source without shipped code: the output still gets it
        (src / name).unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("auto_map")
    (src / "config.json").write_text(json.dumps(cfg))
    card = convert_checkpoint(str(src), tmp_path / "conv", block_size=4, verify="no")
    assert card["attnres_block_size"] == 4
    assert stale_remote_code(tmp_path / "conv") == []
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["auto_map"] == auto_map("transformer")
    # --overwrite replaces the shipped files with the rest of the checkpoint
    (tmp_path / "conv" / "depth.py").write_text("# stale\n")
    convert_checkpoint(str(src), tmp_path / "conv", block_size=4, verify="no", overwrite=True)
    assert stale_remote_code(tmp_path / "conv") == []

    model, tok = load_model(str(tmp_path / "conv"), dtype="float32")
    export_variant(model, parse_variant({"name": "w8", "default": {"weight": "int8"}}),
                   tmp_path / "exp", tokenizer=tok)
    assert stale_remote_code(tmp_path / "exp") == []
    assert set(AUTO_CLASSES) == {"attnres", "transformer"}


def test_lm_eval_cli_scores_the_zoo_copy_without_the_package_as_our_pipeline_does(tmp_path, one_thread):
    """The issue's must-show: plain lm-eval, trust_remote_code=True, no attnres_quant; same scores."""
    from attnres_quant.evaluation import evaluate
    from attnres_quant.evaluation.tasks import write_standalone_task
    from attnres_quant.loading import load_model

    ckpt = tmp_path / "tiny-block"
    shutil.copytree(ZOO / "tiny-block", ckpt)
    task_dir = tmp_path / "task"
    write_standalone_task("proxy_mc", task_dir)
    out_dir = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={ckpt},trust_remote_code=True",  # dtype auto: the bf16 weights
           "--tasks", "proxy_mc", "--include_path", str(task_dir), "--limit", "20", "--batch_size", "8",
           "--device", "cpu", "--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.run(cmd, env=_without_package_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results_file] = list(out_dir.rglob("results_*.json"))
    theirs = json.loads(results_file.read_text())["results"]["proxy_mc"]
    [samples_file] = list(out_dir.rglob("samples_proxy_mc_*.jsonl"))
    their_docs = sorted((json.loads(line) for line in samples_file.read_text().splitlines()),
                        key=lambda r: r["doc_id"])

    model, tokenizer = load_model("zoo:tiny-block", dtype="bfloat16")  # what the pipeline evaluates
    ours = evaluate(model, tokenizer, ["proxy_mc"], {"limit": 20, "batch_size": 8})["proxy_mc"]
    assert ours.n == len(their_docs) == 20
    assert ours.value == theirs["acc,none"]
    assert ours.metrics["acc_norm,none"] == theirs["acc_norm,none"]
    assert ours.per_sample == [float(r["acc"]) for r in their_docs]
