"""The performance rewrite of the two-phase depth path keeps its semantics.

(Owned by the bench work: preallocated token-major source buffer, per-source
scoring at close, sigmoid-form merge; the folded queries are recomputed every
forward since issue 13 -- a cache missed writes through ``w.data``.)  The reference
is the naive stack-and-softmax path.
"""

import pytest
import torch

from attnres_quant.model import AttnResConfig, AttnResForCausalLM
from attnres_quant.model.testing import randomize_depth

VOCAB = 97


def build(block_size, layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=layers, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                        intermediate_size=96, attnres_block_size=block_size)
    return AttnResForCausalLM(cfg).eval()


def both_paths(model, ids, **kw):
    with torch.no_grad():
        model.config.attnres_two_phase = True
        fast = model(ids, **kw).logits
        model.config.attnres_two_phase = False
        slow = model(ids, **kw).logits
        model.config.attnres_two_phase = True
    return fast, slow


def test_cached_folded_queries_follow_in_place_and_replaced_parameters():
    model = build(4)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    fast, slow = both_paths(model, ids)  # populates the cache with zero pseudo-queries
    assert (fast - slow).abs().max() < 1e-5
    randomize_depth(model)  # in-place copy_: version counters move
    fast, slow = both_paths(model, ids)
    assert (fast - slow).abs().max() < 1e-5
    before = fast.clone()
    layer = model.model.layers[1]
    layer.mlp_res_proj.weight = torch.nn.Parameter(torch.randn_like(layer.mlp_res_proj.weight) * 2)  # replaced
    fast, slow = both_paths(model, ids)
    assert (fast - slow).abs().max() < 1e-5
    assert (fast - before).abs().max() > 1e-4


def test_gradients_reach_pseudo_queries_in_eval_mode_two_phase():
    model = build(4)
    randomize_depth(model)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)  # a cached entry exists
    loss = model(ids).logits.square().mean()
    loss.backward()
    grad = model.model.layers[2].attn_res_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("block_size,layers", [(1, 3), (2, 4), (4, 5), (8, 4)])
def test_two_phase_matches_naive_under_kv_cache_decoding(block_size, layers):
    model = build(block_size, layers=layers)
    randomize_depth(model)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.no_grad():
        for two in (True, False):
            model.config.attnres_two_phase = two
            out = model(ids[:, :5], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for i in range(5, 9):
                out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits)
            outs[two] = torch.cat(steps, 1)
    model.config.attnres_two_phase = True
    rel = ((outs[True] - outs[False]).abs().max() / outs[False].abs().max()).item()
    assert rel < 1e-5, rel  # fp32 summation order only


def test_two_phase_with_precision_hooks_matches_naive():
    """Non-default mixers (bf16 softmax, an elementwise logit quantizer, a source quantizer)
    take the general phase-1/phase-2 branch; it must still equal the naive path."""
    model = build(4, layers=4)
    randomize_depth(model)

    def round_logits(x):
        return torch.round(x * 16) / 16

    round_logits.elementwise = True
    for i, mixer in enumerate(model.model.depth_mixers()):
        if i % 3 == 0:
            mixer.softmax_dtype = torch.bfloat16
        if i % 3 == 1:
            mixer.logit_quantizer = round_logits
        mixer.source_quantizer = lambda v: v.to(torch.bfloat16).to(v.dtype)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    fast, slow = both_paths(model, ids)
    rel = ((fast - slow).abs().max() / slow.abs().max()).item()
    assert rel < 2e-2, rel  # bf16 softmax statistics differ only in summation order


def test_two_phase_bf16_model_matches_naive():
    model = build(4).to(torch.bfloat16)
    randomize_depth(model)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    fast, slow = both_paths(model, ids)
    rel = ((fast.float() - slow.float()).abs().max() / slow.float().abs().max()).item()
    assert rel < 2e-2, rel
