"""Results store: one JSON file, rewritten atomically after every finished cell.

A *cell* is one (model, variant, item) result, e.g. ``tiny-block / int4 / task:proxy_mc``.
Writing after each cell means an interrupted run loses at most the cell in
flight, and ``--resume`` skips everything already recorded.  The report is
rendered from this file alone.

``results.json`` (schema 2)::

    {"schema": 2,
     "meta":  {... the run: config, versions, machine, models [{path, name, label, ...}], baseline,
               variants, tasks, git_commit, started, finished ...},
     "cells": {"<model>/<variant>/<cell>": {"status": "ok" | "failed", "value": ...,
                                            "provenance": {"git_commit": str | null,
                                                           "versions": {package: version}},
                                            ... optional extras (wall_s, limit, ...)}}}

Non-finite numbers are stored as ``null`` (schema 1 stored the strings "nan"/"inf").  Files are
validated on load (:func:`validate_results`): structure and the types of the fields the pipeline
and the report rely on; unknown keys inside cells and meta are allowed, so new evaluation fields
need no schema change.
"""

from __future__ import annotations

import csv
import datetime as _dt
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UserError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)   # `report` renders both; `--resume` needs SCHEMA_VERSION
MAX_RESULTS_BYTES = 512 * 1024 * 1024
_NON_FINITE_STRINGS = {"nan", "-nan", "inf", "-inf", "infinity", "-infinity"}


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become ``null`` so the file stays standard JSON and readers see "no value"."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _upgrade_v1(value: Any) -> Any:
    """Schema 1 stored NaN/Inf as strings; read them as ``null``."""
    if isinstance(value, str) and value.lower() in _NON_FINITE_STRINGS:
        return None
    if isinstance(value, dict):
        return {k: _upgrade_v1(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_upgrade_v1(v) for v in value]
    return value


# --------------------------------------------------------------------------- I/O errors
def os_error_reason(exc: OSError) -> str:
    reasons = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ENOTDIR: "a part of the path is a file, not a folder",
               errno.EISDIR: "the path is a folder", errno.EEXIST: "a file is in the way",
               errno.EDQUOT: "the disk quota is exceeded", errno.ENAMETOOLONG: "the name is too long"}
    return reasons.get(exc.errno, exc.strerror or type(exc).__name__)


def write_error(path: Path, exc: OSError, consequence: str = "") -> UserError:
    return UserError(f"could not write {str(path)!r}: {os_error_reason(exc)}" + (f"; {consequence}" if consequence
                                                                                  else ""),
                     str(path.parent), "free space or choose a writable folder (--out), then rerun"
                     + (" with --resume" if "--resume" in consequence else ""))


