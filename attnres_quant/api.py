"""Python API beside the CLI: ``run_study`` is ``python -m attnres_quant run`` as a function.

    import attnres_quant
    study = attnres_quant.run_study("configs/int4_hybrid.yaml", out="/tmp/reports", limit=20,
                                    eval={"batch_size": 16}, model={"path": "/ckpt"})
    study.report_path, study.results["cells"]

It calls the runner's own entry (``pipeline.runner.main``) with the arguments the CLI would pass, so
validation, preflight, resume, locking and the report are exactly the CLI's. Errors are raised
(``UserError`` for bad input) instead of printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError


@dataclass
class Study:
    """A finished study: its name, results file, rendered report and the results mapping (schema 2)."""

    name: str
    results_path: Path
    report_path: Path
    results: dict = field(repr=False)

    @property
    def cells(self) -> dict:
        """``{"model/variant/cell": {"status", "value", ...}}``."""
        return self.results.get("cells", {})

    def value(self, model: str, variant: str, cell: str):
        """The value of a finished cell, e.g. ``study.value("tiny-block", "int4_hybrid", "quality")``;
        None if the cell is missing or failed."""
        entry = self.cells.get(f"{model}/{variant}/{cell}")
        return entry.get("value") if entry and entry.get("status") == "ok" else None


def _flatten(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    else:
        out.append(f"{prefix}={json.dumps(value)}")  # JSON is YAML: --set parses it back to the same value


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``--set`` arguments for keyword overrides: ``eval={"limit": 20}`` and ``eval__limit=20`` both give
    ``eval.limit=20`` (a mapping is merged key by key, any other value replaces)."""
    out: list[str] = []
    for key, value in overrides.items():
        _flatten(key.replace("__", "."), value, out)
    return out


def run_study(config: str | Path | Mapping[str, Any], *, out: str | Path = "runs", resume: bool = False,
              device: str | None = None, tasks: list[str] | None = None, limit: int | float | None = None,
              include_path: list[str] | None = None, set: list[str] | None = None,  # noqa: A002 (the CLI's name)
              **overrides: Any) -> Study:
    """Run a study and return it.

    ``config``: a study config path or the config as a mapping. ``out``, ``resume``, ``device``,
    ``tasks``, ``limit`` (N, or a fraction 0 < limit < 1), ``include_path`` (task folders) and ``set`` (a list
    of ``"key=value"``) are the ``run`` flags of the same
    names; any other keyword overrides config keys (``model={"path": "/ckpt"}``, ``eval__limit=20``),
    applied after ``set``.
    """
    from .pipeline import runner

    from .pipeline.config import check_limit

    try:
        limit = check_limit(limit)
    except ValueError as exc:
        raise UserError(f"limit={limit!r}: {exc}", "run_study", "pass e.g. limit=20 or limit=0.1") from None
    if isinstance(include_path, (str, Path)):
        include_path = [str(include_path)]
    if tasks is not None:
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = runner._task_list(",".join(str(t) for t in tasks)) if tasks else runner._task_list("")
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={device!r} is not one of auto, cpu, cuda", "run_study", "pass device='cpu'")
    set_args = [*(set or []), *override_args(overrides)]

    with tempfile.TemporaryDirectory(prefix="attnres_quant_study_") as tmp:
        if isinstance(config, Mapping):
            name = config.get("name") if isinstance(config.get("name"), str) else "study"
            from .pipeline.config import safe_slug

            config_path = Path(tmp) / f"{safe_slug(name, fallback='study')}.yaml"
            config_path.write_text(json.dumps(dict(config)), encoding="utf-8")  # JSON is YAML
        else:
            config_path = Path(config)
        args = argparse.Namespace(config=str(config_path), set=set_args, tasks=tasks, limit=limit, resume=resume,
                                  device=device, out=str(out), include_path=include_path)
        # the name the runner gives the study (the config's `name`, else the file's), for the paths below
        from .pipeline.config import load_config

        study_config, _ = load_config(config_path, set_args, tasks=tasks, limit=limit, include_path=include_path)
        code = runner.main(args)
    if code != 0:
        raise RuntimeError(f"the study stopped (exit status {code}); rerun with resume=True to continue")
    results_path = Path(out) / study_config.name / "results.json"
    from .pipeline.results import load_results

    return Study(name=study_config.name, results_path=results_path,
                 report_path=Path(out) / f"{study_config.name}.md", results=load_results(results_path))
