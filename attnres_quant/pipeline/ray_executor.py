"""``run CONFIG --executor ray``: one Ray task per (model, variant), results written by the driver alone.

Scheduling: per model, the baseline task first; once its cells are in, the model's pending variants
are submitted together, each asking for ``--cpus-per-task`` CPUs, one GPU on ``--device cuda`` and
the host memory of a baseline plus one variant (:func:`unit_memory_bytes`). Models are independent,
so one model's variants can run while another model's baseline does.

What a variant needs from its baseline is the baseline's weights (to quantize from and to compare
against); a task reloads them from the model's path (the zoo, a checkpoint folder on storage every node
sees, or the hub cache), so nothing large travels through the driver. The cells a task computes go
through a small actor (:class:`CellSink`) to the driver, which writes each into results.json the moment
it arrives -- the same atomic per-cell writes as a local run, so ``--resume`` after a killed driver
continues from the last written cell. Samples logs (``samples/``) are written by the tasks themselves
beside results.json: on a multi-node cluster the output folder must be on shared storage.

Failures: a task whose worker dies (preemption, OOM kill, crash) or that raises is retried once by Ray
(``max_retries=1``, ``retry_exceptions=True``); the retry skips the cells the first attempt already
delivered and its cells carry ``attempt: 2``. A task that fails twice is recorded as a failed variant,
as a crashing variant is in a local run. (A variant that crashes inside quantization or evaluation is
recorded as failed by the runner itself, without a retry: those failures are deterministic.)
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from ..errors import UserError
from .executors import RAY_VERSION

MAX_ATTEMPTS = 2                   # the first run and one retry
RUNTIME_OVERHEAD_BYTES = 1 << 30   # interpreter, torch, lm-eval, activations of the tiny eval batches
_BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4}
TEST_KILL_ENV = "ATTNRES_QUANT_TEST_KILL_FIRST_ATTEMPT"   # "<study>/<model>/<variant>": tests only


def _log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- units and resources
@dataclass
class Unit:
    """One (model, variant) of the study; ``variant`` None is the model's baseline."""

    spec: Any
    variant: Any
    name: str
    pending_variants: list = field(default_factory=list)  # the baseline's: variants to fail if it fails

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def key(self) -> str:
        return f"{self.label}/{self.name}"

    @property
    def is_baseline(self) -> bool:
        return self.variant is None


def count_parameters(spec) -> int | None:
    """Parameters of a study model, from its structure (no weights read); None when unknown."""
    from ..loading import structure_model

    try:
        skeleton = structure_model(spec.path, trust_remote_code=spec.trust_remote_code)
        return int(sum(p.numel() for p in skeleton.parameters()))
    except Exception:  # noqa: BLE001 - an estimate only; preflight has already checked the model
        return None


def unit_memory_bytes(n_params: int | None, dtype: str) -> int | None:
    """Host memory one task asks Ray for: a baseline and one variant copy at the study dtype, plus the
    runtime. (The variant copy is the runner's per-variant peak; a runner that quantizes in place or
    reloads per variant needs less, and this estimate should follow it.)"""
    if not n_params:
        return None
    return 2 * n_params * _BYTES_PER_PARAM.get(dtype, 4) + RUNTIME_OVERHEAD_BYTES


def task_options(config, device: str, cpus_per_task: int, memory: int | None) -> dict:
    options: dict[str, Any] = {"num_cpus": cpus_per_task, "num_gpus": 1 if device == "cuda" else 0,
                               "max_retries": MAX_ATTEMPTS - 1, "retry_exceptions": True}
    if memory:
        options["memory"] = memory
    return options


