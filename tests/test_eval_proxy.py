"""The proxy suite through lm-eval: real HFLM around an in-memory model, and scripted answers."""

from __future__ import annotations

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("lm_eval")
proxy_tasks = pytest.importorskip("attnres_quant.data.proxy_tasks")

from attnres_quant.evaluation import EvalSettings, evaluate  # noqa: E402
from attnres_quant.evaluation import testing as T  # noqa: E402
from attnres_quant.evaluation.tasks import PROXY_SIZES  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    import datasets

    datasets.disable_progress_bars()


def test_proxy_test_sets_are_fixed_and_sized():
    from attnres_quant.evaluation.tasks import load_proxy_code, load_proxy_math, load_proxy_mc

    assert PROXY_SIZES == {"proxy_mc": 200, "proxy_code": 100, "proxy_math": 200}
    mc = load_proxy_mc()["test"]
    assert len(mc) == 200 and mc[0] == proxy_tasks.generate("proxy_mc", "test", 1, seed=0)[0]
    assert len(load_proxy_code()["test"]) == 100 and len(load_proxy_math()["test"]) == 200
    assert len(load_proxy_mc(aq_proxy_sizes={"proxy_mc": 7})["test"]) == 7


def test_proxy_suite_scripted_answers_known_scores():
    """Scripted model: right on even docs for MC, canonical code on the first half, right math on 3 of 4."""
    mc_prompts = []

    def choose(doc):
        mc_prompts.append(proxy_tasks.format_mc_prompt(doc))
        i = int(doc["id"].rsplit("/", 1)[1])
        return doc["answer"] if i % 2 == 0 else (doc["answer"] + 1) % 4

    def gen(doc, ctx):
        if "task_id" in doc:  # proxy_code
            assert ctx == proxy_tasks.format_code_prompt(doc)
            i = int(doc["task_id"].rsplit("/", 1)[1])
            return doc["canonical_solution"] if i < 5 else "    return None\n"
        assert ctx == proxy_tasks.format_math_prompt(doc)
        i = int(doc["id"].rsplit("/", 1)[1])
        return " " + (doc["answer"] if i % 4 else "nope")

    s = EvalSettings(limit=10, allow_code_execution=True)
    res = evaluate(None, None, ["proxy_suite"], s, lm=T.scripted_lm(choose, gen))
    assert list(res) == ["proxy_mc", "proxy_code", "proxy_math"]
    assert (res["proxy_mc"].metric, res["proxy_mc"].value, res["proxy_mc"].n) == ("acc", 0.5, 10)
    assert "acc_norm" in res["proxy_mc"].extra
    assert (res["proxy_code"].metric, res["proxy_code"].value) == ("pass@1", 0.5)
    assert res["proxy_code"].per_sample == [1.0] * 5 + [0.0] * 5
    assert (res["proxy_math"].metric, res["proxy_math"].value) == ("exact_match", pytest.approx(0.7))


def test_in_memory_attnres_model_through_hflm():
    """HFLM wraps the model object itself; scores are valid and deterministic across runs."""
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    tok = T.tiny_tokenizer()
    torch.manual_seed(0)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=len(tok),
                        attnres_block_size=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AttnResForCausalLM(cfg).eval()
    s = EvalSettings(limit=6, batch_size=4, allow_code_execution=True, gen_kwargs={"max_gen_toks": 8})
    a = evaluate(model, tok, ["proxy_mc", "proxy_math", "proxy_code"], s)
    b = evaluate(model, tok, ["proxy_mc", "proxy_math", "proxy_code"], s)
    for name in a:
        assert a[name].n == 6 and 0.0 <= a[name].value <= 1.0
        assert a[name].per_sample == b[name].per_sample
    assert a["proxy_code"].value == 0.0  # 8 random tokens do not write working code


def test_proxy_few_shot_comes_from_train_items():
    contexts = []

    def gen(doc, ctx):
        contexts.append(ctx)
        return " " + doc["answer"]

    res = evaluate(None, None, ["proxy_math"], EvalSettings(limit=3, num_fewshot=2), lm=T.scripted_lm(generate=gen))
    assert res["proxy_math"].value == 1.0
    train = proxy_tasks.generate("proxy_math", "train", 2, seed=0)
    shots = "".join(proxy_tasks.format_math_prompt(d) + " " + d["answer"] + "\n\n" for d in train)
    assert all(c.startswith(shots) and c.count("Problem:") == 3 for c in contexts)


def test_task_yamls_ship_inside_the_package():
    """The YAMLs are package data (wheel installs carry them); eval/ at the root links to them."""
    import os
    import pathlib

    import attnres_quant
    from attnres_quant.evaluation import tasks

    pkg = pathlib.Path(attnres_quant.__file__).parent
    if not os.environ.get("ATTNRES_EVAL_DIR"):
        assert tasks.EVAL_DIR.resolve() == (pkg / "eval_tasks").resolve()
    assert (pkg / "eval_tasks" / "proxy" / "proxy_mc.yaml").is_file()
    assert '"eval_tasks/**/*"' in (pkg.parent / "pyproject.toml").read_text()
    assert (pkg.parent / "eval").resolve() == (pkg / "eval_tasks").resolve()
