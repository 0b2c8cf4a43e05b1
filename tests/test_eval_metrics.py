"""Quality metrics and statistics: known values on known inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")

from attnres_quant.evaluation import metrics as M
from attnres_quant.evaluation import stats as S


@pytest.fixture(scope="module")
def tok():
    from attnres_quant.evaluation.testing import tiny_tokenizer

    return tiny_tokenizer()


def _attnres(tok, block_size=2, seed=0):
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    torch.manual_seed(seed)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=len(tok),
                        attnres_block_size=block_size, max_position_embeddings=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return AttnResForCausalLM(cfg).eval()


class Uniform(torch.nn.Module):
    """All-zero logits: every token has probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_bits_per_byte_of_uniform_model(tok):
    text = M.fixed_text(max_problems=3)
    q = M.quality(Uniform(len(tok)), Uniform(len(tok)), tok, text=text, seq_len=50)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_bytes = len(text.encode("utf-8"))
    assert q["tokens"] == len(ids) and q["bytes"] == n_bytes
    assert q["bpb"] == pytest.approx(math.log2(len(tok)) * len(ids) / n_bytes, rel=1e-6)
    assert q["ppl"] == pytest.approx(len(tok), rel=1e-5)
    p = M.perplexity(Uniform(len(tok)), tok, text, seq_len=17)
    assert p["bpb"] == pytest.approx(math.log2(len(tok)) * len(ids) / n_bytes, rel=1e-6)


def test_model_against_itself_is_identical(tok):
    m = _attnres(tok)
    q = M.quality(m, m, tok, max_tokens=300, seq_len=100)
    assert q["tokens"] == 300
    assert q["kl_mean"] == pytest.approx(0.0, abs=1e-7) and q["kl_max"] == pytest.approx(0.0, abs=1e-6)
    assert q["top1_agreement"] == 1.0 and q["bpb_delta"] == 0.0
    assert q["depth_js"] is not None and len(q["depth_js"]) == 2 * 2 + 1
    assert max(q["depth_js"]) == pytest.approx(0.0, abs=1e-9)


def test_perturbed_variant_moves_every_metric(tok):
    base = _attnres(tok)
    var = _attnres(tok)
    var.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in var.parameters():
            p.add_(0.05 * torch.randn_like(p))
    q = M.quality(base, var, tok, max_tokens=200, seq_len=100)
    assert q["kl_mean"] > 0 and q["kl_p50"] <= q["kl_p90"] <= q["kl_p99"] <= q["kl_max"]
    assert 0.0 <= q["top1_agreement"] < 1.0
    assert all(0.0 <= j <= 1.0 for j in q["depth_js"]) and q["depth_js_mean"] > 0
    assert q["base_bpb"] == pytest.approx(M.perplexity(base, tok, max_tokens=200, seq_len=100)["bpb"], rel=1e-5)


def test_standard_residual_model_has_no_depth_js(tok):
    m = _attnres(tok, block_size=None)
    q = M.quality(m, m, tok, max_tokens=64, seq_len=64)
    assert q["depth_js"] is None and q["kl_mean"] == pytest.approx(0.0, abs=1e-7)


def test_divergences_known_values():
    p = torch.softmax(torch.randn(3, 5, 7), -1)
    assert M.js_divergence(p, p).abs().max() < 1e-12
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(M.js_divergence(a, b)) == pytest.approx(1.0)  # disjoint supports: 1 bit
    logits = torch.randn(4, 11)
    assert M.kl_per_token(logits, logits).abs().max() < 1e-6
    lb, lv = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.9, 0.1]))
    assert float(M.kl_per_token(lb, lv)) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


def test_flips_and_paired_statistics():
    base = [1, 1, 0, 0, 1, 0, 1, 1] * 10
    assert S.flips(base, base) == (0, 0)
    assert S.paired_delta(base, base) == (0.0, 0.0, 0.0)
    assert S.mcnemar(base, base) == 1.0
    var = [1 - x if i % 8 == 0 else x for i, x in enumerate(base)]  # 10 correct -> wrong
    assert S.flips(base, var) == (10, 0)
    d, lo, hi = S.paired_delta(base, var, iters=1000, seed=1)
    assert d == pytest.approx(-10 / 80) and lo <= d <= hi < 0
    assert (d, lo, hi) == S.paired_delta(base, var, iters=1000, seed=1)  # fixed seed: reproducible
    assert S.mcnemar(base, var) == pytest.approx(2 / 2 ** 10)
    assert S.mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    c = S.compare(base, var)
    assert c["correct_to_wrong"] == 10 and c["wrong_to_correct"] == 0 and c["n"] == 80
    with pytest.raises(ValueError):
        S.flips([1], [1, 0])


def test_task_flips_between_results():
    from attnres_quant.evaluation import TaskResult

    r = TaskResult("acc", 0.5, 0.1, 4, [1, 0, 1, 0], ["t/0", "t/1", "t/2", "t/3"])
    v = TaskResult("acc", 0.5, 0.1, 4, [0, 1, 1, 0], ["t/0", "t/1", "t/2", "t/3"])
    assert M.task_flips({"t": r}, {"t": r}) == {"t": (0, 0)}
    assert M.task_flips({"t": r}, {"t": v}) == {"t": (1, 1)}
    assert TaskResult.from_dict(r.to_dict()) == r
