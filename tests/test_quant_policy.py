"""Policy schema, plan resolution: rule precedence, selectors, every error case, components."""

import pytest
import torch
import yaml

from attnres_quant.errors import UserError
from attnres_quant.quant import Variant, parse_variant, quantize, resolve_components, resolve_plan
from attnres_quant.quant.testing import tiny_attnres, tiny_llama

SPEC_EXAMPLE = """
variants:
  - name: int4_hybrid
    method: gptq
    default: {weight: int4, group_size: 32, activation: bf16}
    rules:
      - select: depth.*
        weight: bf16
        compute: bf16
      - select: lm_head
        weight: int8
"""


@pytest.fixture(scope="module")
def model():
    return tiny_attnres(block_size=2, layers=3)


def rows_by_name(plan):
    return {r.name: r for r in plan.rows}


def test_spec_example_parses_and_resolves(model):
    raw = yaml.safe_load(SPEC_EXAMPLE)["variants"][0]
    v = parse_variant(raw, "study.yaml")
    assert isinstance(v, Variant) and v.method == "gptq" and v.default.weight == "int4"
    assert v.rules[0].select == "depth.*" and v.rules[0].compute == "bf16"
    plan = resolve_plan(model, v, "study.yaml")
    rows = rows_by_name(plan)
    assert rows["model.layers.0.attn.q_proj.weight"].method == "gptq"
    assert rows["model.layers.0.attn.q_proj.weight"].precision == "int4"
    assert rows["model.layers.0.attn.q_proj.weight"].granularity == "g32 sym"
    assert rows["lm_head.weight"].precision == "int8" and "rules[1]" in rows["lm_head.weight"].rule
    assert rows["model.layers.1.attn_res_proj.weight"].method == "keep"
    assert rows["model.layers.1.mlp_depth.softmax"].precision == "bf16"  # depth.softmax compute
    assert rows["model.embeddings.weight"].method == "keep"  # embed outside the default's scope
    text = plan.to_table()
    assert "rules[0] (select: depth.*)" in text and "bits/weight" in text


def test_components_reference_model(model):
    parts = resolve_components(model)
    comps = {p.component for p in parts}
    assert comps == {"embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "lm_head",
                     "norm", "depth.query", "depth.key_norm", "depth.softmax", "depth.sources", "attn.kv_cache"}
    by = {(p.component, p.name): p for p in parts}
    assert by[("depth.softmax", "model.layers.2.mlp_depth")].layer == 2  # sub-layer 5 // 2
    assert by[("depth.softmax", "model.res_depth")].layer == 3  # final mix = num_hidden_layers
    assert by[("depth.query", "model.res_proj")].layer == 3
    assert by[("norm", "model.norm")].layer == 3
    assert not by[("depth.query", "model.layers.0.attn_res_proj")].is_linear


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral"])
def test_components_hf_llama_family(kind):
    m = tiny_llama(kind)
    parts = resolve_components(m)
    comps = {p.component for p in parts}
    assert {"embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "lm_head",
            "norm"} <= comps
    assert not any(c.startswith("depth.") for c in comps)
    v = parse_variant({"name": "x", "method": "rtn", "default": {"weight": "int8"},
                       "rules": [{"select": "depth.*", "weight": "bf16"}, {"select": "mlp.down", "layers": "-1:",
                                                                            "weight": "int4"}]})
    plan = resolve_plan(m, v)
    assert any("skipped" in n for n in plan.notes)  # depth rule on a model without a depth path
    rows = rows_by_name(plan)
    assert rows["model.layers.1.mlp.down_proj.weight"].precision == "int4"
    assert rows["model.layers.0.mlp.down_proj.weight"].precision == "int8"
    q = quantize(m, v)
    assert torch.isfinite(q.model(torch.randint(0, 97, (1, 8))).logits).all()


def test_rule_precedence_later_wins_and_fields_merge(model):
    v = parse_variant({"name": "p", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
                       "rules": [{"select": "attn.*", "weight": "int8"},
                                 {"select": "attn.q", "weight": "int4", "symmetric": False},
                                 {"select": "attn.q", "layers": [1], "weight": "bf16"}]})
    rows = rows_by_name(resolve_plan(model, v))
    k0 = rows["model.layers.0.attn.k_proj.weight"]
    assert (k0.precision, k0.granularity) == ("int8", "g32 sym")  # group_size inherited from default
    q0 = rows["model.layers.0.attn.q_proj.weight"]
    assert (q0.precision, q0.granularity) == ("int4", "g32 asym") and "rules[1]" in q0.rule
    q1 = rows["model.layers.1.attn.q_proj.weight"]
    assert q1.method == "keep" and "rules[2]" in q1.rule
    assert rows["model.layers.0.mlp.up_proj.weight"].precision == "int4"
    assert rows["model.layers.0.mlp.up_proj.weight"].rule == "default"


