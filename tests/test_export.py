"""Export round trip: a variant written by `attnres_quant.export` as a compressed-tensors checkpoint loads with
plain transformers (compressed-tensors decompression) and gives the simulated variant's logits -- bit for bit
for the floating formats (same arithmetic), within a stated bf16 tolerance for int formats (our RTN's fp32
scale is stored in bf16 by compressed-tensors)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from attnres_quant.errors import UserError  # noqa: E402
from attnres_quant.export import export_variant  # noqa: E402
from attnres_quant.quant import parse_variant, quantize  # noqa: E402
from attnres_quant.quant.testing import kl_divergence  # noqa: E402

FLOAT_SPECS = {
    "fp8_dynamic": {"default": {"weight": "fp8", "activation": "fp8"}, "rules": [{"select": "depth.*",
                                                                                  "weight": "bf16"}]},
    "fp8_block": {"default": {"weight": "fp8_block"}},
    "mxfp4": {"default": {"weight": "mxfp4"}, "rules": [{"select": "lm_head", "weight": "mxfp8"}]},
    "mxfp8": {"default": {"weight": "mxfp8"}},
    "nvfp4": {"default": {"weight": "nvfp4"}},
    # NVFP4 W4A4: activations with a calibrated fp32 global scale (random calibration tokens, seeded) + dynamic
    # E4M3 16-group scales -- compressed-tensors' NVFP4 preset.
    "nvfp4_w4a4": {"default": {"weight": "nvfp4", "activation": "nvfp4"}, "rules": [{"select": "depth.*",
                                                                                     "weight": "bf16"}]},
}


@pytest.fixture(scope="module")
def zoo():
    from attnres_quant.loading import load_model

    return {name: load_model(f"zoo:{name}") for name in ("tiny-block", "tiny-standard")}


def _load(path):
    import attnres_quant.model  # noqa: F401  (registers the AttnRes model type)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def _ids():
    return torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_name", ["tiny-block", "tiny-standard"])
@pytest.mark.parametrize("name", list(FLOAT_SPECS))
def test_export_float_formats_bit_exact(zoo, tmp_path, model_name, name):
    model, tok = zoo[model_name]
    variant = parse_variant({"name": name, "method": "rtn", **FLOAT_SPECS[name]})
    info = export_variant(model, variant, tmp_path / "ckpt", tokenizer=tok, model_label=model_name)
    sim = quantize(model, variant)
    loaded = _load(tmp_path / "ckpt")
    with torch.no_grad():
        a = sim.model(input_ids=_ids()).logits
        b = loaded(input_ids=_ids()).logits
    assert torch.equal(a, b), f"max |diff| {(a.float() - b.float()).abs().max().item()}"
    sp, lp = dict(sim.model.named_parameters()), dict(loaded.named_parameters())
    assert all(torch.equal(sp[n], lp[n]) for n in sp)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["config_groups"]
    ignore = set(cfg["ignore"])
    res_proj = [n for n, _ in model.named_modules() if n.endswith("res_proj")]
    assert set(res_proj) <= ignore  # every pseudo-query is listed as kept dense
    if model_name == "tiny-block":
        assert len(res_proj) == 2 * model.config.num_hidden_layers + 1
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "## Policy" in card and name in card and "res_proj" in card


def test_export_int_and_w4afp8_within_bf16_tolerance(zoo, tmp_path):
    """int4 (W4AFP8: int4 g32 weights + dynamic per-token fp8 activations) and int8: our RTN computes in fp32
    with a fp32 scale (torchao's arithmetic, bit-exact with torchao), compressed-tensors stores the scale in bf16
    and dequantizes in bf16: weights agree within one bf16 rounding step of the row's largest value, and
    the logits' KL is tiny."""
    model, tok = zoo["tiny-block"]
    for name, spec in {"w4afp8": {"weight": "int4", "group_size": 32, "activation": "fp8"},
                       "int8": {"weight": "int8"}}.items():
        variant = parse_variant({"name": name, "default": spec})
        export_variant(model, variant, tmp_path / name, tokenizer=tok)
        sim = quantize(model, variant)
        base = dict(model.named_parameters())
        loaded = _load(tmp_path / name)
        with torch.no_grad():  # the first forward decompresses (compressed-tensors' decompress hook)
            kl = kl_divergence(sim.model(input_ids=_ids()).logits, loaded(input_ids=_ids()).logits)
        assert kl < 5e-3, (name, kl)  # measured: w4afp8 1.8e-3, int8 1.2e-4
        sp, lp = dict(sim.model.named_parameters()), dict(loaded.named_parameters())
        n_diff = n_step = n_all = 0
        step = 1 / (7.5 if name == "w4afp8" else 127.5)  # one quantization step = amax * step (symmetric RTN)
        g = 32 if name == "w4afp8" else None
        for n in sp:
            d = (sp[n].float() - lp[n].float()).abs()
            if sp[n].dim() > 1 and d.any():
                cols = d.shape[-1]
                gv = (lambda t: t.unflatten(-1, (cols // (g or cols), g or cols)))
                amax = gv(base[n].float()).abs().amax(-1, keepdim=True)
                # at most one quantization step plus two bf16 roundings of the group's largest value
                assert bool((gv(d) <= amax * (step * 1.01 + 2 ** -7)).all()), n
                n_step += int((gv(d) > amax * (step * 0.5)).sum())  # a value that crossed a rounding boundary
            n_diff += int((d > 0).sum())
            n_all += d.numel()
        print(f"{name}: KL(sim || exported) {kl:.3g}; {n_diff} of {n_all} weights differ, {n_step} by more than "
              "half a quantization step")


def test_export_refusals_and_card_results(zoo, tmp_path):
    model, tok = zoo["tiny-block"]
    with pytest.raises(UserError, match="export supports"):
        export_variant(model, parse_variant({"name": "g", "method": "gptq", "default": {"weight": "int4"}}),
                       tmp_path / "g")
    with pytest.raises(UserError, match="nothing for"):
        export_variant(model, parse_variant({"name": "d", "rules": [{"select": "depth.*", "weight": "int8"}]}),
                       tmp_path / "d")
    results = {"rows": [{"model": "tiny-block", "variant": "mx", "quality": {"kl_mean": 0.0123, "top1": 0.97}}]}
    variant = parse_variant({"name": "mx", "default": {"weight": "mxfp4"},
                             "rules": [{"select": "depth.*", "weight": "bf16"},
                                       {"select": "depth.sources", "storage": "mxfp4"}]})
    info = export_variant(model, variant, tmp_path / "mx", tokenizer=tok, model_label="tiny-block", results=results)
    card = (tmp_path / "mx" / "README.md").read_text()
    assert "0.0123" in card and "kl_mean" in card
    assert "depth.sources=mxfp4" in card and "Not carried" in card  # run-time hooks are listed, not exported
    assert info["hooks_not_exported"] and not info["baked"]


def test_export_verb_main(tmp_path):
    """The `export` verb module (registered in cli.py as `export`): config -> checkpoint + card, variant picked by
    name, results.json of the study found next to the config's report."""
    import argparse

    from attnres_quant import export

    cfg = tmp_path / "study.yaml"
    cfg.write_text("models:\n  - {path: \"zoo:tiny-block\"}\ndtype: bfloat16\nvariants:\n"
                   "  - {name: nv, method: rtn, default: {weight: nvfp4}, rules: [{select: \"depth.*\", weight: bf16}]}\n"
                   "  - {name: other, method: rtn, default: {weight: int8}}\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"cells": [{"model": "tiny-block", "variant": "nv", "kl_mean": 0.0042}]}))
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    args = parser.parse_args([str(cfg), str(tmp_path / "out"), "--variant", "nv", "--model", "tiny-block",
                              "--results", str(results)])
    assert export.main(args) == 0
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"
    assert "0.0042" in (tmp_path / "out" / "README.md").read_text()
    args = parser.parse_args([str(cfg), str(tmp_path / "out2"), "--variant", "nope"])
    with pytest.raises(UserError, match="no variant named 'nope'"):
        export.main(args)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gguf_export_reads_back_equal_to_simulated(tmp_path, kind):
    """A `method: gguf` variant of a Llama-family comparator as a GGUF file: every tensor read back with gguf's
    reader (and dequantized by gguf.quants) equals the simulated weight bit for bit; Llama q/k rows are in
    llama.cpp's rotary order (undone here)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from attnres_quant.export import export_gguf, gguf_tensor_name, rope_permute
    from attnres_quant.quant.testing import tiny_llama

    m = tiny_llama(kind, hidden=256)  # rows of 256: real K-quant super-blocks
    variant = parse_variant({"name": "q4km", "method": "gguf", "options": {"preset": "q4_k_m"}})
    info = export_gguf(m, variant, tmp_path / "m.gguf")
    assert {"Q4_K", "Q6_K", "F32"} <= set(info["tensors"].values())
    sim = quantize(m, variant)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == ("llama" if kind == "llama" else "qwen3")
    n = 0
    for name, p in sim.model.named_parameters():
        t = tensors[gguf_tensor_name(name)]
        deq = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(p.shape)
        if kind == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = m.config.num_attention_heads if "attn_q" in t.name else m.config.num_key_value_heads
            deq = deq[torch.argsort(rope_permute(torch.arange(p.shape[0]), heads))]
        assert torch.equal(deq.to(p.dtype), p.detach()), name
        n += 1
    assert n == len(tensors)


def test_gguf_export_refuses_attnres(zoo, tmp_path):
    from attnres_quant.export import export_gguf

    model, _ = zoo["tiny-block"]
    with pytest.raises(UserError, match="llama.cpp does not know"):
        export_gguf(model, parse_variant({"name": "q", "method": "gguf", "default": {"weight": "q8_0"}}),
                    tmp_path / "x.gguf")


@pytest.mark.parametrize("lm_head", [None, "fp8"])
def test_export_llama_tied_embeddings(tmp_path, lm_head):
    """A Llama comparator with tied embeddings: lm_head kept (still tied in the checkpoint) or quantized (untied,
    as quantize() unties it). The reference is loaded from a saved checkpoint, so its rotary inv_freq is fp32 as
    in the exported one (``.to(bf16)`` on a freshly built model rounds that buffer)."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=96, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).eval()
    spec = {"name": "mx", "default": {"weight": "mxfp4", "activation": "fp8"}}
    if lm_head:
        spec["rules"] = [{"select": "lm_head", "weight": lm_head}]
    variant = parse_variant(spec)
    export_variant(model, variant, tmp_path / "ckpt")
    sim = quantize(model, variant)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sim.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert tied == (lm_head is None)


# --------------------------------------------------------------------------------------------- Kimi family
# A random tiny Kimi-Linear checkpoint (KDA + MLA + MoE + Block AttnRes, architectures.kimi_testing) widened so
# every projection and expert has >= 32 input features (MXFP4 / NVFP4 groups); the depth path, router, decay and
# norms stay bf16 (the family's DEFAULT_KEEP), the short convolutions (rows of 4) by a rule.
KIMI_KEEP = [{"select": "attn.conv", "weight": "bf16"}, {"select": "depth.*", "weight": "bf16"}]
KIMI_SPECS = {"nvfp4": {"weight": "nvfp4"}, "fp8": {"weight": "fp8"}, "fp8_block": {"weight": "fp8_block"},
              "mxfp4": {"weight": "mxfp4"}}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    from attnres_quant.architectures.kimi_testing import TINY, save_tiny_kimi
    from attnres_quant.loading import load_model

    wide = dict(TINY, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
                linear_attn_config=dict(TINY["linear_attn_config"], head_dim=32, num_heads=2))
    path = tmp_path_factory.mktemp("kimi") / "tiny-kimi"
    save_tiny_kimi(path, wide)
    model, tok = load_model(str(path), dtype="bfloat16")
    return path, model, tok


def _kimi_load(path):
    import warnings

    from attnres_quant.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(str(path), dtype="bfloat16")[0]


def _kimi_logits(model):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(KIMI_SPECS))
def test_export_kimi_float_formats_round_trip(kimi, tmp_path, name, one_thread):
    """A Kimi-architecture variant exported as compressed-tensors: `ignore` lists every `*_res_proj` and every
    MoE router; projections and routed/shared experts are packed; our Kimi loader (compressed-tensors' own
    decompressors, MXFP4 by ours) gives the simulated variant's weights and logits bit for bit."""
    _, model, tok = kimi
    variant = parse_variant({"name": name, "method": "rtn", "default": KIMI_SPECS[name], "rules": KIMI_KEEP})
    info = export_variant(model, variant, tmp_path / "ckpt", tokenizer=tok, model_label="tiny-kimi")
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    ignore = set(qc["ignore"])
    res_proj = {n for n, _ in model.named_modules() if n.endswith("_res_proj")}
    routers = {n for n, _ in model.named_modules() if n.endswith("block_sparse_moe.gate")}
    assert len(res_proj) == 2 * model.config.num_hidden_layers + 1 and len(routers) == 2
    assert res_proj | routers <= ignore
    targets = {t for g in qc["config_groups"].values() for t in g["targets"]}
    assert "re:^model.layers.1.block_sparse_moe.experts.3.w2$" in targets
    assert "re:^model.layers.2.block_sparse_moe.shared_experts.up_proj$" in targets
    assert not any("res_proj" in t or t.endswith("block_sparse_moe.gate$") for t in targets)
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert info["baked"] == [] and "res_proj" in card and "attnres_quant.loading import load_model" in card
    loaded = _kimi_load(tmp_path / "ckpt")
    (fmt, comps), = loaded._kimi_as_shipped.items()
    assert fmt == qc["format"] and {"moe.experts.down", "attn.kv_b", "attn.gate"} <= set(comps)
    assert "depth.query" not in comps and "moe.router" not in comps
    sim = quantize(model, variant)
    sp, lp = dict(sim.model.named_parameters()), dict(loaded.named_parameters())
    assert sp.keys() == lp.keys() and all(torch.equal(sp[n], lp[n]) for n in sp)
    assert torch.equal(_kimi_logits(sim.model), _kimi_logits(loaded))


def test_export_kimi_int4_w4a16_within_tolerance(kimi, tmp_path, one_thread):
    """int4 g32 weight-only: our RTN's fp32 scale is stored in bf16 and compressed-tensors dequantizes in bf16
    (as for the zoo models): every weight within one quantization step plus two bf16 roundings of its group's
    largest value; KL(simulated || loaded) measured 3.2e-2 nats/token on this random (untrained, sharp) model,
    an eighth of its own int4 error KL(baseline || simulated) 0.26."""
    from attnres_quant.quant.testing import kl_divergence

    _, model, tok = kimi
    variant = parse_variant({"name": "w4a16", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
                             "rules": KIMI_KEEP})
    export_variant(model, variant, tmp_path / "ckpt", tokenizer=tok)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    loaded = _kimi_load(tmp_path / "ckpt")
    sim = quantize(model, variant)
    base, sp, lp = dict(model.named_parameters()), dict(sim.model.named_parameters()), dict(loaded.named_parameters())
    n_quant = 0
    for n in sp:
        d = (sp[n].float() - lp[n].float()).abs()
        if not d.any():
            continue
        n_quant += 1
        cols = d.shape[-1]
        g = 32 if cols % 32 == 0 else cols
        amax = base[n].float().unflatten(-1, (cols // g, g)).abs().amax(-1, keepdim=True)
        assert bool((d.unflatten(-1, (cols // g, g)) <= amax * (1.01 / 7.5 + 2 ** -7)).all()), n
    assert n_quant > 40
    sim_logits, loaded_logits = _kimi_logits(sim.model), _kimi_logits(loaded)
    kl = kl_divergence(sim_logits, loaded_logits)
    own = kl_divergence(_kimi_logits(model), sim_logits)
    print(f"int4 g32: KL(simulated || loaded) {kl:.3g}, KL(baseline || simulated) {own:.3g}")
    assert kl < 0.1, kl  # measured 3.2e-2
    assert kl < own / 3  # measured: own error 0.26


def test_export_kimi_verb_mixed_formats_and_activations(kimi, tmp_path, one_thread):
    """The `export` verb on a Kimi checkpoint: fp8 W8A8 projections + MXFP4 routed experts (a mixed-precision
    checkpoint, groups matched by their targets); the loader reads both formats bit-exactly and says the fp8
    input-activation quantization is not applied (the loaded model is the weight-only part of the variant)."""
    import argparse

    import yaml

    from attnres_quant import export

    path, model, _ = kimi
    spec = {"name": "mixed", "method": "rtn", "default": {"weight": "fp8", "activation": "fp8"},
            "rules": KIMI_KEEP + [{"select": "moe.experts.*", "weight": "mxfp4"}]}
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"path": str(path)}], "dtype": "bfloat16", "variants": [spec]}))
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    assert export.main(parser.parse_args([str(cfg), str(tmp_path / "out"), "--variant", "mixed"])) == 0
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    from attnres_quant.architectures.kimi import load_kimi

    with pytest.warns(UserWarning, match="input-activation quantization of the float-quantized"):
        loaded, notes = load_kimi(tmp_path / "out", dtype="bfloat16")
    assert any(n.startswith("as shipped: fp8 for ") for n in notes)
    assert any(n.startswith("as shipped: mxfp4 for moe.experts.down") for n in notes)
    assert set(loaded._kimi_as_shipped) == {"float-quantized", "mxfp4-pack-quantized"}
    assert loaded._kimi_as_shipped["mxfp4-pack-quantized"] == ["moe.experts.down", "moe.experts.gate",
                                                               "moe.experts.up"]
    sim = quantize(model, parse_variant(spec))
    sp, lp = dict(sim.model.named_parameters()), dict(loaded.named_parameters())
    assert all(torch.equal(sp[n], lp[n]) for n in sp)


def test_export_kimi_bakes_parameter_rows(kimi, tmp_path, one_thread):
    """Rules that lower the non-Linear parts (KDA short convolutions, dt_bias / A_log, the router and its bias,
    the pseudo-queries) bake them: stored dense with their simulated values, by parameter name; the routers and
    `*_res_proj` stay in `ignore` (dense in the checkpoint); the loaded model equals the simulated one."""
    _, model, tok = kimi
    lowered = ("attn.conv", "attn.decay", "moe.router", "depth.query")
    variant = parse_variant({"name": "baked", "method": "rtn", "default": {"weight": "fp8"},
                             "rules": [{"select": c, "weight": "fp8"} for c in lowered]})
    info = export_variant(model, variant, tmp_path / "ckpt", tokenizer=tok)
    baked = {b.split(" ")[0] for b in info["baked"]}
    assert {"model.layers.0.self_attn.q_conv1d.weight", "model.layers.0.self_attn.dt_bias",
            "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.1.block_sparse_moe.gate.e_score_correction_bias",
            "model.output_attn_res_proj.weight"} <= baked
    assert {"model.layers.1.block_sparse_moe.gate", "model.output_attn_res_proj"} <= set(info["ignore"])
    loaded = _kimi_load(tmp_path / "ckpt")
    sp, lp = dict(quantize(model, variant).model.named_parameters()), dict(loaded.named_parameters())
    assert all(torch.equal(sp[n], lp[n]) for n in sp)
