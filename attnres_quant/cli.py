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
    "sensitivity": ("attnres_quant.pipeline.sensitivity", "rank the damage of quantizing one part at a time (KL)"),
    "search": ("attnres_quant.pipeline.search", "find a mixed-precision policy under a bit or KL budget"),
    "train": ("attnres_quant.training.train", "train a tiny model from a training config"),
    "bench": ("attnres_quant.bench.cli", "benchmarks: overhead, kernels, kimi, kquant, memory"),
    "report": ("attnres_quant.report.render", "re-render a report from a study folder or its results.json"),
    "convert": ("attnres_quant.convert", "retrofit a Llama-style checkpoint into Block/Full AttnRes"),
    "export": ("attnres_quant.export", "write a variant as a compressed-tensors checkpoint (or .gguf) + model card"),
    "compare": ("attnres_quant.compare", "Δ table (paired CIs where the documents align) between two studies"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the full usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {cap_message(message)}. Run `{self.prog} --help` for the options.\n")


def _usage() -> str:
    lines = ["usage: python -m attnres_quant [--version] VERB [options]", "", "verbs:"]
    lines += [f"  {verb:<11} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "python -m attnres_quant VERB --help shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # like argparse without a required argument: the usage, on stderr, exit status 2
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"attnres_quant {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {cap_message(verb, 80)!r}; the verbs are {', '.join(VERBS)} "
              "(python -m attnres_quant --help describes them).", file=sys.stderr)
        return 2
    module_name, help_ = VERBS[verb]
    from . import console

    # Before the verb's module is imported: most third-party noise is printed at import time.
    console.configure(verbose=wants_verbose(rest))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("attnres_quant"):
            print(f"error: `{verb}` is not built yet in this version ({module_name} is missing).",
                  file=sys.stderr)
            return 2
        raise
    parser = ArgumentParser(prog=f"python -m attnres_quant {verb}", description=help_)
    module.add_arguments(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="also show third-party libraries' warnings, info messages and progress bars "
                             "(hidden by default)")
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:  # argparse: usage + one error line already printed (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"error: {cap_message(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # I/O the verb did not anticipate (disk full, read-only storage, ...)
        from .pipeline.results import os_error_reason

        target = f" on {exc.filename!r}" if exc.filename else ""
        print(cap_message(f"error: {verb} stopped: {os_error_reason(exc)}{target} ({exc.strerror or exc}). "
                          "Fix: free space or choose a writable location, then rerun."), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `run` reports what it saved itself; other verbs write nothing partial
        print("interrupted.", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


def wants_verbose(args: list[str]) -> bool:
    """``--verbose`` among a verb's options (not after a ``--``)."""
    return "--verbose" in (args[: args.index("--")] if "--" in args else args)


MAX_MESSAGE_CHARS = 1200


def cap_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message is a paragraph, whatever the input held (a huge key, a million-entry mapping)."""
    if len(text) <= limit:
        return text
    tail = min(150, limit // 4)
    head = limit - tail
    return text[:head] + f" ... [{len(text) - head - tail:,} characters cut] ... " + text[len(text) - tail:]


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
