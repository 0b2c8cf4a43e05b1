"""lm-eval conventions (issue 21, item 2): batch_size auto, fractional limits, chat templates, user
include paths, the request cache and lm-eval's own results JSON -- each tested by its effect."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from attnres_quant.argtypes import limit_value  # noqa: E402
from attnres_quant.errors import UserError  # noqa: E402
from attnres_quant.evaluation import EvalSettings, evaluate  # noqa: E402
from attnres_quant.evaluation import harness  # noqa: E402
from attnres_quant.evaluation import testing as T  # noqa: E402
from attnres_quant.pipeline.config import EvalSettings as ConfigEval  # noqa: E402
from attnres_quant.pipeline.config import load_config  # noqa: E402

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def zoo_block():
    from attnres_quant.loading import load_model

    return load_model("zoo:tiny-block", dtype="float32")


def _right(doc):
    return doc["answer"]


def test_fractional_limit_is_that_share_of_each_task_like_lm_eval():
    s = EvalSettings(limit=0.25, proxy_sizes={"proxy_mc": 40})
    res = evaluate(None, None, ["proxy_mc"], s, lm=T.scripted_lm(choose=_right))["proxy_mc"]
    assert res.n == 10 and res.sample_ids == [f"proxy_mc/{i}" for i in range(10)]
    res = evaluate(None, None, ["proxy_mc"], EvalSettings(limit=0.1, proxy_sizes={"proxy_mc": 25}),
                   lm=T.scripted_lm(choose=_right))["proxy_mc"]
    assert res.n == 3  # lm-eval rounds up: ceil(25 * 0.1)


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, True, "half"])
def test_limits_that_are_neither_counts_nor_fractions_are_refused(bad):
    with pytest.raises(ValueError, match="fraction"):
        ConfigEval(limit=bad)
    assert ConfigEval(limit=0.5).limit == 0.5 and ConfigEval(limit=20.0).limit == 20
    assert limit_value("0.5") == 0.5 and limit_value("20") == 20
    with pytest.raises(argparse.ArgumentTypeError):
        limit_value("1.5")


def test_batch_size_auto_reaches_hflm(zoo_block, monkeypatch):
    assert ConfigEval(batch_size="auto").batch_size == "auto"
    assert ConfigEval(batch_size="auto:2").batch_size == "auto:2"
    with pytest.raises(ValueError, match="auto"):
        ConfigEval(batch_size="big")
    model, tok = zoo_block
    seen = {}
    make = harness.make_lm

    def spy(model, tokenizer, s):
        lm = make(model, tokenizer, s)
        seen["batch_size"], seen["auto"] = s.batch_size, lm.batch_size
        return lm

    monkeypatch.setattr(harness, "make_lm", spy)
    res = evaluate(model, tok, ["proxy_mc"], EvalSettings(batch_size="auto", limit=4, max_length=32))["proxy_mc"]
    assert res.n == 4 and seen["batch_size"] == "auto" and seen["auto"] == "auto"


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_request_cache_answers_a_rerun_without_calling_the_model(zoo_block, tmp_path):
    model, tok = zoo_block
    s = EvalSettings(limit=6, batch_size=4)
    cache = str(tmp_path / "cache" / "tiny-block" / "bf16")
    calls, handle = _count_forwards(model)
    try:
        first = evaluate(model, tok, ["proxy_mc"], s, use_cache=cache)["proxy_mc"]
        n_first = len(calls)
        second = evaluate(model, tok, ["proxy_mc"], s, use_cache=cache)["proxy_mc"]
    finally:
        handle.remove()
    assert n_first > 0 and len(calls) == n_first  # the second run never called the model
    assert (tmp_path / "cache" / "tiny-block" / "bf16_rank0.db").is_file()
    assert second.per_sample == first.per_sample and second.value == first.value


def _contexts(model, tok, s):
    """The contexts lm-eval hands the model for the first two proxy_mc documents."""
    seen = []
    lm = harness.make_lm(model, tok, s)
    real = lm.loglikelihood

    def spy(requests, disable_tqdm=False):
        seen.extend(r.args[0] for r in requests)
        return real(requests, disable_tqdm=disable_tqdm)

    lm.loglikelihood = spy
    evaluate(model, tok, ["proxy_mc"], s, lm=lm)
    return seen


def test_chat_template_system_instruction_and_multiturn_change_the_prompt(zoo_block):
    import copy

    model, tok = zoo_block
    plain = _contexts(model, tok, EvalSettings(limit=2, num_fewshot=1))
    assert not any("<|user|>" in c for c in plain)
    with pytest.raises(UserError, match="no chat template"):
        evaluate(model, tok, ["proxy_mc"], EvalSettings(limit=2, apply_chat_template=True))
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT
    chat = _contexts(model, chat_tok, EvalSettings(limit=2, num_fewshot=1, apply_chat_template=True,
                                                   system_instruction="Answer tersely.",
                                                   fewshot_as_multiturn=True))
    assert all(c.startswith("<|system|>Answer tersely.<|end|><|user|>") for c in chat)
    assert all(c.count("<|user|>") == 2 and c.endswith("<|assistant|>") for c in chat)  # shot as its own turn
    single = _contexts(model, chat_tok, EvalSettings(limit=2, num_fewshot=1, apply_chat_template=True,
                                                     fewshot_as_multiturn=False))
    assert all(c.count("<|user|>") == 1 for c in single)
    with pytest.raises(ValueError, match="apply_chat_template"):
        ConfigEval(fewshot_as_multiturn=True)


def _user_task(folder: Path) -> Path:
    from attnres_quant.evaluation.tasks import write_standalone_task

    path = write_standalone_task("proxy_mc", folder)
    cfg = yaml.safe_load(path.read_text())
    cfg["task"] = "my_quiz"
    path.unlink()
    (folder / "my_quiz.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_include_path_adds_a_user_task_next_to_ours(tmp_path):
    folder = _user_task(tmp_path / "my_tasks")
    s = EvalSettings(limit=5, include_path=[str(folder)])
    res = evaluate(None, None, ["my_quiz", "proxy_mc"], s, lm=T.scripted_lm(choose=_right))
    assert res["my_quiz"].n == 5 and res["my_quiz"].value == 1.0
    assert res["proxy_mc"].n == 5  # ours still there: added to, not replaced
    with pytest.raises(UserError, match="not a folder"):
        evaluate(None, None, ["proxy_mc"], EvalSettings(include_path=[str(tmp_path / "nope")]),
                 lm=T.scripted_lm())


def test_include_path_in_config_is_relative_to_it_and_the_flag_appends(tmp_path):
    (tmp_path / "cfg" / "tasks").mkdir(parents=True)
    (tmp_path / "more").mkdir()
    path = tmp_path / "cfg" / "s.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "zoo:tiny-block"}, "eval": {"include_path": "tasks"}}))
    config, raw = load_config(path, include_path=[str(tmp_path / "more")])
    assert config.eval.include_path == [str(tmp_path / "cfg" / "tasks"), str(tmp_path / "more")]
    assert raw["eval"]["include_path"] == config.eval.include_path  # part of the config fingerprint


def test_lm_eval_results_json_is_merged_per_task_in_lm_evals_format(tmp_path):
    out = tmp_path / "lm_eval" / "results.json"
    folder = _user_task(tmp_path / "my_tasks")
    s = EvalSettings(limit=3, include_path=[str(folder)])
    evaluate(None, None, ["proxy_mc"], s, lm=T.scripted_lm(choose=_right), lm_eval_results=out)
    evaluate(None, None, ["my_quiz"], s, lm=T.scripted_lm(choose=lambda d: 0), lm_eval_results=out)
    data = json.loads(out.read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert set(data[key]) == {"proxy_mc", "my_quiz"}, key
    assert data["results"]["proxy_mc"]["acc,none"] == 1.0
    assert data["configs"]["my_quiz"]["task"] == "my_quiz" and data["n-shot"]["proxy_mc"] == 0
    assert data["n-samples"]["my_quiz"]["effective"] == 3 and "samples" not in data


def test_run_with_cache_include_path_and_fractional_limit(tmp_path, monkeypatch):
    """`run`: --include-path adds a user task, --limit 0.05 takes 5% of each task, lm-eval's results JSON
    lands per variant, and a second run with eval.use_cache answers every request from the cache."""
    from lm_eval.models.huggingface import HFLM

    from attnres_quant.cli import main as cli_main

    ckpt = _tiny_ckpt(tmp_path)
    folder = _user_task(tmp_path / "my_tasks")
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mini", "device": "cpu", "dtype": "float32", "model": {"path": str(ckpt)},
        "variants": [{"name": "w8", "method": "rtn", "default": {"weight": "int8"}}], "tasks": ["proxy_mc"],
        "eval": {"batch_size": 8, "use_cache": True}, "quality": {"enabled": False}, "bench": {"enabled": False}}))
    calls = []
    real = HFLM._model_call
    monkeypatch.setattr(HFLM, "_model_call", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    args = ["run", str(path), "--out", str(tmp_path / "out"), "--limit", "0.05", "--tasks", "proxy_mc,my_quiz",
            "--include-path", str(folder)]
    assert cli_main(args) == 0
    first = len(calls)
    study_dir = tmp_path / "out" / "mini"
    cells = json.loads((study_dir / "results.json").read_text())["cells"]
    assert cells["tiny-block/w8/task:proxy_mc"]["value"]["proxy_mc"]["n"] == 10  # 5% of 200
    assert cells["tiny-block/w8/task:my_quiz"]["value"]["my_quiz"]["n"] == 10
    for variant in ("bf16", "w8"):
        data = json.loads((study_dir / "lm_eval" / "tiny-block" / variant / "results.json").read_text())
        assert set(data["configs"]) == set(data["versions"]) == set(data["n-shot"]) == {"proxy_mc", "my_quiz"}
    assert len(list((study_dir / "lm_eval_cache" / "tiny-block").glob("*_rank0.db"))) == 2
    assert first > 0
    assert cli_main(args) == 0  # a fresh run (no --resume): every request is in the cache
    assert len(calls) == first
    again = json.loads((study_dir / "results.json").read_text())["cells"]
    assert again["tiny-block/w8/task:proxy_mc"]["value"]["proxy_mc"]["per_sample"] == \
        cells["tiny-block/w8/task:proxy_mc"]["value"]["proxy_mc"]["per_sample"]


def _tiny_ckpt(tmp_path):
    import torch

    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    out = tmp_path / "tiny-block"
    tok = T.tiny_tokenizer(vocab_size=320)
    torch.manual_seed(0)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=len(tok),
                        intermediate_size=128, attnres_block_size=2, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AttnResForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
