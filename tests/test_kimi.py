"""Kimi-Linear / Kimi K3 family (issue 16): our model against Moonshot's code, depth hooks, cache, components.

The oracle is Moonshot's modelling code as shipped in llm-compressor
(``llmcompressor.modeling.kimi_k3``), run on CPU with our exact torch stand-ins for FLA's
Triton kernels (``patch_moonshot_reference``).  Every model is a random tiny config built here.
"""

from __future__ import annotations

import json

import pytest
import torch

from attnres_quant.architectures.kimi_testing import randomize
from attnres_quant.architectures.kimi import COMPONENTS, FAMILY, kimi_component, kimi_parts, load_kimi
from attnres_quant.architectures.kimi_modeling import KimiAttnResConfig, KimiAttnResForCausalLM
from attnres_quant.architectures.kimi_torch_ops import patch_moonshot_reference

pytest.importorskip("llmcompressor.modeling.kimi_k3")

V = 64
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, mla_use_nope=True)
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_attention_heads=2, rms_norm_eps=1e-6,
            tie_word_embeddings=False, **MLA)

# (a) KDA + MLA + MoE (top-2 of 4 experts + 1 shared), Block AttnRes of 2 layers, 6 layers.
CFG_A = dict(BASE, num_hidden_layers=6, attn_res_block_size=2, moe_intermediate_size=16, num_experts=4,
             num_experts_per_token=2, num_shared_experts=1, first_k_dense_replace=1,
             linear_attn_config={"kda_layers": [1, 2, 4, 5], "full_attn_layers": [3, 6], "head_dim": 8,
                                 "num_heads": 4, "short_conv_kernel_size": 4})
# (b) dense, MLA only, q-LoRA, 5 layers in blocks of 2 (the last block is partial).
CFG_B = dict(BASE, num_hidden_layers=5, attn_res_block_size=2, q_lora_rank=12)
# (c) K3's text model: SiTU, latent MoE with norm, lower-bounded full-rank KDA gate, gated MLA, blocks of 3.
CFG_C = dict(BASE, num_hidden_layers=4, attn_res_block_size=3, q_lora_rank=12, hidden_act="situ",
             activation_situ_beta=2.0, activation_situ_linear_beta=3.0, moe_intermediate_size=16, num_experts=4,
             num_experts_per_token=2, num_shared_experts=1, first_k_dense_replace=1, routed_expert_hidden_size=24,
             latent_moe_use_norm=True, mla_use_output_gate=True, routed_scaling_factor=1.5,
             linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 8, "num_heads": 4,
                                 "short_conv_kernel_size": 3, "gate_lower_bound": -5.0,
                                 "use_full_rank_gate": True})
K3_VISION = dict(vt_num_attention_heads=2, vt_num_hidden_layers=1, vt_hidden_size=16, vt_intermediate_size=32,
                 qkv_hidden_size=48, text_hidden_size=32, init_pos_emb_height=4, init_pos_emb_width=4, patch_size=2,
                 _attn_implementation="sdpa")

TIE_MARGIN = 1e-3


# Deterministic random weights (Moonshot's _init_weights is a no-op, leaving torch.empty values).
_randomize = randomize


def _moonshot(mk, cfg: dict, seed: int = 1):
    from llmcompressor.modeling.kimi_k3.configuration_kimi_k3 import KimiLinearConfig

    model = mk.KimiLinearForCausalLM(KimiLinearConfig(**cfg)).eval()
    _randomize(model, seed)
    return model


