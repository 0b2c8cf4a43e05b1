"""``python -m attnres_quant bench {overhead,kernels,kimi,kquant,memory} ...``"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from ..argtypes import int_in
from ..errors import UserError

DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
_DEVICE_RE = re.compile(r"(cpu|auto|cuda(:\d+)?)")


def device_arg(text: str) -> str:
    if not _DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda, cuda:N or auto)")
    return text


def _int_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers, each in [1, 65536]."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not out or min(out) < 1 or max(out) > 1 << 16:
        raise argparse.ArgumentTypeError(f"expected whole numbers between 1 and 65536, got {text!r}")
    return out


def _dtype_list(text: str) -> str:
    """argparse type: one dtype or a comma-separated list of them (DTYPES)."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: each dtype must be one of {', '.join(DTYPES)}")
    return ",".join(names)


def _common(p: argparse.ArgumentParser, *, hidden: int, layers: int, seq: int, dtype: str,
            multi: bool = False) -> None:
    p.add_argument("--hidden-size", type=int_in(1, 65536), default=hidden)
    p.add_argument("--layers", type=int_in(1, 1024), default=layers)
    p.add_argument("--seq-len", type=int_in(1, 1 << 20), default=seq, help="prompt length of the prefill")
    if multi:
        p.add_argument("--batch-size", type=_int_list, default=[1, 8],
                       help="batch size(s), comma-separated (default 1,8: one run per batch size and dtype)")
        p.add_argument("--dtype", type=_dtype_list, default=dtype,
                       help="float32 / bfloat16 / float16, comma-separated for several runs")
    else:
        p.add_argument("--batch-size", type=int_in(1, 1 << 16), default=1)
        p.add_argument("--dtype", choices=DTYPES, default=dtype, help="float32 / bfloat16 / float16")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--vocab-size", type=int_in(2, 1 << 24), default=32000)
    p.add_argument("--num-heads", type=int_in(1, 4096), default=None, help="default: hidden_size // 64")
    p.add_argument("--decode-tokens", type=int_in(1, 1 << 20), default=16,
                   help="greedy KV-cache steps timed per round")
    p.add_argument("--warmup", type=int_in(0, 10_000), default=1, help="discarded rounds")
    p.add_argument("--repeats", type=int_in(1, 100_000), default=5,
                   help="timed rounds (median and IQR over these)")
    p.add_argument("--threads", type=int_in(1, 4096), default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--output", default=None, help="also write the JSON object to this file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_verb", metavar="{overhead,kernels,kimi,kquant,memory}")
    sub.required = True
    o = sub.add_parser("overhead", help="AttnRes latency overhead vs a standard-residual model of equal size")
    _common(o, hidden=1024, layers=16, seq=512, dtype="bfloat16,float32", multi=True)
    o.add_argument("--block-size", type=int_in(1, 4096), default=4,
                   help="Block AttnRes block size S (sub-layers): 1 or even")
    o.add_argument("--variants", default=None,
                   help="comma-separated models to time besides standard (default: block,block_naive,full)")
    o.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU only: wall time, or process CPU time (robust to other jobs; use --threads 1)")
    k = sub.add_parser("kernels", help="real-kernel quantized variants (torchao, bitsandbytes) vs bf16")
    _common(k, hidden=1024, layers=8, seq=128, dtype="bfloat16")
    k.add_argument("--variants", default=None,
                   help="comma-separated subset of: " + ", ".join(_kernel_variant_names()))
    k.add_argument("--block-size", type=int_in(0, 4096), default=4,
                   help="Block AttnRes block size of the bench model (0: standard residual)")
    _add_kquant(sub)
    _add_memory(sub)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--output", default=None, help="also write the JSON object to this file")


def _add_kquant(sub) -> None:
    q = sub.add_parser("kquant", help="GGUF K-quant packing speed: the packer vs the numpy one (same bytes)")
    q.add_argument("--types", default="Q4_K,Q5_K,Q6_K", help="comma-separated subset of Q4_K,Q5_K,Q6_K")
    q.add_argument("--weights", type=int_in(256, 1 << 34), default=1 << 20, help="weights packed per run")
    q.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or auto")
    q.add_argument("--repeats", type=int_in(1, 1000), default=3, help="timed runs of the packer (median)")
    q.add_argument("--no-reference", action="store_true", help="skip the (slow) numpy packer")
    q.add_argument("--threads", type=int_in(1, 4096), default=None, help="CPU threads")
    q.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    _output_args(q)


def _add_memory(sub) -> None:
    m = sub.add_parser("memory", help="time and peak RSS of one variant per method at several model sizes")
    m.add_argument("--sizes", default="3M,30M,200M", help="comma-separated subset of 3M,30M,200M")
    m.add_argument("--methods", default="rtn,gptq", help="comma-separated subset of rtn,gptq,rtn_copy "
                   "(rtn_copy: the old deep-copy path); the baseline is always measured")
    m.add_argument("--calib-samples", type=int_in(1, 4096), default=2, help="GPTQ calibration sequences")
    m.add_argument("--calib-len", type=int_in(2, 1 << 16), default=64, help="GPTQ calibration sequence length")
    m.add_argument("--timeout", type=int_in(1, 1 << 20), default=3600, help="seconds per measurement subprocess")
    _output_args(m)


    km = sub.add_parser("kimi", help="Kimi-architecture tokens/s on CPU: our Block-AttnRes Kimi model vs "
                                     "transformers' native kimi_linear (same config, no AttnRes)")
    km.add_argument("--size", choices=("30m", "tiny"), default="30m",
                    help="model size: 30m (~31M parameters, the documented figure) or tiny (a smoke test)")
    km.add_argument("--seq-len", type=int_in(1, 1 << 16), default=512, help="prompt length of the prefill")
    km.add_argument("--decode-tokens", type=int_in(1, 1 << 16), default=16, help="cached decode steps per round")
    km.add_argument("--attn-res-block-size", type=int_in(1, 1024), default=2,
                    help="Block AttnRes block size in decoder layers (Moonshot's attn_res_block_size)")
    km.add_argument("--dtype", choices=DTYPES, default="float32")
    km.add_argument("--warmup", type=int_in(0, 10_000), default=1, help="discarded rounds")
    km.add_argument("--repeats", type=int_in(1, 100_000), default=3, help="timed rounds (median and IQR)")
    km.add_argument("--threads", type=int_in(1, 4096), default=1, help="CPU threads (default 1)")
    km.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                    help="process CPU time (default: robust to other jobs) or wall time")
    km.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    km.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    km.add_argument("--output", default=None, help="also write the JSON object to this file")


