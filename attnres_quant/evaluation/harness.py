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
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from attnres_quant.errors import UserError
from attnres_quant.evaluation import datasets as local
from attnres_quant.evaluation import humaneval as he
from attnres_quant.evaluation import stats
from attnres_quant.evaluation import tasks as tasks_mod
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

    batch_size: int | str = Field(8, description="lm-eval batch size: N >= 1, auto or auto:N")
    limit: int | float | None = Field(None, description="max docs per (sub)task; 0 < limit < 1 = fraction")
    num_fewshot: int | None = Field(None, ge=0, description="None = each task's default")
    seed: int = Field(1234, description="python/numpy/torch/few-shot seeds of lm-eval")
    gen_kwargs: dict[str, Any] = Field(default_factory=dict,
                                       description="generation overrides, e.g. {max_gen_toks: 256}")
    allow_code_execution: bool = Field(False, description="consent to execute generated code")
    datasets: dict[str, str] = Field(default_factory=dict, description="benchmark (mmlu, gpqa, math) or "
                                     "lm-eval task name -> local path")
    code_timeout_s: float = Field(3.0, gt=0, description="time limit per executed program")
    code_workers: int = Field(2, ge=1, description="programs executed in parallel")
    max_length: int | None = Field(None, ge=1, description="context length given to HFLM")
    proxy_sizes: dict[str, int] = Field(default_factory=dict,
                                        description="override the proxy test-set sizes (200/100/200)")
    apply_chat_template: bool | str = Field(False, description="lm-eval's apply_chat_template")
    fewshot_as_multiturn: bool | None = Field(None, description="lm-eval's fewshot_as_multiturn (None: its default)")
    system_instruction: str | None = Field(None, description="lm-eval's system_instruction")
    include_path: list[str] = Field(default_factory=list, description="user task folders added to ours")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _lm_eval_batch_size(cls, value):
        from attnres_quant.pipeline.config import check_batch_size

        return check_batch_size(value)

    @field_validator("limit", mode="before")
    @classmethod
    def _lm_eval_limit(cls, value):
        from attnres_quant.pipeline.config import check_limit

        return check_limit(value)


@dataclass
class TaskResult:
    """One result name's scores, as lm-eval aggregated them.

    ``value`` is lm-eval's own aggregate of ``metric`` under ``filter`` (its ``results`` dict; for a
    group, the group's size-weighted aggregate). ``metrics`` holds every metric/filter of that
    entry (``"<metric>,<filter>"`` and ``"<metric>_stderr,<filter>"``). Per-document vectors
    (``per_sample``, ``per_sample_by``) exist only for metrics lm-eval aggregates as a mean over
    documents, one per filter; corpus metrics (perplexities, bits per byte) have none.
    """

    metric: str
    value: float
    stderr: float
    n: int
    per_sample: list[float]
    sample_ids: list[str] = field(default_factory=list)  # "<lm-eval task>/<doc_id>", same order
    lm_eval_task: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # other metrics/filters: "acc_norm", "m,filter"
    subtasks: dict[str, float] = field(default_factory=dict)  # per-subtask primary metric
    filter: str = "none"              # lm-eval filter of the primary metric
    aggregation: str = "mean"         # lm-eval aggregation of the primary metric
    metrics: dict[str, Any] = field(default_factory=dict)  # lm-eval's results entry ("metric,filter" keys)
    per_sample_by: dict[str, list[float]] = field(default_factory=dict)  # other "metric,filter" -> per doc (means)
    num_fewshot: int | None = None    # effective n-shot (lm-eval's `n-shot`); None when subtasks differ
    n_shot: dict[str, int] = field(default_factory=dict)   # lm-eval (sub)task -> n-shot
    max_gen_toks: int | None = None   # generation limit used (generation tasks)
    samples_path: str | None = None   # per-sample log (JSONL.gz of lm-eval's sample records)
    execution: dict = field(default_factory=dict)  # code tasks: time limit, sandbox, counts (humaneval.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


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


