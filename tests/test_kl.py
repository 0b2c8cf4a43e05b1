"""KL statistics at scale (attnres_quant.evaluation.kl): chunked = straightforward full-vocabulary maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnres_quant.errors import UserError
from attnres_quant.evaluation import kl as K

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(t=300, v=1000, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(t, v, generator=g) * 3
    var = base + noise * torch.randn(t, v, generator=g)
    targets = torch.randint(0, v, (t,), generator=g)
    return base, var, targets


def _reference(base, var, targets):
    """The textbook computation: full-vocabulary log-softmax in float64, numpy statistics."""
    lb, lv = F.log_softmax(base.double(), -1), F.log_softmax(var.double(), -1)
    kl = (lb.exp() * (lb - lv)).sum(-1).clamp_min(0).numpy()
    t = targets.view(-1, 1)
    nb, nv = -lb.gather(1, t).squeeze(1).numpy(), -lv.gather(1, t).squeeze(1).numpy()
    top = lb.argmax(-1, keepdim=True)
    dp = np.exp(-nv) - np.exp(-nb)
    top_dp = (lv.gather(1, top).exp() - lb.gather(1, top).exp()).squeeze(1).numpy()
    same = (lb.argmax(-1) == lv.argmax(-1)).double().numpy()
    n = kl.size
    d = nv - nb
    return {
        "kl_mean": kl.mean(), "kl_stderr": kl.std(ddof=1) / math.sqrt(n), "kl_max": kl.max(), "kl_min": kl.min(),
        "kl_median": np.median(kl), "kl_p90": np.quantile(kl, 0.9), "kl_p95": np.quantile(kl, 0.95),
        "kl_p99": np.quantile(kl, 0.99), "kl_p999": np.quantile(kl, 0.999),
        "same_top_p": same.mean(), "top1_agreement": same.mean(),
        "ppl": math.exp(nv.mean()), "base_ppl": math.exp(nb.mean()), "ppl_ratio": math.exp(d.mean()),
        "ln_ppl_ratio_stderr": d.std(ddof=1) / math.sqrt(n), "nll_correlation": np.corrcoef(nv, nb)[0, 1],
        "dp_mean": dp.mean(), "dp_rms": math.sqrt((dp ** 2).mean()), "dp_p99": np.quantile(dp, 0.99),
        "dp_median": np.median(dp), "dp_min": dp.min(), "dp_max": dp.max(),
        "top_dp_mean": top_dp.mean(), "top_dp_rms": math.sqrt((top_dp ** 2).mean()),
        "top_dp_p01": np.quantile(top_dp, 0.001), "top_dp_p10": np.quantile(top_dp, 0.1),
    }, kl


def test_chunked_statistics_equal_full_vocabulary_computation():
    base, var, targets = _logits()
    got = K.kl_statistics(base, var, targets, pos_chunk=37, vocab_chunk=128)  # uneven chunks on purpose
    want, _ = _reference(base, var, targets)
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-6, abs=1e-6), key
    assert got["n_tokens"] == 300 and got["kl_p50"] == got["kl_median"]
    # the chunk sizes change nothing
    other = K.kl_statistics(base, var, targets, pos_chunk=300, vocab_chunk=1000)
    assert all(other[k] == pytest.approx(got[k], rel=1e-9, abs=1e-12) for k in want)


def test_identical_models_and_bf16_inputs():
    base, _, targets = _logits(t=50, v=333)
    s = K.kl_statistics(base, base.clone(), targets, vocab_chunk=64)
    assert s["kl_max"] == 0.0 and s["same_top_p"] == 1.0 and s["ppl_ratio"] == 1.0 and s["dp_rms"] == 0.0
    b16, v16 = base.bfloat16(), (base + 0.1).bfloat16()  # the accumulator upcasts chunk by chunk
    want, _ = _reference(b16.float(), v16.float(), targets)
    got = K.kl_statistics(b16, v16, targets, vocab_chunk=50)
    assert got["kl_mean"] == pytest.approx(want["kl_mean"], abs=1e-9)


def test_topk_baseline_is_a_lower_bound_exact_at_full_vocab(tmp_path):
    base, var, targets = _logits(t=120, v=400, noise=0.5)
    exact = K.kl_statistics(base, var, targets)
    for k, sub in ((400, "full"), (16, "k16")):
        w = K.BaselineTopK.create(tmp_path / sub, 120, k, 400)
        w.write(0, targets[:70], base[:70])
        w.write(70, targets[70:], base[70:])
        w.close()
        saved = K.BaselineTopK.open(tmp_path / sub)
        acc = K.KLAccumulator(pos_chunk=50, vocab_chunk=64)
        acc.add(targets, var, base=saved.chunk(0, 120))
        got = acc.result()
        # everything but KL is exact from the file (float32 storage: 1e-6)
        for key in ("ppl", "base_ppl", "ppl_ratio", "same_top_p", "dp_mean", "dp_rms", "top_dp_mean", "top_dp_p01"):
            assert got[key] == pytest.approx(exact[key], rel=1e-5, abs=1e-6), (k, key)
        if k == 400:
            assert got["kl_mean"] == pytest.approx(exact["kl_mean"], rel=1e-5)
        else:
            assert got["kl_mean"] <= exact["kl_mean"] + 1e-7
    # the per-token error is exactly P_rest * KL(p|rest || q|rest)
    lb, lv = F.log_softmax(base.double(), -1), F.log_softmax(var.double(), -1)
    top = lb.topk(16, -1).indices
    rest = torch.ones_like(lb, dtype=torch.bool).scatter_(1, top, False)
    p_r = (lb.exp() * rest).sum(-1)
    lbr = torch.where(rest, lb - p_r.log()[:, None], torch.tensor(-math.inf, dtype=torch.float64))
    q_r = (lv.exp() * rest).sum(-1)
    lvr = lv - q_r.log()[:, None]
    kl_rest = torch.where(rest, lbr.exp() * (lbr - lvr), torch.zeros_like(lb)).sum(-1)
    full = (lb.exp() * (lb - lv)).sum(-1)
    acc = K.KLAccumulator()
    acc.add(targets, var, base=K.BaselineTopK.open(tmp_path / "k16").chunk(0, 120))
    approx = torch.from_numpy(acc.arrays()["kl"])
    assert torch.allclose(full - approx, p_r * kl_rest, atol=2e-6)


def test_saved_baseline_rejects_other_tokens_and_missing_folders(tmp_path):
    base, _, targets = _logits(t=20, v=50)
    w = K.BaselineTopK.create(tmp_path / "b", 20, 8, 50)
    w.write(0, targets, base)
    w.close()
    saved = K.BaselineTopK.open(tmp_path / "b")
    saved.check_tokens(targets.tolist(), "test")
    with pytest.raises(UserError, match="written for other tokens"):
        saved.check_tokens((targets + 1).tolist(), "test")
    with pytest.raises(UserError, match="not a saved baseline"):
        K.BaselineTopK.open(tmp_path / "nothing")
    unfinished = K.BaselineTopK.create(tmp_path / "u", 20, 8, 50)
    del unfinished
    with pytest.raises(UserError, match="unfinished"):
        K.BaselineTopK.open(tmp_path / "u")


def test_quality_against_a_saved_baseline_matches_the_live_baseline(tmp_path):
    from attnres_quant.evaluation import metrics as M
    from attnres_quant.evaluation.testing import tiny_tokenizer
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = AttnResConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=len(tok),
                        attnres_block_size=2, max_position_embeddings=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = AttnResForCausalLM(cfg).eval()
    var = AttnResForCausalLM(cfg).eval()
    with torch.no_grad():
        for p, q in zip(base.parameters(), var.parameters()):
            q.copy_(p + 0.02 * torch.randn_like(p))
    text = M.fixed_text(max_problems=2)
    live = M.quality(base, var, tok, text=text, seq_len=40, max_tokens=150)
    M.save_baseline_topk(base, tok, text=text, path=tmp_path / "base", k=len(tok), seq_len=40, max_tokens=150)
    saved = M.quality(None, var, tok, text=text, seq_len=40, max_tokens=150, base_topk=tmp_path / "base")
    for key in ("tokens", "ppl", "base_ppl", "bpb", "kl_mean", "kl_p99", "same_top_p", "dp_rms", "top_dp_mean"):
        assert saved[key] == pytest.approx(live[key], rel=1e-5, abs=1e-7), key
    # the depth weights saved beside the log-probs give the same depth JS without the baseline model
    assert saved["depth_js"] == pytest.approx(live["depth_js"], rel=1e-6, abs=1e-12) and len(live["depth_js"]) == 5
    assert live["kl_source"] == "exact" and saved["kl_source"] == "exact, from the saved baseline"
    M.save_baseline_topk(base, tok, text=text, path=tmp_path / "nodepth", k=8, seq_len=40, max_tokens=150,
                         depth=False)
    top8 = M.quality(None, var, tok, text=text, seq_len=40, max_tokens=150, base_topk=tmp_path / "nodepth")
    assert top8["depth_js"] is None and top8["kl_source"] == "top-8 of the saved baseline"
    assert top8["kl_mean"] <= live["kl_mean"]  # the top-k KL is a lower bound


def test_memory_benchmark_prints_json(capsys):
    import json

    from attnres_quant.bench import kl_memory

    assert kl_memory.main(["--tokens", "96", "--vocab-size", "3000", "--seq-len", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 96 and out["peak_added_bytes"] >= 0 and out["full_logits_bytes"] == 2 * 96 * 3000 * 4
    assert 0 < out["same_top_p"] <= 1 and out["machine"]["date_utc"]


def test_study_reuses_the_saved_baseline_only_for_the_same_text(tmp_path):
    from types import SimpleNamespace

    from attnres_quant.evaluation.testing import tiny_tokenizer
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM
    from attnres_quant.pipeline.runner import baseline_topk

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = AttnResForCausalLM(AttnResConfig(hidden_size=16, num_hidden_layers=1, num_heads=2, vocab_size=len(tok),
                                             attnres_block_size=2, max_position_embeddings=64)).eval()
    store = SimpleNamespace(path=tmp_path / "results.json")
    config = SimpleNamespace(quality=SimpleNamespace(kl_top_k=8, seq_len=16))
    ids = torch.arange(5, 45).view(1, -1)
    first = baseline_topk(store, "m", model, tok, config, ids)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    assert baseline_topk(store, "m", model, tok, config, ids).meta == first.meta  # reused
    assert (first.path / "meta.json").stat().st_mtime_ns == stamp
    other = baseline_topk(store, "m", model, tok, config, ids + 1)  # other text: written again
    assert other.meta["text_ids_sha256"] != first.meta["text_ids_sha256"]
    config.quality.kl_top_k = 4
    assert baseline_topk(store, "m", model, tok, config, ids + 1).meta["k"] == 4


def test_saved_top_token_is_the_first_maximum_on_ties(tmp_path):
    """bf16 logits tie often; the saved baseline's top token must be the argmax a resident baseline
    uses (first index of the maximum), or same_top_p differs between the two routes."""
    from attnres_quant.evaluation.kl import BaselineTopK, lse_and_argmax

    torch.manual_seed(0)
    logits = (torch.randn(64, 50) * 0.5).round()  # many exact ties at the top
    logits[:, 7] = logits.max(dim=-1).values      # token 7 ties the maximum in every row
    saved = BaselineTopK.create(tmp_path / "b", 64, 50, 50)
    saved.write(0, torch.zeros(64, dtype=torch.long), logits)
    saved.close()
    _, first = lse_and_argmax(logits)
    ids = BaselineTopK.open(tmp_path / "b").chunk(0, 64).ids
    assert torch.equal(ids[:, 0].long(), first)
    assert not torch.equal(first, torch.full_like(first, 7))  # some rows tie at an earlier index
