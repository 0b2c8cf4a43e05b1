"""``bench memory``: time and peak memory of one variant per method, at several model sizes.

Each (size, method) runs in its own subprocess, so its peak RSS (``VmHWM``) is its own: the
subprocess imports the libraries (GPTQ: llm-compressor too), loads a random-init AttnRes checkpoint
(bf16 safetensors written once per size into a scratch folder) and reads every weight once (the
file is memory-mapped lazily), and quantizes it the way the study pipeline does -- in place on
a fresh load (``quantize(..., inplace=True)``). Phase ``baseline`` only loads (its RSS after loading is
"the baseline's resident bytes"); ``rtn_copy`` is the pipeline's old way (a deep copy of a resident
baseline) for comparison. Figures: ``peak_over_baseline`` = peak RSS / baseline RSS (whole process) and
``model_peak_over_baseline`` = the same after subtracting the RSS of the imports alone (the model's share).
The extrapolation to 8B / 48B fits ``peak - imports = a * params + b`` and ``time = c * params`` on the
measured sizes (least squares) -- a linear model, stated as such.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # name: (hidden, layers, intermediate, vocab, heads, kv_heads)
    "3M": (256, 4, 512, 2048, 4, 2),
    "30M": (512, 8, 1536, 8192, 8, 4),
    "200M": (1024, 12, 3072, 32000, 16, 8),
}
METHODS = ("baseline", "rtn", "gptq", "rtn_copy")
EXTRAPOLATE = {"8B": 8e9, "48B": 48e9}
_VARIANTS = {
    "rtn": {"name": "rtn_int4_g128", "method": "rtn", "default": {"weight": "int4", "group_size": 128}},
    "rtn_copy": {"name": "rtn_int4_g128", "method": "rtn", "default": {"weight": "int4", "group_size": 128}},
    "gptq": {"name": "gptq_int4_g128", "method": "gptq", "default": {"weight": "int4", "group_size": 128}},
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    """This process's own high-water RSS. Not ``ru_maxrss``: Linux carries the parent's high-water mark
    into a forked-then-exec'd child, so every worker would report the driver's peak (the driver built
    the random checkpoint: 1389 MiB at 200M, whatever the worker did)."""
    hwm = _status_bytes("VmHWM")
    return hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_checkpoint(size: str, folder: Path, seed: int = 0) -> Path:
    """A random-init bf16 AttnRes checkpoint of ``size`` (SIZES) with a tiny tokenizer, in ``folder``."""
    import torch

    from ..evaluation.testing import tiny_tokenizer
    from ..model import AttnResConfig, AttnResForCausalLM

    hidden, layers, inter, vocab, heads, kv = SIZES[size]
    out = folder / f"attnres-{size}"
    if (out / "config.json").is_file():
        return out
    tok = tiny_tokenizer(vocab_size=320)
    cfg = AttnResConfig(hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, num_kv_heads=kv,
                        vocab_size=vocab, intermediate_size=inter, attnres_block_size=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AttnResForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def worker(path: str, method: str, calib_samples: int, calib_len: int, warmup: str | None = None) -> dict:
    """One measurement, in this (fresh) process: load, then quantize with ``method``.

    ``warmup``: a tiny checkpoint of the same family loaded (GPTQ: and quantized) and freed first, so that
    everything loading and the method import (transformers, accelerate, ... ~280 MiB; llm-compressor's
    oneshot ~220 MiB more) is in ``rss_imports``, not in the model's share.
    """
    import gc

    import torch

    from ..loading import load_model
    from ..quant import Variant, quantize

    if warmup:  # the method's own libraries count as libraries (R), not as model memory: llm-compressor
        # imports ~220 MiB more inside its first oneshot call, so GPTQ warms up on the tiny model too
        warmup_model, _ = load_model(warmup, dtype="bfloat16", device="cpu")
        if method == "gptq":
            quantize(warmup_model, Variant(**_VARIANTS[method]), calibration=torch.randint(3, 320, (1, 16)),
                     inplace=True)
        del warmup_model
        gc.collect()
    torch.manual_seed(0)
    rss_imports = _rss_bytes()
    t0 = time.perf_counter()
    model, _ = load_model(path, dtype="bfloat16", device="cpu")
    with torch.no_grad():  # safetensors maps the file lazily: read every weight once, as a study's first
        for p in model.parameters():  # forward pass does, so that "loaded" means resident
            p.sum()
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    out = {"method": method, "params": params, "param_bytes": sum(p.numel() * p.element_size()
                                                                  for p in model.parameters()),
           "rss_imports": rss_imports, "rss_loaded": _rss_bytes(), "load_s": load_s}
    if method != "baseline":
        variant = Variant(**_VARIANTS[method])
        calib = torch.randint(3, 320, (calib_samples, calib_len)) if method == "gptq" else None
        t0 = time.perf_counter()
        q = quantize(model, variant, calibration=calib, inplace=method != "rtn_copy")
        out["quantize_s"] = time.perf_counter() - t0
        out["rss_after"] = _rss_bytes()
        del q
    out["peak_rss"] = _peak_rss_bytes()
    return out


def _run_worker(path: Path, method: str, calib_samples: int, calib_len: int, timeout: int,
                warmup: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "attnres_quant.bench.memory", str(path), method, str(calib_samples), str(calib_len),
           *([str(warmup)] if warmup else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "error": tail[:500]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a x + b."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return a, my - a * mx


def extrapolate(rows: list[dict]) -> dict:
    """Per method: model bytes (peak RSS - imports) and seconds at 8B / 48B from a linear fit."""
    out = {}
    for method in sorted({r["method"] for r in rows if "error" not in r}):
        pts = [r for r in rows if r["method"] == method and "error" not in r]
        if len(pts) < 2:
            continue
        a, b = _fit([r["params"] for r in pts], [r["peak_rss"] - r["rss_imports"] for r in pts])
        secs = [r.get("quantize_s", r["load_s"]) for r in pts]
        c = sum(s * r["params"] for s, r in zip(secs, pts)) / sum(r["params"] ** 2 for r in pts)
        out[method] = {"bytes_per_param": a, "fixed_bytes": b,
                       **{name: {"model_peak_gib": (a * p + b) / 2**30, "seconds": c * p}
                          for name, p in EXTRAPOLATE.items()}}
    return out


def run_memory(*, sizes=("3M", "30M", "200M"), methods=("baseline", "rtn", "gptq"), calib_samples: int = 2,
               calib_len: int = 64, folder: str | None = None, timeout: int = 3600) -> dict:
    from .machine import machine_info

    rows = []
    with tempfile.TemporaryDirectory(prefix="aq-bench-memory-") as tmp:
        root = Path(folder) if folder else Path(tmp)
        warmup = write_checkpoint("3M", root / "warmup", seed=1)
        for size in sizes:
            path = write_checkpoint(size, root)
            base = None
            for method in ("baseline", *[m for m in methods if m != "baseline"]):
                r = _run_worker(path, method, calib_samples, calib_len, timeout, warmup)
                r["size"] = size
                if method == "baseline":
                    base = r
                elif base is not None and "error" not in r and "error" not in base:
                    r["peak_over_baseline"] = r["peak_rss"] / base["rss_loaded"]
                    r["model_peak_over_baseline"] = ((r["peak_rss"] - r["rss_imports"])
                                                     / (base["rss_loaded"] - base["rss_imports"]))
                rows.append(r)
    return {"bench": "memory", "sizes": {s: SIZES[s] for s in sizes}, "calibration": [calib_samples, calib_len],
            "results": rows, "extrapolation": extrapolate([r for r in rows if r["method"] != "baseline"]),
            "machine": machine_info("cpu")}


def memory_table(r: dict) -> str:
    m = r["machine"]
    mib = 2**20
    lines = [f"memory per variant ({m.get('cpu_model')}, {m.get('date_utc')}, load {m.get('load_avg_1m')}); "
             "MiB, seconds", f"{'size':<5} {'method':<9} {'params':>12} {'param MiB':>9} {'RSS loaded':>10} "
             f"{'peak RSS':>9} {'peak/base':>9} {'model x':>8} {'quant s':>8}"]
    for row in r["results"]:
        if "error" in row:
            lines.append(f"{row['size']:<5} {row['method']:<9} error: {row['error']}")
            continue
        ratio = row.get("peak_over_baseline")
        mratio = row.get("model_peak_over_baseline")
        lines.append(f"{row['size']:<5} {row['method']:<9} {row['params']:>12,} {row['param_bytes'] / mib:>9.0f} "
                     f"{row['rss_loaded'] / mib:>10.0f} {row['peak_rss'] / mib:>9.0f} "
                     f"{(f'{ratio:.2f}' if ratio else '-'):>9} {(f'{mratio:.2f}' if mratio else '-'):>8} "
                     f"{row.get('quantize_s', 0):>8.1f}")
    for method, e in r["extrapolation"].items():
        lines.append(f"extrapolated {method}: {e['bytes_per_param']:.2f} bytes/param; "
                     + ", ".join(f"{k}: {v['model_peak_gib']:.0f} GiB, {v['seconds'] / 60:.0f} min"
                                 for k, v in e.items() if isinstance(v, dict)))
    return "\n".join(lines)


if __name__ == "__main__":  # the per-measurement subprocess
    print(json.dumps(worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                            sys.argv[5] if len(sys.argv) > 5 else None)))
