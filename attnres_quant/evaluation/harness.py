"""Task evaluation of an in-memory model through lm-evaluation-harness.

:func:`evaluate` wraps the (possibly quantized) model object in lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` with per-sample logging; each task comes back as a
:class:`TaskResult` whose ``per_sample`` list (0/1 correctness, ordered by subtask then
``doc_id``) feeds flips and paired confidence intervals. :func:`preflight` checks everything
that does not need the model (task names, datasets, code-execution consent) and is meant to be
called before any model is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from attnres_quant.errors import UserError
from attnres_quant.evaluation import datasets as local
from attnres_quant.evaluation import humaneval as he
from attnres_quant.evaluation import stats
from attnres_quant.evaluation.tasks import (EVAL_DIR, GROUPS, PROXY_SIZES, TASKS, TaskSpec, catalogue, expand,
                                            spec_for, subtask_of)

log = logging.getLogger(__name__)


class _DropCustomKwargsHint(logging.Filter):
    """lm-eval repeats a CLI hint for every task with a custom loader (57 times for MMLU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in str(record.msg)


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomKwargsHint())


class EvalSettings(BaseModel):
    """Evaluation settings (the ``eval`` section of a study config)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    limit: int | float | None = Field(None, description="max docs per (sub)task; <1 = fraction")
    num_fewshot: int | None = Field(None, ge=0, description="None = each task's default")
    seed: int = Field(1234, description="python/numpy/torch/few-shot seeds of lm-eval")
    gen_kwargs: dict[str, Any] = Field(default_factory=dict,
                                       description="generation overrides, e.g. {max_gen_toks: 256}")
    allow_code_execution: bool = Field(False, description="consent to execute generated code")
    datasets: dict[str, str] = Field(default_factory=dict, description="benchmark -> local path")
    code_timeout_s: float = Field(3.0, gt=0, description="time limit per executed program")
    code_workers: int = Field(2, ge=1, description="programs executed in parallel")
    max_length: int | None = Field(None, ge=1, description="context length given to HFLM")
    proxy_sizes: dict[str, int] = Field(default_factory=dict,
                                        description="override the proxy test-set sizes (200/100/200)")


@dataclass
class TaskResult:
    metric: str
    value: float
    stderr: float
    n: int
    per_sample: list[float]
    sample_ids: list[str] = field(default_factory=list)  # "<lm-eval task>/<doc_id>", same order
    lm_eval_task: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # other metrics (e.g. acc_norm)
    subtasks: dict[str, float] = field(default_factory=dict)  # per-subtask primary metric
    execution: dict = field(default_factory=dict)  # code tasks: time limit, sandbox, counts (humaneval.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        return cls(**d)


def coerce_settings(settings: Any) -> EvalSettings:
    if settings is None:
        return EvalSettings()
    if isinstance(settings, EvalSettings):
        return settings
    if isinstance(settings, dict):
        return EvalSettings.model_validate(settings)
    if isinstance(settings, BaseModel):
        data = settings.model_dump()
    else:
        data = {k: getattr(settings, k) for k in EvalSettings.model_fields if hasattr(settings, k)}
    return EvalSettings.model_validate({k: v for k, v in data.items() if k in EvalSettings.model_fields})


# ---------------------------------------------------------------------------
# preflight


def _ours(name: str) -> bool:
    return spec_for(name) is not None or name in catalogue()


def preflight(tasks: list[str], settings: Any, *, load_lm_eval_tasks: bool = True) -> list[str]:
    """Check tasks before any model is loaded; returns the expanded result names.

    Raises :class:`UserError` for an unknown task, a benchmark whose data is not on this machine
    (naming where it looked and how to provide it), or a code-executing task without
    ``allow_code_execution: true``. lm-eval's own tasks (names not in ``eval/``) are built, which
    loads their data, unless ``load_lm_eval_tasks`` is false.
    """
    s = coerce_settings(settings)
    if not tasks:
        raise UserError("no evaluation tasks given", where="eval.tasks",
                        fix=f"list at least one of {sorted(TASKS) + sorted(GROUPS)} or an lm-eval task name")
    names = expand(list(tasks))
    catalogue()  # the YAMLs are there (clear error otherwise)
    unknown = [n for n in names if not _ours(n)]
    if unknown:
        tm = _task_manager(s, include_defaults=True)
        bad = [n for n in unknown if n not in tm.all_tasks]
        if bad:
            raise UserError(f"unknown evaluation task(s) {bad}", where="eval.tasks",
                            fix=f"use one of {sorted(TASKS) + sorted(GROUPS)} or a task name that "
                                f"`lm_eval ls tasks` lists")
        for n in unknown if load_lm_eval_tasks else ():  # their data must load now, not after the model
            _load_tasks(tm, n, n)
    for n in names:
        spec = spec_for(n)
        sub = subtask_of(n)
        if sub is not None:
            local.check_available(sub[0], s.datasets, configs=[sub[1]])
        if spec is None:
            continue
        if spec.executes_code and not s.allow_code_execution:
            raise he.consent_error(n)
        if spec.dataset is not None:
            local.check_available(spec.dataset, s.datasets)
        if n.startswith("proxy_"):
            try:
                from attnres_quant.data import proxy_tasks  # noqa: F401
            except ImportError as e:  # pragma: no cover - module ships with the package
                raise UserError(f"task '{n}': the proxy task generator is missing ({e})") from e
    unknown_ds = sorted(set(s.datasets) - set(local.BENCHMARKS))
    if unknown_ds:
        raise UserError(f"`datasets` names unknown benchmark(s) {unknown_ds}", where="eval.datasets",
                        fix=f"local copies are read for {sorted(local.BENCHMARKS)} only")
    return names


# ---------------------------------------------------------------------------
# evaluation


_TM_CACHE: dict[str, Any] = {}


def _task_manager(s: EvalSettings, include_defaults: bool):
    """lm-eval TaskManager over eval/ (+ lm-eval's own tasks when needed); indexing lm-eval's
    ~15k task files takes seconds, so managers are kept per (defaults, metadata)."""
    import json

    from lm_eval.tasks import TaskManager

    meta = {"aq_datasets": dict(s.datasets), "aq_proxy_sizes": {**PROXY_SIZES, **s.proxy_sizes}}
    key = json.dumps([include_defaults, str(EVAL_DIR), meta], sort_keys=True)
    if key not in _TM_CACHE:
        _TM_CACHE[key] = TaskManager(include_path=str(EVAL_DIR), include_defaults=include_defaults, metadata=meta)
    return _TM_CACHE[key]


def _load_tasks(tm, name: str, lm_eval_name: str) -> dict:
    """Build the lm-eval Task objects of one result name (reads its data)."""
    try:
        return tm.load([lm_eval_name])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval / datasets errors of third-party tasks
        if spec_for(name) is not None or subtask_of(name) is not None:
            raise
        raise UserError(f"lm-eval task '{name}' could not load its data ({type(e).__name__}: {str(e)[:300]})",
                        where="lm-eval's own task registry and the Hugging Face cache",
                        fix="run it once on a machine with network to fill the Hugging Face cache and copy "
                            "the cache here, or use a benchmark with a local copy (mmlu, gpqa, math), "
                            "humaneval or the proxy tasks") from e


def make_lm(model, tokenizer, s: EvalSettings):
    """lm-eval's HFLM around the in-memory model (no copy, no device move)."""
    from lm_eval.models.huggingface import HFLM

    kw: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": s.batch_size,
                          "backend": "causal"}
    if s.max_length:
        kw["max_length"] = s.max_length
    return HFLM(**kw)


