"""Direct scorers used by the training card (quick, dependency-free; the study itself
scores through lm-eval in :mod:`attnres_quant.evaluation`).

* ``score_mc``: argmax over the 4 options of the summed log-likelihood of
  ``" " + option`` after :func:`proxy_tasks.format_mc_prompt` (lm-eval's ``acc``).
* ``score_code``: greedy completion of the prompt (stops at HumanEval's stop
  sequences), executed with the item's test in a sandbox (pass@1;
  :mod:`attnres_quant.evaluation.sandbox`, as the study does).
* ``score_math``: greedy completion after :func:`proxy_tasks.format_math_prompt`,
  cut at the first newline, stripped, exact match with ``answer``.
* ``bits_per_byte``: summed next-token NLL (bits) over the UTF-8 bytes predicted.

No BOS is prepended to prompts (as lm-eval's HFLM does for this tokenizer).
"""

from __future__ import annotations

import math

import torch

from ..data import proxy_tasks


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of next-token logits in fp32, [B, T, V]."""
    out = model(input_ids=ids, use_cache=False)
    return torch.log_softmax(out.logits.float(), dim=-1)


@torch.no_grad()
def score_mc(model, tokenizer, items: list[dict]) -> list[float]:
    device = next(model.parameters()).device
    results = []
    for item in items:
        ctx = _encode(tokenizer, proxy_tasks.format_mc_prompt(item))
        seqs, conts = [], []
        for cont in proxy_tasks.mc_continuations(item):
            whole = _encode(tokenizer, proxy_tasks.format_mc_prompt(item) + cont)
            # lm-eval splits context/continuation by encoding them jointly and cutting
            n_ctx = len(ctx)
            while n_ctx > 0 and whole[:n_ctx] != ctx[:n_ctx]:
                n_ctx -= 1
            seqs.append(whole)
            conts.append((n_ctx, len(whole)))
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id or 0
        batch = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        lp = _logprobs(model, batch)
        scores = []
        for b, (start, end) in enumerate(conts):
            tgt = batch[b, start:end]
            scores.append(lp[b, start - 1:end - 1].gather(-1, tgt[:, None]).sum().item())
        pred = max(range(len(scores)), key=lambda i: scores[i])
        results.append(1.0 if pred == item["answer"] else 0.0)
    return results


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, stop: tuple[str, ...]) -> str:
    """Greedy decoding with the KV cache; returns the completion cut at the first stop string."""
    device = next(model.parameters()).device
    ids = torch.tensor([_encode(tokenizer, prompt)], device=device)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    generated: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].float().argmax())
        if nxt == tokenizer.eos_token_id:
            break
        generated.append(nxt)
        text = tokenizer.decode(generated)
        if any(s in text for s in stop):
            break
        out = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def run_code_checks(items: list[dict], completions: list[str], timeout: float | None = None) -> list[bool]:
    """Execute each prompt + completion + test in its own sandbox; True where it passed."""
    from ..evaluation import sandbox

    programs = [proxy_tasks.code_program(item, c) for item, c in zip(items, completions)]
    runs = sandbox.run_batch(programs, timeout_s=sandbox.DEFAULT_TIMEOUT_S if timeout is None else timeout)
    return [r["result"] == "passed" for r in runs]


def run_code_check(item: dict, completion: str, timeout: float | None = None) -> bool:
    """One program (see :func:`run_code_checks`)."""
    return run_code_checks([item], [completion], timeout)[0]


def score_code(model, tokenizer, items: list[dict], max_new_tokens: int = 48,
               samples_out: list | None = None) -> list[float]:
    completions = [greedy(model, tokenizer, proxy_tasks.format_code_prompt(item), max_new_tokens,
                          proxy_tasks.CODE_STOP) for item in items]
    passed = run_code_checks(items, completions) if items else []
    if samples_out is not None:
        samples_out.extend({"task_id": item["task_id"], "completion": c, "passed": ok}
                           for item, c, ok in zip(items, completions, passed))
    return [1.0 if ok else 0.0 for ok in passed]


def score_math(model, tokenizer, items: list[dict], max_new_tokens: int = 8,
               samples_out: list | None = None) -> list[float]:
    results = []
    for item in items:
        completion = greedy(model, tokenizer, proxy_tasks.format_math_prompt(item), max_new_tokens,
                            proxy_tasks.MATH_STOP)
        ok = completion.strip() == item["answer"]
        if samples_out is not None:
            samples_out.append({"id": item["id"], "completion": completion, "correct": ok})
        results.append(1.0 if ok else 0.0)
    return results


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / max(n - 1, 1)
    return m, math.sqrt(var / n)


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts: list[str], max_len: int, start_id: int,
                  byte_lengths: list[int]) -> dict:
    """Bits per UTF-8 byte of each text (truncated to ``max_len`` predicted tokens), context
    starting with ``start_id``.  Returns nats, bits, bytes, tokens and bpb / mean loss."""
    device = next(model.parameters()).device
    nats, nbytes, ntok = 0.0, 0, 0
    for text in texts:
        ids = [start_id] + _encode(tokenizer, text)[:max_len]
        x = torch.tensor([ids], device=device)
        lp = _logprobs(model, x)
        tgt = x[0, 1:]
        nll = -lp[0, :-1].gather(-1, tgt[:, None]).squeeze(-1)
        nats += float(nll.sum())
        nbytes += sum(byte_lengths[i] for i in ids[1:])
        ntok += len(ids) - 1
    bits = nats / math.log(2)
    return {"bpb": bits / max(nbytes, 1), "loss": nats / max(ntok, 1), "tokens": ntok, "bytes": nbytes}