def check_feasible(options: dict, label: str) -> None:
    """A task no node can hold would wait forever: say so before submitting it."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], "memory": options.get("memory", 0)}
    if any(all(res.get(k, 0) >= v for k, v in need.items() if v) for res in nodes):
        return
    best = {k: max((res.get(k, 0) for res in nodes), default=0) for k in need}
    shown = ", ".join(f"{k} {_fmt(k, v)} (largest node: {_fmt(k, best[k])})" for k, v in need.items() if v)
    raise UserError(f"no node of the Ray cluster can run a task of model {label}: each asks for {shown}",
                    "--executor ray", "join a cluster with larger nodes (--address), lower --cpus-per-task, or "
                    "run with --executor local")


def _fmt(kind: str, value: float) -> str:
    return f"{value / 2 ** 30:.1f} GiB" if kind == "memory" else f"{value:g}"


# --------------------------------------------------------------------------- the relay
@ray.remote(num_cpus=0)
class CellSink:
    """Cells on their way from the tasks to the driver, and the attempts of each unit."""

    def __init__(self):
        self.outbox: list[tuple] = []
        self.attempts: dict[str, int] = {}
        self.delivered: dict[str, dict[str, str]] = {}
        self.data: list[dict] = []  # meta.data records (which text a model's calibration / quality used)

    def begin(self, unit_key: str) -> tuple[int, dict[str, str]]:
        """A task attempt starts: its attempt number and the cells earlier attempts delivered."""
        self.attempts[unit_key] = self.attempts.get(unit_key, 0) + 1
        return self.attempts[unit_key], dict(self.delivered.get(unit_key, {}))

    def put(self, unit_key: str, cell: tuple) -> None:
        self.outbox.append(cell)
        self.delivered.setdefault(unit_key, {})["/".join(cell[:3])] = cell[4]

    def put_data(self, data: dict) -> None:
        self.data.append(data)

    def drain(self) -> tuple[list[tuple], dict[str, int], list[dict]]:
        out, self.outbox = self.outbox, []
        data, self.data = self.data, []
        return out, dict(self.attempts), data


class RelayStore:
    """What a task sees of the results store: ``done`` answers from the driver's snapshot and the cells
    already sent; ``put`` sends the cell to the driver (which writes it) instead of writing a file."""

    def __init__(self, path: str, snapshot: dict[str, str], sink, unit_key: str, attempt: int,
                 kill_after_first_cell: bool = False):
        self.path = Path(path)
        self.status = dict(snapshot)           # "model/variant/cell" -> "ok" | "failed"
        self.sink, self.unit_key, self.attempt = sink, unit_key, attempt
        self.kill_after_first_cell = kill_after_first_cell
        # results.json's meta is the driver's; a task only adds meta.data records (which calibration /
        # quality text a model used), relayed on save() like cells.
        self.meta: dict = {}

    def save(self) -> None:
        """Cells are written by the driver as they arrive; meta.data records are sent to it here."""
        if self.meta.get("data"):
            ray.get(self.sink.put_data.remote(self.meta["data"]))

    def done(self, model: str, variant: str, cell: str) -> bool:
        return self.status.get(f"{model}/{variant}/{cell}") == "ok"

    def variant_failed(self, model: str, variant: str) -> dict | None:
        return {"status": "failed"} if self.status.get(f"{model}/{variant}/status") == "failed" else None

    def put(self, model: str, variant: str, cell: str, value: Any, status: str = "ok", **extra) -> None:
        extra["attempt"] = self.attempt
        ray.get(self.sink.put.remote(self.unit_key, (model, variant, cell, value, status, extra)))
        self.status[f"{model}/{variant}/{cell}"] = status
        if self.kill_after_first_cell:  # tests: a worker lost mid-task (preemption, OOM kill)
            os._exit(1)


def _kill_requested(study: str, unit_key: str, attempt: int) -> bool:
    return attempt == 1 and os.environ.get(TEST_KILL_ENV) == f"{study}/{unit_key}"


@ray.remote
def run_unit_task(job: dict, snapshot: dict[str, str], sink) -> dict:
    """One (model, variant) on a Ray worker, with the runner's own functions."""
    from . import runner

    unit, config = job["unit"], job["config"]
    attempt, delivered = ray.get(sink.begin.remote(unit.key))
    store = RelayStore(job["results_path"], {**snapshot, **delivered}, sink, unit.key, attempt,
                       kill_after_first_cell=_kill_requested(config.name, unit.key, attempt))
    runner.quiet_libraries()
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(config.seed)
    baseline, tokenizer = runner.load_baseline(unit.spec, config, job["device"])
    text_ids = runner.quality_text(store, unit.label, tokenizer, config)  # honours quality.source
    if unit.is_baseline:
        if not store.done(unit.label, unit.name, "model"):
            store.put(unit.label, unit.name, "model", runner.describe(unit.spec, baseline))
        runner.run_baseline(store, unit.label, unit.spec, config, baseline, tokenizer, text_ids,
                            unit.pending_variants)
    else:
        if not runner.baseline_needed_by_variants(config, [unit.variant]):
            try:  # the baseline task saved its log-probs: the quality step reads them, one copy resident
                runner.baseline_topk(store, unit.label, None, tokenizer, config, text_ids, window_model=baseline)
                baseline = None
            except UserError:
                pass  # not saved (e.g. a resumed study whose file was removed): keep it resident, save it here
        runner.run_variant(store, unit.label, unit.variant, config, baseline, tokenizer, text_ids, None,
                           job["source"], spec=unit.spec, device=job["device"])
    return {"attempt": attempt, "host": socket.gethostname(), "pid": os.getpid()}