def preflight(tasks: list[str], settings: Any, *, load_lm_eval_tasks: bool = True,
              check_dataset_keys: bool = True) -> list[str]:
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
        tm = _task_manager(s, include_defaults=_needs_lm_eval_defaults(names, s))
        bad = [n for n in unknown if n not in tm.all_tasks]
        if bad:
            raise UserError(f"unknown evaluation task(s) {bad}", where="eval.tasks",
                            fix=f"use one of {sorted(TASKS) + sorted(GROUPS)} or a task name that "
                                f"`lm_eval ls tasks` lists")
        for n in unknown if load_lm_eval_tasks else ():  # their data must load now, not after the model
            _load_tasks(tm, n, n, s)
    for n in names:
        spec = spec_for(n)
        sub = subtask_of(n)
        bench = sub[0] if sub is not None else (spec.dataset if spec is not None else None)
        if spec is not None and spec.executes_code and not s.allow_code_execution:
            raise he.consent_error(n)
        if bench is not None:
            # schema and splits of the local copy, read now (not after the model loaded)
            fewshot = bool(s.num_fewshot) and (bench == "mmlu" or n == "hendrycks_math"
                                                or n.startswith("aq_hendrycks_math_"))
            local.validate(bench, s.datasets, configs=[sub[1]] if sub is not None else None, fewshot=fewshot)
        if bench == "math" and (spec is None or spec.name == "math") and \
                (sub is None or n.startswith("aq_minerva_math_")):
            err = tasks_mod.math_scoring_error(n)  # lm-eval's minerva_math needs math-verify + antlr4 4.11
            if err is not None:
                raise err
        if n.startswith("proxy_"):
            try:
                from attnres_quant.data import proxy_tasks  # noqa: F401
            except ImportError as e:  # pragma: no cover - module ships with the package
                raise UserError(f"task '{n}': the proxy task generator is missing ({e})") from e
    bad = sorted(set(s.datasets) - set(local.BENCHMARKS) - {n for n in names if spec_for(n) is None})
    if bad and check_dataset_keys:
        raise UserError(f"`datasets` names unknown benchmark(s) or task(s) {bad}",
                        where="datasets (top-level key of the study config)",
                        fix=f"use the keys {sorted(local.BENCHMARKS)} for the benchmarks, or the name of an "
                            "lm-eval task listed in `tasks` whose data you have locally")
    return names


# ---------------------------------------------------------------------------
# evaluation


_TM_CACHE: dict[str, Any] = {}


def _include_paths(s: EvalSettings) -> list[str]:
    """Our task folder, then the user's (``eval.include_path``), each checked to be a folder."""
    paths = [str(EVAL_DIR)]
    for p in s.include_path:
        path = Path(os.path.expanduser(str(p)))
        if not path.is_dir():
            raise UserError(f"task include path {str(path)!r} is not a folder", where="eval.include_path / "
                            "run --include-path", fix="give a folder holding lm-eval task YAMLs (they are added "
                                                     "to the tool's own tasks)")
        paths.append(str(path.resolve()))
    return paths


def _task_manager(s: EvalSettings, include_defaults: bool):
    """lm-eval TaskManager over eval/ and the user's include paths (+ lm-eval's own tasks when needed);
    indexing lm-eval's ~15k task files takes seconds, so managers are kept per (paths, defaults, metadata)."""
    import json

    from lm_eval.tasks import TaskManager

    meta = {"aq_datasets": dict(s.datasets), "aq_proxy_sizes": {**PROXY_SIZES, **s.proxy_sizes}}
    paths = _include_paths(s)
    key = json.dumps([include_defaults, paths, meta], sort_keys=True)
    if key not in _TM_CACHE:
        _TM_CACHE[key] = TaskManager(include_path=paths if len(paths) > 1 else paths[0],
                                     include_defaults=include_defaults, metadata=meta)
    return _TM_CACHE[key]


