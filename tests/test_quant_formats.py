"""Deployment formats (quant/formats.py): fake-quant equals compressed-tensors' own quantize->dequantize bit for
bit (the oracle: its calculate_qparams / generate_gparam / compute_dynamic_scales_and_zp + fake_quantize with the
same QuantizationArgs), on random and trained weights, fp32 and bf16, all-zero groups included; torchao where it
has the format; bits per weight; plan-time refusals; the formats through the quantize() hooks."""

from __future__ import annotations

import math

import pytest
import torch

from attnres_quant.errors import UserError
from attnres_quant.quant import formats as F
from attnres_quant.quant import parse_variant, quantize, resolve_plan
from attnres_quant.quant.testing import tiny_attnres

ct_utils = pytest.importorskip("compressed_tensors.quantization.utils")
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402

FORMAT_CASES = [("fp8", None), ("fp8", 32), ("fp8_tensor", None), ("fp8_block", None), ("fp8_block", 64),
                ("mxfp8", None), ("mxfp4", None), ("nvfp4", None)]


def ct_fake_quant_weight(w: torch.Tensor, args) -> torch.Tensor:
    """compressed-tensors' weight QDQ: min/max per granule as llm-compressor's min-max observer flattens them,
    calculate_qparams (generate_gparam for tensor_group), fake_quantize."""
    s = args.strategy
    if s == "tensor":
        mn, mx = w.amin().reshape(1), w.amax().reshape(1)
    elif s == "channel":
        mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    elif s in ("group", "tensor_group"):
        g = w.unflatten(-1, (-1, args.group_size))
        mn, mx = g.amin(-1), g.amax(-1)
    elif s == "block":
        b = args.block_structure
        xp = ct_utils.maybe_pad_tensor_for_block_quant(w, b)
        R, C = xp.shape[0] // b[0], xp.shape[1] // b[1]
        blocks = xp.reshape(R, b[0], C, b[1]).transpose(1, 2).flatten(-2)
        mn, mx = blocks.amin(-1), blocks.amax(-1)
    else:
        raise AssertionError(s)
    gs = None
    if s == "tensor_group":
        a = torch.maximum(-w.amin(), w.amax()).reshape(1)
        gs = ct_utils.generate_gparam(-a, a)
    scale, zp = ct_utils.calculate_qparams(mn, mx, args, global_scale=gs)
    return fake_quantize(w, scale, zp, args, global_scale=gs)


def _random_weight(dtype, rows=200, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05)
    w[3] = 0  # an all-zero row (all-zero groups, blocks' partial zeros)
    w[5, :64] = 0  # all-zero groups inside a row
    w[7, 5] = 3.0  # an outlier
    w[9, 17] = -1e-30  # underflows everywhere
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision,group", FORMAT_CASES)
def test_weight_formats_equal_compressed_tensors_random(precision, group, dtype):
    w = _random_weight(dtype)
    ref = ct_fake_quant_weight(w, F.weight_args(precision, group))
    got = F.fake_quantize_weight(w, precision, group)
    assert got.dtype == w.dtype and got.shape == w.shape
    assert torch.isfinite(got).all()
    assert torch.equal(got, ref), f"{(got != ref).sum().item()} of {w.numel()} differ"
    assert torch.equal(got[3], torch.zeros_like(got[3]))  # all-zero groups stay zero, no NaN/Inf


