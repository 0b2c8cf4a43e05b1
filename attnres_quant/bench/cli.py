"""``python -m attnres_quant bench {overhead,kernels} ...``"""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _common(p: argparse.ArgumentParser, *, hidden: int, layers: int, seq: int, dtype: str,
            multi: bool = False) -> None:
    p.add_argument("--hidden-size", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--seq-len", type=int, default=seq, help="prompt length of the prefill")
    if multi:
        p.add_argument("--batch-size", type=_int_list, default=[1, 8],
                       help="batch size(s), comma-separated (default 1,8: one run per batch size and dtype)")
        p.add_argument("--dtype", default=dtype,
                       help="float32 / bfloat16 / float16, comma-separated for several runs")
    else:
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--dtype", default=dtype, help="float32 / bfloat16 / float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--num-heads", type=int, default=None, help="default: hidden_size // 64")
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy KV-cache steps timed per round")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median and IQR over these)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--output", default=None, help="also write the JSON object to this file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_verb", metavar="{overhead,kernels}")
    sub.required = True
    o = sub.add_parser("overhead", help="AttnRes latency overhead vs a standard-residual model of equal size")
    _common(o, hidden=1024, layers=16, seq=512, dtype="bfloat16,float32", multi=True)
    o.add_argument("--block-size", type=int, default=4, help="Block AttnRes block size S (sub-layers)")
    o.add_argument("--variants", default=None,
                   help="comma-separated models to time besides standard (default: block,block_naive,full)")
    o.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU only: wall time, or process CPU time (robust to other jobs; use --threads 1)")
    k = sub.add_parser("kernels", help="real-kernel quantized variants (torchao, bitsandbytes) vs bf16")
    _common(k, hidden=1024, layers=8, seq=128, dtype="bfloat16")
    k.add_argument("--variants", default=None,
                   help="comma-separated subset of: " + ", ".join(_kernel_variant_names()))
    k.add_argument("--block-size", type=int, default=4,
                   help="Block AttnRes block size of the bench model (0: standard residual)")


def _kernel_variant_names() -> list[str]:
    # Kept in sync with kernels.VARIANTS (not imported here: torchao is slow to import).
    return ["bf16", "fp32", "torchao_int8_wo", "torchao_int8_dyn", "torchao_int4_wo", "bnb_int8", "bnb_nf4",
            "fbgemm_int8_dyn", "aten_int8pack_wo"]


def _emit(result: dict, args: argparse.Namespace, table) -> None:
    text = json.dumps(result, indent=None if args.json else 2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(text)
    else:
        print(table(result))


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
    print(f"unknown bench verb {args.bench_verb!r}", file=sys.stderr)
    return 2
