"""Engine methods `awq` and `gguf`, and component `attn.kv_cache`, through parse_variant / resolve_plan / quantize."""

import pytest
import torch

from attnres_quant.errors import UserError
from attnres_quant.quant import parse_variant, quantize, resolve_plan
from attnres_quant.quant import gguf_quant as G
from attnres_quant.quant.kv_cache import KVQuantizer
from attnres_quant.quant.testing import kl_divergence, tiny_attnres

torch.set_num_threads(1)

DEPTH_KEYS = ("res_proj", "res_norm")


@pytest.fixture(scope="module")
def model():
    # hidden 64: q/k/v/o, gate/up, lm_head and pseudo-query rows are 64 long (no K-quant super-block
    # fits -> llama.cpp's fallback); mlp.down rows are 256 long (K-quants fit).
    return tiny_attnres(hidden=64, layers=2, intermediate=256, vocab=97)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits.float()


def depth_params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if any(k in n for k in DEPTH_KEYS)}


def v(d):
    return parse_variant(d, source="test.yaml")


# ------------------------------------------------------------------------------------- gguf
def test_gguf_weights_equal_gguf_roundtrip_bit_exactly_with_fallbacks(model, ids):
    var = v({"name": "g", "method": "gguf", "default": {"weight": "Q4_K"},
             "rules": [{"select": "attn.v", "weight": "q8_0"}, {"select": "depth.*", "weight": "bf16"}]})
    q = quantize(model, var)
    assert q.simulated and q.kernel == "simulated-gguf"
    plan = q.plan
    down = plan.row("model.layers.0.mlp.down_proj.weight")
    assert (down.method, down.precision, down.fallback, down.bits) == ("gguf", "q4_k", None, 4.5)
    qp = plan.row("model.layers.0.attn.q_proj.weight")
    assert (qp.method, qp.precision, qp.fallback) == ("gguf", "q5_0", "q4_k")
    assert "fallback from q4_k" in qp.granularity and "q5_0" in plan.to_table()
    assert plan.row("model.layers.1.attn.v_proj.weight").precision == "q8_0"
    assert plan.row("lm_head.weight").method == "keep" and plan.row("model.embeddings.weight").method == "keep"
    assert any("q4_k -> q5_0" in n for n in q.notes)
    assert q.details["gguf"]["fallbacks"]["model.layers.0.attn.q_proj.weight"] == {"requested": "q4_k",
                                                                                   "type": "q5_0"}
    base, got = dict(model.named_parameters()), dict(q.model.named_parameters())
    for name, qtype in [("model.layers.0.mlp.down_proj.weight", "Q4_K"),
                        ("model.layers.1.mlp.down_proj.weight", "Q4_K"),
                        ("model.layers.0.attn.q_proj.weight", "Q5_0"), ("model.layers.1.attn.v_proj.weight", "Q8_0")]:
        ref = G.gguf_roundtrip(base[name].detach(), qtype)
        assert torch.equal(got[name].view(torch.int16), ref.view(torch.int16)), name
    # K-quant blocks read back by gguf's own dequantizer: the same values (before the bf16 cast).
    w = base["model.layers.0.mlp.down_proj.weight"].detach()
    deq = torch.from_numpy(G.dequantize_packed(G.quantize_packed(w, "Q4_K"), "Q4_K")).reshape(w.shape)
    assert torch.equal(deq.to(torch.bfloat16), got["model.layers.0.mlp.down_proj.weight"].detach())
    # depth.* bf16: every depth parameter bit-identical.
    dp = depth_params(q.model)
    for n, p in depth_params(model).items():
        assert torch.equal(p, dp[n]), n
    assert plan.row("model.layers.0.attn_res_proj.weight").method == "keep"
    # bytes: packed GGUF bytes for the gguf rows, bf16 for the rest.
    expected = sum(G.packed_nbytes(r.part.shape, r.precision) for r in plan.weight_rows() if r.method == "gguf")
    expected += sum(r.numel * 2 for r in plan.weight_rows() if r.method == "keep" and r.tied_to is None)
    assert q.weight_bytes == expected
    kl = kl_divergence(logits(model, ids), logits(q.model, ids))
    assert 0 < kl < 0.1