def _needs_lm_eval_defaults(names: list[str], s: EvalSettings) -> bool:
    """True when a task is neither ours nor in the user's include paths (lm-eval's registry is needed)."""
    unknown = [n for n in names if not _ours(n)]
    if unknown and s.include_path:
        local_tasks = _task_manager(s, include_defaults=False).all_tasks
        unknown = [n for n in unknown if n not in local_tasks]
    return bool(unknown)


def _load_tasks(tm, name: str, lm_eval_name: str, s: EvalSettings | None = None) -> dict:
    """Build the lm-eval Task objects of one result name (reads its data).

    An lm-eval task with an entry in ``datasets`` reads that local copy: its own YAML config, with
    ``dataset_path`` set to the file format's builder and ``dataset_kwargs.data_files`` to the
    copy's files per split (everything else -- prompts, filters, metrics -- unchanged).
    """
    spec: Any = lm_eval_name
    given = (s.datasets if s is not None else {}).get(name)
    if given and spec_for(name) is None and subtask_of(name) is None:
        spec = _local_task_config(tm, name, given, s.num_fewshot)
    try:
        return tm.load([spec])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval / datasets errors of third-party tasks
        if spec_for(name) is not None or subtask_of(name) is not None:
            raise
        if given:
            raise UserError(f"lm-eval task '{name}' could not read its local copy ({type(e).__name__}: "
                            f"{str(e)[:300]})", where=f"datasets.{name} = {given}",
                            fix="give a folder holding the task's splits as <split>.{parquet,jsonl,json,csv} or "
                                "<split>-*.parquet (optionally under <dataset_name>/ or data/), with the columns "
                                "of the task's hub dataset") from e
        raise UserError(f"lm-eval task '{name}' could not load its data ({type(e).__name__}: {str(e)[:300]})",
                        where="lm-eval's own task registry and the Hugging Face cache",
                        fix="run it once on a machine with network to fill the Hugging Face cache and copy "
                            "the cache here, point the top-level `datasets` key at a local copy "
                            f"(`datasets: {{{name}: /data/{name}}}`), or use a benchmark with a local copy (mmlu, "
                            "gpqa, math), humaneval or the proxy tasks") from e