def _router_margin(ref, ids) -> float:
    """Smallest gap between the k-th and (k+1)-th expert choice score over all tokens and MoE layers."""
    margins = []

    def hook(gate, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        scores = torch.sigmoid(x @ gate.weight.float().T) + gate.e_score_correction_bias.float()
        top = scores.sort(dim=-1, descending=True).values
        margins.append((top[:, gate.top_k - 1] - top[:, gate.top_k]).min().item())

    gates = [m for m in ref.modules() if type(m).__name__ == "KimiMoEGate"]
    handles = [g.register_forward_pre_hook(hook) for g in gates]
    try:
        with torch.no_grad():
            ref(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return min(margins) if margins else float("inf")


def _draw_ids(ref, shape=(2, 12)) -> torch.Tensor:
    """Token ids for which no top-k routing decision is within TIE_MARGIN of a tie."""
    for seed in range(50):
        ids = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(100 + seed))
        if _router_margin(ref, ids) > TIE_MARGIN:
            return ids
    raise AssertionError("no router-safe input found")


def _save(state: dict, directory, config: dict, shards: int = 1) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _ours(ref_state: dict, cfg: dict) -> KimiAttnResForCausalLM:
    model = KimiAttnResForCausalLM(KimiAttnResConfig(**cfg)).eval()
    model.load_state_dict(ref_state, strict=True)
    return model


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


# --------------------------------------------------------------------------- equality with Moonshot's code
@pytest.mark.parametrize("name,cfg,tol,shards", [
    ("a_kda_mla_moe", CFG_A, 2e-4, 1),
    ("b_dense_mla", CFG_B, 1e-5, 2),
    ("a_standard_residual", dict(CFG_A, attn_res_block_size=None), 2e-4, 1),  # Kimi-Linear without AttnRes
])
def test_kimi_linear_logits_equal_moonshot(tmp_path, name, cfg, tol, shards, one_thread):
    with patch_moonshot_reference() as mk:
        ref = _moonshot(mk, cfg)
        ids = _draw_ids(ref)
        expected = _logits(ref, ids)
    _save(ref.state_dict(), tmp_path / name, dict(cfg, model_type="kimi_linear"), shards=shards)
    ours, notes = load_kimi(tmp_path / name, dtype="float32")
    assert notes == []
    for two_phase in (True, False):
        ours.config.attnres_two_phase = two_phase
        diff = (_logits(ours, ids) - expected).abs().max().item()
        print(f"{name} two_phase={two_phase}: max |logit diff| = {diff:.3g}")
        assert diff <= tol


def test_kimi_k3_language_model_equals_moonshot(tmp_path, one_thread):
    from llmcompressor.modeling.kimi_k3.configuration_kimi_k3 import KimiK3Config

    with patch_moonshot_reference() as mk:
        from llmcompressor.modeling.kimi_k3 import KimiK3ForConditionalGeneration

        config = KimiK3Config(text_config=dict(CFG_C), vision_config=dict(K3_VISION))
        k3 = KimiK3ForConditionalGeneration(config).eval()
        _randomize(k3, 3)
        ref = k3.language_model
        ids = _draw_ids(ref)
        expected = _logits(ref, ids)
    state = k3.state_dict()
    assert any(k.startswith("vision_tower.") for k in state) and any(k.startswith("language_model.") for k in state)
    raw = {"model_type": "kimi_k3", "architectures": ["KimiK3ForConditionalGeneration"],
           "text_config": dict(CFG_C, model_type="kimi_linear"), "vision_config": dict(K3_VISION)}
    _save(state, tmp_path / "k3", raw, shards=3)
    with pytest.warns(UserWarning, match="vision_tower"):
        ours, notes = load_kimi(tmp_path / "k3", dtype="float32")
    assert any("vision_tower" in n for n in notes)
    diff = (_logits(ours, ids) - expected).abs().max().item()
    print(f"c_k3 max |logit diff| = {diff:.3g}")
    assert diff <= 2e-4
    # Every text-model tensor of the checkpoint has a component; the vision tower has none.
    for key in state:
        ref_c = kimi_component(key, CFG_C["num_hidden_layers"])
        assert (ref_c is None) == (not key.startswith("language_model.")), key


# --------------------------------------------------------------------------- depth path
def _tiny(cfg, seed=5, depth_scale=1.0):
    model = KimiAttnResForCausalLM(KimiAttnResConfig(**cfg)).eval()
    _randomize(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "res_proj" in name:
                p.mul_(depth_scale)
    return model


def test_zero_pseudo_queries_give_uniform_mean_of_sources(one_thread):
    """Each mix is the plain mean of its sources (embedding, completed block sums, running block sum),
    reconstructed here from the sub-layer outputs with the block rule of Moonshot's code."""
    model = _tiny(CFG_A, depth_scale=0.0)
    k, L = CFG_A["attn_res_block_size"], CFG_A["num_hidden_layers"]
    outputs, mixes = [], []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, o: outputs.append(o))]
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o: outputs.append(o)))
        hooks.append(layer.ffn.register_forward_hook(lambda m, a, o: outputs.append(o)))
        hooks.append(layer.input_layernorm.register_forward_pre_hook(lambda m, a: mixes.append(a[0])))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: mixes.append(a[0])))
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: mixes.append(a[0])))
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_depth_attentions=True)
    for h in hooks:
        h.remove()
    assert len(mixes) == 2 * L + 1 and len(outputs) == 2 * L + 1
    e, sub_outputs = outputs[0], outputs[1:]
    completed, partial = [e], None
    for j in range(2 * L + 1):
        if j > 0 and j % (2 * k) == 0:  # layer j/2 starts a block: the running sum is committed
            completed.append(partial)
            partial = None
        sources = completed + ([partial] if partial is not None else [])
        expected = torch.stack(sources).float().mean(0)
        assert torch.allclose(mixes[j].float(), expected, atol=1e-6, rtol=1e-5), j
        w = out.depth_attentions[j]
        assert w.shape[-1] == len(sources)
        assert torch.allclose(w, torch.full_like(w, 1 / len(sources)))
        if j < 2 * L:
            partial = sub_outputs[j] if partial is None else partial + sub_outputs[j]