def _primary(spec: TaskSpec | None, task_obj) -> str:
    if spec is not None:
        return spec.metric
    metrics = list(task_obj.aggregation().keys())
    for pref in ("acc", "exact_match", "pass@1", "pass_at_1"):
        if pref in metrics:
            return pref
    return metrics[0]


def _sample_value(sample: dict, metric: str) -> float:
    v = sample.get(metric)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else float("nan")
    return float(v) if v is not None else float("nan")


@contextlib.contextmanager
def _no_env_probe():
    """Skip lm-eval's environment report (it shells out to pip/nvidia-smi: ~1 s per call);
    the pipeline records the environment once per study."""
    import lm_eval.evaluator as ev

    saved = ev.add_env_info
    ev.add_env_info = lambda results: None
    try:
        yield
    finally:
        ev.add_env_info = saved


def evaluate(model, tokenizer, tasks: list[str], settings: Any = None, *, lm=None) -> dict[str, TaskResult]:
    """Evaluate ``model`` on ``tasks`` through lm-eval; one :class:`TaskResult` per result name.

    ``tasks``: benchmark names (``mmlu``, ``gpqa``, ``humaneval``, ``math``), proxy names
    (``proxy_mc``, ``proxy_code``, ``proxy_math``, group ``proxy_suite``) or lm-eval task names.
    ``lm``: an lm-eval ``LM`` to use instead of wrapping ``model`` (tests, custom backends).
    """
    import lm_eval

    s = coerce_settings(settings)
    names = preflight(tasks, s, load_lm_eval_tasks=False)  # loaded just below
    needs_defaults = any(not _ours(n) for n in names)
    tm = _task_manager(s, include_defaults=needs_defaults)

    leaves: dict[str, list[str]] = {}
    task_objs: dict[str, Any] = {}
    for n in names:
        spec = spec_for(n)
        loaded = _load_tasks(tm, n, spec.lm_eval_task if spec else n)
        leaves[n] = sorted(loaded["tasks"])
        for k, t in loaded["tasks"].items():
            task_objs.setdefault(k, t)

    if lm is None:
        if model is not None and hasattr(model, "eval"):
            model.eval()
        lm = make_lm(model, tokenizer, s)

    with he.code_execution(s.allow_code_execution, s.code_timeout_s, s.code_workers), _no_env_probe():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(task_objs.values()), num_fewshot=s.num_fewshot, limit=s.limit,
            batch_size=s.batch_size, log_samples=True, bootstrap_iters=0,
            gen_kwargs=dict(s.gen_kwargs) or None, task_manager=tm,
            random_seed=s.seed, numpy_random_seed=s.seed, torch_random_seed=s.seed,
            fewshot_random_seed=s.seed, confirm_run_unsafe_code=s.allow_code_execution)
        executed = he.execution_record()
    if out is None:  # non-zero rank
        return {}
    results = collect(out, names, leaves, task_objs)
    for n, r in results.items():
        if n in executed:
            r.execution = executed[n]
    return results