@pytest.fixture(scope="module")
def trained_weights():
    from attnres_quant.loading import load_model

    model, _ = load_model("zoo:tiny-block", dtype="float32")
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision,group", FORMAT_CASES)
def test_weight_formats_equal_compressed_tensors_trained(trained_weights, precision, group, dtype):
    """Every nn.Linear of the trained zoo:tiny-block (incl. the [1, d] pseudo-queries where the format fits)."""
    n_checked = 0
    for name, w in trained_weights.items():
        w = w.to(dtype)
        cols = w.shape[-1]
        g = F.weight_group(precision, group)
        if precision == "fp8_block" and w.shape[0] < 2:
            continue
        if g is not None and cols % g:
            continue
        ref = ct_fake_quant_weight(w, F.weight_args(precision, group))
        got = F.fake_quantize_weight(w, precision, group)
        assert torch.equal(got, ref), f"{name}: {(got != ref).sum().item()} of {w.numel()} differ"
        n_checked += 1
    assert n_checked >= 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formats_equal_compressed_tensors(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 7, 128, generator=g) * 3).to(dtype)
    x[0, 2] = 0  # an all-zero token
    args = F.activation_args("fp8")
    scale, zp = ct_utils.compute_dynamic_scales_and_zp(x, args, None)
    assert torch.equal(F.fake_quantize_fp8_tokens(x), fake_quantize(x, scale, zp, args))
    for p in ("mxfp8", "mxfp4"):
        args = F.activation_args(p)
        scale, zp = ct_utils.compute_dynamic_scales_and_zp(x, args, None)
        got = F.fake_quantize_groups(x, p)
        assert torch.isfinite(got).all()
        assert torch.equal(got, fake_quantize(x, scale, zp, args))
    # nvfp4: calibrated fp32 global scale (running amax) + dynamic E4M3 16-group scales (compute_dynamic_scales_and_zp
    # with that global scale, as compressed-tensors' NVFP4 input activations)
    q = F.FormatActivationQuantizer("nvfp4")
    lin = torch.nn.Linear(128, 4).to(dtype)
    assert q(lin, (x,)) is None and q(lin, (x * 1.5,)) is None
    q.freeze()
    args = F.activation_args("nvfp4")
    scale, zp = ct_utils.compute_dynamic_scales_and_zp(x, args, lin, global_scale=q.global_scale)
    got = q(lin, (x,))[0]
    assert torch.isfinite(got).all()
    assert torch.equal(got, fake_quantize(x, scale, zp, args, global_scale=q.global_scale))
    # static per-tensor fp8: scale from the calibrated amax, as calculate_qparams gives it
    q = F.FormatActivationQuantizer("fp8", "static")
    lin = torch.nn.Linear(128, 4).to(dtype)
    q(lin, (x,))
    q(lin, (x * 0.5,))
    q.freeze()
    args = F.activation_args("fp8", "static")
    scale, zp = ct_utils.calculate_qparams(x.amin().reshape(1), x.amax().reshape(1), args)
    assert torch.equal(q(lin, (x * 0.7,))[0], fake_quantize(x * 0.7, scale, zp, args))


def test_e2m1_rounding_ties_to_even():
    vals = torch.tensor([0.0, 0.1, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 6.0, -0.75, -2.5, -5.0])
    want = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -2.0, -4.0])
    assert torch.equal(F.round_e2m1(vals), want)
    cast = pytest.importorskip("compressed_tensors.quantization.utils.fp4_utils").cast_to_fp4
    assert torch.equal(F.round_e2m1(vals), cast(vals.clone()))