@pytest.mark.parametrize("cfg", [CFG_A, CFG_B], ids=["a", "b"])
def test_depth_hooks_as_on_the_reference_model(cfg, one_thread):
    model = _tiny(cfg)
    L = cfg["num_hidden_layers"]
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mixers = model.model.depth_mixers()
    assert [m.sublayer for m in mixers] == list(range(2 * L + 1))
    base_two = _logits(model, ids)
    with torch.no_grad():
        naive = model(input_ids=ids, use_cache=False, output_depth_attentions=True)
    assert len(naive.depth_attentions) == 2 * L + 1
    assert (naive.logits - base_two).abs().max() < 1e-4  # fp32 rounding only
    # Depth weights vary (random pseudo-queries) and sum to one.
    assert any(w.std() > 1e-3 for w in naive.depth_attentions[1:])
    for w in naive.depth_attentions:
        assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)

    # source_quantizer: applied to the embedding and to the running sum after every sub-layer
    # (hence to every committed block sum), 1 + 2L calls per forward, on both paths.
    calls = []

    def record(x):
        calls.append(tuple(x.shape))
        return x.to(torch.bfloat16).to(x.dtype)

    for m in mixers:
        m.source_quantizer = record
    q_two = _logits(model, ids)
    assert len(calls) == 1 + 2 * L
    model.config.attnres_two_phase = False
    q_naive = _logits(model, ids)
    model.config.attnres_two_phase = True
    assert len(calls) == 2 * (1 + 2 * L)
    assert (q_two - base_two).abs().max() > 1e-4
    # bf16 rounding of sources that differ in the last fp32 bit can flip: the reference model's criterion.
    assert ((q_two - q_naive).abs().max() / q_naive.abs().max()).item() < 2e-2
    for m in mixers:
        m.source_quantizer = None
    if cfg is CFG_A:
        return  # bf16 softmax statistics move MoE routing decisions: compared on the dense model only

    # An elementwise logit quantizer and the softmax dtype: the same semantics on both paths, and they
    # matter (the reference model's own criterion: bf16 statistics differ only in summation order).
    def round_logits(x):
        return torch.round(x * 16) / 16

    round_logits.elementwise = True
    for m in mixers:
        m.logit_quantizer = round_logits
    r_two = _logits(model, ids)
    model.config.attnres_two_phase = False
    r_naive = _logits(model, ids)
    model.config.attnres_two_phase = True
    assert (r_two - base_two).abs().max() > 1e-3
    assert (r_two - r_naive).abs().max() < 1e-4
    for m in mixers:
        m.softmax_dtype = torch.bfloat16
    h_two = _logits(model, ids)
    model.config.attnres_two_phase = False
    h_naive = _logits(model, ids)
    assert (h_two - r_two).abs().max() > 1e-3
    assert ((h_two - h_naive).abs().max() / h_naive.abs().max()).item() < 2e-2


