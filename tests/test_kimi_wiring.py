"""Kimi-Linear / K3 wired into the tool (issue 16): loading, components, plan, experts selector,
DEFAULT_KEEP, attn.state / attn.kv_cache hooks, method refusals and `run` end to end.

Every model is a random tiny Kimi config (KDA + MLA + MoE + Block AttnRes,
``architectures.kimi_testing``) built and saved here.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

from attnres_quant.architectures.kimi_testing import TINY, save_tiny_kimi, tiny_kimi
from attnres_quant.errors import UserError
from attnres_quant.quant import parse_variant, quantize, resolve_plan

DENSE = dict(TINY, num_experts=None, num_experts_per_token=None, linear_attn_config=None,
             num_shared_experts=0, q_lora_rank=12)


@pytest.fixture(scope="module")
def kimi_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("kimi") / "tiny-kimi"
    save_tiny_kimi(out)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _variant(**kw):
    return parse_variant({"name": kw.pop("name", "v"), "method": kw.pop("method", "rtn"), **kw})


# --------------------------------------------------------------------------- loading
def test_load_preflight_structure_describe(kimi_ckpt, one_thread):
    from attnres_quant.loading import describe_model, load_model, preflight_model, structure_model

    src = preflight_model(str(kimi_ckpt), dtype="float32")
    assert src.model_type == "kimi_linear" and src.family == "kimi_linear-attnres" and src.block_size == 4
    assert src.has_tokenizer
    skeleton = structure_model(str(kimi_ckpt), dtype="float32")
    assert type(skeleton).__name__ == "KimiAttnResForCausalLM" and skeleton.lm_head.weight.is_meta
    model, tok = load_model(str(kimi_ckpt), dtype="float32")
    assert type(model).__name__ == "KimiAttnResForCausalLM" and tok is not None
    assert model.lm_head.weight.dtype == torch.float32
    info = describe_model(model)
    assert info["family"] == "kimi_linear-attnres" and info["attn_res_block_size"] == 2
    assert info["block_size"] == 4 and info["num_experts"] == 4 and info["kda_layers"] == 2
    # Same rows on the skeleton as on the loaded model (plan before any weights load).
    v = _variant(default={"weight": "int4"})
    assert [r.as_dict() for r in resolve_plan(skeleton, v).rows] == [r.as_dict() for r in resolve_plan(model, v).rows]


def test_kimi_tokenizer_rule(tmp_path):
    """Moonshot's tiktoken tokenizer is remote code: without trust_remote_code (or tiktoken) the
    tokenizer is None with a note; an explicit `tokenizer:` directory is used instead."""
    from attnres_quant.evaluation.testing import tiny_tokenizer
    from attnres_quant.loading import load_model, preflight_model

    ckpt = tmp_path / "k"
    save_tiny_kimi(ckpt, tokenizer=False)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    src = preflight_model(str(ckpt))
    assert not src.has_tokenizer and any("tiktoken" in n for n in src.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tok = load_model(str(ckpt), dtype="float32")
    assert tok is None
    tiny_tokenizer(vocab_size=320).save_pretrained(tmp_path / "tok")
    src = preflight_model(str(ckpt), tokenizer=str(tmp_path / "tok"))
    assert src.has_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tok = load_model(str(ckpt), dtype="float32", tokenizer=str(tmp_path / "tok"))
    assert tok is not None and len(tok) > 256


# --------------------------------------------------------------------------- plan
def test_plan_lists_every_kimi_component():
    model = tiny_kimi()
    plan = resolve_plan(model, _variant(default={"weight": "int4"}))
    comps = {r.component for r in plan.rows}
    assert {"depth.query", "depth.key_norm", "depth.softmax", "depth.sources", "attn.gate", "attn.conv",
            "attn.decay", "attn.state", "attn.kv_cache", "attn.kv_a", "attn.kv_b", "moe.router",
            "moe.experts.gate", "moe.experts.up", "moe.experts.down", "moe.shared.gate", "moe.shared.up",
            "moe.shared.down", "mlp.gate", "embed", "norm", "lm_head"} <= comps
    experts = {(r.layer, r.part.expert) for r in plan.rows if r.component == "moe.experts.up"}
    assert experts == {(layer, e) for layer in (1, 2) for e in range(4)}
    # Parameters without a module .weight are rows named by parameter.
    names = {r.name for r in plan.rows}
    assert {"model.layers.0.self_attn.A_log", "model.layers.0.self_attn.dt_bias",
            "model.layers.1.block_sparse_moe.gate.e_score_correction_bias"} <= names
    assert {r.name for r in plan.weight_rows()} == {n for n, _ in model.named_parameters()}
    assert plan.row("model.layers.2.self_attn.kv_cache").precision == "fp32"
    assert plan.row("model.layers.0.self_attn.state").precision == "fp32"


def test_plan_cli_on_a_kimi_checkpoint(kimi_ckpt, tmp_path, capsys):
    from attnres_quant.cli import main as cli_main

    cfg = {"name": "k", "device": "cpu", "dtype": "float32", "model": {"path": str(kimi_ckpt)},
           "variants": [{"name": "experts", "method": "rtn",
                         "rules": [{"select": "moe.experts.*", "experts": [0, 2], "weight": "int4"}]}]}
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["plan", str(path), "--format", "json"]) == 0
    text = capsys.readouterr().out
    data = json.loads(text[text.index("["):] if text.lstrip().startswith("[") else text[text.index("{"):])
    rows = json.dumps(data)
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in rows and "attn.state" in rows


def test_default_keep_is_respected_and_said():
    model = tiny_kimi()
    plan = resolve_plan(model, _variant(default={"weight": "int4"}))
    for r in plan.weight_rows():
        if r.component in ("depth.query", "depth.key_norm", "moe.router", "attn.decay", "norm"):
            assert r.method == "keep", r.name
        if r.component in ("depth.query", "moe.router", "attn.decay"):
            assert r.rule == "kept: kimi default-keep", r.name
    assert any("DEFAULT_KEEP" in n for n in plan.notes)
    q = quantize(model, _variant(default={"weight": "int4"}))
    base, got = dict(model.named_parameters()), dict(q.model.named_parameters())
    for name in base:
        kept = any(k in name for k in ("res_proj", "res_norm", "layernorm", "model.norm", "A_log", "dt_bias",
                                       "block_sparse_moe.gate.", "o_norm", "embed", "lm_head"))
        assert torch.equal(base[name], got[name]) == kept, name
    # A rule that names them does quantize them.
    q = quantize(model, _variant(default={"weight": "int4"},
                                 rules=[{"select": "depth.query", "weight": "int4"},
                                        {"select": "moe.router", "weight": "int8"}]))
    got = dict(q.model.named_parameters())
    assert not torch.equal(base["model.output_attn_res_proj.weight"], got["model.output_attn_res_proj.weight"])
    assert not torch.equal(base["model.layers.1.block_sparse_moe.gate.weight"],
                           got["model.layers.1.block_sparse_moe.gate.weight"])


@pytest.mark.parametrize("experts,chosen", [([0, 2], {0, 2}), ("-1:", {3}), ([-4], {0})])
def test_experts_selector_touches_exactly_those_experts(experts, chosen):
    model = tiny_kimi()
    v = _variant(rules=[{"select": "moe.experts.*", "experts": experts, "weight": "int4"}])
    q = quantize(model, v)
    base, got = dict(model.named_parameters()), dict(q.model.named_parameters())
    changed = {n for n in base if not torch.equal(base[n], got[n])}
    expected = {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                for layer in (1, 2) for e in chosen for w in ("w1", "w2", "w3")}
    assert changed == expected
    # Restricted to one layer and one projection.
    v = _variant(rules=[{"select": "moe.experts.down", "experts": experts, "layers": [2], "weight": "int4"}])
    got = dict(quantize(model, v).model.named_parameters())
    changed = {n for n in base if not torch.equal(base[n], got[n])}
    assert changed == {f"model.layers.2.block_sparse_moe.experts.{e}.w2.weight" for e in chosen}


def test_experts_selector_errors():
    with pytest.raises(UserError, match="matches nothing"):
        resolve_plan(tiny_kimi(DENSE), _variant(rules=[{"select": "moe.experts.*", "experts": [0],
                                                        "weight": "int4"}]))
    with pytest.raises(UserError, match="matches nothing"):
        resolve_plan(tiny_kimi(), _variant(rules=[{"select": "moe.experts.*", "experts": [7], "weight": "int4"}]))
    from attnres_quant.quant.testing import tiny_attnres

    with pytest.raises(UserError, match="has none"):
        resolve_plan(tiny_attnres(), _variant(rules=[{"select": "mlp.*", "experts": [0], "weight": "int4"}]))


@pytest.mark.parametrize("method,options", [("torchao", {}), ("gguf", {"preset": "q4_k_m"})])
def test_methods_not_wired_for_kimi_are_refused_at_plan_time(method, options):
    default = {"weight": {"gguf": "q4_0", "torchao": "int8"}[method]}
    with pytest.raises(UserError, match="cannot run on the kimi family"):
        resolve_plan(tiny_kimi(), _variant(method=method, default=default, options=options))


@pytest.mark.parametrize("method,weight,kernel", [("gguf", "q4_0", "simulated-gguf"), ("bnb", "int8", "bitsandbytes-int8")])
def test_gguf_types_and_bnb_on_kimi(method, weight, kernel, one_thread):
    """Plain GGUF types (llama.cpp's rounding and fallbacks) and bitsandbytes LLM.int8 reach the routed
    experts; DEFAULT_KEEP holds for them too."""
    model = tiny_kimi()
    q = quantize(model, _variant(method=method, default={"weight": weight}))
    assert q.kernel == kernel
    rows = {r.name: r for r in q.plan.weight_rows()}
    up = rows["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    assert up.method == method and up.precision == weight
    assert rows["model.layers.1.block_sparse_moe.gate.weight"].method == "keep"
    if method == "gguf":  # rows of 16 (w2) do not fit q4_0's block of 32: llama.cpp's fp16 fallback
        assert rows["model.layers.1.block_sparse_moe.experts.3.w2.weight"].fallback == "q4_0"
        got = dict(q.model.named_parameters())
        assert not torch.equal(got[up.name], dict(model.named_parameters())[up.name])
    else:
        assert type(q.model.model.layers[1].block_sparse_moe.experts[3].w3).__name__ == "Linear8bitLt"
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    d = (_logits(q.model, ids).float() - _logits(model, ids)).abs().max()
    assert torch.isfinite(d) and d > 0


# --------------------------------------------------------------------------- cache hooks
def test_state_and_latent_cache_rules_change_the_output(one_thread):
    model = tiny_kimi()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    base = _logits(model, ids)
    out = {}
    for name, rules in {"state_int4": [{"select": "attn.state", "storage": "int4"}],
                        "state_fp32": [{"select": "attn.state", "storage": "fp32"}],
                        "kv_int4": [{"select": "attn.kv_cache", "storage": "int4"}],
                        "state_l1_int4": [{"select": "attn.state", "layers": [1], "storage": "int4"}]}.items():
        q = quantize(model, _variant(method="none", rules=rules))
        out[name] = (_logits(q.model, ids) - base).abs().max().item()
        if name == "kv_int4":
            mla = q.model.model.layers[2].self_attn
            assert mla.kv_quantizer is not None and q.details["kv_cache"]["cache"] == "mla latent"
            assert q.details["kv_cache"]["bytes_per_token"] < q.details["kv_cache"]["baseline_bytes_per_token"]
        if name == "state_l1_int4":
            assert q.model.model.layers[0].self_attn.state_quantizer is None
            assert q.model.model.layers[1].self_attn.state_quantizer is not None
    assert out["state_fp32"] == 0.0
    assert out["state_int4"] > 1e-3 and out["kv_int4"] > 1e-3 and out["state_l1_int4"] > 1e-4


@pytest.mark.parametrize("gran", ["per_token", "per_head"])
def test_latent_cache_quantizer_prefill_plus_decode_equals_prefill(gran, one_thread):
    """The MLA latent cache follows the reference KV-cache protocol: per_head scales are the running
    maximum kept beside the cache, so decoding token by token equals one prefill."""
    model = tiny_kimi(dict(TINY, linear_attn_config=None, num_experts=None, num_experts_per_token=None))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    q = quantize(model, _variant(method="none", rules=[{"select": "attn.kv_cache", "storage": "int4"}],
                                 options={"kv_granularity": gran}))
    assert getattr(q.model.model.layers[0].self_attn.kv_quantizer, "stateful", False) == (gran == "per_head")
    full = _logits(q.model, ids)
    assert (full - _logits(model, ids)).abs().max() > 1e-4
    cache, got = None, []
    with torch.no_grad():
        for chunk in [ids[:, :4]] + [ids[:, i:i + 1] for i in range(4, 9)]:
            o = q.model(input_ids=chunk, past_key_values=cache, use_cache=True)
            cache, got = o.past_key_values, got + [o.logits]
    assert (torch.cat(got, 1) - full).abs().max() < 1e-5
    # Appending tokens never changes earlier positions' logits.
    assert (_logits(q.model, ids[:, :5]) - full[:, :5]).abs().max() < 1e-5


def test_set_kv_quantizer_finds_mla_layers():
    from attnres_quant.quant.kv_cache import set_kv_quantizer

    model = tiny_kimi()
    assert set_kv_quantizer(model, "int8") == 1  # the MLA layer; KDA layers keep their state instead
    assert model.model.layers[2].self_attn.kv_quantizer is not None


# --------------------------------------------------------------------------- run end to end
def _study(tmp_path, ckpt, *, tasks, bench=False, extra_variants=(), calibration=False):
    cfg = {
        "name": "kimi_mini", "seed": 0, "device": "cpu", "dtype": "float32",
        "model": {"path": str(ckpt), "name": "tiny-kimi"},
        "variants": [
            {"name": "int4_all", "method": "rtn", "default": {"weight": "int4", "group_size": 16},
             "rules": [{"select": "depth.*", "weight": "int4", "group_size": 16},
                       {"select": "depth.sources", "storage": "int4"},
                       {"select": "moe.router", "weight": "int4", "group_size": 16}]},
            {"name": "int4_hybrid", "method": "rtn", "default": {"weight": "int4", "group_size": 16}},
            {"name": "int4_experts02", "method": "rtn",
             "rules": [{"select": "moe.experts.*", "experts": [0, 2], "weight": "int4", "group_size": 16},
                       {"select": "attn.state", "storage": "int8"}]},
            *extra_variants,
        ],
        "tasks": tasks,
        "eval": {"batch_size": 8, "limit": 4},
        "quality": {"max_tokens": 96, "seq_len": 48},
        "bench": {"enabled": bench, "prompt_len": 8, "decode_tokens": 2, "warmup": 0, "repeats": 1,
                  "threads": 1},
        **({"calibration": {"samples": 4, "seq_len": 32}} if calibration else {}),
    }
    path = tmp_path / "kimi_mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_report(out):
    results = json.loads((out / "kimi_mini" / "results.json").read_text())
    cells = results["cells"]
    for v in ("bf16", "int4_all", "int4_hybrid", "int4_experts02"):
        assert cells[f"tiny-kimi/{v}/plan"]["status"] == "ok", v
        assert cells[f"tiny-kimi/{v}/quality"]["status"] == "ok", v
        assert cells[f"tiny-kimi/{v}/depth"]["status"] == "ok", v
    model = cells["tiny-kimi/bf16/model"]["value"]
    assert model["family"] == "kimi_linear-attnres" and model["num_experts"] == 4
    js = {v: cells[f"tiny-kimi/{v}/quality"]["value"]["depth_js"] for v in ("int4_all", "int4_hybrid",
                                                                          "int4_experts02")}
    # One JS per mixing point: 2L sub-layers + the output mix (sub-layer 0 mixes one source).
    assert all(len(j) == 2 * TINY["num_hidden_layers"] + 1 for j in js.values())
    assert max(js["int4_all"]) > max(js["int4_hybrid"]) > 0
    report = (out / "kimi_mini.md").read_text()
    assert "int4_experts02" in report and "kimi_linear-attnres" in report
    assert "Depth JS per mixing point" in report and "depth JS max" in report
    return results


def test_run_end_to_end_on_a_tiny_kimi_checkpoint(kimi_ckpt, tmp_path, one_thread):
    """Fast version: one proxy task, quality metrics with depth JS per mixing point, no latency."""
    from attnres_quant.cli import main as cli_main

    out = tmp_path / "reports"
    assert cli_main(["run", str(_study(tmp_path, kimi_ckpt, tasks=["proxy_mc"])), "--out", str(out)]) == 0
    results = _check_report(out)
    for v in ("bf16", "int4_all", "int4_hybrid", "int4_experts02"):
        assert results["cells"][f"tiny-kimi/{v}/task:proxy_mc"]["status"] == "ok", v


@pytest.mark.slow
def test_run_end_to_end_all_proxy_tasks_and_latency(kimi_ckpt, tmp_path, one_thread):
    from attnres_quant.cli import main as cli_main

    out = tmp_path / "reports"
    path = _study(tmp_path, kimi_ckpt, tasks=["proxy_mc", "proxy_math"], bench=True, calibration=True,
                  extra_variants=[{"name": "kv_fp8_state_int4", "method": "none",
                                   "rules": [{"select": "attn.kv_cache", "storage": "fp8"},
                                             {"select": "attn.state", "storage": "int4"}]},
                                  {"name": "gptq_int4", "method": "gptq",
                                   "default": {"weight": "int4", "group_size": 16}}])
    assert cli_main(["run", str(path), "--out", str(out)]) == 0
    results = _check_report(out)
    cells = results["cells"]
    for v in ("bf16", "int4_all", "int4_hybrid", "int4_experts02", "kv_fp8_state_int4", "gptq_int4"):
        for c in ("task:proxy_mc", "task:proxy_math", "latency"):
            assert cells[f"tiny-kimi/{v}/{c}"]["status"] == "ok", (v, c)


def test_run_without_a_usable_tokenizer_stops_at_preflight(tmp_path, capsys):
    """A Kimi checkpoint with only Moonshot's tiktoken tokenizer: `run` stops before any weights load,
    naming the `tokenizer:` key; with `tokenizer: DIR` the preflight passes."""
    from attnres_quant.cli import main as cli_main
    from attnres_quant.evaluation.testing import tiny_tokenizer

    ckpt = tmp_path / "k"
    save_tiny_kimi(ckpt, tokenizer=False)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    cfg = {"name": "k", "device": "cpu", "dtype": "float32", "model": {"path": str(ckpt)}, "tasks": ["proxy_mc"],
           "variants": [{"name": "w4", "method": "rtn", "default": {"weight": "int4"}}]}
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no usable tokenizer" in err and "tokenizer: DIR" in err
    assert not (tmp_path / "out" / "k" / "results.json").exists()
    from attnres_quant.pipeline.config import load_config
    from attnres_quant.pipeline.runner import preflight, validate_variants

    tiny_tokenizer(vocab_size=320).save_pretrained(tmp_path / "tok")
    config, _ = load_config(path, [f"model.tokenizer={tmp_path / 'tok'}"])
    preflight(config, validate_variants(config, str(path)), str(path), "cpu")


def test_example_config_plans_on_a_tiny_kimi_checkpoint(kimi_ckpt, capsys):
    from pathlib import Path

    from attnres_quant.cli import main as cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "kimi_tiny.yaml"
    assert cli_main(["plan", str(config), "--set", f"model.path={kimi_ckpt}", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "experts: [0, 2]" in out and "kept: kimi default-keep" in out and "attn.state" in out


def test_gptq_on_kimi_calibrates_every_routed_expert(one_thread):
    """GPTQ (llm-compressor, basic pipeline) with every routed expert calibrated on every token: all
    its targets change, land on the int4 grid, and beat RTN on their own layer outputs."""
    from attnres_quant.quant.apply import layer_output_error

    model = tiny_kimi()
    calib = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(0))
    v = _variant(method="gptq", default={"weight": "int4", "group_size": 16})
    q = quantize(model, v, calibration=calib)
    rows = [r for r in q.plan.weight_rows() if r.method == "gptq"]
    assert {r.component for r in rows} >= {"moe.experts.gate", "moe.experts.up", "moe.experts.down", "attn.q",
                                            "attn.kv_b", "moe.shared.down", "attn.gate"}
    assert len([r for r in rows if r.component == "moe.experts.down"]) == 8  # 2 MoE layers x 4 experts
    base, got = dict(model.named_parameters()), dict(q.model.named_parameters())
    for r in rows:
        w = got[r.name].detach().float()
        assert not torch.equal(w, base[r.name].float()), r.name
        groups = w.reshape(-1, 16)  # int4 in groups of 16: at most 16 distinct values per group
        assert max(len(torch.unique(g)) for g in groups) <= 16, r.name
    assert all(not m.calibrate_all_experts for m in q.model.modules() if hasattr(m, "calibrate_all_experts"))
    rtn = quantize(model, _variant(default={"weight": "int4", "group_size": 16}))
    names = [r.part.name for r in rows if r.component.startswith("moe.experts")]
    e_gptq = layer_output_error(model, q.model, [calib], names)
    e_rtn = layer_output_error(model, rtn.model, [calib], names)
    better = sum(e_gptq[n] < e_rtn[n] for n in e_gptq)
    print(f"routed experts: GPTQ better on {better}/{len(e_gptq)}; mean error GPTQ "
          f"{sum(e_gptq.values()) / len(e_gptq):.3g} vs RTN {sum(e_rtn.values()) / len(e_rtn):.3g}")
    # Some experts receive no routed calibration token (layer_output_error sees only called modules), yet
    # every expert was quantized above: calibrating all experts is what reaches them.
    assert 0 < len(e_gptq) < len(names) and better >= 0.8 * len(e_gptq)


def test_kimi_k3_checkpoint_through_load_model_and_plan(tmp_path, one_thread):
    """kimi_k3: the text model under `language_model.` loads through loading.load_model (vision tensors
    skipped with a note), and its structure plans like the loaded model."""
    from safetensors.torch import save_file

    from attnres_quant.evaluation.testing import tiny_tokenizer
    from attnres_quant.loading import describe_model, load_model, preflight_model, structure_model

    model = tiny_kimi()
    state = {f"language_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["vision_tower.patch_embed.weight"] = torch.zeros(4, 4)
    ckpt = tmp_path / "k3"
    ckpt.mkdir()
    save_file(state, str(ckpt / "model.safetensors"))
    text = dict(TINY, model_type="kimi_linear")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "kimi_k3", "text_config": text,
                                                  "auto_map": {"AutoModel": "modeling_kimi_k3.X"}}))
    tiny_tokenizer(vocab_size=320).save_pretrained(tmp_path / "tok")
    src = preflight_model(str(ckpt), tokenizer=str(tmp_path / "tok"))  # auto_map is never run: no refusal
    assert src.family == "kimi_k3-attnres" and any("only the text model" in n for n in src.warnings)
    loaded, tok = load_model(str(ckpt), dtype="float32", tokenizer=str(tmp_path / "tok"))
    assert tok is not None
    info = describe_model(loaded)
    assert info["model_type"] == "kimi_k3" and any("vision_tower" in n for n in info["load_notes"])
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    v = _variant(default={"weight": "int4"}, rules=[{"select": "moe.experts.up", "experts": "1:3",
                                                     "weight": "int8"}])
    skeleton = structure_model(str(ckpt), dtype="float32")
    assert [r.as_dict() for r in resolve_plan(skeleton, v).rows] == [r.as_dict() for r in resolve_plan(loaded, v).rows]


def test_standard_residual_kimi_skips_depth_rules():
    model = tiny_kimi(dict(TINY, attn_res_block_size=None))
    plan = resolve_plan(model, _variant(default={"weight": "int4"}, rules=[{"select": "depth.*", "weight": "bf16"}]))
    assert not any(r.component.startswith("depth.") for r in plan.rows)
    assert any("no depth path" in n for n in plan.notes)


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_w8a8_on_kimi_every_expert_gets_a_static_scale(scheme, one_thread):
    """Static activation scales are observed with every routed expert running on every calibration token
    (an expert no token is routed to would otherwise have no scale)."""
    model = tiny_kimi()
    calib = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    q = quantize(model, _variant(default={"weight": "int8", "activation": "int8", "activation_scheme": scheme}),
                 calibration=calib)
    experts = [m for n, m in q.model.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
    assert len(experts) == 24 and all(hasattr(m, "_act_quantizer") for m in experts)
    if scheme == "static":
        assert all(m._act_quantizer.amax is not None for m in experts)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    assert 0 < (_logits(q.model, ids) - _logits(model, ids)).abs().max() < 5