def ensure_dir(path: Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) or explain in one paragraph why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} {str(path)!r} is a file, not a folder", str(path.parent),
                        "pass a folder (--out DIR) or remove the file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the {what} {str(path)!r}: {os_error_reason(exc)}", str(path.parent),
                        "choose a writable folder (--out DIR)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"the {what} {str(path)!r} is not writable", str(path),
                        "choose a writable folder (--out DIR) or fix its permissions")
    return path


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename) with ordinary permissions (0644 under
    the usual umask). On any OS error the old file is untouched and a ``UserError`` says why."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise write_error(path, exc, "the previous version of the file, if any, is unchanged") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def backup_previous(path: Path) -> Path | None:
    """Move an existing results file aside as ``results.<UTC time>.json`` (never overwriting an older one)."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for i in range(1, 10_000):
        target = path.with_name(f"{path.stem}.{stamp}{'' if i == 1 else f'-{i}'}{path.suffix}")
        if not target.exists():
            break
    try:
        os.replace(path, target)
    except OSError as exc:
        raise UserError(f"could not keep the previous {str(path)!r} as {target.name}: {os_error_reason(exc)}",
                        str(path.parent), "make the folder writable, or pass --resume to continue it") from None
    return target


# --------------------------------------------------------------------------- validation
def _is_num(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _is_slug(x) -> bool:
    from .config import is_slug

    return is_slug(x)


def validate_results(data: Any, *, schemas=READABLE_SCHEMAS) -> list[str]:
    """Problems of a results.json mapping (empty when valid). Unknown keys are allowed everywhere."""
    if not isinstance(data, dict):
        return [f"the top level is {type(data).__name__}, not an object"]
    problems: list[str] = []
    schema = data.get("schema")
    if schema not in schemas:
        problems.append(f"`schema` is {schema!r}; this version reads schema {' or '.join(map(str, schemas))}")
        return problems
    meta, cells = data.get("meta"), data.get("cells")
    if not isinstance(meta, dict):
        problems.append("`meta` is missing or not an object")
    if not isinstance(cells, dict):
        problems.append("`cells` is missing or not an object")
    if problems:
        return problems
    for key, kind in (("config_name", str), ("baseline", str), ("variants", list), ("tasks", list),
                      ("models", list), ("versions", dict), ("machine", dict), ("overrides", list),
                      ("git_commit", str), ("config_path", str)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            problems.append(f"`meta.{key}` is {type(meta[key]).__name__}, not {kind.__name__}")
    for key in ("baseline",):
        if isinstance(meta.get(key), str) and not _is_slug(meta[key]):
            problems.append(f"`meta.{key}` {meta[key][:60]!r} is not a safe name")
    if isinstance(meta.get("variants"), list) and not all(_is_slug(v) for v in meta["variants"]):
        problems.append("`meta.variants` holds a name that is not a safe name")
    if isinstance(meta.get("tasks"), list) and not all(isinstance(t, str) for t in meta["tasks"]):
        problems.append("`meta.tasks` holds a non-string")
    for i, m in enumerate(meta.get("models") or [] if isinstance(meta.get("models"), list) else []):
        if not isinstance(m, dict) or not isinstance(m.get("path"), str):
            problems.append(f"`meta.models.{i}` is not an object with a string `path`")
            continue
        label = m.get("label") or m.get("name")
        if label is not None and not _is_slug(label):
            problems.append(f"`meta.models.{i}` has the label {str(label)[:60]!r}, which is not a safe name")
    for key, entry in cells.items():
        parts = key.split("/", 2)
        if len(parts) != 3 or not _is_slug(parts[0]) or not _is_slug(parts[1]) or not parts[2]:
            problems.append(f"cell key {key[:80]!r} is not `model/variant/cell` with safe names")
        elif not isinstance(entry, dict):
            problems.append(f"cell {key!r} is {type(entry).__name__}, not an object")
        elif entry.get("status") not in ("ok", "failed"):
            problems.append(f"cell {key!r} has status {str(entry.get('status'))[:40]!r} (expected ok or failed)")
        elif entry.get("provenance") is not None and not isinstance(entry["provenance"], dict):
            problems.append(f"cell {key!r}: `provenance` is not an object")
        elif not _is_num(entry.get("wall_s")):
            problems.append(f"cell {key!r}: `wall_s` is not a number")
        else:
            problems += [f"cell {key!r}: {p}" for p in _cell_problems(parts[2], entry)]
        if len(problems) > 20:
            break
    return problems


def _cell_problems(cell: str, entry: dict) -> list[str]:
    value, status = entry.get("value"), entry["status"]
    if status == "failed":
        if cell == "status" and not (isinstance(value, dict) and isinstance(value.get("reason", ""), str)):
            return ["a failed status needs `value.reason` (a string)"]
        return []
    if cell.startswith("task:"):
        if not isinstance(value, dict):
            return ["`value` is not an object of subtask results"]
        for sub, r in value.items():
            if not isinstance(r, dict):
                return [f"subtask {sub!r} is not an object"]
            for field in ("value", "stderr"):
                if not _is_num(r.get(field)):
                    return [f"subtask {sub!r}: `{field}` is not a number"]
            if r.get("n") is not None and not (isinstance(r["n"], int) and not isinstance(r["n"], bool)):
                return [f"subtask {sub!r}: `n` is not an integer"]
            if r.get("per_sample") is not None and not (
                    isinstance(r["per_sample"], list) and all(_is_num(x) for x in r["per_sample"])):
                return [f"subtask {sub!r}: `per_sample` is not a list of numbers"]
            if r.get("metric") is not None and not isinstance(r["metric"], str):
                return [f"subtask {sub!r}: `metric` is not a string"]
        return []
    if cell in ("quality", "latency", "plan", "model", "status"):
        if not isinstance(value, dict):
            return [f"`value` of a {cell} cell is not an object"]
        numeric = {"quality": ("bpb", "ppl", "kl_mean", "kl_p99", "top1_agreement", "tokens"),
                   "latency": ("prefill_ms", "prefill_ms_iqr", "decode_ms_per_token", "tokens_per_s",
                               "peak_mem_bytes", "weight_bytes"),
                   "plan": ("avg_bits", "weight_bytes")}.get(cell, ())
        bad = [f for f in numeric if not _is_num(value.get(f))]
        if bad:
            return [f"`{bad[0]}` is not a number"]
        if cell == "quality" and value.get("depth_js") is not None and not (
                isinstance(value["depth_js"], list) and all(_is_num(x) for x in value["depth_js"])):
            return ["`depth_js` is not a list of numbers"]
        return []
    if cell == "depth":
        if value is None:
            return []
        if not (isinstance(value, list) and all(isinstance(row, list) and all(_is_num(x) for x in row)
                                                for row in value)):
            return ["`value` of a depth cell is not a list of lists of numbers"]
    return []


def load_results(path: Path, *, schemas=READABLE_SCHEMAS) -> dict:
    """Read and validate a results.json; ``UserError`` (naming the file and the first problems) otherwise."""
    path = Path(path)
    fix = ("re-run the study to rewrite it, or restore an earlier copy (a run keeps every previous "
           "results.json beside it as results.<time>.json)")
    try:
        size = path.stat().st_size
        if size > MAX_RESULTS_BYTES:
            raise UserError(f"{str(path)!r} is {size:,} bytes, too large for a results file", str(path.parent), fix)
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"could not read {str(path)!r}: {os_error_reason(exc)}", str(path.parent),
                        "check the path and its permissions") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{str(path)!r} is not a results file (binary, not UTF-8 JSON)", str(path), fix) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{str(path)!r} is damaged: not valid JSON ({exc.msg} at line {exc.lineno}, "
                        f"column {exc.colno})", str(path), fix) from None
    except RecursionError:
        raise UserError(f"{str(path)!r} is damaged: nested too deeply", str(path), fix) from None
    if isinstance(data, dict) and data.get("schema") == 1 and 1 in schemas:
        data = _upgrade_v1(data)
    problems = validate_results(data, schemas=schemas)
    if problems:
        shown = "; ".join(p[:200] for p in problems[:3]) + (f" (and {len(problems) - 3} more)"
                                                             if len(problems) > 3 else "")
        raise UserError(f"{str(path)!r} is not a valid results file: {shown}", str(path), fix)
    return _clean(data)


# --------------------------------------------------------------------------- store
class ResultStore:
    """``results.json`` = {"schema", "meta", "cells": {"model/variant/cell": {...}}}.

    ``provenance`` (git commit and library versions of this run) is stamped on every cell this
    store writes; cells loaded from an earlier run keep theirs.
    """

    def __init__(self, path: Path, data: dict | None = None, provenance: dict | None = None):
        self.path = Path(path)
        self.data = data or {"schema": SCHEMA_VERSION, "meta": {}, "cells": {}}
        self.provenance = provenance

    @classmethod
    def load(cls, path: Path, provenance: dict | None = None) -> "ResultStore":
        """Load for appending: the file must be of the current schema (cells of two schemas never mix)."""
        data = load_results(path)
        if data["schema"] != SCHEMA_VERSION:
            raise UserError(f"{str(path)!r} was written with results schema {data['schema']}; this version writes "
                            f"schema {SCHEMA_VERSION} and does not mix the two", str(path),
                            "drop --resume to start over (the old file is kept beside the new one), or finish "
                            "the run with the version that started it")
        return cls(path, data, provenance)

    @staticmethod
    def key(model: str, variant: str, cell: str) -> str:
        return f"{model}/{variant}/{cell}"

    @property
    def meta(self) -> dict:
        return self.data["meta"]

    @property
    def cells(self) -> dict:
        return self.data["cells"]

    def get(self, model: str, variant: str, cell: str) -> dict | None:
        return self.cells.get(self.key(model, variant, cell))

    def done(self, model: str, variant: str, cell: str) -> bool:
        entry = self.get(model, variant, cell)
        return entry is not None and entry.get("status") == "ok"

    def variant_failed(self, model: str, variant: str) -> dict | None:
        entry = self.get(model, variant, "status")
        return entry if entry and entry.get("status") == "failed" else None

    def finished_count(self) -> int:
        return sum(1 for c in self.cells.values() if c.get("status") == "ok")

    def put(self, model: str, variant: str, cell: str, value: Any, status: str = "ok", **extra) -> None:
        entry = {"status": status, "value": _clean(value), **_clean(extra)}
        if self.provenance is not None:
            entry["provenance"] = self.provenance
        key = self.key(model, variant, cell)
        previous = self.cells.get(key)
        self.cells[key] = entry
        try:
            self.save()
        except UserError:
            if previous is None:
                self.cells.pop(key, None)
            else:
                self.cells[key] = previous
            raise

    def save(self) -> None:
        text = json.dumps(_clean(self.data), indent=1, sort_keys=False, allow_nan=False)
        try:
            atomic_write_text(self.path, text)
            self.write_csv()
        except UserError as exc:
            raise UserError(exc.what.split(";")[0] + f"; {self.path.name} still holds every cell finished before "
                            "this one", exc.where, "free space or make the folder writable, then rerun the same "
                            "command with --resume") from None

    def write_csv(self) -> None:
        """Flat scalar view (results.csv) for spreadsheets and pandas."""
        rows = []
        for key, entry in self.cells.items():
            model, variant, cell = key.split("/", 2)
            value = entry.get("value")
            scalars = value if isinstance(value, dict) else {"value": value}
            for metric, v in scalars.items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    rows.append({"model": model, "variant": variant, "cell": cell,
                                 "metric": metric, "value": v, "status": entry.get("status")})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["model", "variant", "cell", "metric", "value", "status"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path.with_suffix(".csv"), buf.getvalue())
