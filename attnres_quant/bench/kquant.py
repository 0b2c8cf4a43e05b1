"""``bench kquant``: GGUF K-quant packing speed, the packer in use vs the numpy one it replaced.

Both write the same bytes (checked here on every run, and by tests); the figure is seconds per million
weights, wall clock and process CPU time (CPU time is the robust figure on a machine shared with
other jobs). The packer is ``kquant_torch.quantize_blocks``: numba kernels on CPU (``engine: numba``),
torch on a GPU (``engine: torch``). Its first call compiles (or loads from numba's on-disk cache) the
CPU kernels, or warms CUDA up; that one-off cost is reported as ``warmup_s`` and not counted in the
per-weight figures.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..quant import kquant_reference, kquant_torch
from .machine import machine_info, resolve_device


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median wall s, median process-CPU s, last result) over ``repeats`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if isinstance(out, torch.Tensor) and out.device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus)), out


def run_kquant(*, qtypes=("Q4_K", "Q5_K", "Q6_K"), weights: int = 1 << 20, device: str = "cpu",
               repeats: int = 3, reference: bool = True, threads: int | None = None, seed: int = 0) -> dict:
    """Time both packers on a Gaussian tensor of ``weights`` weights (rounded to whole super-blocks)."""
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    n_blocks = max(1, weights // kquant_torch.QK_K)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n_blocks, kquant_torch.QK_K, generator=g) * 0.02
    on_dev = blocks.to(dev)
    per_m = 1e6 / (n_blocks * kquant_torch.QK_K)
    rows = []
    for q in qtypes:
        c0 = time.perf_counter()
        kquant_torch.quantize_blocks(on_dev[:64], q)  # numba JIT (or its disk cache) / CUDA warm-up
        warmup_s = time.perf_counter() - c0
        wall, cpu, new = _timed(lambda q=q: kquant_torch.quantize_blocks(on_dev, q), repeats)
        row = {"qtype": q, "engine": "numba" if dev.type == "cpu" else "torch",
               "packer_s_per_mweights": wall * per_m, "packer_cpu_s_per_mweights": cpu * per_m,
               "warmup_s": warmup_s}
        if reference:
            r_wall, r_cpu, ref = _timed(lambda q=q: kquant_reference.quantize_blocks(blocks.numpy(), q), 1)
            row.update({"numpy_s_per_mweights": r_wall * per_m, "numpy_cpu_s_per_mweights": r_cpu * per_m,
                        "speedup_wall": r_wall / wall, "speedup_cpu": r_cpu / cpu if cpu > 0 else None,
                        "identical_bytes": bool(np.array_equal(new.cpu().numpy(), ref))})
        rows.append(row)
    return {"bench": "kquant", "weights": n_blocks * kquant_torch.QK_K, "device": str(dev), "repeats": repeats,
            "threads": torch.get_num_threads(), "results": rows, "machine": machine_info(dev)}


def kquant_table(r: dict) -> str:
    m = r["machine"]
    lines = [f"K-quant packing, {r['weights']:,} weights on {r['device']} ({r['threads']} threads, "
             f"{m.get('cpu_model')}, {m.get('date_utc')}, load {m.get('load_avg_1m')})",
             f"{'type':<6} {'packer s/M':>10} {'cpu s/M':>9} {'numpy s/M':>10} {'cpu s/M':>9} {'x wall':>7} "
             f"{'x cpu':>7} {'same bytes':>10} {'warmup s':>9}"]
    for row in r["results"]:
        def f(k, fmt="{:.3f}"):
            v = row.get(k)
            return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
        lines.append(f"{row['qtype']:<6} {f('packer_s_per_mweights'):>10} {f('packer_cpu_s_per_mweights'):>9} "
                     f"{f('numpy_s_per_mweights'):>10} {f('numpy_cpu_s_per_mweights'):>9} "
                     f"{f('speedup_wall', '{:.1f}'):>7} {f('speedup_cpu', '{:.1f}'):>7} "
                     f"{str(row.get('identical_bytes', '-')):>10} {f('warmup_s', '{:.1f}'):>9}")
    return "\n".join(lines)