def _local_task_config(tm, name: str, path: str, num_fewshot: int | None = None) -> dict:
    """lm-eval's own config of task ``name``, reading its splits from the local copy at ``path``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None or "group" in (entry.cfg or {}) or \
            str(getattr(entry.kind, "name", entry.kind)).upper() not in ("TASK",):
        raise UserError(f"`datasets.{name}`: a local copy can be given for a single lm-eval task, and "
                        f"'{name}' is not one (a group, a tag or a Python task)", where=f"datasets.{name}",
                        fix="give the local copy of each of its tasks under that task's name")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    builder, files = local.task_files(Path(os.path.expanduser(str(path))), name, cfg,
                                      fewshot=None if num_fewshot is None else num_fewshot > 0)
    cfg.update(dataset_path=builder, dataset_name=None,
               dataset_kwargs={**(cfg.get("dataset_kwargs") or {}), "data_files": files})
    return cfg


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


def _aggregation_name(task_obj, metric: str) -> str:
    """'mean' when lm-eval aggregates ``metric`` as a plain mean over documents."""
    from lm_eval.api.metrics import mean

    fn = task_obj.aggregation().get(metric, mean)  # lm-eval's own fallback is mean
    return "mean" if fn is mean else getattr(fn, "__name__", str(fn))


def _sample_value(sample: dict, metric: str) -> float:
    v = sample.get(metric)
    return float(v) if isinstance(v, (int, float, bool)) else float("nan")


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


def evaluate(model, tokenizer, tasks: list[str], settings: Any = None, *, lm=None,
             samples_dir: str | os.PathLike | None = None, lm_eval_results: str | os.PathLike | None = None,
             use_cache: str | None = None) -> dict[str, TaskResult]:
    """Evaluate ``model`` on ``tasks`` through lm-eval; one :class:`TaskResult` per result name.

    ``tasks``: benchmark names (``mmlu``, ``gpqa``, ``humaneval``, ``math``, ``hendrycks_math``),
    proxy names (``proxy_mc``, ``proxy_code``, ``proxy_math``, group ``proxy_suite``) or lm-eval
    task names. ``lm``: an lm-eval ``LM`` to use instead of wrapping ``model`` (tests, custom
    backends). ``samples_dir``: write lm-eval's per-sample records of each result name to
    ``<samples_dir>/<name>.jsonl.gz`` (path in ``TaskResult.samples_path``). ``lm_eval_results``:
    merge lm-eval's own results JSON (``results``, ``configs``, ``versions``, ``n-shot``, ...) of
    these tasks into that file. ``use_cache``: lm-eval's request-cache prefix (sqlite, ``_rank0.db``
    appended): requests answered before are read from it, not computed.
    """
    import lm_eval

    s = coerce_settings(settings)
    # loaded just below; `datasets` may name the other tasks of a study (one cell at a time here)
    names = preflight(tasks, s, load_lm_eval_tasks=False, check_dataset_keys=False)
    tm = _task_manager(s, include_defaults=_needs_lm_eval_defaults(names, s))

    leaves: dict[str, list[str]] = {}
    task_objs: dict[str, Any] = {}
    top: list[Any] = []  # what lm-eval is handed: groups as groups, so it aggregates them itself
    for n in names:
        spec = spec_for(n)
        lm_name = spec.lm_eval_task if spec else n
        loaded = _load_tasks(tm, n, lm_name, s)
        leaves[n] = sorted(loaded["tasks"])
        for k, t in loaded["tasks"].items():
            task_objs.setdefault(k, t)
        if lm_name in loaded["groups"]:
            top.append(loaded["groups"][lm_name])
        else:  # a task, or a tag's tasks
            top += [loaded["tasks"][k] for k in leaves[n]]

    if lm is None:
        if model is not None and hasattr(model, "eval"):
            model.eval()
        lm = make_lm(model, tokenizer, s)

    check_generation_limits(task_objs, s, lm)
    check_chat_template(s, tokenizer if tokenizer is not None else getattr(lm, "tokenizer", None))
    chat = {"apply_chat_template": s.apply_chat_template, "system_instruction": s.system_instruction}
    if s.fewshot_as_multiturn is not None:
        chat["fewshot_as_multiturn"] = s.fewshot_as_multiturn
    if use_cache is not None:
        Path(use_cache).parent.mkdir(parents=True, exist_ok=True)
    with he.code_execution(s.allow_code_execution, s.code_timeout_s, s.code_workers), _no_env_probe():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=top, num_fewshot=s.num_fewshot, limit=s.limit,
            batch_size=s.batch_size, log_samples=True, bootstrap_iters=0,
            gen_kwargs=dict(s.gen_kwargs) or None, task_manager=tm, use_cache=use_cache,
            random_seed=s.seed, numpy_random_seed=s.seed, torch_random_seed=s.seed,
            fewshot_random_seed=s.seed, confirm_run_unsafe_code=s.allow_code_execution, **chat)
        executed = he.execution_record()
    if out is None:  # non-zero rank
        return {}
    if lm_eval_results is not None:
        export_lm_eval_results(out, lm_eval_results)
    results = collect(out, names, leaves, task_objs, default_max_gen_toks=getattr(lm, "max_gen_toks", None))
    for n, r in results.items():
        if n in executed:
            r.execution = executed[n]
    if samples_dir is not None:
        for n, r in results.items():
            r.samples_path = str(write_samples(Path(samples_dir) / f"{n}.jsonl.gz", out, leaves[n]))
    return results


def check_chat_template(s: EvalSettings, tokenizer) -> None:
    """apply_chat_template needs a tokenizer with a chat template (lm-eval fails deep inside otherwise)."""
    if not s.apply_chat_template:
        return
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError("eval.apply_chat_template is set, but the model's tokenizer has no chat template",
                        where="eval.apply_chat_template of the study config",
                        fix="use a chat model whose tokenizer_config.json (or chat_template.jinja) has a chat "
                            "template, or set apply_chat_template: false")
    if isinstance(s.apply_chat_template, str) and isinstance(template, dict) and \
            s.apply_chat_template not in template:
        raise UserError(f"the tokenizer has no chat template named {s.apply_chat_template!r}",
                        where="eval.apply_chat_template", fix=f"use one of {sorted(template)} or true")


# lm-eval's results keys that describe the whole run (merged by key across tasks) and per-task ones.
_LM_EVAL_PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                     "n-samples")


def export_lm_eval_results(out: dict, path: str | os.PathLike) -> Path:
    """Merge one ``simple_evaluate`` output (without its samples) into lm-eval's results JSON at ``path``.

    Per-task sections (``results``, ``configs``, ``versions``, ``n-shot``, ...) are merged task by task
    so one file holds every task of a (model, variant); the run-level keys (``config``, ``date``, ...)
    are those of the last evaluation. Values lm-eval cannot serialise become strings, as its own
    ``--output_path`` writer does (``lm_eval.utils.handle_non_serializable``)."""
    import json

    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    merged: dict = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            merged = {}
    fresh = json.loads(json.dumps({k: v for k, v in out.items() if k != "samples"},
                                  default=handle_non_serializable))
    for key, value in fresh.items():
        if key in _LM_EVAL_PER_TASK and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2, ensure_ascii=False, default=handle_non_serializable) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_generation_limits(task_objs: dict[str, Any], s: EvalSettings, lm) -> None:
    """A generation limit (lm-eval's default, e.g. HumanEval's 1024, or a config's) must leave room
    for the prompt in the model's context; say so clearly instead of lm-eval's ValueError."""
    try:
        max_length = int(lm.max_length)
    except (AttributeError, TypeError, ValueError):
        return
    for name, t in task_objs.items():
        if t.get_config("output_type") != "generate_until":
            continue
        gen = {**(t.get_config("generation_kwargs") or {}), **s.gen_kwargs}
        limit = gen.get("max_gen_toks", getattr(lm, "max_gen_toks", None))
        if isinstance(limit, int) and limit >= max_length:
            raise UserError(f"task '{name}' may generate {limit} tokens, but the model's context is {max_length} "
                            "tokens (lm-eval's generation limits are meant for full-size models)",
                            where="tasks / eval.max_gen_toks of the study config",
                            fix=f"lower the limit, e.g. `tasks: [{{name: ..., max_gen_toks: {max(1, max_length // 4)}}}]` "
                                "or `eval: {max_gen_toks: ...}`; the report states the limit used")


def write_samples(path: Path, out: dict, leaves: list[str]) -> Path:
    """lm-eval's per-sample records of ``leaves`` (prompt/arguments, target, responses, filtered
    responses, filter, metric values, hashes; plus ``task``) as gzipped JSON lines, written
    atomically and reproducibly (no timestamp in the gzip header)."""
    import gzip
    import json

    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for leaf in leaves:
            for rec in out.get("samples", {}).get(leaf, []):
                line = json.dumps({"task": leaf, **rec}, default=handle_non_serializable, ensure_ascii=False)
                gz.write(line.encode("utf-8") + b"\n")
    os.replace(tmp, path)
    return path


def read_samples(path: str | os.PathLike) -> list[dict]:
    """The records :func:`write_samples` wrote."""
    import gzip
    import json

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _doc_key(doc_id) -> tuple:
    try:
        return (0, int(doc_id), "")
    except (TypeError, ValueError):
        return (1, 0, str(doc_id))


def _clean_metrics(entry: dict) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if "," in k}


def collect(out: dict, names: list[str], leaves: dict[str, list[str]], task_objs: dict[str, Any],
            default_max_gen_toks: int | None = None) -> dict[str, TaskResult]:
    """lm-eval's output (with samples) -> TaskResult per result name.

    Values come from lm-eval's ``results`` (its own aggregation, per metric and filter). Per-document
    vectors are built, per filter, for mean-aggregated metrics only, ordered by subtask then doc id.
    """
    lm_results = out.get("results", {})
    results: dict[str, TaskResult] = {}
    for n in names:
        spec = spec_for(n)
        lm_name = spec.lm_eval_task if spec else n
        first = task_objs[leaves[n][0]]
        metric = _primary(spec, first)
        aggs = {m: _aggregation_name(first, m) for m in first.aggregation()}
        # per (metric, filter): per-document values of mean-aggregated metrics
        vectors: dict[str, list[float]] = {}
        ids: dict[str, list[str]] = {}
        filters: list[str] = []
        subtask_vals: dict[str, dict[str, list[float]]] = {}
        for leaf in leaves[n]:
            for x in sorted(out.get("samples", {}).get(leaf, []), key=lambda x: _doc_key(x["doc_id"])):
                filt = x.get("filter", "none")
                if filt not in filters:
                    filters.append(filt)
                for m in x.get("metrics", []):
                    if aggs.get(m, "mean") != "mean":
                        continue
                    key = f"{m},{filt}"
                    vectors.setdefault(key, []).append(_sample_value(x, m))
                    ids.setdefault(key, []).append(f"{leaf}/{x['doc_id']}")
                    subtask_vals.setdefault(key, {}).setdefault(leaf, []).append(_sample_value(x, m))
        # lm-eval's aggregate entry for this name (a task, or a group with aggregate_metric_list)
        entry = lm_results.get(lm_name) if lm_name in lm_results else (
            lm_results.get(leaves[n][0]) if len(leaves[n]) == 1 else None)
        metrics = _clean_metrics(entry) if entry else {}
        if not metrics:  # a tag or a group without aggregation: pooled means of the documents
            metrics = {k: sum(v) / len(v) for k, v in vectors.items() if v}
        filt = next((k.split(",", 1)[1] for k in metrics if k.split(",", 1)[0] == metric), filters[0] if filters
                    else "none")
        key = f"{metric},{filt}"
        for k, v in vectors.items():  # closed-form stderr of means (lm-eval's formula; bootstrap is off)
            m, f = k.split(",", 1)
            if metrics.get(f"{m}_stderr,{f}") in (None, "N/A"):
                metrics[f"{m}_stderr,{f}"] = stats.mean_stderr(v)
        per = vectors.get(key, [])
        value = metrics.get(key, float("nan"))
        value = float(value) if isinstance(value, (int, float)) else float("nan")
        stderr = metrics.get(f"{metric}_stderr,{filt}")
        n_docs = len(per) if per else sum(int((out.get("n-samples", {}).get(leaf) or {}).get("effective", 0))
                                          for leaf in leaves[n])
        n_shot = {leaf: out.get("n-shot", {}).get(leaf) for leaf in leaves[n]}
        shots = {v for v in n_shot.values()}
        gen = [((out.get("configs", {}).get(leaf) or {}).get("generation_kwargs") or {}) for leaf in leaves[n]
               if (out.get("configs", {}).get(leaf) or {}).get("output_type") == "generate_until"]
        max_gen = {g.get("max_gen_toks", default_max_gen_toks) for g in gen}
        results[n] = TaskResult(
            metric=metric, value=value, stderr=float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
            n=n_docs, per_sample=per, sample_ids=ids.get(key, []), lm_eval_task=lm_name,
            extra={(k.split(",", 1)[0] if k.endswith(",none") else k): v for k, v in metrics.items()
                   if k != key and "_stderr," not in k},
            subtasks=({leaf: (sum(v) / len(v)) for leaf, v in subtask_vals.get(key, {}).items()}
                      if len(leaves[n]) > 1 else {}),
            filter=filt, aggregation=aggs.get(metric, "mean"), metrics=metrics,
            per_sample_by={k: v for k, v in vectors.items() if k != key},
            num_fewshot=next(iter(shots)) if len(shots) == 1 else None, n_shot=n_shot,
            max_gen_toks=next(iter(max_gen)) if len(max_gen) == 1 else None)
    return results


def offline_env() -> None:
    """Switch the hub off for this process (the tool's default: air-gapped first)."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
