"""Latency and memory harness: prefill, KV-cache decode, peak memory, stored weight bytes.

``measure_latency`` times one model; ``measure_interleaved`` times several
models round-robin (order rotated every round) so that background load and
thermal drift hit all of them equally -- use it whenever figures are compared.

Timing discipline: warm-up rounds are discarded; every figure is a median over
``repeats`` with its inter-quartile range; on GPU each phase is bracketed by
CUDA events after a synchronize; on CPU the thread count is fixed for the
measurement (default: physical cores) and recorded.  Every result carries
``simulated`` (fake-quantized weights run as dense floats: its latency is *not*
the latency of a real low-bit kernel) and ``kernel`` (what actually ran).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import statistics
import threading
import time
from typing import Iterator

import torch
from torch import nn

from .machine import resolve_device

# --------------------------------------------------------------------------- weight bytes


def _inner_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that actually hold a (possibly wrapped) parameter's data.

    * torchao tensor subclasses (``Int8Tensor``, int4 tensors, affine-quantized
      tensors) expose their storage through ``__tensor_flatten__``: packed
      ``qdata`` plus ``scale``/``zero_point`` -- recurse into those;
    * bitsandbytes ``Params4bit`` holds the packed uint8 data (two 4-bit codes
      per byte) and a ``quant_state`` (absmax, code book, offset, nested state);
    * bitsandbytes ``Int8Params`` holds int8 data plus per-row ``SCB`` scales
      (``CB`` aliases the data and is deduplicated by the caller).
    """
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _inner_tensors(inner)
        return
    yield t
    for attr in ("SCB", "CB"):
        extra = getattr(t, attr, None)
        if isinstance(extra, torch.Tensor):
            yield extra
    state = getattr(t, "quant_state", None)
    while state is not None:
        for attr in ("absmax", "code", "offset"):
            extra = getattr(state, attr, None)
            if isinstance(extra, torch.Tensor):
                yield extra
        state = getattr(state, "state2", None)


def stored_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every distinct plain tensor holding a parameter or buffer (shared/tied storage once)."""
    seen: set = set()
    out = []
    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is None:
                continue
            for leaf in _inner_tensors(t):
                ptr = leaf.data_ptr() if leaf.device.type != "meta" else 0
                key = (ptr, leaf.nbytes, leaf.dtype) if ptr else ("id", id(leaf))
                if key in seen:
                    continue
                seen.add(key)
                out.append(leaf)
    return out


def _packed_params_bytes(module: nn.Module) -> int:
    """torch.ao dynamic-quantized Linear keeps its weight in an opaque fbgemm/onednn
    packed object (not a parameter or buffer): count int8 values, scales, zero
    points and bias as unpacked from it."""
    packed = getattr(module, "_packed_params", None)
    # Only the holder of the opaque object (LinearPackedParams), not the Linear
    # that wraps it, so each packed weight is counted once.
    if not isinstance(packed, torch._C.ScriptObject) or not hasattr(module, "_weight_bias"):
        return 0
    w, b = module._weight_bias()
    total = w.numel() * w.element_size()
    if w.is_quantized and w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                          torch.per_channel_affine_float_qparams):
        total += w.q_per_channel_scales().nbytes + w.q_per_channel_zero_points().nbytes
    elif w.is_quantized:
        total += 8 + 8  # one fp64 scale and one int64 zero point
    if b is not None:
        total += b.nbytes
    return int(total)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as actually stored (packed int4 = half a byte a weight,
    plus scales/zero points/code books); tied weights are counted once."""
    packed = sum(_packed_params_bytes(m) for m in model.modules())
    return int(sum(t.nbytes for t in stored_tensors(model)) + packed)


def linear_weight_bytes(model: nn.Module, *, exclude: tuple[str, ...] = ("embeddings", "embed_tokens")
                        ) -> int:
    """Bytes a decode step streams from memory: every weight except the embedding table
    (of which one row per token is read)."""
    total = 0
    seen: set = set()
    for name, module in model.named_modules():
        if any(part in name.split(".") for part in exclude):
            continue
        total += _packed_params_bytes(module)
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is None:
                continue
            for leaf in _inner_tensors(t):
                key = (leaf.data_ptr(), leaf.nbytes)
                if key not in seen:
                    seen.add(key)
                    total += leaf.nbytes
    return total