def test_layer_selectors(model):
    def prec(layers, name):
        v = parse_variant({"name": "l", "method": "rtn", "default": {"weight": "int8"},
                           "rules": [{"select": "mlp.*", "layers": layers, "weight": "int4"}]})
        return rows_by_name(resolve_plan(model, v))[name].precision

    assert prec("-1:", "model.layers.2.mlp.up_proj.weight") == "int4"
    assert prec("-1:", "model.layers.1.mlp.up_proj.weight") == "int8"
    assert prec("0:2", "model.layers.1.mlp.up_proj.weight") == "int4"
    assert prec([0, -1], "model.layers.2.mlp.up_proj.weight") == "int4"
    assert prec([0, -1], "model.layers.1.mlp.up_proj.weight") == "int8"
    # the final depth mix is layer L=3, selectable explicitly
    v = parse_variant({"name": "f", "method": "rtn", "rules": [{"select": "depth.softmax", "layers": [3],
                                                                  "compute": "bf16"}]})
    rows = rows_by_name(resolve_plan(model, v))
    assert rows["model.res_depth.softmax"].precision == "bf16" and rows["model.layers.2.mlp_depth.softmax"].precision == "fp32"


def test_modules_regex_selector(model):
    v = parse_variant({"name": "m", "method": "rtn", "default": {"weight": "int8"},
                       "rules": [{"modules": r"layers\.1\..*_proj$", "weight": "int4"}]})
    rows = rows_by_name(resolve_plan(model, v))
    assert rows["model.layers.1.attn.o_proj.weight"].precision == "int4"
    assert rows["model.layers.1.attn_res_proj.weight"].precision == "int4"
    assert rows["model.layers.0.attn.o_proj.weight"].precision == "int8"


def expect_error(fn, *fragments):
    with pytest.raises(UserError) as exc:
        fn()
    msg = str(exc.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_error_unknown_component():
    expect_error(lambda: parse_variant({"name": "v1", "rules": [{"select": "depth.sofmax", "compute": "bf16"}]},
                                       "c.yaml"),
                 "unknown component 'depth.sofmax'", "c.yaml", "variant 'v1'", "rules[0]", "Fix:", "depth.softmax")


def test_error_unknown_precision():
    expect_error(lambda: parse_variant({"name": "v2", "default": {"weight": "int4"},
                                        "rules": [{"select": "attn.q", "weight": "int3"}]}, "c.yaml"),
                 "unknown weight precision 'int3'", "c.yaml", "variant 'v2'", "rules[0] (select: attn.q)", "int4")
    expect_error(lambda: parse_variant({"name": "v3", "default": {"compute": "fp4"}}, "c.yaml"),
                 "unknown compute precision", "fp8")
    expect_error(lambda: parse_variant({"name": "v4", "default": {"wieght": "int4"}}, "c.yaml"),
                 "unknown key 'wieght'", "variant 'v4'")


def test_error_method_cannot_provide(model):
    expect_error(lambda: parse_variant({"name": "v5", "method": "rtn", "default": {"weight": "nf4"}}, "c.yaml"),
                 "cannot provide weight nf4", "method: bnb")
    expect_error(lambda: parse_variant({"name": "v5b", "method": "none", "default": {"weight": "int4"}}, "c.yaml"),
                 "cannot provide weight int4", "method: rtn")
    expect_error(lambda: parse_variant({"name": "v6", "method": "bnb", "rules": [{"select": "mlp.*",
                                                                                 "weight": "int4"}]}, "c.yaml"),
                 "cannot provide weight int4", "rules[0] (select: mlp.*)", "nf4")
    expect_error(lambda: parse_variant({"name": "v7", "method": "bnb", "rules": [{"select": "depth.query",
                                                                                 "weight": "nf4"}]}, "c.yaml"),
                 "cannot provide weight nf4 for depth.query")
    expect_error(lambda: parse_variant({"name": "v8", "method": "torchao", "default": {"weight": "int4"},
                                        "rules": [{"select": "attn.q", "activation": "int8"}]}, "c.yaml"),
                 "cannot quantize activations", "int8", "variant 'v8'", "rules[0] (select: attn.q)")
    # known only against the model: an int8-activation rule on a part whose weight is int4 under torchao
    v = parse_variant({"name": "v8b", "method": "torchao", "default": {"weight": "int4"},
                       "rules": [{"select": "attn.*", "weight": "int8", "activation": "int8"},
                                 {"select": "attn.q", "weight": "int4"}]}, "c.yaml")
    expect_error(lambda: resolve_plan(model, v, "c.yaml"), "need int8 weights", "variant 'v8b'")
    expect_error(lambda: parse_variant({"name": "v9", "method": "bnb", "default": {"weight": "nf4",
                                                                                 "activation": "int8"}}, "c.yaml"),
                 "cannot quantize activations")


def test_error_rule_matches_nothing(model):
    v = parse_variant({"name": "v10", "rules": [{"select": "mlp.*", "layers": [7], "weight": "int8"}]}, "c.yaml")
    expect_error(lambda: resolve_plan(model, v, "c.yaml"), "matches nothing", "c.yaml", "variant 'v10'",
                 "rules[0] (select: mlp.*, layers: [7])", "Fix:")
    v = parse_variant({"name": "v11", "rules": [{"select": "attn.*", "modules": "nope", "weight": "int8"}]})
    expect_error(lambda: resolve_plan(model, v), "matches nothing", "modules: nope")
    v = parse_variant({"name": "v12", "rules": [{"select": "attn.q", "compute": "bf16"}]})
    expect_error(lambda: resolve_plan(model, v), "applies to none", "compute to depth.softmax")


def test_error_group_size_not_dividing(model):
    v = parse_variant({"name": "v13", "method": "rtn", "default": {"weight": "int4", "group_size": 48}}, "c.yaml")
    expect_error(lambda: resolve_plan(model, v, "c.yaml"), "group_size 48 does not divide")


def test_errors_happen_before_model_work(model, monkeypatch):
    import copy

    calls = []
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: calls.append(1))
    v = parse_variant({"name": "v14", "rules": [{"select": "mlp.*", "layers": [9], "weight": "int8"}]})
    with pytest.raises(UserError):
        quantize(model, v)
    assert not calls


