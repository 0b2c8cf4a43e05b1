"""mHC as a family (issue 20, item 1): our mHC math against transformers' DeepSeek-V4, DeepSeek-V4 checkpoints
through our loader, identity checks against the standard-residual reference model, the hc.* components and
their precision hooks, `plan` and a short `run`.

Every model is a random tiny config (``architectures.mhc_testing``) built here, fp32.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import yaml

from attnres_quant.architectures.mhc_testing import TINY_DSV4, TINY_MHC, save_tiny, tiny_deepseek_v4, tiny_mhc
from attnres_quant.errors import UserError
from attnres_quant.quant import parse_variant, quantize, resolve_plan

HC_COMPUTE = ("hc.pre", "hc.post", "hc.comb", "hc.streams")


def _variant(**kw):
    return parse_variant({"name": kw.pop("name", "v"), "method": kw.pop("method", "rtn"), **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _ids(vocab: int, seed: int = 1, shape=(2, 12)):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dsv4_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsv4") / "tiny-dsv4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_tiny(out, "deepseek_v4")
    return out


@pytest.fixture(scope="module")
def mhc_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("mhc") / "tiny-mhc"
    save_tiny(out, "attnres_mhc")
    return out


# --------------------------------------------------------------------------- the math against transformers
def _random_(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.7))


@pytest.mark.parametrize("hc_mult,iters", [(4, 20), (3, 5), (1, 1)])
def test_hc_site_and_head_equal_transformers_deepseek_v4(hc_mult, iters):
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

    from attnres_quant.architectures.mhc_modeling import HyperConnection, HyperHead, expand

    cfg = DeepseekV4Config(**dict(TINY_DSV4, hc_mult=hc_mult, hc_sinkhorn_iters=iters))
    theirs = DeepseekV4HyperConnection(cfg)
    _random_([theirs.fn, theirs.base, theirs.scale], seed=hc_mult)
    ours = HyperConnection(hc_mult, cfg.hidden_size, iters, cfg.hc_eps, cfg.rms_norm_eps)
    ours.load_state_dict(theirs.state_dict())
    streams = torch.randn(2, 5, hc_mult, cfg.hidden_size, generator=torch.Generator().manual_seed(7)) * 3
    with torch.no_grad():
        post_t, comb_t, coll_t = theirs(streams)
        post_o, comb_o, coll_o = ours(streams)
        pre_o, _, _ = ours.maps(streams)
    for a, b in ((post_o, post_t), (comb_o, comb_t), (coll_o, coll_t)):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    # The combine matrix is (nearly) doubly stochastic, and nontrivial.
    assert torch.allclose(comb_o.sum(-1), torch.ones(()), atol=1e-4)
    assert torch.allclose(comb_o.sum(-2), torch.ones(()), atol=1e-4)
    assert hc_mult == 1 or pre_o.std() > 1e-3
    # The expand step equals DeepseekV4DecoderLayer's mixing (comb applied transposed).
    out = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    ref = post_t.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb_t.transpose(-1, -2), streams)
    assert (expand(out, post_o, comb_o, streams) - ref).abs().max().item() < 1e-5

    head_t = DeepseekV4HyperHead(cfg)
    _random_([head_t.hc_fn, head_t.hc_base, head_t.hc_scale], seed=11)
    head_o = HyperHead(hc_mult, cfg.hidden_size, cfg.hc_eps, cfg.rms_norm_eps)
    head_o.load_state_dict(head_t.state_dict())
    with torch.no_grad():
        assert (head_o(streams) - head_t(streams)).abs().max().item() < 1e-5


def test_deepseek_v4_checkpoint_loads_and_reproduces_transformers(dsv4_ckpt, one_thread):
    from transformers import DeepseekV4ForCausalLM

    from attnres_quant.architectures.mhc_modeling import HyperConnection, HyperHead
    from attnres_quant.loading import describe_model, load_model, preflight_model, structure_model

    src = preflight_model(str(dsv4_ckpt), dtype="float32")
    assert src.model_type == "deepseek_v4" and src.family == "deepseek_v4-mhc" and src.block_size is None
    model, tok = load_model(str(dsv4_ckpt), dtype="float32")
    assert tok is not None and type(model).__name__ == "DeepseekV4ForCausalLM"
    assert isinstance(model.model.layers[0].attn_hc, HyperConnection) and isinstance(model.model.hc_head, HyperHead)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, info = DeepseekV4ForCausalLM.from_pretrained(str(dsv4_ckpt), dtype=torch.float32,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(model.state_dict()) == set(theirs.eval().state_dict())  # our sites hold the same parameters
    ids = _ids(model.config.vocab_size)
    diff = (_logits(model, ids) - _logits(theirs, ids)).abs().max().item()
    assert diff < 1e-4, diff  # MoE layers included (hash-routed, then top-2 of 4 + a shared expert)
    info = describe_model(model)
    assert info["family"] == "deepseek_v4-mhc" and info["residual"] == "mhc" and info["hc_mult"] == 4
    assert info["num_experts"] == 4
    # The skeleton (plan before weights load) gives the same rows as the loaded model.
    skeleton = structure_model(str(dsv4_ckpt), dtype="float32")
    v = _variant(default={"weight": "int4", "group_size": 8})
    assert [r.as_dict() for r in resolve_plan(skeleton, v).rows] == [r.as_dict() for r in resolve_plan(model, v).rows]


def test_deepseek_v4_in_bf16_loads_runs_and_plans_like_its_skeleton(dsv4_ckpt, one_thread):
    """transformers keeps DeepSeek-V4's norms fp32 and its own bf16 forward then fails on CPU; ours runs (norm
    weights held in bf16, mHC sites / sinks / router bias fp32 as transformers keeps them) and says so."""
    from attnres_quant.loading import describe_model, load_model, structure_model

    model, _ = load_model(str(dsv4_ckpt), dtype="bfloat16")
    assert model.model.layers[0].attn_hc.fn.dtype == torch.float32
    assert model.model.layers[0].self_attn.sinks.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert any("RMSNorm weights are held in the model dtype" in n for n in describe_model(model)["load_notes"])
    logits = _logits(model, _ids(model.config.vocab_size))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    skeleton = structure_model(str(dsv4_ckpt), dtype="bfloat16")
    v = _variant(default={"weight": "int4", "group_size": 8}, rules=[{"select": "hc.streams", "storage": "int8"}])
    rows = [r.as_dict() for r in resolve_plan(model, v).rows]
    assert rows == [r.as_dict() for r in resolve_plan(skeleton, v).rows]
    assert {r["precision"] for r in rows if r["component"] == "hc.fn"} == {"fp32"}


def test_decode_with_cache_equals_prefill_with_and_without_stream_quantization():
    model = tiny_mhc()
    ids = _ids(TINY_MHC["vocab_size"], shape=(1, 7))
    q = quantize(model, _variant(method="none", rules=[{"select": "hc.streams", "storage": "int8"}])).model
    # Stream scales are per token and stream, so a decode step needs nothing from other tokens; with int8 streams
    # the ~1e-7 float differences of cached attention can still move a value across a rounding boundary (one
    # int8 step), hence the looser bound.
    for m, tol in ((model, 1e-5), (q, 3e-2)):
        with torch.no_grad():
            full = m(input_ids=ids, use_cache=False).logits[:, -1]
            out = m(input_ids=ids[:, :-1], use_cache=True)
            step = m(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        assert (full - step).abs().max().item() < tol


def test_deepseek_v4_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from attnres_quant.loading import load_model

    save_tiny(tmp_path / "ck", "deepseek_v4")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    # Saved under DeepSeek's original names (transformers' conversion mapping renames them on load).
    state.pop("model.layers.1.hc_ffn_fn")
    save_file(state, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing weights model.layers.1.ffn_hc.fn"):
        load_model(str(tmp_path / "ck"), dtype="float32")


# --------------------------------------------------------------------------- identity checks
def _reference_and_mhc(hc_mult: int, hc_eps: float):
    """The standard-residual reference model and an mHC model sharing every sub-layer weight."""
    from attnres_quant.architectures.mhc_modeling import MHCConfig, MHCForCausalLM
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    base = {k: v for k, v in TINY_MHC.items() if not k.startswith("hc_")}
    ref = AttnResForCausalLM(AttnResConfig(**base)).eval()
    _random_(ref.parameters(), seed=3)
    mhc = MHCForCausalLM(MHCConfig(**base, hc_mult=hc_mult, hc_eps=hc_eps)).eval()
    missing, unexpected = mhc.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(".attn_hc." in k or ".ffn_hc." in k or "hc_head" in k for k in missing)
    return ref, mhc


def _constant_maps(mhc, pre_logit: float) -> None:
    """fn = 0 (maps independent of the input); pre = sigmoid(pre_logit), post = 2 sigmoid(0) = 1, comb uniform."""
    n = mhc.config.hc_mult
    with torch.no_grad():
        for site in mhc.model.sites():
            for p in site.parameters():
                p.zero_()
            if hasattr(site, "fn"):
                site.scale.fill_(1.0)
                site.base[:n] = pre_logit
            else:
                site.hc_scale.fill_(1.0)
                site.hc_base.fill_(pre_logit)


def test_hc_mult_1_with_identity_maps_equals_the_standard_residual_model():
    """One stream, pre = post = comb = 1 (hc_eps 0): h + f(norm(h)) exactly -- the standard residual."""
    ref, mhc = _reference_and_mhc(hc_mult=1, hc_eps=0.0)
    _constant_maps(mhc, pre_logit=40.0)  # sigmoid(40) == 1.0 in fp32
    ids = _ids(TINY_MHC["vocab_size"])
    assert (_logits(mhc, ids) - _logits(ref, ids)).abs().max().item() < 1e-5


def test_uniform_maps_keep_the_streams_equal_and_equal_the_standard_residual_model():
    """hc_mult 4, pre = 1/4, post = 1, comb = J/4 (default hc_eps): the four streams stay copies of the standard
    residual stream, so the model equals the reference model up to hc_eps."""
    ref, mhc = _reference_and_mhc(hc_mult=4, hc_eps=1e-6)
    _constant_maps(mhc, pre_logit=math.log(1 / 3))  # sigmoid = 1/4
    ids = _ids(TINY_MHC["vocab_size"])
    seen = []  # the streams the second layer's attention site reads (a recording "storage" hook)
    mhc.model.layers[1].attn_hc.stream_quantizer = lambda streams: seen.append(streams) or streams
    out = _logits(mhc, ids)
    assert (seen[0] - seen[0][..., :1, :]).abs().max().item() < 1e-5
    assert (out - _logits(ref, ids)).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- components and plan
def test_plan_lists_every_mhc_component_and_keeps_hc_fn_by_default():
    model = tiny_mhc()
    plan = resolve_plan(model, _variant(default={"weight": "int4", "group_size": 16}))
    comps = {r.component for r in plan.rows}
    assert {"hc.fn", *HC_COMPUTE, "attn.q", "mlp.down", "norm", "embed", "lm_head", "attn.kv_cache"} <= comps
    assert {r.name for r in plan.weight_rows()} == {n for n, _ in model.named_parameters()}
    L = TINY_MHC["num_hidden_layers"]
    # two sites per layer (pre, post, comb, streams each) + the head (pre, streams)
    assert sum(r.component in HC_COMPUTE for r in plan.rows) == 2 * L * 4 + 2
    assert plan.row("model.hc_head.streams").layer == L and plan.row("model.hc_head.hc_fn").layer == L
    for r in plan.rows:
        if r.component == "hc.fn":
            assert r.method == "keep" and r.rule == "kept: mhc default-keep"
        if r.component in HC_COMPUTE:
            assert r.method == "keep" and r.precision == "fp32"
    assert any("does not reach hc.fn" in n for n in plan.notes)
    # A rule that names hc.fn does quantize it.
    plan2 = resolve_plan(model, _variant(rules=[{"select": "hc.fn", "weight": "int8"}]))
    assert all(r.method == "rtn" for r in plan2.weight_rows() if r.component == "hc.fn")


@pytest.mark.parametrize("rule,match", [
    ({"select": "moe.router", "weight": "int8"}, "matches nothing"),  # no MoE in our minimal model
    ({"select": "hc.comb", "layers": [5], "compute": "bf16"}, "matches nothing"),
    ({"select": "hc.streams", "compute": "bf16"}, "applies to none"),  # streams take storage, not compute
    ({"select": "hc.comb", "storage": "int8"}, "applies to none"),
    ({"select": "hc.nope", "weight": "int8"}, "unknown component"),
    # base [(2+n)n] = [24]: a group of 16 does not divide it (an error at plan time, not a crash in RTN)
    ({"select": "hc.fn", "weight": "int4", "group_size": 16}, "does not divide the 24"),
])
def test_bad_hc_rules_are_errors(rule, match):
    with pytest.raises(UserError, match=match):
        resolve_plan(tiny_mhc(), _variant(rules=[rule]))


def test_methods_not_wired_for_mhc_are_refused():
    with pytest.raises(UserError, match="cannot run on the mhc family"):
        resolve_plan(tiny_mhc(), _variant(method="gptq", default={"weight": "int4"}))


# --------------------------------------------------------------------------- hooks: their effect
def test_stream_storage_int8_changes_the_logits_and_fp32_does_not(one_thread):
    model = tiny_mhc()
    ids = _ids(TINY_MHC["vocab_size"])
    base = _logits(model, ids)
    same = quantize(model, _variant(method="none", rules=[{"select": "hc.streams", "storage": "fp32"}])).model
    assert torch.equal(_logits(same, ids), base)
    q = quantize(model, _variant(method="none", rules=[{"select": "hc.streams", "storage": "int8"}]))
    assert all(s.stream_quantizer is not None for s in q.model.model.sites())
    assert (_logits(q.model, ids) - base).abs().max().item() > 1e-3
    # One site only: that site's stored streams change, nothing before it.
    one = quantize(model, _variant(method="none", rules=[{"select": "hc.streams", "storage": "int4",
                                                          "modules": r"layers\.1\.ffn_hc"}])).model
    assert [s.stream_quantizer is not None for s in one.model.sites()] == [False, False, False, True, False]
    assert (_logits(one, ids) - base).abs().max().item() > 1e-3


@pytest.mark.parametrize("comp", ["hc.comb", "hc.pre", "hc.post"])
def test_map_compute_bf16_changes_the_logits_slightly(comp, one_thread):
    model = tiny_mhc()
    ids = _ids(TINY_MHC["vocab_size"])
    base = _logits(model, ids)
    q = quantize(model, _variant(method="none", rules=[{"select": comp, "compute": "bf16"}])).model
    diff = (_logits(q, ids) - base).abs().max().item()
    assert 0 < diff < 0.05 * base.abs().max().item(), diff
    # int8 logits of the map also run (per-token) and change the output.
    q8 = quantize(model, _variant(method="none", rules=[{"select": comp, "compute": "int8"}])).model
    assert (_logits(q8, ids) - base).abs().max().item() > 0


def test_sinkhorn_at_bf16_stays_close_to_doubly_stochastic():
    from attnres_quant.architectures.mhc_modeling import sinkhorn

    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2
    exact = sinkhorn(logits, 20, 1e-6)
    low = sinkhorn(logits, 20, 1e-6, torch.bfloat16)
    assert 0 < (low - exact).abs().max().item() < 2e-2
    assert torch.allclose(low.sum(-2), torch.ones(()), atol=2e-2)


def test_weight_rule_on_hc_fn_changes_exactly_those_weights():
    model = tiny_mhc()
    q = quantize(model, _variant(rules=[{"select": "hc.fn", "layers": [1], "weight": "int4", "group_size": 8}]))
    before = dict(model.named_parameters())
    changed = {n for n, p in q.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {f"model.layers.1.{s}_hc.{p}" for s in ("attn", "ffn") for p in ("fn", "base",
                                                                                                     "scale")}
    assert "model.layers.1.attn_hc.fn" in changed and "model.layers.1.ffn_hc.fn" in changed


def test_experts_selector_and_hooks_on_deepseek_v4(one_thread):
    from attnres_quant.architectures.mhc_modeling import attach_hc_hooks

    model = tiny_deepseek_v4()
    attach_hc_hooks(model)
    v = _variant(rules=[{"select": "moe.experts.*", "experts": [0, 2], "weight": "int4", "group_size": 8}])
    q = quantize(model, v).model
    for name, p in model.named_parameters():
        p2 = dict(q.named_parameters())[name]
        if ".mlp.experts." in name:
            assert [not torch.equal(p[e], p2[e]) for e in range(p.shape[0])] == [True, False, True, False], name
        else:
            assert torch.equal(p, p2), name
    ids = _ids(model.config.vocab_size)
    base = _logits(model, ids)
    qs = quantize(model, _variant(method="none", rules=[{"select": "hc.streams", "storage": "int8"}])).model
    assert (_logits(qs, ids) - base).abs().max().item() > 1e-3
    plan = resolve_plan(model, _variant(default={"weight": "int4", "group_size": 8}))
    kept = {r.component for r in plan.weight_rows() if r.rule.startswith("kept")}
    assert kept == {"hc.fn", "moe.router", "attn.sink"}


def test_residual_bytes_per_token():
    from attnres_quant.architectures.mhc import residual_bytes_per_token

    assert residual_bytes_per_token(4096, 4, "bf16") == 4 * 4096 * 2
    assert residual_bytes_per_token(4096, 4, "int8") == 4 * 4096 + 4 * 2
    assert residual_bytes_per_token(4096, 1, "int4") == 2048 + 2


# --------------------------------------------------------------------------- CLI
def test_plan_cli_on_a_tiny_mhc_checkpoint(mhc_ckpt, tmp_path, capsys):
    from attnres_quant.cli import main as cli_main

    cfg = {"name": "m", "device": "cpu", "dtype": "float32", "model": {"path": str(mhc_ckpt)},
           "variants": [{"name": "int4_hybrid", "method": "rtn", "default": {"weight": "int4", "group_size": 16},
                         "rules": [{"select": "hc.comb", "compute": "bf16"}]}]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    for comp in ("hc.fn", *HC_COMPUTE):
        assert comp in out
    assert "does not reach hc.fn" in out


def test_run_int4_all_vs_hybrid_on_a_tiny_mhc_checkpoint(mhc_ckpt, tmp_path, one_thread):
    from attnres_quant.cli import main as cli_main

    cfg = {
        "name": "mhc_mini", "seed": 0, "device": "cpu", "dtype": "float32",
        "model": {"path": str(mhc_ckpt), "name": "tiny-mhc"},
        "variants": [
            {"name": "int4_all", "method": "rtn", "default": {"weight": "int4", "group_size": 16},
             "rules": [{"select": "hc.fn", "weight": "int4", "group_size": 8},
                       {"select": "hc.streams", "storage": "int4"},
                       {"select": "hc.comb", "compute": "int8"}]},
            {"name": "int4_hybrid", "method": "rtn", "default": {"weight": "int4", "group_size": 16},
             "rules": [{"select": "hc.streams", "storage": "bf16"},
                       {"select": "hc.pre", "compute": "bf16"}, {"select": "hc.post", "compute": "bf16"},
                       {"select": "hc.comb", "compute": "bf16"}]},
        ],
        "tasks": ["proxy_mc"],
        "eval": {"batch_size": 8, "limit": 4},
        "quality": {"max_tokens": 96, "seq_len": 48},
        "bench": {"enabled": False},
    }
    path = tmp_path / "mhc_mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "reports"
    assert cli_main(["run", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "mhc_mini" / "results.json").read_text())
    cells = results["cells"]
    for v in ("bf16", "int4_all", "int4_hybrid"):
        assert cells[f"tiny-mhc/{v}/plan"]["status"] == "ok", v
        assert cells[f"tiny-mhc/{v}/quality"]["status"] == "ok", v
        assert cells[f"tiny-mhc/{v}/task:proxy_mc"]["status"] == "ok", v
    assert cells["tiny-mhc/bf16/model"]["value"]["family"] == "attnres-mhc"
    kl = {v: cells[f"tiny-mhc/{v}/quality"]["value"]["kl_mean"] for v in ("int4_all", "int4_hybrid")}
    assert kl["int4_all"] > kl["int4_hybrid"] > 0
    assert "int4_hybrid" in (out / "mhc_mini.md").read_text()


# --------------------------------------------------------------------------- training config (not trained here)
def test_tiny_mhc_training_config_mirrors_tiny_block_and_builds_the_mhc_model():
    from attnres_quant.architectures.mhc_modeling import MHCForCausalLM
    from attnres_quant.evaluation.testing import tiny_tokenizer
    from attnres_quant.training import train

    a = train.load_config("configs/train/tiny_block.yaml")
    b = train.load_config("configs/train/tiny_mhc.yaml")
    assert (a["model"].pop("attnres_block_size"), b["model"].pop("attnres_block_size")) == (4, None)
    assert (a["model"].pop("hc_mult"), b["model"].pop("hc_mult")) == (None, 4)
    for key in ("model", "data", "train", "eval"):
        assert a[key] == b[key], key
    tok = tiny_tokenizer(vocab_size=320)
    cfg = train.load_config("configs/train/tiny_mhc.yaml")
    cfg["model"].update(hidden_size=32, num_hidden_layers=1)
    model = train.build_model(cfg, tok)
    assert isinstance(model, MHCForCausalLM) and model.config.hc_mult == 4
    cfg["model"]["hc_mult"] = 0
    with pytest.raises(UserError, match="hc_mult"):
        train.build_model(cfg, tok)
