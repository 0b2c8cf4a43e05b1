"""Peak memory and time of the KL pass at a large vocabulary: ``python -m attnres_quant.bench.kl_memory --json``.

Feeds :class:`attnres_quant.evaluation.kl.KLAccumulator` window by window (``--seq-len`` positions of
two models' logits at a time, in ``--dtype``, as a model returns them to ``metrics.quality``) for
``--tokens`` positions at ``--vocab-size`` entries, and reports the peak resident memory the pass
added (``ru_maxrss`` after the pass minus the RSS before it; CUDA: ``max_memory_allocated``). The
logits are synthetic (a fixed random table, shifted per window, and a perturbed copy), because the
memory and time of the statistics do not depend on the values. ``--mode topk`` measures the variant
side against a saved top-k baseline instead (the baseline is written first, in the same process).

The full-logits approach (both models' logits for every token in float32, then a full log-softmax
of each) is not run: its size is printed as ``full_logits_bytes`` (2 x tokens x vocab x 4 bytes, x 3
with the two log-softmax copies).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def run(tokens: int, vocab_size: int, seq_len: int, dtype: str, device: str, mode: str, k: int, seed: int) -> dict:
    import torch

    from ..bench.machine import machine_info
    from ..evaluation.kl import BaselineTopK, KLAccumulator

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    base_table = (torch.randn(seq_len, vocab_size, generator=g) * 3).to(dt).to(device)
    var_table = (base_table.float() + torch.randn(seq_len, vocab_size, generator=g) * 0.2).to(dt).to(device)
    targets_all = torch.randint(0, vocab_size, (tokens,), generator=g)
    table_bytes = 2 * base_table.numel() * base_table.element_size()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()

    def window(i: int):
        shift = (i * 7919) % vocab_size  # a different distribution per window, same memory
        return torch.roll(base_table, shifts=shift, dims=1), torch.roll(var_table, shifts=shift, dims=1)

    acc = KLAccumulator()
    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if mode == "topk":
            writer = BaselineTopK.create(tmp + "/base", tokens, k, vocab_size)
            for i, s in enumerate(range(0, tokens, seq_len)):
                n = min(seq_len, tokens - s)
                base, _ = window(i)
                writer.write(s, targets_all[s:s + n], base[:n])
                del base
            writer.close()
            saved = BaselineTopK.open(tmp + "/base")
        for i, s in enumerate(range(0, tokens, seq_len)):
            n = min(seq_len, tokens - s)
            base, var = window(i)
            if saved is None:
                acc.add(targets_all[s:s + n], var[:n], base_logits=base[:n])
            else:
                acc.add(targets_all[s:s + n], var[:n], base=saved.chunk(s, s + n))
            del base, var
        stats = acc.result()
    wall = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "mode": mode, "tokens": tokens, "vocab_size": vocab_size, "seq_len": seq_len, "dtype": dtype,
        "device": device, "top_k": k if mode == "topk" else None,
        "pos_chunk": acc.pos_chunk, "vocab_chunk": acc.vocab_chunk,
        "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
        "rss_before_bytes": rss_before, "peak_rss_bytes": peak_rss,
        "peak_added_bytes": peak_rss - rss_before,
        "input_window_logits_bytes": table_bytes,
        "full_logits_bytes": 2 * tokens * vocab_size * 4,
        "full_logits_with_log_softmax_bytes": 3 * 2 * tokens * vocab_size * 4,
        "kl_mean": stats["kl_mean"], "same_top_p": stats["same_top_p"],
        "machine": machine_info(device),
    }
    if device.startswith("cuda"):
        out["cuda_peak_added_bytes"] = torch.cuda.max_memory_allocated() - start_alloc
    return out


def main(argv=None) -> int:
    from ..argtypes import int_in

    p = argparse.ArgumentParser(prog="python -m attnres_quant.bench.kl_memory", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int_in(1, 1 << 26), default=8192)
    p.add_argument("--vocab-size", type=int_in(2, 1 << 24), default=163_840)
    p.add_argument("--seq-len", type=int_in(1, 1 << 20), default=512, help="positions per window (model call)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=("exact", "topk"), default="exact")
    p.add_argument("--top-k", type=int_in(1, 1 << 20), default=64)
    p.add_argument("--threads", type=int_in(1, 4096), default=None)
    p.add_argument("--seed", type=int_in(0, 2**31), default=0)
    p.add_argument("--json", action="store_true", help="one JSON object (default: indented)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run(args.tokens, args.vocab_size, args.seq_len, args.dtype, args.device, args.mode, args.top_k,
                 args.seed)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