def _kernel_variant_names() -> list[str]:
    # Kept in sync with kernels.VARIANTS (not imported here: torchao is slow to import).
    return ["bf16", "fp32", "torchao_int8_wo", "torchao_int8_dyn", "torchao_int4_wo", "torchao_float8_wo",
            "torchao_float8_dyn", "bnb_int8", "bnb_nf4", "fbgemm_int8_dyn", "aten_int8pack_wo"]


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise UserError(f"device {device!r} is not available (torch sees {count} CUDA device(s))",
                            "bench --device", "use --device cpu, or a CUDA device index that exists")


def _check_list(text: str, allowed, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if not items or bad:
        raise UserError(f"{flag} {text!r}: {', '.join(bad) or 'empty'} not among {', '.join(allowed)}",
                        f"bench {flag}", f"pass a comma-separated subset of {','.join(allowed)}")
    return items


def validate(args: argparse.Namespace) -> None:
    """Cross-argument checks argparse cannot express; all before any model is built."""
    if args.bench_verb == "kquant":
        _check_list(args.types, ("Q4_K", "Q5_K", "Q6_K"), "--types")
        _check_device(args.device)
        _check_output(args)
        return
    if args.bench_verb == "memory":
        from .memory import SIZES

        _check_list(args.sizes, tuple(SIZES), "--sizes")
        _check_list(args.methods, ("rtn", "gptq", "rtn_copy"), "--methods")
        _check_output(args)
        return

    if args.bench_verb == "kimi":
        _check_output(args)
        return
    heads = args.num_heads or max(1, args.hidden_size // 64)
    if args.hidden_size % heads:
        raise UserError(f"--hidden-size {args.hidden_size} is not a multiple of the number of heads ({heads})",
                        "bench --num-heads", "pick --num-heads that divides --hidden-size")
    if (args.hidden_size // heads) % 2:
        raise UserError(f"the head size hidden_size / num_heads = {args.hidden_size // heads} is odd; rotary "
                        "embeddings need an even head size", "bench --num-heads / --hidden-size",
                        "choose sizes giving an even head size, e.g. --hidden-size 1024 --num-heads 16")
    block = args.block_size
    if block not in (0, 1) and block % 2:
        raise UserError(f"--block-size {block} must be 1 (Full AttnRes) or even (Block AttnRes)"
                        + (" or 0 (standard residual)" if args.bench_verb == "kernels" else ""),
                        f"bench {args.bench_verb} --block-size", "pass 1 or an even number such as 2, 4 or 8")
    if block == 0 and args.bench_verb == "overhead":
        raise UserError("--block-size 0 has no AttnRes model to compare", "bench overhead --block-size",
                        "pass 1 or an even block size")
    _check_device(args.device)
    _check_output(args)


def _check_output(args: argparse.Namespace) -> None:
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise UserError(f"--output {args.output!r} is a folder", "bench --output", "name a file, e.g. bench.json")
        if not out.parent.is_dir():
            raise UserError(f"the folder of --output {args.output!r} does not exist", "bench --output",
                            "create the folder first or name a file in an existing one")
        if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise UserError(f"--output {args.output!r} is not writable", "bench --output",
                            "name a file in a writable folder")


def _emit(result: dict, args: argparse.Namespace, table) -> None:
    text = json.dumps(result, indent=None if args.json else 2)
    # Print first: if writing --output fails (disk full, storage gone read-only), the numbers are not lost.
    if args.json:
        print(text)
    else:
        print(table(result))
    if args.output:
        from ..pipeline.results import atomic_write_text

        atomic_write_text(Path(args.output), json.dumps(result, indent=2) + "\n")


def _overhead_table(r: dict) -> str:
    if "runs" in r:
        parts = [_overhead_table(run) for run in r["runs"]]
        keys = sorted({k for row in r["summary"] for k in row["ratios"]})
        lines = ["summary (median / standard median): " + ", ".join(keys),
                 f"{'dtype':<9} {'batch':>5} " + " ".join(f"{k:>20}" for k in keys)]
        for row in r["summary"]:
            lines.append(f"{row['dtype']:<9} {row['batch_size']:>5} "
                         + " ".join(f"{row['ratios'].get(k, float('nan')):>20.3f}" for k in keys))
        return "\n\n".join(parts + ["\n".join(lines)])
    c = r["config"]
    lines = [f"AttnRes overhead: hidden {c['hidden_size']}, {c['layers']} layers, block size {c['block_size']}, "
             f"seq {c['seq_len']}, batch {c['batch_size']}, {c['dtype']} on {c['device']} "
             f"({c['threads']} threads, {c['clock']} clock, {r['machine']['cpu_model']}, "
             f"{r['machine']['date_utc']}, load {r['machine']['load_avg_1m']})",
             f"{'model':<12} {'prefill ms':>11} {'iqr':>8} {'decode ms/tok':>14} {'iqr':>8} {'max|dlogit|':>12}"]
    for name in ("standard", "block", "block_naive", "full"):
        if name in r:
            m = r[name]
            lines.append(f"{name:<12} {m['prefill_ms']:>11.2f} {m['prefill_ms_iqr']:>8.2f} "
                         f"{m['decode_ms_per_token']:>14.3f} {m['decode_ms_per_token_iqr']:>8.3f} "
                         f"{m['max_abs_logit_diff_vs_standard']:>12.2e}")
    lines.append("ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in r["ratios"].items()))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    validate(args)
    if args.bench_verb == "overhead":
        from .overhead import VARIANTS, run_overhead_matrix

        variants = VARIANTS
        if args.variants:
            variants = ("standard", *[v.strip() for v in args.variants.split(",") if v.strip() and v != "standard"])
        result = run_overhead_matrix(
            dtypes=[d.strip() for d in args.dtype.split(",") if d.strip()], batch_sizes=args.batch_size,
            hidden_size=args.hidden_size, layers=args.layers, block_size=args.block_size,
            seq_len=args.seq_len, device=args.device, vocab_size=args.vocab_size, num_heads=args.num_heads,
            decode_tokens=args.decode_tokens, warmup=args.warmup, repeats=args.repeats,
            threads=args.threads, seed=args.seed, clock=args.clock, variants=variants)
        _emit(result, args, _overhead_table)
        return 0
    if args.bench_verb == "kernels":
        from .kernels import kernels_table, run_kernels

        variants = None if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
        result = run_kernels(hidden_size=args.hidden_size, layers=args.layers, seq_len=args.seq_len,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                             vocab_size=args.vocab_size, num_heads=args.num_heads,
                             block_size=args.block_size or None, decode_tokens=args.decode_tokens,
                             warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                             seed=args.seed, variants=variants)
        _emit(result, args, kernels_table)
        return 0
    if args.bench_verb == "kimi":
        from .kimi import kimi_table, run_kimi_bench

        result = run_kimi_bench(size=args.size, seq_len=args.seq_len, decode_tokens=args.decode_tokens,
                                warmup=args.warmup, repeats=args.repeats, threads=args.threads, clock=args.clock,
                                block_size=args.attn_res_block_size, dtype=args.dtype, seed=args.seed)
        _emit(result, args, kimi_table)
        return 0
    if args.bench_verb == "kquant":
        from .kquant import kquant_table, run_kquant

        result = run_kquant(qtypes=[t.strip() for t in args.types.split(",") if t.strip()], weights=args.weights,
                            device=args.device, repeats=args.repeats, reference=not args.no_reference,
                            threads=args.threads, seed=args.seed)
        _emit(result, args, kquant_table)
        return 0
    if args.bench_verb == "memory":
        from .memory import memory_table, run_memory

        result = run_memory(sizes=[s.strip() for s in args.sizes.split(",") if s.strip()],
                            methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                            calib_samples=args.calib_samples, calib_len=args.calib_len, timeout=args.timeout)
        _emit(result, args, memory_table)
        return 0
    print(f"unknown bench verb {args.bench_verb!r}", file=sys.stderr)
    return 2
