"""KL divergence and token-probability statistics at scale, as ``llama-perplexity --kl-divergence`` prints them.

Memory does not grow with the vocabulary: logits are processed ``pos_chunk`` positions by
``vocab_chunk`` vocabulary entries at a time, in float64 (one pass over the vocabulary with an
online softmax: running maxima, sums and the KL numerator, rescaled as the maxima grow), so the
pass itself holds about ``4 * pos_chunk * vocab_chunk * 8`` bytes of temporaries (256 x 8192 ->
~67 MB) whatever the vocabulary (Kimi K3: 163,840). What grows with the text is six float64 numbers per token (~48
bytes/token: 8k tokens = 0.4 MB, 1M tokens = 48 MB), kept for the exact percentiles.

API (small on purpose; the sensitivity / search verbs call it):

* ``acc = KLAccumulator()`` then, chunk by chunk, ``acc.add(targets, var_logits, base_logits=...)``
  (exact: both models' logits ``[T, V]`` of the same positions; ``targets[t]`` is the token that
  follows position ``t``) or ``acc.add(targets, var_logits, base=topk.chunk(start, stop))`` (the
  baseline from a saved top-k file, below); ``acc.result()`` -> JSON-ready dict (keys below).
* ``kl_statistics(base_logits, var_logits, targets)``: the same in one call.
* ``BaselineTopK.create(path, n_tokens, k, vocab_size)`` -> writer with
  ``write(start, targets, base_logits)`` (positions ``start..start+T-1``) and ``close()``;
  ``BaselineTopK.open(path)`` -> reader with ``chunk(start, stop)`` (memory-mapped). The model-level
  helpers are :func:`attnres_quant.evaluation.metrics.save_baseline_topk` (run the baseline once
  over the quality text and write the file) and ``metrics.quality(None, variant, tokenizer, ids,
  base_topk=path)`` (a variant against the file, the baseline not loaded).

Statistics (``result()``; nats unless said; stderr = sample std / sqrt(n) as llama.cpp, which
ignores the correlation between neighbouring tokens):

* ``n_tokens``; ``nll``/``ppl``/``ppl_stderr`` (variant), ``base_nll``/``base_ppl``/``base_ppl_stderr``;
  ``ln_ppl_ratio`` = mean(nll_var - nll_base) and its ``_stderr`` (paired); ``ppl_ratio`` =
  exp(ln_ppl_ratio) with ``ppl_ratio_stderr`` = ratio x stderr(ln ratio); ``ppl_diff`` and its
  delta-method ``_stderr``; ``nll_correlation`` (Pearson, per-token NLLs: llama.cpp's
  "Cor(ln PPL(Q), ln PPL(base))");
* ``kl_mean``, ``kl_stderr``, ``kl_max``, ``kl_p999``, ``kl_p99``, ``kl_p95``, ``kl_p90``,
  ``kl_median`` (= ``kl_p50``), ``kl_p10``, ``kl_p5``, ``kl_p1``, ``kl_p01``, ``kl_min``;
  KL(base || variant) per position, clamped at 0;
* ``same_top_p`` (= ``top1_agreement``) and ``same_top_p_stderr``: both argmaxes equal
  (first index on ties, as ``torch.argmax``);
* ``dp_*``: delta-p of the **target** token, p_var(target) - p_base(target), which is what
  llama.cpp calls "Δp": ``dp_mean``, ``dp_stderr``, ``dp_rms``, ``dp_rms_stderr``, ``dp_max``,
  ``dp_p999``, ``dp_p99``, ``dp_p95``, ``dp_p90``, ``dp_p75``, ``dp_median``, ``dp_p25``,
  ``dp_p10``, ``dp_p5``, ``dp_p1``, ``dp_p01``, ``dp_min`` (probabilities, not percent);
* ``top_dp_*``: the same set for the **baseline's top token**, p_var(argmax_base) -
  p_base(argmax_base) (always <= 0 on average when the variant is blurrier).

Percentiles are numpy's default (linear interpolation between order statistics).

Top-k approximation (saved baseline): per position the file holds the baseline's ``k`` largest
log-probabilities and their token ids (exact log-softmax, computed over the full vocabulary),
the log-probability of the target token and the target itself. KL is computed over the top-k
tokens plus one "rest" bucket: sum_{i in top-k} p_i log(p_i/q_i) + P_r log(P_r/Q_r) with
P_r = 1 - sum_k p_i, Q_r = 1 - sum_k q_i. By the log-sum inequality this is a lower bound of the
exact KL; the error is exactly P_r * KL(p|rest || q|rest) (the KL of the two distributions
renormalised over the tokens outside the top-k, weighted by the baseline's mass there), so it
vanishes when the baseline puts little mass outside its top-k and is exact when ``k >= vocab``.
Everything else (both perplexities, same top p, both delta-p sets) is exact from the file. The
file costs 8k + 16 bytes per token (k = 64: 528 bytes; llama.cpp's full uint16 log-probs: 2 x vocab
bytes, 328 KB per token at vocab 163,840). docs/evaluation.md gives the measured error.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

POS_CHUNK = 256
VOCAB_CHUNK = 8192
KL_QUANTILES = {"p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "median": 0.5, "p10": 0.10, "p5": 0.05,
                "p1": 0.01, "p01": 0.001}
DP_QUANTILES = {"p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75, "median": 0.5, "p25": 0.25,
                "p10": 0.10, "p5": 0.05, "p1": 0.01, "p01": 0.001}
TOPK_FORMAT = "attnres_quant.baseline_topk/1"


# --------------------------------------------------------------------------- chunked primitives
def lse_and_argmax(logits: torch.Tensor, vocab_chunk: int = VOCAB_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log-sum-exp (float64) and argmax (first index of the maximum) of ``[R, V]``, vocab-chunked."""
    rows = logits.shape[0]
    lse = torch.full((rows,), -math.inf, dtype=torch.float64, device=logits.device)
    best = torch.full((rows,), -math.inf, dtype=torch.float64, device=logits.device)
    idx = torch.zeros(rows, dtype=torch.long, device=logits.device)
    for start in range(0, logits.shape[1], vocab_chunk):
        z = logits[:, start:start + vocab_chunk].double()
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        i = z.argmax(dim=-1)
        m = z.gather(1, i.unsqueeze(1)).squeeze(1)
        better = m > best  # strict: an earlier chunk keeps a tie, so the first maximum wins
        best = torch.where(better, m, best)
        idx = torch.where(better, i + start, idx)
    return lse, idx


