"""GPTQ (llm-compressor) vs RTN, bitsandbytes and torchao real kernels on CPU."""

import pytest
import torch
from torch import nn

from attnres_quant.errors import UserError
from attnres_quant.quant import layer_output_error, parse_variant, quantize
from attnres_quant.quant.testing import kl_divergence, tiny_attnres

CALIB = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(1))
X = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_attnres(layers=2, dtype=torch.float32)


def test_gptq_beats_rtn_int4_on_layer_outputs(fp32_model):
    m = fp32_model
    errs = {}
    for method in ("rtn", "gptq"):
        v = parse_variant({"name": method, "method": method, "default": {"weight": "int4"},
                           "rules": [{"select": "depth.*", "weight": "fp32"}]})
        q = quantize(m, v, calibration=CALIB)
        e = layer_output_error(m, q.model, [CALIB])
        decoder = {k: x for k, x in e.items() if ".attn." in k or ".mlp." in k}
        assert len(decoder) == 14
        errs[method] = decoder
        if method == "gptq":
            assert q.kernel == "simulated-gptq" and q.simulated
            lin = q.model.model.layers[0].attn.q_proj
            assert type(lin) is nn.Linear and set(dict(lin.named_parameters())) == {"weight"}
            assert "forward" not in lin.__dict__  # compressed-tensors wrapper removed: a plain Linear
            assert q.plan.row("model.layers.0.attn.q_proj.weight").method == "gptq"
            # weights sit on an int4 per-channel grid: <= 16 levels per row
            assert all(len(torch.unique(r)) <= 16 for r in lin.weight)
            assert torch.isfinite(q.model(X).logits).all()
    mean = {k: sum(v.values()) / len(v) for k, v in errs.items()}
    assert mean["gptq"] < mean["rtn"], mean
    better = sum(errs["gptq"][k] < errs["rtn"][k] for k in errs["rtn"])
    assert better >= 12, (better, errs)


def test_bnb_int8_and_nf4_fp4_run_on_cpu():
    import bitsandbytes as bnb

    m = tiny_attnres(layers=2)  # bf16
    base = m(X).logits
    for prec, cls in (("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit)):
        v = parse_variant({"name": prec, "method": "bnb", "default": {"weight": prec},
                           "rules": [{"select": "depth.*", "compute": "fp32"}]})
        q = quantize(m, v)
        assert isinstance(q.model.model.layers[1].mlp.down_proj, cls)
        assert q.kernel == f"bitsandbytes-{prec}" and not q.simulated
        # pseudo-queries are not module calls: bnb's default leaves them at bf16, and the plan says so
        assert q.plan.row("model.layers.0.attn_res_proj.weight").method == "keep"
        with torch.no_grad():
            out = q.model(X).logits
        assert torch.isfinite(out).all()
        kl = kl_divergence(base, out)
        assert 0 < kl < 0.5
        assert q.weight_bytes < sum(p.numel() * 2 for p in m.parameters())


def test_torchao_int8_kernels_and_int4_cpu_error():
    m = tiny_attnres(layers=2)
    base = m(X).logits
    for act, kernel in ((None, "torchao-int8-weight-only"), ("int8", "torchao-int8-dynamic")):
        default = {"weight": "int8"} | ({"activation": act} if act else {})
        q = quantize(m, parse_variant({"name": kernel, "method": "torchao", "default": default}))
        assert q.kernel == kernel and not q.simulated
        assert "Int8" in type(q.model.model.layers[0].attn.q_proj.weight).__name__
        with torch.no_grad():
            assert kl_divergence(base, q.model(X).logits) < 0.05
    v4 = parse_variant({"name": "ao4", "method": "torchao", "default": {"weight": "int4", "group_size": 32}})
    with pytest.raises(UserError, match="no CPU kernel"):
        quantize(m, v4)


def test_kl_ordering_int8_below_int4(fp32_model):
    m = fp32_model
    with torch.no_grad():
        base = m(X).logits
        kl = {}
        for w in ("int8", "int4"):
            q = quantize(m, parse_variant({"name": w, "method": "rtn", "default": {"weight": w}}))
            kl[w] = kl_divergence(base, q.model(X).logits)
    assert 0 < kl["int8"] < kl["int4"]