def _doc_key(doc_id) -> tuple:
    try:
        return (0, int(doc_id), "")
    except (TypeError, ValueError):
        return (1, 0, str(doc_id))


def collect(out: dict, names: list[str], leaves: dict[str, list[str]], task_objs: dict[str, Any]) -> dict[str, TaskResult]:
    """lm-eval's output (with samples) -> TaskResult per result name."""
    results: dict[str, TaskResult] = {}
    for n in names:
        spec = spec_for(n)
        metric = _primary(spec, task_objs[leaves[n][0]])
        per: list[float] = []
        ids: list[str] = []
        subtasks: dict[str, float] = {}
        extra_vals: dict[str, list[float]] = {}
        for leaf in leaves[n]:
            samples = sorted(out.get("samples", {}).get(leaf, []), key=lambda x: _doc_key(x["doc_id"]))
            vals = [_sample_value(x, metric) for x in samples]
            per += vals
            ids += [f"{leaf}/{x['doc_id']}" for x in samples]
            if vals:
                subtasks[leaf] = sum(vals) / len(vals)
            for x in samples:
                for m in x.get("metrics", []):
                    if m != metric:
                        extra_vals.setdefault(m, []).append(_sample_value(x, m))
        value = sum(per) / len(per) if per else float("nan")
        results[n] = TaskResult(
            metric=metric, value=value, stderr=stats.mean_stderr(per), n=len(per), per_sample=per,
            sample_ids=ids, lm_eval_task=(spec.lm_eval_task if spec else n),
            extra={m: (sum(v) / len(v) if v else math.nan) for m, v in extra_vals.items()},
            subtasks=subtasks if len(leaves[n]) > 1 else {})
    return results


def offline_env() -> None:
    """Switch the hub off for this process (the tool's default: air-gapped first)."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