# --------------------------------------------------------------------------- cache
@pytest.mark.parametrize("cfg,tol", [(CFG_A, 2e-4), (CFG_B, 1e-5), (CFG_C, 2e-4)], ids=["a", "b", "c"])
def test_incremental_decode_equals_prefill(cfg, tol, one_thread):
    """Tolerances as for the Moonshot comparison: KDA layers amplify fp32 rounding (batched vs
    one-token matmuls) through the l2-normalised short-convolution outputs; dense MLA stays at 1e-5."""
    model = _tiny(cfg)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    full = _logits(model, ids)
    steps = [ids[:, :4], ids[:, 4:7]] + [ids[:, i:i + 1] for i in range(7, 10)]  # prefill, chunk, decode
    cache, got = None, []
    with torch.no_grad():
        for chunk in steps:
            out = model(input_ids=chunk, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            got.append(out.logits)
    diff = (torch.cat(got, dim=1) - full).abs().max().item()
    print(f"decode vs prefill: {diff:.3g}")
    assert diff < tol, diff
    # The MLA cache holds the latent (kv_lora_rank + shared key part), the KDA cache the V-first state.
    for i, layer in enumerate(model.model.layers):
        if layer.is_linear_attn:
            attn = layer.self_attn
            assert cache.recurrent_states[i].shape == (2, attn.num_heads, attn.head_dim, attn.head_dim)
        else:
            c, k_rope = cache.latent[i]
            assert c.shape == (2, 10, cfg["kv_lora_rank"]) and k_rope.shape == (2, 10, cfg["qk_rope_head_dim"])


def test_cache_quantizers_apply_to_stored_latent_and_state(one_thread):
    model = _tiny(CFG_A)
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(3))
    base = _logits(model, ids)
    seen = {"kv": 0, "state": 0}

    def kvq(x):
        seen["kv"] += 1
        return x.to(torch.bfloat16).to(x.dtype)

    def stq(s):
        seen["state"] += 1
        return s.to(torch.bfloat16).to(s.dtype)

    for layer in model.model.layers:
        if layer.is_linear_attn:
            layer.self_attn.state_quantizer = stq
        else:
            layer.self_attn.kv_quantizer = kvq
    prefill = _logits(model, ids)
    assert seen["kv"] == 2 * 2 and seen["state"] == 4 * 8  # 2 MLA layers x (latent, key); 4 KDA layers x tokens
    assert (prefill - base).abs().max() > 1e-5
    cache, got = None, []
    with torch.no_grad():
        for i in range(8):
            out = model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            cache, got = out.past_key_values, got + [out.logits]
    assert (torch.cat(got, 1) - prefill).abs().max() < 2e-4


