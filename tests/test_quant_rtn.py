"""RTN simulation: bit-for-bit agreement with torchao's affine primitives; activations; quantize()."""

import pytest
import torch

from attnres_quant.quant import parse_variant, quantize
from attnres_quant.quant.rtn import EPS, QRANGE, fake_quantize_per_token, fake_quantize_weight
from attnres_quant.quant.testing import tiny_attnres

tq = pytest.importorskip("torchao.quantization.quant_primitives")


def torchao_fake_quant(w, bits, group_size, symmetric):
    qmin, qmax = QRANGE[bits]
    x = w.float()
    cols = x.shape[-1]
    block = (1, group_size or cols) if x.dim() == 2 else (group_size or cols,)
    mapping = tq.MappingType.SYMMETRIC if symmetric else tq.MappingType.ASYMMETRIC
    scale, zp = tq.choose_qparams_affine(x, mapping, block, torch.int8, qmin, qmax, eps=EPS,
                                         scale_dtype=torch.float32, zero_point_dtype=torch.int32)
    q = tq.quantize_affine(x, block, scale, zp, torch.int8, qmin, qmax)
    return tq.dequantize_affine(q, block, scale, zp, torch.int8, qmin, qmax, output_dtype=torch.float32)


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_bit_for_bit_with_torchao(bits, symmetric, group_size, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=g) * torch.rand(48, 1, generator=g) * 0.2).to(dtype)
    w[3] = 0  # an all-zero row exercises the eps clamp
    w[5, :] = w[5, :].abs()  # an all-positive row exercises the asymmetric zero point
    ours = fake_quantize_weight(w, bits, group_size, symmetric)
    ref = torchao_fake_quant(w, bits, group_size, symmetric).to(dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, w)


def test_rtn_levels():
    w = torch.randn(8, 32)
    q = fake_quantize_weight(w, "int4", None, True)
    scale = w.abs().amax(-1, keepdim=True) / 7.5
    levels = torch.round(q / scale)
    assert levels.min() >= -8 and levels.max() <= 7
    assert len(torch.unique(levels)) <= 16


def test_per_token_activation_matches_torchao():
    x = torch.randn(2, 5, 64)
    ours = fake_quantize_per_token(x, "int8")
    ref = torchao_fake_quant(x.reshape(-1, 64), "int8", None, True).reshape(x.shape)
    assert torch.equal(ours, ref)


def test_quantize_rtn_fresh_copy_and_weights():
    m = tiny_attnres(layers=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    v = parse_variant({"name": "w8", "method": "rtn", "default": {"weight": "int8", "group_size": 32}})
    q = quantize(m, v)
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), k  # baseline untouched
    w = m.model.layers[0].mlp.up_proj.weight
    assert torch.equal(q.model.model.layers[0].mlp.up_proj.weight, fake_quantize_weight(w, "int8", 32, True))
    assert q.simulated and q.kernel == "simulated-rtn"
    assert q.avg_bits == pytest.approx(q.plan.summary()["avg_bits"])
    assert q.weight_bytes < sum(p.numel() * 2 for p in m.parameters())
    # embeddings / norms are outside the default's scope
    assert torch.equal(q.model.model.embeddings.weight, m.model.embeddings.weight)


def test_activation_quantization_dynamic_and_static():
    m = tiny_attnres(layers=2, dtype=torch.float32)
    x = torch.randint(0, 97, (2, 12))
    base = m(x).logits
    calib = torch.randint(0, 97, (4, 16))
    outs = {}
    for scheme in ("dynamic", "static"):
        v = parse_variant({"name": "a8", "method": "rtn",
                           "default": {"activation": "int8", "activation_scheme": scheme}})
        q = quantize(m, v, calibration=calib)
        lin = q.model.model.layers[0].attn.q_proj
        assert lin._act_quantizer.scheme == scheme
        if scheme == "static":
            assert lin._act_quantizer.amax is not None and not lin._act_quantizer.observing
        outs[scheme] = q.model(x).logits
        assert 0 < (outs[scheme] - base).abs().max() < 1.0
        row = q.plan.row("model.layers.0.attn.q_proj.weight")
        assert row.activation.startswith("int8")
    # int4 activations hurt more than int8
    v4 = parse_variant({"name": "a4", "method": "rtn", "default": {"activation": "int4"}})
    err4 = (quantize(m, v4).model(x).logits - base).abs().mean()
    assert err4 > (outs["dynamic"] - base).abs().mean()