def test_gguf_preset_expands_then_user_rules_and_depth_query_fallback(model):
    var = v({"name": "m", "method": "gguf", "options": {"preset": "q4_k_m"},
             "rules": [{"select": "lm_head", "weight": "bf16"}]})
    plan = resolve_plan(model, var, "test.yaml")
    # Q4_K_M on 2 layers: attn.v / mlp.down of layer 1 at Q6_K (use_more_bits), lm_head Q6_K -> overridden.
    down1 = plan.row("model.layers.1.mlp.down_proj.weight")
    assert down1.precision == "q6_k" and down1.rule.startswith("preset q4_k_m")
    assert plan.row("model.layers.0.mlp.down_proj.weight").precision == "q4_k"
    v1 = plan.row("model.layers.1.attn.v_proj.weight")
    assert (v1.precision, v1.fallback) == ("q8_0", "q6_k")
    assert plan.row("lm_head.weight").method == "keep"
    # llama-quantize: the [1, d] pseudo-queries have ggml_n_dims 1 and key norms are 1-D: neither is quantized;
    # token_embd takes the base type (here its fallback). An explicit rule still quantizes a pseudo-query.
    dq = plan.row("model.layers.0.attn_res_proj.weight")
    assert (dq.method, dq.precision, dq.fallback) == ("keep", "bf16", None)
    assert plan.row("model.layers.0.attn_res_norm.weight").method == "keep"
    emb = plan.row("model.embeddings.weight")
    assert (emb.precision, emb.fallback) == ("q5_0", "q4_k") and emb.rule.startswith("preset q4_k_m")
    var_dq = v({"name": "dq", "method": "gguf", "options": {"preset": "q4_k_m"},
                "rules": [{"select": "depth.query", "weight": "q4_k"}]})
    plan_dq = resolve_plan(model, var_dq, "test.yaml")
    dq = plan_dq.row("model.layers.0.attn_res_proj.weight")
    assert (dq.method, dq.precision, dq.fallback) == ("gguf", "q5_0", "q4_k")
    assert any("depth path" in n and "depth.query=q5_0" in n for n in plan_dq.notes)
    # an explicit rule may still quantize a 1-D key norm; the plan says llama.cpp would not.
    var2 = v({"name": "k", "method": "gguf", "rules": [{"select": "depth.key_norm", "weight": "q8_0"}]})
    plan2 = resolve_plan(model, var2, "test.yaml")
    assert plan2.row("model.layers.0.attn_res_norm.weight").precision == "q8_0"
    assert any("ggml_n_dims < 2" in n for n in plan2.notes)