def test_mx_formats_equal_torchao():
    """torchao's MX (prototype.mx_formats): MXFP4 equals its EVEN scale mode bit for bit, MXFP8 its RCEIL mode
    (2^ceil(log2(amax/448)); identical to compressed-tensors' rounding except a group amax whose mantissa is
    exactly 1.75, absent here). torchao's default FLOOR (the OCP spec's) differs: see docs/quantization.md."""
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode as Mode

    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(256, 256, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
        w[3] = 0
        for p, el, mode in (("mxfp4", torch.float4_e2m1fn_x2, Mode.EVEN), ("mxfp8", torch.float8_e4m3fn, Mode.RCEIL)):
            s, d = mx.to_mx(w, el, 32, mode)
            ao = mx.to_dtype(d, s, el, 32, dtype)
            assert torch.equal(F.fake_quantize_weight(w, p), ao), (p, dtype)
            s, d = mx.to_mx(w, el, 32, Mode.FLOOR)
            assert not torch.equal(F.fake_quantize_weight(w, p), mx.to_dtype(d, s, el, 32, dtype))


def test_nvfp4_differs_from_torchao_only_in_global_scale_rounding():
    """torchao's NVFP4Tensor keeps the global scale as fp32 amax / 2688 and multiplies; compressed-tensors (and
    we) take 2688 / amax in the weight's dtype (bf16-rounded for bf16 weights) and divide. In fp32 the results
    agree to 1 ulp; in bf16 the rounded global scale moves some group scales (documented difference)."""
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    w = (torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) * 0.05)
    t = nv.NVFP4Tensor.to_nvfp4(w, 16, per_tensor_scale=nv.per_tensor_amax_to_scale(w.abs().amax()))
    ao = t.dequantize(torch.float32)
    ours = F.fake_quantize_weight(w, "nvfp4")
    assert torch.allclose(ao, ours, rtol=0, atol=float(w.abs().max()) * 2 ** -20)


def test_bits_per_weight_per_format():
    shape = (256, 512)
    numel = 256 * 512
    assert F.bits_per_weight("mxfp4", shape, None, 16) == 4.25
    assert F.bits_per_weight("mxfp8", shape, None, 16) == 8.25
    assert F.bits_per_weight("nvfp4", shape, None, 16) == 4.5 + 32 / numel
    assert F.bits_per_weight("fp8", shape, None, 16) == 8 + 16 / 512  # per-channel bf16 scale per row
    assert F.bits_per_weight("fp8", shape, None, 32) == 8 + 32 / 512  # fp32 model: fp32 scales
    assert F.bits_per_weight("fp8", shape, 128, 16) == 8 + 16 / 128
    assert F.bits_per_weight("fp8_tensor", shape, None, 16) == 8 + 16 / numel
    assert F.bits_per_weight("fp8_block", shape, None, 16) == 8 + 16 * (2 * 4) / numel
    assert F.bits_per_weight("fp8_block", (200, 100), None, 16) == 8 + 16 * 2 / 20000  # padded edge blocks
    # through the plan (bf16 model: scales of fp8 formats in bf16)
    m = tiny_attnres(hidden=64, intermediate=128)
    for prec, bits in (("mxfp4", 4.25), ("mxfp8", 8.25), ("fp8", 8 + 16 / 64)):
        plan = resolve_plan(m, parse_variant({"name": prec, "default": {"weight": prec}}))
        assert plan.row("model.layers.0.attn.q_proj.weight").bits == bits
        assert plan.row("model.layers.0.mlp.down_proj.weight").bits == (bits if prec != "fp8" else 8 + 16 / 128)
    plan = resolve_plan(m, parse_variant({"name": "nv", "default": {"weight": "nvfp4"}}))
    r = plan.row("model.layers.0.attn.q_proj.weight")
    assert r.bits == 4.5 + 32 / r.numel and r.granularity == "g16 E4M3 + fp32 global"
    s = plan.summary()
    assert s["weight_bytes"] == math.ceil(sum(x.numel * x.bits for x in plan.weight_rows() if x.tied_to is None) / 8)


def test_plan_refuses_what_a_format_cannot_apply():
    m = tiny_attnres(hidden=64)
    bad = [
        ({"name": "a", "default": {"weight": "mxfp4", "group_size": 64}}, "fixed group of 32"),
        ({"name": "b", "default": {"weight": "nvfp4", "symmetric": False}}, "symmetric floating format"),
        ({"name": "c", "default": {"weight": "fp8_tensor", "group_size": 32}}, "one scale per tensor"),
        ({"name": "d", "default": {"weight": "int4", "activation": "mxfp4", "activation_scheme": "static"}},
         "dynamic"),
        ({"name": "e", "rules": [{"select": "attn.kv_cache", "storage": "mxfp4"}]}, "head_dim"),  # head_dim 16
    ]
    for spec, msg in bad:
        with pytest.raises(UserError, match=msg):
            resolve_plan(m, parse_variant(spec))
    with pytest.raises(UserError, match="rtn"):
        parse_variant({"name": "g", "method": "gptq", "default": {"weight": "nvfp4"}})
    with pytest.raises(UserError, match="cannot quantize activations"):
        parse_variant({"name": "h", "method": "awq", "default": {"weight": "int4", "activation": "fp8"}})
    with pytest.raises(UserError, match="unknown weight precision"):
        parse_variant({"name": "i", "default": {"weight": "mxfp6"}})


