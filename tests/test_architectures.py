"""The architecture registry (issue 16, item 1): every family supplies the Family interface, and a family
registered at run time is what loading / plan consult -- the plug-in point a new family uses.  Also AWQ on
the Kimi family (item 4): its smoothing mappings are complete (smoothing alone leaves the logits unchanged)
and never reach the depth path."""

from __future__ import annotations

import copy
import re
from dataclasses import fields

import pytest
import torch
from torch import nn

from attnres_quant import architectures
from attnres_quant.architectures import Family, FamilyPart, PrecisionHook
from attnres_quant.errors import UserError
from attnres_quant.quant import parse_variant, resolve_plan


def test_registry_lists_the_families_and_each_supplies_the_interface():
    fams = architectures.families()
    assert [f.name for f in fams] == ["reference", "kimi", "mhc", "llama"]
    assert [f.name for f in fams if f.fallback] == ["llama"]  # exactly one fallback, looked up last
    for fam in fams:
        assert isinstance(fam, Family) and fam.name and fam.model_types
        for name in ("handles_model", "check_config", "tokenizer_status", "structure", "load", "describe", "parts",
                     "component", "method_problem", "calibration_context", "awq_mappings"):
            assert callable(getattr(fam, name)), (fam.name, name)
        assert {f.name for f in fields(Family)} >= {"components", "default_keep", "keep_reason", "hooks",
                                                     "kv_cache_bytes"}
        assert set(fam.compute_components) <= set(fam.components)
        for comp, hook in (fam.hooks or {}).items():  # a family's own computations (mHC: hc.*)
            assert isinstance(hook, PrecisionHook) and comp in fam.compute_components and hook.field in (
                "compute", "storage")
        assert set(fam.default_keep) <= set(fam.components) and set(fam.awq_components) <= set(fam.components)
    by_type = {t: architectures.family_for_config({"model_type": t}).name
               for t in ("attnres", "transformer", "kimi_linear", "kimi_k3", "attnres_mhc", "deepseek_v4", "llama",
                         "qwen3", "gpt2")}
    assert by_type == {"attnres": "reference", "transformer": "reference", "kimi_linear": "kimi", "kimi_k3": "kimi",
                       "attnres_mhc": "mhc", "deepseek_v4": "mhc", "llama": "llama", "qwen3": "llama", "gpt2": "llama"}


def test_models_find_their_family():
    from attnres_quant.architectures.kimi_testing import tiny_kimi
    from attnres_quant.architectures.mhc_testing import tiny_mhc
    from attnres_quant.quant.testing import tiny_attnres

    assert architectures.family_for_model(tiny_attnres()).name == "reference"
    assert architectures.family_for_model(tiny_kimi()).name == "kimi"
    assert architectures.family_for_model(tiny_mhc()).name == "mhc"
    assert architectures.family_for_model(nn.Linear(2, 2)).name == "llama"  # the fallback claims the rest


# --------------------------------------------------------------------------- a family plugged in by a test
class _ToyConfig:
    model_type = "toy"
    num_hidden_layers = 2
    tie_word_embeddings = False


class ToyLM(nn.Module):
    """Module names no built-in rule knows: only the toy family can name its parts."""

    def __init__(self):
        super().__init__()
        self.config = _ToyConfig()
        self.tok = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mix": nn.Linear(8, 8, bias=False),
                                                   "ff": nn.Linear(8, 8, bias=False)}) for _ in range(2))
        self.out = nn.Linear(8, 16, bias=False)


_TOY_RULES = [(r"tok", "embed"), (r"blocks\.(\d+)\.mix", "attn.q"), (r"blocks\.(\d+)\.ff", "mlp.up"),
              (r"out", "lm_head")]


def _toy_component(name: str, num_layers=None):
    from attnres_quant.architectures.base import rule_component

    return rule_component(name, _TOY_RULES, num_layers)


def _toy_parts(model):
    for name, _ in model.named_parameters():
        yield FamilyPart(name, _toy_component(name), "weight")


def _unused(*_a, **_k):
    raise AssertionError("not called by plan")


TOY = Family(name="toy", model_types=("toy",), components=("embed", "attn.q", "mlp.up", "lm_head"),
             compute_components=(), handles_model=lambda m: isinstance(m, ToyLM), check_config=_unused,
             tokenizer_status=_unused, structure=_unused, load=_unused,
             describe=lambda m: {"model_type": "toy", "family": "toy", "block_size": None},
             parts=_toy_parts, component=_toy_component, default_keep=("mlp.up",),
             method_problem=lambda method, options=None: "toys only round" if method == "gptq" else None)


