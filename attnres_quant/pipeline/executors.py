"""Executors: who runs the (model, variant) units of a study.

The runner validates the config, opens the results store and renders the report; between the two it
hands the units to an executor. Whatever the executor, the driver process alone writes
``results.json`` (one atomic write per finished cell), so ``--resume`` and the report work the same.

- ``local`` (the default): this process, model by model -- load the baseline once, evaluate it, then
  each variant (``runner.run_model``). Imports nothing beyond the runner: Ray is not needed.
- ``ray``: each (model, variant) is a Ray task (``attnres_quant.pipeline.ray_executor``), on a local
  Ray instance or the cluster at ``--address``. Needs the optional extra ``pip install -e ".[ray]"``.
"""

from __future__ import annotations

from ..argtypes import int_in
from ..errors import UserError

EXECUTORS = ("local", "ray")
RAY_VERSION = "2.60.0"   # the extra's pin (pyproject.toml [project.optional-dependencies] ray)


def add_arguments(parser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: this process (default); ray: one Ray task per (model, variant), "
                             "needs pip install -e \".[ray]\"")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="with --executor ray: the Ray cluster to join (e.g. auto, or HEAD_IP:6379); "
                             "default: start a local Ray instance on this machine")
    parser.add_argument("--cpus-per-task", type=int_in(1), default=1, metavar="N",
                        help="with --executor ray: CPUs (and torch threads) each (model, variant) task asks for "
                             "(default 1)")


class LocalExecutor:
    """Every unit in this process, in config order (the behaviour of every version before executors)."""

    name = "local"

    def describe(self) -> dict:
        return {"name": self.name}

    def run(self, store, config, variants, device: str, source: str) -> None:
        from .runner import run_model

        for spec in config.models:
            run_model(store, spec, config, variants, device, source)


def make_executor(args):
    """The executor the command line asks for; a Ray request without Ray installed is a clear error."""
    kind = getattr(args, "executor", "local") or "local"
    address = getattr(args, "address", None)
    cpus = getattr(args, "cpus_per_task", 1) or 1
    if kind == "local":
        if address is not None:
            raise UserError("--address was given without --executor ray (a local run has no cluster to join)",
                            "command line", "add --executor ray, or drop --address")
        return LocalExecutor()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--executor ray needs Ray, which is not installed (it is an optional extra)",
                        "command line", f"pip install -e \".[ray]\" (ray=={RAY_VERSION}), or run with "
                        "--executor local") from None
    from .ray_executor import RayExecutor

    return RayExecutor(address=address, cpus_per_task=cpus)
