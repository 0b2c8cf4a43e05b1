"""What machine a benchmark ran on, and how fast it can move memory.

Every benchmark result embeds :func:`machine_info` so a figure is never read
without its hardware, software versions, thread count, date and the background
load at the time it was taken.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The SIMD features that decide which CPU kernels exist (AVX2/AVX-512/AMX/VNNI)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                            "amx_bf16", "amx_int8", "amx_tile")
                    return [f for f in keep if f in flags]
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 -- an optional dependency that fails to import is "absent"
        return None
    return getattr(mod, "__version__", "unknown")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def machine_info(device: str | torch.device | None = "cpu") -> dict:
    """CPU model, cores, threads, library versions, device name, UTC date, load average."""
    import psutil

    dev = resolve_device(device)
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": _version("torchao"),
        "bitsandbytes": _version("bitsandbytes"),
        "device": str(dev),
        "device_name": _cpu_model(),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_avg_1m"] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def copy_bandwidth_gbs(device: str | torch.device | None = "cpu", *, mib: int = 256,
                       repeats: int = 7) -> float:
    """Measured device-memory copy bandwidth in GB/s (bytes read + bytes written per second).

    Copies a ``mib``-MiB buffer (far larger than any CPU cache) ``repeats``
    times and reports the median; this is the ceiling a memory-bound decode step
    can approach when it streams the weights once per token.
    """
    dev = resolve_device(device)
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(dev)
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i >= 2:  # the first copies fault the pages in
            times.append(elapsed)
    times.sort()
    return 2 * src.numel() * 4 / times[len(times) // 2] / 1e9