# --------------------------------------------------------------------------- timing helpers


def summarize(samples: list[float]) -> dict:
    """Median, inter-quartile range and the raw samples (ms)."""
    s = sorted(samples)
    if len(s) >= 2:
        q = statistics.quantiles(s, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = s[0]
    return {"median": statistics.median(s), "iqr": p75 - p25, "p25": p25, "p75": p75,
            "samples": [round(x, 4) for x in samples]}


class _Timer:
    """Milliseconds of a region: CUDA events on GPU; on CPU wall clock (``perf_counter``) or,
    with ``clock="cpu"``, this process's CPU time (``process_time``: robust to other jobs on a
    shared machine, but it counts every thread, so use it with ``threads=1``)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
        self.cuda = device.type == "cuda"
        self.device = device
        self.now = time.process_time if (clock == "cpu" and not self.cuda) else time.perf_counter

    @contextlib.contextmanager
    def __call__(self, out: list):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize(self.device)
            out.append(start.elapsed_time(end))
        else:
            t0 = self.now()
            yield
            out.append((self.now() - t0) * 1e3)


@contextlib.contextmanager
def fixed_threads(threads: int | None, device: torch.device):
    """Pin torch's intra-op thread count for the measurement (CPU); yields the count used."""
    import psutil

    previous = torch.get_num_threads()
    if threads is None:
        threads = psutil.cpu_count(logical=False) or previous
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


class PeakMemory:
    """Peak memory of a region beyond what was allocated when it started.

    GPU: ``torch.cuda.max_memory_allocated`` (reset at entry).  CPU: peak
    resident set size minus RSS at entry; the kernel's high-water mark is reset
    through ``/proc/self/clear_refs`` when allowed, otherwise RSS is sampled
    every millisecond by a thread.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_delta"
        self.peak_bytes = 0

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        import psutil

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self._proc = psutil.Process()
        self.start = self._proc.memory_info().rss
        self._hwm = False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
            self._hwm = self._status_kib("VmHWM") is not None
        except OSError:
            self._hwm = False
        self._sampled = self.start
        if not self._hwm:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            peak = (self._status_kib("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, self._proc.memory_info().rss)
        self.peak_bytes = max(0, int(peak - self.start))
        return False


def _accepts(model: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> str:
    """The dtype of the model's float weights ('bfloat16', 'float32', ...), for labels."""
    for t in model.parameters():
        if t.is_floating_point():
            return str(t.dtype).replace("torch.", "")
    return "unknown"


def prompt_ids(vocab_size: int, batch_size: int, prompt_len: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=g).to(device)


def run_once(model: nn.Module, ids: torch.Tensor, decode_tokens: int, timer: _Timer) -> tuple[float, float]:
    """One prefill (building the KV cache, next-token logits only) then ``decode_tokens``
    greedy single-token steps on that cache. Returns (prefill ms, decode ms per token)."""
    kw = {"use_cache": True}
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1
    prefill: list = []
    decode: list = []
    with torch.inference_mode():
        with timer(prefill):
            out = model(input_ids=ids, **kw)
            nxt = out.logits[:, -1:].argmax(-1)
        cache = out.past_key_values
        if decode_tokens > 0:
            with timer(decode):
                for _ in range(decode_tokens):
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    nxt = out.logits[:, -1:].argmax(-1)
    return prefill[0], (decode[0] / decode_tokens if decode_tokens > 0 else float("nan"))


# --------------------------------------------------------------------------- public API


def measure_interleaved(models: dict[str, nn.Module], *, prompt_len: int = 128, batch_size: int = 1,
                        decode_tokens: int = 16, warmup: int = 1, repeats: int = 5,
                        simulated: dict[str, bool] | bool = False, kernel: dict[str, str] | str = "torch",
                        threads: int | None = None, vocab_size: int | None = None, seed: int = 0,
                        measure_memory: bool = True, clock: str = "wall") -> dict[str, dict]:
    """Time several models round-robin on the same prompts; returns one result per name.

    Each round runs every model once (prefill + decode); the order is rotated
    every round so no model always runs first (cold caches) or last.
    Peak memory is taken in a separate pass per model after the timed rounds.
    """
    if not models:
        return {}
    names = list(models)
    device = model_device(models[names[0]])
    sim = simulated if isinstance(simulated, dict) else {n: simulated for n in names}
    kern = kernel if isinstance(kernel, dict) else {n: kernel for n in names}
    if vocab_size is None:
        vocab_size = min(getattr(getattr(m, "config", None), "vocab_size", 32000) or 32000
                         for m in models.values())
    ids = prompt_ids(vocab_size, batch_size, prompt_len, device, seed)
    timer = _Timer(device, clock)
    pre = {n: [] for n in names}
    dec = {n: [] for n in names}
    for m in models.values():
        m.eval()
    with fixed_threads(threads, device) as used_threads:
        for r in range(warmup + repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                p, d = run_once(models[n], ids, decode_tokens, timer)
                if r >= warmup:
                    pre[n].append(p)
                    dec[n].append(d)
        peaks = {}
        for n in names:
            if measure_memory:
                with PeakMemory(device) as pm:
                    run_once(models[n], ids, decode_tokens, timer)
                peaks[n] = (pm.peak_bytes, pm.kind)
            else:
                peaks[n] = (None, None)
    results = {}
    for n in names:
        ps, ds = summarize(pre[n]), summarize(dec[n])
        results[n] = {
            "prefill_ms": ps["median"], "prefill_ms_iqr": ps["iqr"], "prefill_ms_samples": ps["samples"],
            "decode_ms_per_token": ds["median"], "decode_ms_per_token_iqr": ds["iqr"],
            "decode_ms_per_token_samples": ds["samples"],
            "tokens_per_s": (1e3 * batch_size / ds["median"]) if decode_tokens > 0 else None,
            "prefill_tokens_per_s": 1e3 * batch_size * prompt_len / ps["median"],
            "peak_mem_bytes": peaks[n][0], "peak_mem_kind": peaks[n][1],
            "weight_bytes": weight_bytes(models[n]),
            "prompt_len": prompt_len, "batch_size": batch_size, "decode_tokens": decode_tokens,
            "warmup": warmup, "repeats": repeats,
            "threads": used_threads, "device": str(device), "dtype": model_dtype(models[n]),
            "clock": "cuda_events" if device.type == "cuda" else ("process_cpu_time" if clock == "cpu" else "wall"),
            "simulated": bool(sim.get(n, False)), "kernel": kern.get(n, "torch"),
        }
    return results


def measure_latency(model: nn.Module, *, prompt_len: int = 128, batch_size: int = 1,
                    decode_tokens: int = 16, warmup: int = 1, repeats: int = 5, simulated: bool = False,
                    kernel: str = "torch", threads: int | None = None, vocab_size: int | None = None,
                    seed: int = 0, measure_memory: bool = True, clock: str = "wall") -> dict:
    """Prefill and KV-cache decode latency, peak memory and stored weight bytes of one model.

    Returns a flat dict: ``prefill_ms`` (median) / ``prefill_ms_iqr`` /
    ``prefill_ms_samples``, ``decode_ms_per_token`` (+ ``_iqr``, ``_samples``),
    ``tokens_per_s`` (decode, batch included), ``prefill_tokens_per_s``,
    ``peak_mem_bytes`` and ``peak_mem_kind`` (``cuda_max_allocated`` or
    ``rss_delta``), ``weight_bytes``, the settings, ``threads``, ``device``,
    ``dtype``, and the ``simulated`` / ``kernel`` flags.
    """
    return measure_interleaved({"model": model}, prompt_len=prompt_len, batch_size=batch_size,
                               decode_tokens=decode_tokens, warmup=warmup, repeats=repeats,
                               simulated=simulated, kernel=kernel, threads=threads,
                               vocab_size=vocab_size, seed=seed, measure_memory=measure_memory,
                               clock=clock)["model"]


def measure_latency_grid(model: nn.Module, *, prompt_lens: list[int], batch_sizes: list[int],
                         **kwargs) -> list[dict]:
    """``measure_latency`` at every (prompt length, batch size) pair."""
    return [measure_latency(model, prompt_len=t, batch_size=b, **kwargs)
            for b in batch_sizes for t in prompt_lens]
