"""Issue 13, method side: every method validates its options (7), applies or refuses every setting the plan
shows (6: torchao), answers can_run(plan, device) before any model work (10), bnb 4-bit does not depend on the
CPU kind (9), and gguf presets choose llama-quantize's type tensor by tensor (4)."""

import pytest
import torch
import yaml

from attnres_quant.errors import UserError
from attnres_quant.quant import parse_variant, quantize, resolve_plan
from attnres_quant.quant.testing import tiny_attnres

torch.set_num_threads(1)


def v(d):
    return parse_variant(d, source="c.yaml")


def expect(fn, *needles):
    with pytest.raises(UserError) as exc:
        fn()
    msg = str(exc.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def small():
    return tiny_attnres(hidden=64, layers=2, intermediate=128, vocab=97)


# ------------------------------------------------------------------------------------------ 4. GGUF presets
def _llama_quantize_q4_k_m_8_layers(L=8, tied=False):
    """Expected llama-quantize Q4_K_M types for tiny_attnres(hidden=256, layers=8, intermediate=512), written
    from src/llama-quant.cpp (commit 007dbbf): tensor_allows_quantization (ggml_n_dims >= 2, no *_norm),
    llama_tensor_get_type_impl (output.weight -> Q6_K; token_embd -> the base Q4_K unless tied to the output;
    attn_v / ffn_down -> Q6_K where use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2 -> layers 0, 3, 6, 7),
    every row length (256 or 512) a multiple of QK_K so no fallback. None = left at its stored type."""
    more = {0, 3, 6, 7}
    exp = {"model.embeddings.weight": "q6_k" if tied else "q4_k", "lm_head.weight": "q6_k",
           "model.norm.weight": None, "model.res_proj.weight": None, "model.res_norm.weight": None}
    for i in range(L):
        pre = f"model.layers.{i}."
        for t in ("attn.q_proj", "attn.k_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            exp[pre + t + ".weight"] = "q4_k"
        exp[pre + "attn.v_proj.weight"] = "q6_k" if i in more else "q4_k"
        exp[pre + "mlp.down_proj.weight"] = "q6_k" if i in more else "q4_k"
        for t in ("attn_norm", "mlp_norm", "attn_res_norm", "mlp_res_norm"):  # 1-D
            exp[pre + t + ".weight"] = None
        for t in ("attn_res_proj", "mlp_res_proj"):  # [1, 256]: ggml ne = [256, 1], ggml_n_dims 1
            exp[pre + t + ".weight"] = None
    return exp


def _types(plan):
    return {r.name: (None if r.method == "keep" else r.precision) for r in plan.weight_rows()}


def test_gguf_q4_k_m_plan_is_llama_quantize_tensor_by_tensor():
    m = tiny_attnres(hidden=256, layers=8, intermediate=512, vocab=256)
    plan = resolve_plan(m, v({"name": "q4km", "method": "gguf", "options": {"preset": "q4_k_m"}}), "c.yaml")
    assert _types(plan) == _llama_quantize_q4_k_m_8_layers()
    assert not any(r.fallback for r in plan.weight_rows())
    # "unquantized" = the baseline dtype (GGUF: convert_hf_to_gguf stores [1, d] at the outtype, bf16 for a bf16
    # checkpoint, and 1-D tensors in F32, an exact widening of bf16)
    assert {r.precision for r in plan.weight_rows() if r.method == "keep"} == {"bf16"}
    # a rule still overrides llama.cpp's choice (and the plan says llama-quantize would not do it)
    plan2 = resolve_plan(m, v({"name": "q4km_dq", "method": "gguf", "options": {"preset": "q4_k_m"},
                               "rules": [{"select": "depth.query", "weight": "q8_0"}]}), "c.yaml")
    assert plan2.row("model.layers.3.mlp_res_proj.weight").precision == "q8_0"
    assert any("ggml_n_dims < 2" in n for n in plan2.notes)


def test_gguf_presets_tied_embedding_q4_k_s_and_fallbacks():
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    cfg = AttnResConfig(hidden_size=256, num_hidden_layers=8, num_heads=4, num_kv_heads=2, vocab_size=256,
                        intermediate_size=512, attnres_block_size=2, tie_word_embeddings=True)
    with torch.device("meta"):
        tied = AttnResForCausalLM(cfg)
    assert tied.lm_head.weight is tied.model.embeddings.weight
    plan = resolve_plan(tied, v({"name": "t", "method": "gguf", "options": {"preset": "q4_k_m"}}), "c.yaml")
    assert _types(plan) == _llama_quantize_q4_k_m_8_layers(tied=True)  # token_embd takes output.weight's Q6_K

    m = tiny_attnres(hidden=256, layers=8, intermediate=512, vocab=256)
    s = _types(resolve_plan(m, v({"name": "s", "method": "gguf", "options": {"preset": "q4_k_s"}}), "c.yaml"))
    # Q4_K_S: attn_v of i_attention_wv < 4 -> Q5_K, ffn_down of i < n/8 (= layer 0) -> Q5_K
    assert [s[f"model.layers.{i}.attn.v_proj.weight"] for i in range(8)] == ["q5_k"] * 4 + ["q4_k"] * 4
    assert [s[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(8)] == ["q5_k"] + ["q4_k"] * 7
    assert (s["model.embeddings.weight"], s["lm_head.weight"], s["model.res_proj.weight"]) == ("q4_k", "q6_k", None)
    # legacy mixes: output.weight still Q6_K (ne[0] = 256 fits), token_embd and everything else at the base type
    o = _types(resolve_plan(m, v({"name": "o", "method": "gguf", "options": {"preset": "q4_0"}}), "c.yaml"))
    assert (o["model.embeddings.weight"], o["lm_head.weight"], o["model.layers.0.attn.v_proj.weight"],
            o["model.layers.0.mlp.down_proj.weight"], o["model.layers.0.attn_res_proj.weight"]) == \
        ("q4_0", "q6_k", "q4_0", "q4_0", None)

    # rows of 64: token_embd Q4_K -> Q5_0 (tensor_type_fallback), output -> Q8_0 (ne[0] % QK_K != 0)
    m64 = tiny_attnres(hidden=64, layers=2, intermediate=256, vocab=97)
    p64 = resolve_plan(m64, v({"name": "f", "method": "gguf", "options": {"preset": "q4_k_m"}}), "c.yaml")
    t = _types(p64)
    assert (t["model.embeddings.weight"], t["lm_head.weight"]) == ("q5_0", "q8_0")
    assert t["model.layers.0.attn_res_proj.weight"] is None and t["model.layers.1.mlp.down_proj.weight"] == "q6_k"


def test_gguf_preset_quantizes_the_embedding_and_leaves_pseudo_queries_bit_identical(small):
    q = quantize(small, v({"name": "q", "method": "gguf", "options": {"preset": "q4_k_m"}}))
    base, got = dict(small.named_parameters()), dict(q.model.named_parameters())
    for name, p in base.items():
        if "res_proj" in name or "norm" in name:
            assert torch.equal(got[name], p), name
    assert not torch.equal(got["model.embeddings.weight"], base["model.embeddings.weight"])


# ---------------------------------------------------------------------------------- 7. options per method
@pytest.mark.parametrize("method,typo,accepted", [
    ("rtn", "blocksize", "kv_granularity"),
    ("gptq", "damping", "dampening"),
    ("bnb", "treshold", "threshold"),
    ("torchao", "group", "kv_granularity"),
    ("none", "granularity", "kv_granularity"),
    ("awq", "block_size", "n_grid"),
    ("gguf", "presets", "preset"),
])
def test_every_method_refuses_unknown_options_naming_variant_key_and_accepted_keys(method, typo, accepted):
    d = {"name": f"v_{method}", "method": method, "options": {typo: 1}}
    expect(lambda: parse_variant(d, "c.yaml"), f"unknown option {typo!r} for method {method!r}",
           f"variant 'v_{method}'", "c.yaml", accepted)


def test_option_types_are_checked_and_known_options_pass():
    expect(lambda: v({"name": "g", "method": "gptq", "options": {"block_size": "big"}}), "block_size", "variant 'g'")
    expect(lambda: v({"name": "b", "method": "bnb", "options": {"threshold": -1}}), "threshold")
    expect(lambda: v({"name": "a", "method": "gptq", "options": {"actorder": "sideways"}}), "actorder")
    for d in ({"method": "gptq", "options": {"block_size": 64, "dampening": 0.1, "actorder": None}},
              {"method": "bnb", "options": {"threshold": 0.0, "kv_granularity": "per_head"}},
              {"method": "awq", "options": {"duo_scaling": "both", "n_grid": 4, "measure": False}},
              {"method": "rtn", "options": {"kv_granularity": "per_token"}}):
        v({"name": "ok", **d})


# ------------------------------------------------------------------------------------- 6. torchao settings
@pytest.mark.parametrize("default,needle", [
    ({"weight": "int8", "symmetric": False}, "symmetric only"),
    ({"weight": "int8", "activation": "int8", "group_size": 32}, "per output row only"),
    ({"weight": "int8", "activation": "int8", "activation_scheme": "static"}, "activation_scheme: static"),
    ({"weight": "int4"}, "per-channel"),
    ({"weight": "int4", "group_size": 32, "symmetric": True}, "asymmetric"),
])
def test_torchao_refuses_settings_it_cannot_apply_at_plan_time(small, default, needle):
    var = v({"name": "ao", "method": "torchao", "default": default})
    expect(lambda: resolve_plan(small, var, "c.yaml"), needle, "variant 'ao'", "Fix:")


def test_torchao_int8_weight_only_applies_group_size(small):
    pytest.importorskip("torchao")
    q = quantize(small, v({"name": "g32", "method": "torchao", "default": {"weight": "int8", "group_size": 32}}))
    w = q.model.model.layers[0].attn.q_proj.weight  # [64, 64]: two groups of 32 per row
    assert tuple(w.scale.shape) == (64, 2)
    q0 = quantize(small, v({"name": "row", "method": "torchao", "default": {"weight": "int8"}}))
    assert tuple(q0.model.model.layers[0].attn.q_proj.weight.scale.shape) == (64, 1)
    assert q.plan.row("model.layers.0.attn.q_proj.weight").granularity == "g32 sym"


# ------------------------------------------------------------------------------------------ 10. can_run
def test_can_run_is_asked_per_method_and_device(small):
    from attnres_quant.quant.methods import can_run, check_can_run

    p4 = resolve_plan(small, v({"name": "ao4", "method": "torchao", "default": {"weight": "int4", "group_size": 32}}))
    assert "no CPU kernel" in can_run(p4, "cpu")
    assert can_run(p4, "cuda") is None and can_run(p4, torch.device("cuda:0")) is None
    expect(lambda: check_can_run(p4, "cpu", "c.yaml, variant 'ao4'"), "cannot run on device cpu", "variant 'ao4'",
           "Fix:")
    for d in ({"method": "rtn", "default": {"weight": "int4"}}, {"method": "bnb", "default": {"weight": "nf4"}},
              {"method": "torchao", "default": {"weight": "int8"}}, {"method": "gguf", "default": {"weight": "q8_0"}},
              {"method": "none"}):
        assert can_run(resolve_plan(small, v({"name": "x", **d})), "cpu") is None, d


STUDY = {
    "name": "ao", "seed": 0, "device": "cpu", "dtype": "bfloat16", "model": {"path": "zoo:tiny-block"},
    "variants": [{"name": "ao_int4", "method": "torchao", "default": {"weight": "int4", "group_size": 32}}],
    "tasks": ["proxy_mc"], "eval": {"limit": 2},
}


@pytest.fixture
def no_weights(monkeypatch):
    import attnres_quant.loading as loading

    def structure_model(path, **kw):
        with torch.device("meta"):
            return tiny_attnres(hidden=64, layers=2)

    def load_model(*a, **kw):
        raise AssertionError("the model was loaded before the method x device check")

    monkeypatch.setattr(loading, "structure_model", structure_model)
    monkeypatch.setattr(loading, "load_model", load_model)


def test_run_and_plan_refuse_a_method_device_combination_before_loading_weights(tmp_path, no_weights, capsys):
    from attnres_quant import cli

    cfg = tmp_path / "ao.yaml"
    cfg.write_text(yaml.safe_dump(STUDY))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err
    assert "cannot run on device cpu" in err and "ao_int4" in err and "Traceback" not in err
    assert not (tmp_path / "reports" / "ao" / "results.json").exists()
    assert cli.main(["plan", str(cfg)]) == 2
    assert "cannot run on device cpu" in capsys.readouterr().err
    assert cli.main(["plan", str(cfg), "--device", "cuda"]) == 0  # the plan itself is fine for a CUDA run


# ------------------------------------------------------------------------------ 9. bitsandbytes 4-bit packing
@pytest.mark.parametrize("n,k,block", [(97, 128, 64), (96, 128, 64), (64, 96, 64), (64, 128, 64), (64, 32, 64),
                                       (64, 192, 128), (64, 256, 128), (33, 64, 64), (32, 64, 32), (64, 130, 64)])
def test_bnb_packing_rule_equals_bitsandbytes_cpu_repacking(n, k, block):
    """bitsandbytes' AVX512-BF16 CPU path calls _convert_weight_packed_for_cpu on the first inference forward;
    the function itself is plain torch, so it runs (and asserts) on any CPU: our rule must say exactly when."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, quantize_4bit

    from attnres_quant.quant.bnb import cpu_packing_problem

    qw, state = quantize_4bit(torch.randn(n, k, dtype=torch.bfloat16), blocksize=block, quant_type="nf4")
    try:
        _convert_weight_packed_for_cpu(qw, state)
        packs = True
    except (AssertionError, RuntimeError):
        packs = False
    assert (cpu_packing_problem(n, k, block) is None) == packs


@pytest.fixture
def avx512bf16_path(monkeypatch):
    """Make every Linear4bit take the AVX512-BF16 CPU path (repack on the first inference forward), whatever
    this CPU is; on such a CPU it already does."""
    bnb = pytest.importorskip("bitsandbytes")
    orig = bnb.nn.Linear4bit.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        self.support_avx512bf16_for_cpu = True

    monkeypatch.setattr(bnb.nn.Linear4bit, "__init__", init)


def test_bnb_nf4_plan_keeps_unpackable_layers_and_runs_on_the_avx512bf16_path(small, avx512bf16_path):
    import bitsandbytes as bnb

    var = v({"name": "nf4", "method": "bnb", "default": {"weight": "nf4"},
             "rules": [{"select": "lm_head", "weight": "nf4"}]})
    plan = resolve_plan(small, var, "c.yaml")
    head = plan.row("lm_head.weight")  # vocab 97: not a multiple of bnb's 32-row packing block
    assert (head.method, head.precision) == ("keep", "bf16") and "bnb 4-bit CPU packing" in head.rule
    assert any("97 output rows are not a multiple of 32" in n for n in plan.notes)
    q = quantize(small, var)
    assert isinstance(q.model.lm_head, torch.nn.Linear) and not isinstance(q.model.lm_head, bnb.nn.Linear4bit)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in q.model.modules())
    assert n4 == 14  # every projection of the 2 layers
    with torch.inference_mode():
        out = q.model(torch.randint(0, 97, (1, 12)), use_cache=False).logits
    assert torch.isfinite(out).all()
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in q.model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_bench_kernels_bnb_nf4_with_vocab_97_on_the_avx512bf16_path(avx512bf16_path, capsys):
    pytest.importorskip("torchao")
    from attnres_quant import cli

    assert cli.main(["bench", "kernels", "--hidden-size", "64", "--layers", "1", "--seq-len", "4",
                     "--vocab-size", "97", "--num-heads", "4", "--decode-tokens", "1", "--warmup", "0",
                     "--repeats", "1", "--variants", "bf16,bnb_nf4"]) == 0
    out = capsys.readouterr().out
    assert "bnb_nf4" in out and "unsupported" not in out and "kept dense" in out and "lm_head" in out