def exact_kl_one_pass(base_logits, var_logits, vocab_chunk: int = VOCAB_CHUNK):
    """(KL(base || var), lse_base, argmax_base, lse_var, argmax_var) per row in one pass over the vocabulary.

    Online softmax: running maxima m, sums s = sum exp(z - m) and t = sum exp(z_b - m_b) (z_b - z_v), rescaled
    when a maximum grows; then KL = t / s_b - lse_b + lse_v (float64, so the difference loses nothing).
    """
    rows, dev = base_logits.shape[0], base_logits.device

    def zeros():
        return torch.zeros(rows, dtype=torch.float64, device=dev)

    m_b = torch.full((rows,), -math.inf, dtype=torch.float64, device=dev)
    m_v = m_b.clone()
    s_b, s_v, t = zeros(), zeros(), zeros()
    arg_b = torch.zeros(rows, dtype=torch.long, device=dev)
    arg_v = arg_b.clone()
    for start in range(0, base_logits.shape[1], vocab_chunk):
        zb = base_logits[:, start:start + vocab_chunk].double()
        zv = var_logits[:, start:start + vocab_chunk].double()
        cb, ib = zb.max(dim=-1)
        cv, iv = zv.max(dim=-1)
        arg_b = torch.where(cb > m_b, ib + start, arg_b)  # strict: the first maximum wins
        arg_v = torch.where(cv > m_v, iv + start, arg_v)
        new_b, new_v = torch.maximum(m_b, cb), torch.maximum(m_v, cv)
        scale_b = torch.exp(m_b - new_b)
        eb = torch.exp(zb - new_b[:, None])
        s_b = s_b * scale_b + eb.sum(dim=-1)
        t = t * scale_b + torch.linalg.vecdot(eb, zb.sub_(zv))
        s_v = s_v * torch.exp(m_v - new_v) + torch.exp(zv - new_v[:, None]).sum(dim=-1)
        m_b, m_v = new_b, new_v
    lse_b, lse_v = m_b + s_b.log(), m_v + s_v.log()
    kl = (t / s_b - lse_b + lse_v).clamp_min(0.0)
    return kl, lse_b, arg_b, lse_v, arg_v


def _logp_at(logits: torch.Tensor, index: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, index.view(-1, 1).to(logits.device)).squeeze(1).double() - lse


@dataclass
class TopKChunk:
    """The saved baseline of some positions: top-k ids [T, k], their log-probs [T, k], target log-prob [T]."""

    ids: torch.Tensor
    logp: torch.Tensor
    target_logp: torch.Tensor
    rest_p: torch.Tensor  # float64 [T]: the baseline's probability mass outside its top-k
    targets: torch.Tensor | None = None


