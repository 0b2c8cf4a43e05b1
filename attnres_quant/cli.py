"""Command-line entry point: ``python -m attnres_quant VERB ...``.

Each verb lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; the module is imported only when its verb is used, so
``--help`` of one verb does not pay for the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

VERBS = {
    "run": ("attnres_quant.pipeline.runner", "run a study config end to end and write its report"),
    "plan": ("attnres_quant.quant.plan_cli", "print the resolved precision plan of a config's variants"),
    "train": ("attnres_quant.training.train", "train a tiny model from a training config"),
    "bench": ("attnres_quant.bench.cli", "latency/memory benchmarks (overhead, kernels)"),
    "report": ("attnres_quant.report.render", "re-render a report from results.json"),
    "convert": ("attnres_quant.convert", "retrofit a Llama-style checkpoint into Block/Full AttnRes"),
}


def _usage() -> str:
    lines = ["usage: python -m attnres_quant VERB [options]", "", "verbs:"]
    lines += [f"  {verb:<8} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "python -m attnres_quant VERB --help shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("attnres_quant"):
            print(f"error: `{verb}` is not built yet in this version ({module_name} is missing).",
                  file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"python -m attnres_quant {verb}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished results are saved; rerun with --resume to continue.", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
