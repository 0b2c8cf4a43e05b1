"""What the tool prints: quiet third-party libraries, one progress display for a study.

Quiet by default (every verb, set up by the CLI before the verb's module is imported, since most of
the noise comes at import time): warnings and info messages of the libraries we drive say nothing to
our user -- torchao's optional CUDA extensions that fail to load on a CPU machine, torch's
``_pytree`` deprecation notices, bitsandbytes' kernel messages and ``MatMul8bitLt`` cast warnings,
llm-compressor's "No accelerator available!", tokenizers' "sequence length is longer than the
specified maximum" on our own long quality text -- and their progress bars (lm-eval's request bars,
transformers' weight loading) would scroll our own progress away. ``--verbose`` shows all of it.
Errors from libraries are still shown.

The study progress is one tqdm bar on stderr (cells done / total, ETA, the current model / variant /
step) when stderr is a terminal; each step is also one timestamped line on stdout with the same
count and ETA, so logs and CI see the progress too.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
import warnings

# Loggers of the libraries we drive; in quiet mode only their errors are shown.
THIRD_PARTY_LOGGERS = ("torchao", "torch", "transformers", "tokenizers", "lm_eval", "lm-eval", "llmcompressor",
                       "compressed_tensors", "accelerate", "datasets", "bitsandbytes", "huggingface_hub",
                       "gguf", "evaluate", "sqlitedict", "numexpr", "matplotlib", "PIL", "urllib3", "filelock",
                       "root")

_state = {"verbose": False, "configured": False}


def is_verbose() -> bool:
    return _state["verbose"]


class _QuietFilter(logging.Filter):
    """Let through our own records and errors of everyone else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.startswith("attnres_quant")


def configure(verbose: bool = False) -> None:
    """Quiet (default) or verbose console; safe to call again (the last call wins)."""
    _state["verbose"] = bool(verbose)
    _state["configured"] = True
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # llm-compressor re-adds its own loguru sink (on stdout, level INFO) when it is imported.
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet = _QuietFilter()
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        # A filter on the logger (not only a level): libraries reset their own levels on import
        # (torch._logging does), but a record dropped at its logger never reaches any handler.
        logger.addFilter(quiet)
        if name != "root":
            logger.setLevel(logging.ERROR)
    # Child loggers (torch.utils._pytree, torchao.xyz) do not run their parents' filters: a filter on
    # the last-resort handler and on every handler that exists or appears catches their records.
    logging.lastResort = _filtered_last_resort(quiet)
    _filter_handlers_on_creation(quiet)
    # Python warnings from libraries (deprecations, MatMul8bitLt casts, ...); ours stay visible.
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"attnres_quant(\..*)?$")
    _quiet_loguru()
    _hide_third_party_bars()


def _filtered_last_resort(quiet: logging.Filter) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(quiet)
    return handler


def _filter_handlers_on_creation(quiet: logging.Filter) -> None:
    """Every logging handler created from now on (torch's, lm-eval's, ...) drops third-party
    warnings; handlers already created get the filter too."""
    for ref in list(logging._handlerList):  # weakrefs to every handler created so far
        handler = ref()
        if handler is not None and quiet not in handler.filters:
            handler.addFilter(quiet)
    if getattr(logging.Handler.__init__, "_attnres_quiet", False):
        return
    original = logging.Handler.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not _state["verbose"]:
            self.addFilter(quiet)

    __init__._attnres_quiet = True
    logging.Handler.__init__ = __init__


def _quiet_loguru() -> None:
    """llm-compressor logs through loguru (its own handlers, not ``logging``)."""
    try:
        from loguru import logger as loguru_logger
    except ImportError:
        return
    loguru_logger.remove()
    loguru_logger.add(sys.stderr, level="ERROR")


def _hide_third_party_bars() -> None:
    """Progress bars created outside this package (lm-eval's request bars, transformers' weight
    loading, datasets' maps) are created disabled; ours (the study bar, training) are not. The
    caller is the first frame outside tqdm's own modules."""
    try:
        from tqdm import std
    except ImportError:
        return
    original = std.tqdm.__init__
    if getattr(original, "_attnres_quiet", False):
        return

    def __init__(self, *args, **kwargs):
        if not _state["verbose"]:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "tqdm":
                frame = frame.f_back
            caller = frame.f_globals.get("__name__", "") if frame is not None else ""
            if not caller.startswith("attnres_quant"):
                kwargs["disable"] = True
                # The library's own step ("(3/9): Calibrating", llm-compressor's per-layer GPTQ/AWQ
                # pass) moves to the study's progress bar instead.
                progress = _state.get("progress")
                if progress is not None and kwargs.get("desc"):
                    progress.detail(f"{caller.split('.')[0]}: {kwargs['desc']}")
        original(self, *args, **kwargs)

    __init__._attnres_quiet = True
    std.tqdm.__init__ = __init__


# --------------------------------------------------------------------------- study progress
class StudyProgress:
    """Cells done / total with an ETA, and the current (model, variant, step).

    ``total`` counts the cells this run has to compute (finished cells of a resumed run are not
    counted); a variant that fails drops its remaining cells from the total."""

    def __init__(self, total: int):
        self.total = max(0, int(total))
        self.done = 0
        self.t0 = time.monotonic()
        self.bar = None
        _state["progress"] = self
        if sys.stderr.isatty() and self.total:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="cell", dynamic_ncols=True, leave=False, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} cells [{elapsed}<{remaining}{postfix}]")

    def detail(self, text: str) -> None:
        """What a library is doing inside the current step (shown on the bar only)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60], refresh=True)

    def eta_text(self) -> str:
        if not self.done or self.done >= self.total:
            return ""
        rate = (time.monotonic() - self.t0) / self.done
        left = int(rate * (self.total - self.done))
        return f", ETA {left // 60}m{left % 60:02d}s"

    def step(self, model: str, variant: str, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.set_description_str(f"{model} / {variant}: {what}", refresh=True)
        log(f"[{self.done}/{self.total} cells{self.eta_text()}] {model} / {variant}: {what}")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def drop(self, n: int) -> None:
        """Cells that will not run (a failed variant): out of the total."""
        self.total = max(self.done, self.total - n)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def close(self) -> None:
        if _state.get("progress") is self:
            _state["progress"] = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def log(msg: str) -> None:
    """A timestamped line on stdout that does not tear an active progress bar."""
    line = f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}"
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
    except ImportError:
        print(line)
    sys.stdout.flush()