def topk_kl(base: TopKChunk, var_logits, lse_var) -> torch.Tensor:
    """KL over the baseline's top-k plus one rest bucket (a lower bound of the exact KL; module docstring)."""
    lb = base.logp.to(var_logits.device).double()
    lv = var_logits.gather(1, base.ids.to(var_logits.device).long()).double() - lse_var[:, None]
    head = (lb.exp() * (lb - lv)).sum(dim=-1)
    rest_p = base.rest_p.to(var_logits.device).double()
    rest_q = (1.0 - lv.exp().sum(dim=-1)).clamp_min(1e-300)
    tail = torch.where(rest_p > 0, rest_p * (rest_p.clamp_min(1e-300).log() - rest_q.log()), torch.zeros_like(head))
    return (head + tail).clamp_min(0.0)


# --------------------------------------------------------------------------- accumulator
class KLAccumulator:
    """Per-token statistics gathered chunk by chunk; ``result()`` summarises them (module docstring)."""

    FIELDS = ("kl", "nll_base", "nll_var", "dp", "top_dp", "same_top")

    def __init__(self, pos_chunk: int = POS_CHUNK, vocab_chunk: int = VOCAB_CHUNK):
        self.pos_chunk, self.vocab_chunk = pos_chunk, vocab_chunk
        self._parts: dict[str, list[np.ndarray]] = {f: [] for f in self.FIELDS}

    @torch.no_grad()
    def add(self, targets, var_logits: torch.Tensor, *, base_logits: torch.Tensor | None = None,
            base: TopKChunk | None = None) -> None:
        """Add positions: ``var_logits`` [T, V] (or [1, T, V]), ``targets`` [T]; the baseline as logits
        ``[T, V]`` or as a saved top-k chunk."""
        if (base_logits is None) == (base is None):
            raise ValueError("give exactly one of base_logits (exact) or base (a saved top-k chunk)")
        var_logits = var_logits.reshape(-1, var_logits.shape[-1])
        targets = torch.as_tensor(targets).reshape(-1).long()
        if base_logits is not None:
            base_logits = base_logits.reshape(-1, base_logits.shape[-1])
            if base_logits.shape != var_logits.shape:
                raise ValueError(f"baseline logits {tuple(base_logits.shape)} and variant logits "
                                 f"{tuple(var_logits.shape)} differ in shape")
        if targets.numel() != var_logits.shape[0]:
            raise ValueError(f"{targets.numel()} targets for {var_logits.shape[0]} positions")
        for s in range(0, var_logits.shape[0], self.pos_chunk):
            e = min(s + self.pos_chunk, var_logits.shape[0])
            piece = None if base is None else TopKChunk(base.ids[s:e], base.logp[s:e], base.target_logp[s:e],
                                                         base.rest_p[s:e])
            self._add_rows(targets[s:e], var_logits[s:e], None if base_logits is None else base_logits[s:e], piece)

    def _add_rows(self, targets, zv, zb, base) -> None:
        if zb is not None:
            kl, lse_b, arg_b, lse_v, arg_v = exact_kl_one_pass(zb, zv, self.vocab_chunk)
            lp_b_target = _logp_at(zb, targets, lse_b)
            lp_b_top = _logp_at(zb, arg_b, lse_b)
        else:
            lse_v, arg_v = lse_and_argmax(zv, self.vocab_chunk)
            kl = topk_kl(base, zv, lse_v)
            arg_b = base.ids[:, 0].to(zv.device).long()
            lp_b_target = base.target_logp.to(zv.device).double()
            lp_b_top = base.logp[:, 0].to(zv.device).double()
        lp_v_target = _logp_at(zv, targets, lse_v)
        lp_v_top = _logp_at(zv, arg_b, lse_v)
        values = {"kl": kl, "nll_base": -lp_b_target, "nll_var": -lp_v_target,
                  "dp": lp_v_target.exp() - lp_b_target.exp(), "top_dp": lp_v_top.exp() - lp_b_top.exp(),
                  "same_top": (arg_v == arg_b).double()}
        for name, v in values.items():
            self._parts[name].append(v.detach().cpu().numpy().astype(np.float64))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: np.concatenate(p) if p else np.zeros(0) for f, p in self._parts.items()}

    def result(self) -> dict:
        return summarize(**self.arrays())


