"""Issue 21 (ecosystem conventions): `import attnres_quant` registers the model with transformers' Auto
classes and stays light; `--version`; bare `python -m attnres_quant`; `report` on a study folder;
the Python API `attnres_quant.run_study`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnres_quant
from attnres_quant.api import Study, override_args, run_study
from attnres_quant.cli import main as cli_main
from attnres_quant.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "attnres_quant" / "zoo" / "tiny-block"


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


# --------------------------------------------------------------------------- Auto classes
def test_import_is_light_and_auto_classes_load_our_checkpoints_after_it():
    proc = _python(f"""
        import sys
        import attnres_quant
        heavy = sorted(m for m in ("torch", "transformers", "lm_eval", "attnres_quant.model") if m in sys.modules)
        assert not heavy, heavy
        from transformers import AutoConfig, AutoModelForCausalLM
        import torch
        assert AutoConfig.from_pretrained({str(ZOO)!r}).model_type == "attnres"
        model = AutoModelForCausalLM.from_pretrained({str(ZOO)!r})
        from attnres_quant.model import AttnResForCausalLM
        assert type(model) is AttnResForCausalLM, type(model)
        ref = AttnResForCausalLM.from_pretrained({str(ZOO)!r})
        ids = torch.arange(1, 17).unsqueeze(0)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        assert not any(type(f).__module__ == "attnres_quant._autoregister" for f in sys.meta_path)
        print("OK")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


@pytest.mark.parametrize("before", [
    "from transformers import AutoConfig",  # auto classes loaded first: registered at once
    "import transformers",                  # transformers loaded, its auto classes not yet
])
def test_auto_classes_work_whatever_was_imported_first(before):
    proc = _python(f"""
        {before}
        import attnres_quant
        import transformers
        config = transformers.AutoConfig.from_pretrained({str(ZOO)!r})
        model = transformers.AutoModelForCausalLM.from_pretrained({str(ZOO)!r})
        assert config.model_type == "attnres" and type(model).__name__ == "AttnResForCausalLM"
        print("OK")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


# --------------------------------------------------------------------------- CLI conventions
def test_version_flag(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"attnres_quant {attnres_quant.__version__}"
    proc = subprocess.run([sys.executable, "-m", "attnres_quant", "--version"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"attnres_quant {attnres_quant.__version__}"


def test_bare_invocation_prints_help_and_exits_2_while_help_exits_0():
    bare = subprocess.run([sys.executable, "-m", "attnres_quant"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert bare.returncode == 2
    assert "usage: python -m attnres_quant" in bare.stderr and "report" in bare.stderr
    assert "Traceback" not in bare.stderr
    helped = subprocess.run([sys.executable, "-m", "attnres_quant", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert helped.returncode == 0 and "usage: python -m attnres_quant" in helped.stdout


def test_report_of_a_folder_without_results_is_one_paragraph(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no results.json" in err and "Traceback" not in err and err.strip().count("\n") == 0


# --------------------------------------------------------------------------- Python API
def test_override_args_merge_mappings_and_accept_double_underscores():
    assert override_args({"eval": {"limit": 2, "batch_size": 4}, "model__path": "/ckpt", "bench": {"enabled": False}}) \
        == ["eval.limit=2", "eval.batch_size=4", 'model.path="/ckpt"', "bench.enabled=false"]


def _tiny_ckpt(out: Path) -> Path:
    from attnres_quant.evaluation.testing import tiny_tokenizer
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    tok = tiny_tokenizer(vocab_size=320)
    torch.manual_seed(0)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=len(tok),
                        intermediate_size=128, attnres_block_size=2, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AttnResForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_run_study_returns_results_and_report_and_report_accepts_the_folder(tmp_path, one_thread, capsys):
    ckpt = _tiny_ckpt(tmp_path / "tiny-block")
    config = {
        "name": "api", "seed": 0, "device": "cpu", "dtype": "float32", "model": {"path": "/not/used"},
        "variants": [{"name": "int4", "method": "rtn", "default": {"weight": "int4", "group_size": 32}}],
        "tasks": ["proxy_mc"], "eval": {"batch_size": 8, "limit": 5},
        "quality": {"max_tokens": 96, "seq_len": 32}, "bench": {"enabled": True},
    }
    out = tmp_path / "reports"
    study = run_study(config, out=out, limit=3, model={"path": str(ckpt)}, bench__enabled=False)
    assert isinstance(study, Study) and study.name == "api"
    assert study.results_path == out / "api" / "results.json" and study.report_path == out / "api.md"
    assert study.report_path.is_file() and json.loads(study.results_path.read_text()) == study.results
    assert study.cells["tiny-block/int4/task:proxy_mc"]["status"] == "ok"
    assert study.cells["tiny-block/int4/task:proxy_mc"]["limit"] == 3          # limit= is --limit
    assert "tiny-block/int4/latency" not in study.cells                         # bench__enabled=False applied
    assert study.value("tiny-block", "int4", "quality")["kl_mean"] >= 0
    assert study.results["meta"]["models"][0]["path"] == str(ckpt)              # model={...} merged
    assert attnres_quant.run_study is run_study

    # `report` accepts the study folder (with or without a trailing slash) and renders the same report
    first = study.report_path.read_text()
    study.report_path.unlink()
    capsys.readouterr()
    assert cli_main(["report", str(out / "api") + "/"]) == 0
    assert capsys.readouterr().out.strip() == str(study.report_path)
    assert study.report_path.read_text() == first


def test_run_study_raises_user_errors_before_any_model_work(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_study(tmp_path / "missing.yaml", out=tmp_path / "out")
    with pytest.raises(UserError, match="limit"):
        run_study({"model": {"path": "zoo:tiny-block"}}, out=tmp_path / "out", limit=0)
    with pytest.raises(UserError):
        run_study({"model": {"path": "zoo:tiny-block"}, "no_such_key": 1}, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
