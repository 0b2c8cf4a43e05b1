"""Latency/memory harness and benchmarks (``bench overhead``, ``bench kernels``)."""

from .latency import (linear_weight_bytes, measure_interleaved, measure_latency, measure_latency_grid,
                      stored_tensors, weight_bytes)
from .machine import copy_bandwidth_gbs, machine_info

__all__ = ["measure_latency", "measure_interleaved", "measure_latency_grid", "weight_bytes",
           "linear_weight_bytes", "stored_tensors", "machine_info", "copy_bandwidth_gbs"]