def kl_statistics(base_logits: torch.Tensor, var_logits: torch.Tensor, targets, *, pos_chunk: int = POS_CHUNK,
                  vocab_chunk: int = VOCAB_CHUNK) -> dict:
    """All statistics of one pair of logits ``[T, V]`` (exact, chunked); module docstring for the keys."""
    acc = KLAccumulator(pos_chunk, vocab_chunk)
    acc.add(targets, var_logits, base_logits=base_logits)
    return acc.result()


# --------------------------------------------------------------------------- summary
def _stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def _quantiles(x: np.ndarray, prefix: str, table: dict[str, float]) -> dict:
    values = np.quantile(x, list(table.values())) if x.size else [float("nan")] * len(table)
    return {f"{prefix}_{name}": float(v) for name, v in zip(table, values)}


def _spread(x: np.ndarray, prefix: str) -> dict:
    """Mean, stderr, RMS (with its delta-method stderr), extremes and percentiles of a delta-p array."""
    ms = float(np.mean(x ** 2))
    rms = math.sqrt(ms)
    out = {f"{prefix}_mean": float(x.mean()), f"{prefix}_stderr": _stderr(x), f"{prefix}_rms": rms,
           f"{prefix}_rms_stderr": _stderr(x ** 2) / (2 * rms) if rms > 0 else 0.0,
           f"{prefix}_max": float(x.max()), f"{prefix}_min": float(x.min())}
    out.update(_quantiles(x, prefix, DP_QUANTILES))
    return out


def _ppl(nll: np.ndarray) -> tuple[float, float]:
    ppl = math.exp(float(nll.mean()))
    return ppl, ppl * _stderr(nll)