def test_quantize_applies_formats_through_hooks():
    m = tiny_attnres(hidden=64, block_size=2)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    v = parse_variant({"name": "w4afp8", "default": {"weight": "mxfp4", "activation": "fp8"},
                       "rules": [{"select": "depth.sources", "storage": "nvfp4"},
                                 {"select": "depth.softmax", "compute": "fp8_e5m2"},
                                 {"select": "attn.kv_cache", "storage": "fp8_e5m2"}]})
    q = quantize(m, v)
    lin = dict(q.model.named_modules())["model.layers.0.attn.q_proj"]
    base = dict(m.named_modules())["model.layers.0.attn.q_proj"]
    assert torch.equal(lin.weight, F.fake_quantize_weight(base.weight, "mxfp4"))
    assert isinstance(lin._act_quantizer, F.FormatActivationQuantizer)
    mixer = q.model.model.depth_mixers()[1]  # sub-layer 0 mixes one source: no softmax to simulate
    assert isinstance(mixer.source_quantizer, F.FormatStorageQuantizer)
    assert isinstance(mixer.logit_quantizer, F.E5M2LogitQuantizer) and mixer.logit_quantizer.elementwise
    assert isinstance(q.model.model.layers[0].attn.kv_quantizer, F.FormatStorageQuantizer)
    with torch.no_grad():
        out = q.model(input_ids=ids).logits
    assert torch.isfinite(out).all() and q.simulated and q.kernel == "simulated-rtn"
    row = q.plan.row("model.layers.0.attn.q_proj.weight")
    assert row.activation == "fp8 per-token dyn" and row.precision == "mxfp4"
    # static fp8 activations are calibrated
    v = parse_variant({"name": "fp8s", "default": {"weight": "fp8_tensor", "activation": "fp8",
                                                   "activation_scheme": "static"}})
    assert v.needs_calibration()
    q = quantize(m, v, calibration=ids)
    assert dict(q.model.named_modules())["model.layers.0.mlp.up_proj"]._act_quantizer.scale is not None