# --------------------------------------------------------------------------- components
@pytest.mark.parametrize("cfg", [CFG_A, CFG_B, CFG_C], ids=["a", "b", "c"])
def test_component_mapping_covers_every_parameter(cfg):
    model = KimiAttnResForCausalLM(KimiAttnResConfig(**cfg))
    parts = list(kimi_parts(model))
    names = {p.name for p in parts if p.kind == "weight"}
    assert names == {n for n, _ in model.named_parameters()}
    assert all(p.ref.component in COMPONENTS for p in parts)
    found = {p.ref.component for p in parts}
    assert {"embed", "norm", "lm_head", "depth.query", "depth.key_norm", "depth.softmax", "depth.sources",
            "attn.kv_a", "attn.kv_b", "attn.o", "attn.kv_cache"} <= found
    L = cfg["num_hidden_layers"]
    assert kimi_component("model.output_attn_res_proj.weight", L).layer == L
    assert kimi_component("model.norm.weight", L).layer == L
    if cfg is CFG_A:
        assert {"attn.q", "attn.k", "attn.v", "attn.gate", "attn.conv", "attn.decay", "attn.state", "moe.router",
                "moe.experts.gate", "moe.experts.up", "moe.experts.down", "moe.shared.gate", "mlp.gate"} <= found
        experts = {(p.ref.layer, p.ref.expert) for p in parts if p.ref.component == "moe.experts.down"}
        assert experts == {(i, e) for i in range(1, L) for e in range(4)}
        assert kimi_component("model.layers.3.block_sparse_moe.experts.2.w3.weight") == \
            type(kimi_component("lm_head"))("moe.experts.up", 3, 2)
        assert kimi_component("model.layers.1.block_sparse_moe.gate.e_score_correction_bias").component == \
            "moe.router"
        assert kimi_component("model.layers.1.self_attn.A_log").component == "attn.decay"
    if cfg is CFG_B:
        assert {"attn.q_a", "attn.q_b", "mlp.gate", "mlp.up", "mlp.down"} <= found
        assert not any(c.startswith("moe.") or c in ("attn.state", "attn.conv") for c in found)
    if cfg is CFG_C:
        assert {"moe.latent.down", "moe.latent.up", "attn.gate"} <= found
    assert FAMILY.handles_model(model) and FAMILY.handles_config({"model_type": "kimi_k3"})
    # K3 names and compressed-tensors suffixes resolve too.
    ref = kimi_component("language_model.model.layers.0.self_attn.q_proj.weight_packed")
    assert ref is not None and ref.component in ("attn.q",) and ref.layer == 0
    assert kimi_component("vision_tower.encoder.blocks.0.mlp.fc0.weight") is None


@pytest.mark.parametrize("cfg", [CFG_A, CFG_C], ids=["a", "c"])
def test_left_padding_equals_unpadded(cfg, one_thread):
    """A left-padded row of a batch gives the logits of the same tokens run alone (KDA state and
    short convolutions start from zero at the first real token, as Moonshot's unpadding does)."""
    model = _tiny(cfg)
    g = torch.Generator().manual_seed(4)
    long, short = torch.randint(0, V, (1, 9), generator=g), torch.randint(0, V, (1, 6), generator=g)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        both = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
    assert (both[0] - _logits(model, long)[0]).abs().max() < 2e-4
    assert (both[1, 3:] - _logits(model, short)[0]).abs().max() < 2e-4