def summarize(kl, nll_base, nll_var, dp, top_dp, same_top) -> dict:
    """JSON-ready statistics from per-token arrays (module docstring)."""
    n = int(kl.size)
    if n == 0:
        raise ValueError("no tokens: the KL statistics need at least one predicted position")
    ppl_v, ppl_v_se = _ppl(nll_var)
    ppl_b, ppl_b_se = _ppl(nll_base)
    diff = nll_var - nll_base
    ln_ratio, ln_ratio_se = float(diff.mean()), _stderr(diff)
    cov = float(np.cov(nll_var, nll_base)[0, 1]) / n if n > 1 else float("nan")
    var_diff = (ppl_v * _stderr(nll_var)) ** 2 + (ppl_b * _stderr(nll_base)) ** 2 - 2 * ppl_v * ppl_b * cov
    same = float(same_top.mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = float(np.corrcoef(nll_var, nll_base)[0, 1]) if n > 1 else float("nan")
    out = {
        "n_tokens": n,
        "nll": float(nll_var.mean()), "ppl": ppl_v, "ppl_stderr": ppl_v_se,
        "base_nll": float(nll_base.mean()), "base_ppl": ppl_b, "base_ppl_stderr": ppl_b_se,
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_stderr": ln_ratio_se,
        "ppl_ratio": math.exp(ln_ratio), "ppl_ratio_stderr": math.exp(ln_ratio) * ln_ratio_se,
        "ppl_diff": ppl_v - ppl_b, "ppl_diff_stderr": math.sqrt(max(var_diff, 0.0)) if n > 1 else float("nan"),
        "nll_correlation": corr,
        "kl_mean": float(kl.mean()), "kl_stderr": _stderr(kl), "kl_max": float(kl.max()), "kl_min": float(kl.min()),
        "same_top_p": same, "same_top_p_stderr": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else float("nan"),
    }
    out.update(_quantiles(kl, "kl", KL_QUANTILES))
    out["kl_p50"] = out["kl_median"]
    out["top1_agreement"] = same
    out.update(_spread(dp, "dp"))
    out.update(_spread(top_dp, "top_dp"))
    return out


# --------------------------------------------------------------------------- saved baseline (top-k)
def tokens_sha256(targets) -> str:
    return hashlib.sha256(np.asarray(targets, dtype=np.int64).tobytes()).hexdigest()


class BaselineTopK:
    """A folder holding the baseline's top-k log-probs of every position (memory-mapped ``.npy`` files).

    ``ids.npy`` int32 [N, k], ``logp.npy`` float32 [N, k] (descending), ``target_logp.npy`` float32 [N],
    ``rest_p.npy`` float64 [N] (mass outside the top-k, computed in float64 so that it is exactly 0 when
    k = vocab), ``targets.npy`` int32 [N], ``meta.json`` (format, k, vocab_size, n_tokens, tokens_sha256 once closed).
    """

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text()) if mode == "r" else {}
        self.arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode=mode if mode == "r" else "r+")
                       for name in ("ids", "logp", "target_logp", "rest_p", "targets")}

    # ---- writing
    @classmethod
    def create(cls, path, n_tokens: int, k: int, vocab_size: int) -> "BaselineTopK":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        k = min(int(k), int(vocab_size))
        for name, shape, dtype in (("ids", (n_tokens, k), np.int32), ("logp", (n_tokens, k), np.float32),
                                   ("target_logp", (n_tokens,), np.float32), ("rest_p", (n_tokens,), np.float64),
                                   ("targets", (n_tokens,), np.int32)):
            np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
        meta = {"format": TOPK_FORMAT, "k": k, "vocab_size": int(vocab_size), "n_tokens": int(n_tokens),
                "complete": False}
        (path / "meta.json").write_text(json.dumps(meta))
        self = cls(path, "r+")
        self.meta = meta
        return self

    @torch.no_grad()
    def write(self, start: int, targets, base_logits: torch.Tensor, vocab_chunk: int = VOCAB_CHUNK) -> None:
        """Store positions ``start..start+T-1`` from the baseline's logits ``[T, V]`` (position-chunked)."""
        base_logits = base_logits.reshape(-1, base_logits.shape[-1])
        targets = torch.as_tensor(targets).reshape(-1).long()
        k = self.meta["k"]
        for s in range(0, base_logits.shape[0], POS_CHUNK):
            z = base_logits[s:s + POS_CHUNK]
            t = targets[s:s + POS_CHUNK]
            lse, _ = lse_and_argmax(z, vocab_chunk)
            values, ids = torch.topk(z, k, dim=-1)  # sorted, descending; ties in no stated order
            # Ties (common in bf16 logits) ordered by token id, so column 0 is the first index of the maximum,
            # the baseline top token a resident baseline's argmax gives (same_top_p, top_dp agree exactly).
            ids, by_id = ids.sort(dim=-1)
            values, order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
            ids = ids.gather(1, order)
            rows = slice(start + s, start + s + z.shape[0])
            self.arrays["ids"][rows] = ids.cpu().numpy().astype(np.int32)
            logp = values.double() - lse[:, None]
            self.arrays["logp"][rows] = logp.cpu().numpy().astype(np.float32)
            rest = torch.zeros_like(lse) if k >= z.shape[1] else (1.0 - logp.exp().sum(-1)).clamp_min(0.0)
            self.arrays["rest_p"][rows] = rest.cpu().numpy()
            self.arrays["target_logp"][rows] = _logp_at(z, t, lse).cpu().numpy().astype(np.float32)
            self.arrays["targets"][rows] = t.cpu().numpy().astype(np.int32)

    def close(self) -> None:
        for a in self.arrays.values():
            a.flush()
        self.meta.update(complete=True, tokens_sha256=tokens_sha256(self.arrays["targets"]),
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        (self.path / "meta.json").write_text(json.dumps(self.meta, indent=1))

    # ---- reading
    @classmethod
    def open(cls, path) -> "BaselineTopK":
        path = Path(path)
        meta_path = path / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{str(path)!r} is not a saved baseline top-k folder ({type(exc).__name__}: {exc})",
                            str(path), "save it first with metrics.save_baseline_topk(baseline, tokenizer, ids, "
                            "path), or point at the folder it wrote") from None
        if meta.get("format") != TOPK_FORMAT or not meta.get("complete"):
            raise UserError(f"{str(path)!r} holds an unfinished or foreign baseline file (format "
                            f"{meta.get('format')!r}, complete={meta.get('complete')})", str(meta_path),
                            "delete the folder and save the baseline again")
        return cls(path, "r")

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def chunk(self, start: int, stop: int) -> TopKChunk:
        a = self.arrays
        return TopKChunk(torch.from_numpy(np.array(a["ids"][start:stop])),
                         torch.from_numpy(np.array(a["logp"][start:stop])),
                         torch.from_numpy(np.array(a["target_logp"][start:stop])),
                         torch.from_numpy(np.array(a["rest_p"][start:stop])),
                         torch.from_numpy(np.array(a["targets"][start:stop])))

    def check_tokens(self, targets, where: str) -> None:
        """The variant must score exactly the tokens the baseline file was written for."""
        digest = tokens_sha256(targets)
        if digest != self.meta.get("tokens_sha256"):
            raise UserError(f"the saved baseline {str(self.path)!r} was written for other tokens ({self.n_tokens} "
                            f"tokens, sha256 {str(self.meta.get('tokens_sha256'))[:12]}...) than this text "
                            f"({len(np.asarray(targets))} tokens, sha256 {digest[:12]}...)", where,
                            "use the same text, tokenizer, max_tokens and seq_len, or save the baseline again")