# ------------------------------------------------------------------------------------- awq
def test_awq_method_plan_rows_and_depth_path(model, ids):
    var = v({"name": "a", "method": "awq", "default": {"weight": "int4", "group_size": 32, "symmetric": False},
             "rules": [{"select": "depth.*", "weight": "bf16"}, {"select": "attn.v", "weight": "bf16"},
                       {"select": "depth.sources", "storage": "int8"}]})
    assert var.needs_calibration()
    calib = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    q = quantize(model, var, calibration=calib)
    assert q.simulated and q.kernel == "simulated-awq"
    r = q.plan.row("model.layers.0.attn.q_proj.weight")
    assert (r.method, r.precision, r.granularity) == ("awq", "int4", "g32 asym")
    assert q.plan.row("model.layers.0.attn.v_proj.weight").method == "keep"
    assert q.details["awq"]["quantized"] == 12  # 14 projections, v_proj skipped in both layers
    assert q.details["awq"]["smoothed"] and q.details["awq"]["mean_layer_error"] > 0
    # AWQ never rescales the depth path; lm_head / embeddings untouched.
    dp = depth_params(q.model)
    for n, p in depth_params(model).items():
        assert torch.equal(p, dp[n]), n
    base, got = dict(model.named_parameters()), dict(q.model.named_parameters())
    for n in ("lm_head.weight", "model.embeddings.weight"):
        assert torch.equal(base[n], got[n])
    # the quantized weights sit on an int4 grid per group of 32: <= 16 distinct values per group
    w = got["model.layers.1.mlp.down_proj.weight"].detach().float().reshape(-1, 32)
    assert max(len(torch.unique(g)) for g in w[:16]) <= 16
    # non-weight depth rows applied after AWQ, as for the other methods
    mixers = list(q.model.model.depth_mixers())
    assert all(m.source_quantizer is not None for m in mixers)
    assert all(m.source_quantizer is None for m in model.model.depth_mixers())
    kl = kl_divergence(logits(model, ids), logits(q.model, ids))
    assert 0 < kl < 0.1


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("d, match", [
    ({"method": "rtn", "default": {"weight": "q4_k", "group_size": 32}}, "block layout is fixed"),  # rtn takes q4_k
    ({"method": "gptq", "rules": [{"select": "attn.q", "weight": "Q8_0"}]}, "method: gguf"),
    ({"method": "gguf", "default": {"weight": "int4"}}, "llama.cpp types"),
    ({"method": "gguf", "rules": [{"select": "attn.q", "weight": "int8"}]}, "q8_0 instead of int8"),
    ({"method": "gguf", "default": {"weight": "q4_0", "group_size": 32}}, "block layout is fixed"),
    ({"method": "awq", "default": {"weight": "nf4"}}, "bnb"),
    ({"method": "awq", "default": {"weight": "q4_k"}}, "method: gguf"),
    ({"method": "awq", "default": {"weight": "int4", "activation": "int8"}}, "weight-only"),
    ({"method": "rtn", "options": {"preset": "q4_k_m"}}, "needs `method: gguf`"),
    ({"method": "gguf", "options": {"preset": "q3_k_xl"}}, "unknown llama.cpp preset"),
    ({"method": "awq", "options": {"block_size": 64}}, "unknown option"),
    ({"method": "none", "options": {"kv_granularity": "per_layer"}}, "kv_granularity"),
])
def test_policy_errors_for_wrong_type_method_combinations(d, match):
    with pytest.raises(UserError, match=match) as exc:
        v({"name": "bad", **d})
    assert "test.yaml" in str(exc.value) and "'bad'" in str(exc.value)


def test_awq_mixed_settings_rejected_and_upper_case_types(model):
    var = v({"name": "mix", "method": "awq", "default": {"weight": "int4", "group_size": 32},
             "rules": [{"select": "attn.v", "weight": "int8"}]})
    with pytest.raises(UserError, match="one quantization setting"):
        resolve_plan(model, var, "test.yaml")
    assert v({"name": "u", "method": "gguf", "default": {"weight": "Q6_K"}}).default.weight == "q6_k"


# ------------------------------------------------------------------------------------- kv cache
def test_kv_cache_through_policy(model, ids):
    base = logits(model, ids)
    same = quantize(model, v({"name": "kb", "method": "none",
                              "rules": [{"select": "attn.kv_cache", "storage": "bf16"}]}))
    assert torch.equal(logits(same.model, ids), base)
    q = quantize(model, v({"name": "k8", "method": "none", "options": {"kv_granularity": "per_head"},
                           "rules": [{"select": "attn.kv_cache", "storage": "int8"}]}))
    kvq = q.model.model.layers[0].attn.kv_quantizer
    assert isinstance(kvq, KVQuantizer) and (kvq.precision, kvq.granularity) == ("int8", "per_head")
    assert q.plan.row("model.layers.0.attn.kv_cache").granularity == "per-head"
    assert q.details["kv_cache"]["bytes_per_token"] < q.details["kv_cache"]["baseline_bytes_per_token"]
    out = logits(q.model, ids)
    assert not torch.equal(out, base)
    assert 0 < kl_divergence(base, out) < 1e-2
    assert model.model.layers[0].attn.kv_quantizer is None


def test_deployment_config_q4_k_m_rules_equal_the_preset():
    import yaml

    from attnres_quant.quant.testing import tiny_attnres as mk

    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "deployment.yaml").read_text())
    written = next(x for x in cfg["variants"] if x["name"] == "gguf_q4_k_m")
    m8 = mk(hidden=64, layers=8, intermediate=256, vocab=97)
    a = resolve_plan(m8, v(written), "deployment.yaml")
    b = resolve_plan(m8, v({"name": "p", "method": "gguf", "options": {"preset": "Q4_K_M"}}), "test.yaml")
    assert [(r.name, r.precision, r.fallback) for r in a.rows] == [(r.name, r.precision, r.fallback) for r in b.rows]