def test_generate_uses_the_kimi_cache(one_thread):
    model = _tiny(CFG_A)
    ids = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(0))  # no pad/eos ids in the prompt
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    x = ids
    for _ in range(5):
        x = torch.cat([x, _logits(model, x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def _mxfp4_checkpoint(model, directory, cfg):
    """Write ``model`` as compressed-tensors MXFP4 (weight-only, groups of 32) with compressed-tensors'
    own scale rule and compressor; AttnRes projections, routers, embeddings and lm_head stay dense
    (as the K3 release and llm-compressor's K3 ignore list keep them)."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import MXFP4A16
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    scheme = QuantizationScheme(targets=["Linear"], **MXFP4A16)
    state, quantized, ignore = {}, {}, []
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in linears and tensor.shape[-1] % 32 == 0 and "res_proj" not in name and module != "lm_head":
            w = tensor.float()
            amax = w.view(w.shape[0], -1, 32).abs().amax(-1)
            scale = torch.exp2(generate_mx_scales(amax) - 127)
            packed = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
            state[f"{module}.weight_packed"] = packed["weight_packed"]
            state[f"{module}.weight_scale"] = packed["weight_scale"]
            quantized[module] = packed
        else:
            state[name] = tensor
            if module in linears:
                ignore.append(module)
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, format="mxfp4-pack-quantized",
                              quantization_status="compressed", ignore=ignore).to_dict()
    _save(state, directory, dict(cfg, model_type="kimi_linear", quantization_config=qcfg), shards=2)
    return scheme, quantized


def test_mxfp4_checkpoint_dequantizes_like_compressed_tensors(tmp_path, one_thread):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor

    model = _tiny(CFG_A)
    scheme, quantized = _mxfp4_checkpoint(model, tmp_path / "mx", CFG_A)
    with open(tmp_path / "mx" / "config.json") as fh:
        assert json.load(fh)["quantization_config"]["format"] == "mxfp4-pack-quantized"
    with pytest.warns(UserWarning, match="as shipped: mxfp4"):
        loaded, notes = load_kimi(tmp_path / "mx", dtype="float32")
    assert any(n.startswith("as shipped: mxfp4 for ") and "moe.experts.gate" in n and "attn.q" in n for n in notes)
    assert "depth.query" not in loaded._kimi_as_shipped["mxfp4-pack-quantized"]
    params = dict(loaded.named_parameters())
    assert len(quantized) > 20
    for module, packed in quantized.items():
        theirs = MXFP4PackedCompressor.decompress(dict(packed), scheme)["weight"]
        ours = params[f"{module}.weight"]
        assert torch.equal(ours, theirs.float()), module  # bit-exact
        assert not torch.equal(ours, dict(model.named_parameters())[f"{module}.weight"])  # really quantized
    dense = {n for n, _ in model.named_parameters()} - {f"{m}.weight" for m in quantized}
    for name in dense:
        assert torch.equal(params[name], dict(model.named_parameters())[name]), name
    # bf16 loading: the same values (exact in bf16).
    bf16, _ = load_kimi(tmp_path / "mx", dtype="bfloat16")
    some = next(iter(quantized))
    assert torch.equal(dict(bf16.named_parameters())[f"{some}.weight"].float(), params[f"{some}.weight"])


def test_save_pretrained_round_trip_and_tied_embeddings(tmp_path, one_thread):
    model = _tiny(dict(CFG_B, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "rt")
    with open(tmp_path / "rt" / "config.json") as fh:
        raw = json.load(fh)
    assert raw["model_type"] == "kimi_linear" and raw["attn_res_block_size"] == 2
    loaded, notes = load_kimi(tmp_path / "rt", dtype="float32")
    assert notes == [] and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_loader_errors_are_user_errors(tmp_path):
    from attnres_quant.errors import UserError

    model = _tiny(CFG_B)
    state = model.state_dict()
    state.pop("model.layers.0.mlp_res_proj.weight")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    _save(state, tmp_path / "bad", dict(CFG_B, model_type="kimi_linear"))
    with pytest.raises(UserError, match="missing weights model.layers.0.mlp_res_proj.weight.*unexpected"):
        load_kimi(tmp_path / "bad", dtype="float32")
    _save(model.state_dict(), tmp_path / "nv", dict(CFG_B, model_type="kimi_linear", quantization_config={
        "quant_method": "compressed-tensors", "format": "sparse-bitmask", "config_groups": {}}))
    with pytest.raises(UserError, match="sparse-bitmask"):
        load_kimi(tmp_path / "nv")


def test_torch_kda_matches_fla_naive_reference():
    """Where fla-core is installed (it needs triton): our KDA recurrence and gate against FLA's own
    torch references (fla.ops.kda.naive / naive_kda_gate), state layouts transposed.  Checked here
    once against fla-core 0.6.0's sources: 3e-8 (output), 9e-8 (state), gates bit-exact."""
    naive = pytest.importorskip("fla.ops.kda.naive")
    gate = pytest.importorskip("fla.ops.kda.gate")
    from attnres_quant.architectures.kimi_torch_ops import l2norm, recurrent_kda

    g = torch.Generator().manual_seed(0)
    B, T, H, K = 2, 13, 3, 8
    q, k, v, raw = (torch.randn(B, T, H, K, generator=g) for _ in range(4))
    beta = torch.randn(B, T, H, generator=g)
    A_log = torch.log(torch.empty(H).uniform_(1, 16, generator=g))
    dt_bias = torch.randn(H * K, generator=g)
    h0 = torch.randn(B, H, K, K, generator=g)
    decay = gate.naive_kda_gate(raw, A_log, dt_bias)
    o_ref, s_ref = naive.naive_recurrent_kda(l2norm(q), l2norm(k), v, decay, beta.sigmoid(), initial_state=h0,
                                             output_final_state=True)
    o, s = recurrent_kda(q, k, v, raw, beta, initial_state=h0.transpose(-1, -2), A_log=A_log, dt_bias=dt_bias)
    assert (o - o_ref).abs().max() < 1e-6
    assert (s.transpose(-1, -2) - s_ref).abs().max() < 1e-6