def test_storage_formats_prefill_decode_agree():
    """Scales only from the values a cache holds: quantizing a token alone equals quantizing it in a batch."""
    x = torch.randn(1, 2, 9, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for p in F.STORAGE_FORMATS:
        q = F.FormatStorageQuantizer(p)
        full = q(x)
        assert torch.isfinite(full).all()
        assert torch.equal(full[:, :, -1:], q(x[:, :, -1:])), p
        assert torch.equal(q(torch.zeros_like(x)), torch.zeros_like(x))


# ------------------------------------------------------------------------------------------- real kernels / labels
def test_fp8_real_kernel_labels_cpu_and_gpu_paths():
    """CPU: torchao's fp8 weight-only (fp8 storage, per-row fp32 scales, dequantized for a bf16 matmul) runs and
    is labelled a real kernel; the FP8 GEMM (fp8 activations) is a CUDA >= 8.9 code path, refused elsewhere by
    can_run; rtn's formats are labelled simulated."""
    pytest.importorskip("torchao")
    from attnres_quant.quant.methods import can_run, fp8_gemm_available

    m = tiny_attnres(hidden=64)
    q = quantize(m, parse_variant({"name": "ao", "method": "torchao", "default": {"weight": "fp8"}}))
    assert q.kernel == "torchao-float8-weight-only" and not q.simulated
    row = q.plan.row("model.layers.0.attn.q_proj.weight")
    assert row.bits == 8 + 32 / 64 and row.granularity == "per-channel"
    lin = q.model.model.layers[0].attn.q_proj
    deq = lin.weight.dequantize().float()
    ours = F.fake_quantize_weight(m.model.layers[0].attn.q_proj.weight, "fp8").float()
    # torchao scales in fp32, compressed-tensors (and we) in the weight's dtype: at most one E4M3 step apart
    # (2^-3 relative), on a few percent of the elements.
    diff = (deq - ours).abs()
    sub = deq.abs().amax(-1, keepdim=True) / 448 * 2 ** -8  # two subnormal E4M3 steps
    assert bool((diff <= torch.maximum(ours.abs(), deq.abs()) * 2 ** -3 + sub).all())
    assert (diff > 0).float().mean() < 0.1
    with torch.no_grad():
        assert torch.isfinite(q.model(input_ids=torch.randint(0, 97, (1, 8))).logits).all()

    dyn = resolve_plan(m, parse_variant({"name": "ao8", "method": "torchao",
                                         "default": {"weight": "fp8", "activation": "fp8"}}))
    assert "capability >= 8.9" in can_run(dyn, "cpu")
    assert fp8_gemm_available("cuda", (9, 0)) and fp8_gemm_available("cuda", (8, 9))
    assert not fp8_gemm_available("cuda", (8, 0)) and not fp8_gemm_available("cpu")
    from attnres_quant.quant.torchao_method import torchao_config

    cfg, kernel = torchao_config("fp8", "fp8", None, torch.device("cuda"))
    assert kernel == "float8-dynamic" and type(cfg).__name__ == "Float8DynamicActivationFloat8WeightConfig"
    with pytest.raises(UserError, match="per output row"):
        resolve_plan(m, parse_variant({"name": "g", "method": "torchao", "default": {"weight": "fp8",
                                                                                       "group_size": 32}}))
    with pytest.raises(UserError, match="method 'torchao' cannot provide weight mxfp4"):
        parse_variant({"name": "mx", "method": "torchao", "default": {"weight": "mxfp4"}})
    q = quantize(m, parse_variant({"name": "sim", "default": {"weight": "fp8", "activation": "fp8"}}))
    assert q.kernel == "simulated-rtn" and q.simulated


def test_nvfp4_fused_global_scale_like_llm_compressor():
    """q/k/v and gate/up share one NVFP4 global scale (llm-compressor's fuse_weight_observers; vLLM runs them as
    one GEMM): the global comes from the max |w| of the siblings; compressed-tensors' QDQ with that global."""
    m = tiny_attnres(hidden=64)
    q = quantize(m, parse_variant({"name": "nv", "default": {"weight": "nvfp4"}}))
    layer, qlayer = m.model.layers[0], q.model.model.layers[0]
    ws = {n: getattr(layer.attn, n).weight for n in ("q_proj", "k_proj", "v_proj")}
    a = torch.stack([w.abs().amax() for w in ws.values()]).amax()
    gs = ct_utils.generate_gparam(-a.reshape(1), a.reshape(1))
    args = F.weight_args("nvfp4")
    for n, w in ws.items():
        g = w.unflatten(-1, (-1, 16))
        scale, zp = ct_utils.calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
        assert torch.equal(getattr(qlayer.attn, n).weight, fake_quantize(w, scale, zp, args, global_scale=gs)), n
    amax = F.fused_global_amax({"a.gate_proj": layer.mlp.gate_proj.weight, "a.up_proj": layer.mlp.up_proj.weight,
                                "a.down_proj": layer.mlp.down_proj.weight})
    assert torch.equal(amax["a.gate_proj"], amax["a.up_proj"])
    assert torch.equal(amax["a.down_proj"], layer.mlp.down_proj.weight.abs().amax())