def test_plan_summary_bits_and_bytes(model):
    v = parse_variant({"name": "s", "method": "rtn", "default": {"weight": "int4", "group_size": 32}})
    plan = resolve_plan(model, v)
    row = rows_by_name(plan)["model.layers.0.mlp.up_proj.weight"]
    assert row.bits == pytest.approx(4 + 16 / 32)
    s = plan.summary()
    n = sum(p.numel() for p in model.parameters())
    assert s["n_weights"] == n
    assert 4.5 < s["avg_bits"] < 16
    assert s["weight_bytes"] == pytest.approx(s["avg_bits"] * n / 8, abs=1)
    base = resolve_plan(model, parse_variant({"name": "b", "method": "none"})).summary()
    assert base["avg_bits"] == 16 and base["weight_bytes"] == 2 * n


def test_tied_lm_head_gets_own_copy_when_treated_differently():
    m = tiny_attnres(layers=2)
    m.lm_head.weight = m.model.embeddings.weight  # tie
    v = parse_variant({"name": "t", "method": "rtn", "rules": [{"select": "lm_head", "weight": "int8"}]})
    plan = resolve_plan(m, v)
    assert rows_by_name(plan)["lm_head.weight"].tied_to is None
    q = quantize(m, v)
    assert torch.equal(q.model.model.embeddings.weight, m.model.embeddings.weight)
    assert not torch.equal(q.model.lm_head.weight, m.lm_head.weight)
    # same treatment: counted once
    v2 = parse_variant({"name": "t2", "method": "rtn", "rules": [{"select": "lm_head", "weight": "bf16"}]})
    assert rows_by_name(resolve_plan(m, v2))["lm_head.weight"].tied_to == "model.embeddings.weight"


def test_parse_variants_baseline_plan_and_meta_skeleton():
    from attnres_quant.quant import baseline_plan, parse_variants

    items = [{"name": "a", "method": "gptq", "default": {"weight": "int4"}},
             {"name": "b", "method": "rtn", "default": {"activation": "int8", "activation_scheme": "static"}},
             {"name": "c", "method": "rtn", "default": {"weight": "int8"}}]
    a, b, c = parse_variants(items, "s.yaml")
    assert a.needs_calibration() and b.needs_calibration() and not c.needs_calibration()
    expect_error(lambda: parse_variants(items + [{"name": "a"}], "s.yaml"), "unique", "s.yaml")
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=97,
                        attnres_block_size=2, intermediate_size=128, tie_word_embeddings=True)
    with torch.device("meta"):
        skeleton = AttnResForCausalLM(cfg).to(torch.bfloat16)
    plan = resolve_plan(skeleton, a, "s.yaml")
    tied = [r for r in plan.rows if r.tied_to]
    assert [r.name for r in tied] == ["lm_head.weight"]  # only the real tie, not every meta tensor
    rec = baseline_plan(skeleton, "bfloat16")
    assert rec["avg_bits"] == 16 and rec["kernel"] == "dense-bfloat16" and rec["rows"]


def test_calibration_batches_random_and_from_tokenizer():
    from attnres_quant.quant import calibration_batches

    ids = calibration_batches(None, 4, 16, seed=1, vocab_size=50)
    assert ids.shape == (4, 16) and ids.max() < 50
    assert torch.equal(ids, calibration_batches(None, 4, 16, seed=1, vocab_size=50))

    class CharTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) % 97 for ch in text]}

    ids = calibration_batches(CharTok(), samples=3, seq_len=32, seed=0)
    assert ids.shape == (3, 32) and ids.dtype == torch.long
