"""Results store: one JSON file, rewritten atomically after every finished cell.

A *cell* is one (model, variant, item) result, e.g. ``tiny-block / int4 / task:proxy_mc``.
Writing after each cell means an interrupted run loses at most the cell in
flight, and ``--resume`` skips everything already recorded.  The report is
rendered from this file alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become strings so the file stays standard JSON."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ResultStore:
    """``results.json`` = {"schema", "meta", "cells": {"model/variant/cell": {...}}}."""

    def __init__(self, path: Path, data: dict | None = None):
        self.path = Path(path)
        self.data = data or {"schema": SCHEMA_VERSION, "meta": {}, "cells": {}}

    @classmethod
    def load(cls, path: Path) -> "ResultStore":
        return cls(path, json.loads(Path(path).read_text()))

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

    def put(self, model: str, variant: str, cell: str, value: Any, status: str = "ok", **extra) -> None:
        entry = {"status": status, "value": _clean(value), **_clean(extra)}
        self.cells[self.key(model, variant, cell)] = entry
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=False))
        self.write_csv()

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
        fd_path = self.path.with_suffix(".csv")
        fd_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = fd_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["model", "variant", "cell", "metric", "value", "status"])
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, fd_path)
