"""Depth path through the DepthMixer hooks: bit-identity at bf16, softmax/sources precision, KV cache."""

import pytest
import torch

from attnres_quant.model.depth import DepthMixer
from attnres_quant.quant import parse_variant, quantize, resolve_plan
from attnres_quant.quant.depth import FP8LogitQuantizer, set_softmax, set_sources
from attnres_quant.quant.testing import tiny_attnres

X = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))


def depth_weights(model):
    with torch.no_grad():
        return model(X, output_depth_attentions=True, use_cache=False).depth_attentions


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_depth_bf16_keeps_every_depth_parameter_bit_identical():
    m = tiny_attnres(block_size=2, layers=3)  # bf16 baseline
    v = parse_variant({"name": "int4_depth_bf16", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
                       "rules": [{"select": "depth.*", "weight": "bf16"}]})
    q = quantize(m, v)
    base = dict(m.named_parameters())
    n_depth = 0
    for name, p in q.model.named_parameters():
        if "_res_" in name or name.startswith("model.res_"):
            n_depth += 1
            assert torch.equal(p, base[name]), name
    assert n_depth == 3 * 4 + 2
    for row in q.plan.rows:
        if row.component in ("depth.query", "depth.key_norm"):
            assert row.method == "keep" and row.precision == "bf16" and "rules[0] (select: depth.*)" in row.rule
        if row.component in ("depth.softmax", "depth.sources"):
            assert row.method == "keep"
    # ...while the same policy without the rule changes them
    v2 = parse_variant({"name": "int4", "method": "rtn", "default": {"weight": "int4", "group_size": 32}})
    q2 = quantize(m, v2)
    assert not torch.equal(q2.model.model.layers[0].attn_res_proj.weight, m.model.layers[0].attn_res_proj.weight)
    assert q2.plan.row("model.layers.0.attn_res_norm.weight").precision == "int4"


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_attnres(block_size=2, layers=3, dtype=torch.float32, depth_scale=2.0)


@pytest.mark.parametrize("compute,min_diff", [("bf16", 1e-4), ("fp16", 1e-5), ("fp8", 1e-3), ("int8", 1e-4)])
def test_lower_softmax_precision_changes_depth_weights_and_fp32_restores(fp32_model, compute, min_diff):
    base = depth_weights(fp32_model)
    v = parse_variant({"name": f"sm_{compute}", "method": "rtn", "rules": [{"select": "depth.softmax",
                                                                            "compute": compute}]})
    q = quantize(fp32_model, v)
    low = depth_weights(q.model)
    assert max_diff(base, low) > min_diff
    assert all(torch.isfinite(w).all() for w in low)
    # restoring fp32 through a later rule restores the depth weights exactly
    v_back = parse_variant({"name": "back", "method": "rtn", "rules": [
        {"select": "depth.softmax", "compute": compute}, {"select": "depth.softmax", "compute": "fp32"}]})
    restored = depth_weights(quantize(fp32_model, v_back).model)
    assert max_diff(base, restored) == 0
    # and so does resetting the hooks of the quantized copy
    for mixer in q.model.model.depth_mixers():
        set_softmax(mixer, "fp32")
    assert max_diff(base, depth_weights(q.model)) == 0


@pytest.mark.parametrize("storage,min_diff", [("bf16", 1e-5), ("fp8", 1e-4), ("int8", 1e-5), ("int4", 1e-3)])
def test_lower_source_storage_changes_depth_weights_and_fp32_restores(fp32_model, storage, min_diff):
    base = depth_weights(fp32_model)
    v = parse_variant({"name": f"src_{storage}", "method": "rtn", "rules": [{"select": "depth.sources",
                                                                             "storage": storage}]})
    q = quantize(fp32_model, v)
    assert max_diff(base, depth_weights(q.model)) > min_diff
    for mixer in q.model.model.depth_mixers():
        set_sources(mixer, "fp32", torch.float32)
    assert max_diff(base, depth_weights(q.model)) == 0


def test_int4_sources_worse_than_int8(fp32_model):
    base = depth_weights(fp32_model)
    errs = {}
    for s in ("int8", "int4"):
        v = parse_variant({"name": s, "method": "rtn", "default": {"storage": s}})
        errs[s] = max_diff(base, depth_weights(quantize(fp32_model, v).model))
    assert errs["int4"] > errs["int8"]


def test_fp8_logits_keep_two_phase_path_equal_to_naive(fp32_model):
    v = parse_variant({"name": "fp8", "method": "rtn", "default": {"compute": "fp8"}})
    q = quantize(fp32_model, v)
    mixers = q.model.model.depth_mixers()
    # sub-layer 0 mixes one source (weight 1): no softmax, no hook
    assert mixers[0].sublayer == 0 and mixers[0].logit_quantizer is None
    assert all(isinstance(mx.logit_quantizer, FP8LogitQuantizer) and mx.supports_two_phase for mx in mixers[1:])
    with torch.no_grad():
        two_phase = q.model(X, use_cache=False).logits
        q.model.config.attnres_two_phase = False
        naive = q.model(X, use_cache=False).logits
    assert torch.allclose(two_phase, naive, atol=1e-4)
    int8 = quantize(fp32_model, parse_variant({"name": "i8", "method": "rtn", "default": {"compute": "int8"}}))
    assert not any(mx.supports_two_phase for mx in int8.model.model.depth_mixers()[1:])


def test_hooks_are_set_only_on_selected_sublayers(fp32_model):
    v = parse_variant({"name": "last", "method": "rtn", "rules": [{"select": "depth.softmax", "layers": "-1:",
                                                                   "compute": "bf16"}]})
    q = quantize(fp32_model, v)
    dt = {mx.sublayer: mx.softmax_dtype for mx in q.model.model.depth_mixers()}
    assert dt == {0: torch.float32, 1: torch.float32, 2: torch.float32, 3: torch.float32, 4: torch.bfloat16,
                  5: torch.bfloat16, 6: torch.float32}
    assert isinstance(q.model.model.res_depth, DepthMixer)
    plan = resolve_plan(fp32_model, v)
    assert plan.row("model.layers.2.attn_depth.softmax").method == "sim"
    assert plan.row("model.res_depth.softmax").method == "keep"


def test_kv_cache_storage_hook(fp32_model):
    with torch.no_grad():
        base = fp32_model(X, use_cache=False).logits
    v = parse_variant({"name": "kv4", "method": "rtn", "rules": [{"select": "attn.kv_cache", "storage": "int4"}]})
    q = quantize(fp32_model, v)
    assert q.model.model.layers[0].attn.kv_quantizer is not None
    with torch.no_grad():
        assert (q.model(X, use_cache=False).logits - base).abs().max() > 1e-4


def test_depth_rules_on_standard_model_are_skipped():
    m = tiny_attnres(block_size=None, layers=2)
    v = parse_variant({"name": "h", "method": "rtn", "default": {"weight": "int8"},
                       "rules": [{"select": "depth.*", "weight": "bf16", "compute": "bf16"}]})
    q = quantize(m, v)
    assert any("skipped" in n for n in q.plan.notes)
    assert not any(r.component.startswith("depth.") for r in q.plan.rows)