# --------------------------------------------------------------------------- the driver
class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_task: int = 1):
        self.address, self.cpus_per_task = address, cpus_per_task
        self.started_ray = False
        self.retried: dict[str, int] = {}

    def describe(self) -> dict:
        return {"name": self.name, "address": self.address, "cpus_per_task": self.cpus_per_task,
                "ray": ray.__version__}

    # ---- cluster
    def connect(self) -> None:
        if ray.is_initialized():  # an embedding program (or a test) already joined a cluster
            return
        kwargs: dict[str, Any] = {"address": self.address, "log_to_driver": True}
        if self.address is None:  # a local instance: no dashboard (faster start, no open port)
            kwargs["include_dashboard"] = False
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises bare Exception when a node does not start
            where = f"--address {self.address}" if self.address else "a local Ray instance"
            raise UserError(f"could not start or join Ray ({where}): {str(exc).splitlines()[0][:300]}",
                            "--executor ray", "check the address (ray status on the head node prints it) "
                            "and that this machine runs the same Ray version (" + RAY_VERSION + ")") from None
        self.started_ray = True
        _log(f"ray {ray.__version__}: {ray.cluster_resources()}")

    def close(self) -> None:
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    # ---- the study
    def run(self, store, config, variants, device: str, source: str) -> None:
        self.connect()
        try:
            self._run(store, config, variants, device, source)
        finally:
            self.close()

    def _run(self, store, config, variants, device, source) -> None:
        from .runner import variant_cells

        store.meta["executor"] = self.describe()
        cells = variant_cells(config)
        # The relay lives on the driver's node: if that node goes, so does the driver (and --resume continues).
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        sink = CellSink.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False)).remote()
        running: dict[Any, Unit] = {}
        waiting: dict[str, list[Unit]] = {}   # model label -> variants waiting for its baseline
        options: dict[str, dict] = {}
        for spec in config.models:
            base, pending = self._plan_model(store, spec, config, variants, cells)
            if base is None and not pending:
                continue
            memory = unit_memory_bytes(count_parameters(spec), config.dtype)
            options[spec.label] = task_options(config, device, self.cpus_per_task, memory)
            check_feasible(options[spec.label], spec.label)
            if base is not None:
                waiting[spec.label] = pending
                self._submit(base, store, config, device, source, sink, options, running)
            else:
                for unit in pending:
                    self._submit(unit, store, config, device, source, sink, options, running)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            self._deliver(store, sink)
            for ref in ready:
                unit = running.pop(ref)
                self._finish(ref, unit, store, sink)
                if unit.is_baseline:
                    for v in waiting.pop(unit.label, []):
                        if not store.variant_failed(v.label, v.name):
                            self._submit(v, store, config, device, source, sink, options, running)
        if self.retried:
            store.meta["executor"]["retried"] = dict(self.retried)
        store.save()

    def _plan_model(self, store, spec, config, variants, cells):
        """(baseline unit or None, pending variant units) -- the local runner's rules for what is left."""
        label, base_name = spec.label, config.baseline.name
        failed = store.variant_failed(label, base_name)
        if failed:
            _log(f"{label}: the baseline failed in an earlier run ({(failed.get('value') or {}).get('reason')}); "
                 "skipping this model (rerun without --resume to retry)")
            return None, []
        pending = [Unit(spec, v, v.name) for v in variants if not store.variant_failed(label, v.name)
                   and not all(store.done(label, v.name, c) for c in cells)]
        base_pending = not all(store.done(label, base_name, c) for c in cells + ["model"])
        if not pending and not base_pending:
            _log(f"{label}: all cells finished, nothing to do")
            return None, []
        base = Unit(spec, None, base_name, pending_variants=[u.variant for u in pending]) if base_pending else None
        return base, pending

    def _submit(self, unit, store, config, device, source, sink, options, running) -> None:
        prefix = f"{unit.label}/{unit.name}/"
        snapshot = {k: v.get("status") for k, v in store.cells.items()
                    if k.startswith(prefix) or k.startswith(f"{unit.label}/{config.baseline.name}/")}
        job = {"unit": unit, "config": config, "device": device, "source": source,
               "results_path": str(Path(store.path).resolve()),
               "threads": config.bench.threads or options[unit.label]["num_cpus"]}
        _log(f"{unit.label}: submitting {'baseline ' if unit.is_baseline else 'variant '}{unit.name} to Ray")
        ref = run_unit_task.options(**options[unit.label], name=f"attnres_quant {unit.key}").remote(
            job, snapshot, sink)
        running[ref] = unit

    def _deliver(self, store, sink) -> None:
        """Write the cells the tasks sent since the last call (each one an atomic results.json write)."""
        cells, attempts, data = ray.get(sink.drain.remote())
        for records in data:  # meta.data.<model>.<role>, merged as the local runner writes it
            for label, roles in records.items():
                store.meta.setdefault("data", {}).setdefault(label, {}).update(roles)
        if data:
            store.save()
        for model, variant, cell, value, status, extra in cells:
            entry = store.get(model, variant, cell)
            if entry is not None and entry.get("status") == "ok":
                continue  # delivered by an earlier attempt
            store.put(model, variant, cell, value, status=status, **extra)
        for key, n in attempts.items():
            if n > 1 and self.retried.get(key) != n:
                self.retried[key] = n
                _log(f"{key}: Ray retried the task (attempt {n} of {MAX_ATTEMPTS})")

    def _finish(self, ref, unit, store, sink) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            self._deliver(store, sink)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):  # a bad input stops the study, as in a local run
                raise cause from None
            self._record_failure(store, unit, exc)
        self._deliver(store, sink)

    def _record_failure(self, store, unit, exc) -> None:
        reason = f"the Ray task failed after {MAX_ATTEMPTS} attempts: {type(exc).__name__}: " + \
            (str(exc).strip().splitlines() or [""])[-1][:1500]
        _log(f"{unit.key} FAILED: {reason}")
        store.put(unit.label, unit.name, "status", {"reason": reason, "traceback": str(exc)[-4000:]},
                  status="failed")
        if unit.is_baseline:
            for variant in unit.pending_variants:
                if not store.variant_failed(unit.label, variant.name):
                    store.put(unit.label, variant.name, "status",
                              {"reason": f"not run: the baseline {unit.name} failed"}, status="failed")