@pytest.fixture
def toy_family():
    architectures.register(TOY)
    try:
        yield TOY
    finally:
        architectures.unregister("toy")


def test_a_family_registered_at_run_time_is_what_plan_consults(toy_family):
    from attnres_quant.loading import describe_model

    model = ToyLM()
    assert architectures.family_for_config({"model_type": "toy"}) is TOY
    assert architectures.family_for_model(model) is TOY
    plan = resolve_plan(model, parse_variant({"name": "v", "method": "rtn", "default": {"weight": "int4"}}))
    rows = {r.name: r for r in plan.weight_rows()}
    assert set(rows) == {"tok.weight", "blocks.0.mix.weight", "blocks.1.mix.weight", "blocks.0.ff.weight",
                         "blocks.1.ff.weight", "out.weight"}
    assert rows["blocks.1.mix.weight"].component == "attn.q" and rows["blocks.1.mix.weight"].layer == 1
    assert rows["blocks.0.mix.weight"].precision == "int4"
    assert rows["blocks.0.ff.weight"].method == "keep"  # the family's default_keep
    assert any("toy family" in n for n in plan.notes)
    with pytest.raises(UserError, match="cannot run on the toy family: toys only round"):
        resolve_plan(model, parse_variant({"name": "g", "method": "gptq", "default": {"weight": "int4"}}))
    assert describe_model(model)["family"] == "toy"
    architectures.unregister("toy")
    assert architectures.family_for_model(model).name == "llama"  # gone: the fallback's rules name nothing here


# --------------------------------------------------------------------------- AWQ on Kimi
def _exact_name(pattern: str) -> str:
    assert pattern.startswith("re:^") and pattern.endswith("$")
    return re.sub(r"\\(.)", r"\1", pattern[len("re:^"):-1])


def test_awq_on_kimi_smooths_exactly_quantizes_all_experts_and_leaves_the_depth_path(one_thread):
    """AWQ (llm-compressor AWQModifier with the Kimi family's per-layer mappings, all experts calibrated):
    every projection and every routed expert changes; the pseudo-queries and key norms are bit-identical;
    and the scales it found, applied without quantization, leave the logits unchanged (the mappings name
    every consumer of each norm -- the router included)."""
    from attnres_quant.architectures.kimi import awq_mappings
    from attnres_quant.architectures.kimi_testing import TINY, tiny_kimi
    from attnres_quant.quant import quantize
    from attnres_quant.quant.awq import apply_awq

    model = tiny_kimi()
    calib = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
    q = quantize(model, parse_variant({"name": "awq", "method": "awq",
                                       "default": {"weight": "int4", "group_size": 16}}), calibration=calib)
    assert q.kernel == "simulated-awq"
    assert len(q.details["awq"]["smoothed"]) == 2 * TINY["num_hidden_layers"]  # both norms of every layer
    rows = [r for r in q.plan.weight_rows() if r.method == "awq"]
    assert len([r for r in rows if r.component == "moe.experts.up"]) == 8  # 2 MoE layers x 4 experts
    assert {r.component for r in rows} >= {"attn.q", "attn.gate", "attn.kv_a", "moe.shared.gate", "mlp.down"}
    base, got = dict(model.named_parameters()), dict(q.model.named_parameters())
    for r in rows:
        assert not torch.equal(got[r.name], base[r.name]), r.name
    depth = [n for n in base if re.search(r"_res_(proj|norm)\.weight$", n)]
    assert len(depth) == 2 * 2 * TINY["num_hidden_layers"] + 2
    assert all(torch.equal(got[n], base[n]) for n in depth)
    assert any("post_attention_layernorm" in n and "router" in n for n in q.plan.notes)

    res = apply_awq(model, calib, bits=4, group_size=16, targets=[r.part.name for r in rows], measure=False)
    smoothed = copy.deepcopy(model)
    mods = dict(smoothed.named_modules())
    with torch.no_grad():
        for smooth, balance in awq_mappings(model):
            s = res.scales[_exact_name(smooth)]
            mods[_exact_name(smooth)].weight.div_(s)
            for b in balance:
                mods[_exact_name(b)].weight.mul_(s.view(1, -1))
        ref = model(input_ids=calib, use_cache=False).logits
        out = smoothed(input_ids=calib, use_cache=False).logits
    assert not all(torch.allclose(s, torch.ones_like(s)) for s in res.scales.values())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not any(m.calibrate_all_experts for m in q.model.modules() if hasattr(m, "calibrate_all_experts"))
