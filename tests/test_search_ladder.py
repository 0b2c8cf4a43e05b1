"""Issue 18, search's ladder: llama.cpp types and int8 g32 beside RTN int4, counted like every hand-written policy.

A tiny random AttnRes checkpoint whose mlp.down rows are 256 long (real K-quant super-blocks) and whose other
rows are 64 (llama.cpp's fallbacks), so both paths of the GGUF levels are exercised."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from attnres_quant.cli import main as cli_main
from attnres_quant.errors import UserError
from attnres_quant.quant import parse_variant, quantize, resolve_plan
from attnres_quant.quant.allocate import Option, Unit, allocate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from attnres_quant.evaluation.testing import write_tiny_attnres

    return write_tiny_attnres(tmp_path_factory.mktemp("ckpt") / "tiny-block", intermediate_size=256)


@pytest.fixture(scope="module")
def model(ckpt):
    from attnres_quant.loading import load_model

    return load_model(str(ckpt), dtype="float32")[0]


def _levels(text):
    from attnres_quant.pipeline.sensitivity import parse_level

    return [parse_level(t) for t in text.split(",")]


# --------------------------------------------------------------------------- the ladder
def test_default_ladder_has_the_gguf_types_and_int8_g32():
    from attnres_quant.pipeline.search import DEFAULT_LEVELS

    levels = _levels(DEFAULT_LEVELS)
    for want in ({"weight": "q4_k"}, {"weight": "q5_k"}, {"weight": "q6_k"}, {"weight": "q8_0"},
                 {"weight": "int8", "group_size": 32}, {"weight": "int4", "group_size": 32},
                 {"weight": "int4", "group_size": 128}, {"weight": "int8"}):
        assert want in levels
    assert _levels("Q4_K,q5_0") == [{"weight": "q4_k"}, {"weight": "q5_0"}]  # upper case as in llama.cpp
    with pytest.raises(UserError, match="fixed blocks"):
        _levels("q4_k:32")


def test_probes_follow_llama_cpps_fallbacks_one_probe_per_distinct_tensor(model):
    from attnres_quant.pipeline.search import DEFAULT_LEVELS
    from attnres_quant.pipeline.sensitivity import build_probes

    records, variants = build_probes(model, _levels(DEFAULT_LEVELS), per_layer=False, experts=False,
                                     components=None, source="test")
    assert [v.name for v in variants] == list(records)
    levels = {}
    for rec in records.values():
        levels.setdefault(rec["unit"], []).append(rec["level"])
    # mlp.down (rows of 256) holds every K-quant for real.
    assert levels["mlp.down"] == ["int4g128", "int4g32", "q4_k", "q5_k", "q6_k", "q8_0", "int8g32", "int8"]
    # Rows of 64: Q6_K falls back to Q8_0 (one probe, named by what it is); Q4_K -> Q5_0 and Q5_K -> Q5_1 stay.
    assert levels["attn.q"] == ["int4g128", "int4g32", "q4_k", "q5_k", "q8_0", "int8g32", "int8"]
    plan = resolve_plan(model, next(v for v in variants if v.name == "mlp.down.q4_k"))
    assert {(r.method, r.precision, r.bits) for r in plan.weight_rows() if r.component == "mlp.down"} == \
        {("gguf", "q4_k", 4.5)}


def test_an_rtn_variant_mixes_gguf_rows_with_int_rows_and_refuses_groups_on_them(model):
    v = parse_variant({"name": "mix", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
                       "rules": [{"select": "mlp.down", "weight": "Q6_K"}, {"select": "lm_head", "weight": "q8_0"}]})
    rows = {r.component: (r.method, r.precision) for r in resolve_plan(model, v).weight_rows()}
    assert rows["mlp.down"] == ("gguf", "q6_k") and rows["lm_head"] == ("gguf", "q8_0")
    assert rows["attn.q"] == ("rtn", "int4") and rows["embed"] == ("keep", "fp32")
    with pytest.raises(UserError, match="does not apply to GGUF types"):
        resolve_plan(model, parse_variant({"name": "bad", "method": "rtn",
                                           "rules": [{"select": "lm_head", "weight": "q8_0", "group_size": 32}]}))


# --------------------------------------------------------------------------- bits: one count for every policy
class _ZeroKL:
    """A results store whose every probe measured KL 0 (only the bits matter here)."""

    def get(self, label, variant, cell):
        return {"status": "ok", "value": {"kl_mean": 0.0, "kl_sem": 0.0}}


@pytest.mark.parametrize("hand_written, level_of", [
    # llama-quantize Q8_0 (embedding and output included; 1-D tensors, the pseudo-queries and key norms, kept).
    ({"name": "q8", "method": "gguf", "options": {"preset": "q8_0"}},
     lambda unit: "baseline" if unit.startswith("depth.") else "q8_0"),
    # RTN int4 g32: the default's scope (projections, pseudo-queries, key norms); embed / lm_head kept.
    ({"name": "i4", "method": "rtn", "default": {"weight": "int4", "group_size": 32}},
     lambda unit: "baseline" if unit in ("embed", "lm_head") or unit in ("depth.softmax", "depth.sources")
     else "int4g32"),
    # Q4_K on every 2-D weight (configs/low_bit.yaml's gguf_q4_k_all): real K-quants on mlp.down, llama.cpp's
    # fallback Q5_0 on the rows of 64.
    ({"name": "q4k", "method": "gguf", "default": {"weight": "Q4_K"},
      "rules": [{"select": "embed", "weight": "Q4_K"}, {"select": "lm_head", "weight": "Q4_K"}]},
     lambda unit: "baseline" if unit.startswith("depth.") else "q4_k"),
])
def test_search_counts_bits_as_the_plan_of_a_hand_written_policy(model, hand_written, level_of):
    from attnres_quant.pipeline.search import DEFAULT_LEVELS, build_units
    from attnres_quant.pipeline.sensitivity import build_probes

    records, _ = build_probes(model, _levels(DEFAULT_LEVELS), per_layer=False, experts=False, components=None,
                              source="test")
    units, n_weights, fixed = build_units(_ZeroKL(), "m", records, model, "test")
    hand = resolve_plan(model, parse_variant(hand_written))
    bits = fixed + sum(next(o.bits for o in u.options if o.level == level_of(u.name)) for u in units)
    assert n_weights == hand.summary()["n_weights"]
    assert bits / n_weights == pytest.approx(hand.summary()["avg_bits"], rel=1e-12)


# --------------------------------------------------------------------------- allocation never exceeds the budget
def test_allocation_never_exceeds_the_bit_budget_on_random_units():
    rng = random.Random(0)
    for _ in range(300):
        units = []
        for i in range(rng.randint(1, 6)):
            size = rng.choice([64, 512, 4096, 40000])
            opts = [Option(f"l{j}", {}, size * b, rng.random() ** 3 * 0.1) for j, b in
                    enumerate(sorted(rng.sample([4.125, 4.5, 5.5, 6.0, 6.5625, 8.125, 8.5], rng.randint(1, 4))))]
            units.append(Unit(f"u{i}", {"select": f"u{i}"}, opts + [Option("baseline", {}, size * 16, 0.0)]))
        n = sum(u.options[-1].bits for u in units) / 16 + 100
        fixed = 100 * 16
        cheapest = (fixed + sum(min(o.bits for o in u.options) for u in units)) / n
        target = rng.uniform(cheapest, 16.5)
        alloc = allocate(units, n, fixed, target_bits=target)
        assert alloc.avg_bits <= target + 1e-12
        assert alloc.total_bits == pytest.approx(fixed + sum(o.bits for o in alloc.choice.values()))


# --------------------------------------------------------------------------- the searched YAML applies the formats
def test_searched_policies_apply_exactly_the_chosen_formats_to_the_named_weights(tmp_path, ckpt, model):
    from attnres_quant.quant.gguf_quant import gguf_roundtrip
    from attnres_quant.quant.rtn import fake_quantize_weight

    hand = {"name": "q8_head_down", "method": "rtn",
            "rules": [{"select": "lm_head", "weight": "int8", "group_size": 32},
                      {"select": "mlp.down", "weight": "int8", "group_size": 32}]}
    cfg = {"name": "mini", "seed": 0, "device": "cpu", "dtype": "float32", "model": {"path": str(ckpt)},
           "variants": [hand], "quality": {"max_tokens": 160, "seq_len": 64}, "bench": {"enabled": False}}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "runs"
    # Tight budget: both units at their cheapest level (q4_k: Q4_K on mlp.down, llama.cpp's Q5_0 on lm_head).
    tight = resolve_plan(model, parse_variant({"name": "t", "method": "rtn", "rules": [
        {"select": "lm_head", "weight": "q5_0"}, {"select": "mlp.down", "weight": "q4_k"}]})).summary()["avg_bits"]
    assert cli_main(["search", str(path), "--target-bits", f"{tight + 1e-6:.9f}", "--name", "tight", "--out",
                     str(out), "--components", "lm_head,mlp.down", "--levels", "q4_k,int8:32",
                     "--match-compared"]) == 0
    res = json.loads((out / "mini-search" / "results.json").read_text())
    policies = res["meta"]["search"]["policies"]["tiny-block"]
    assert policies["tight"]["choice"] == {"mlp.down": "q4_k", "lm_head": "q4_k"}
    matched = [p for p, s in policies.items() if s.get("matched") == ["q8_head_down"]]
    assert len(matched) == 1
    chosen_levels = set()
    for name, summary in policies.items():
        bits = res["cells"][f"tiny-block/{name}/plan"]["value"]["avg_bits"]
        assert bits <= (summary["target_bits"] + 1e-9) and bits == pytest.approx(summary["predicted_bits"])
        variant = yaml.safe_load(Path(summary["yaml"]).read_text())["variants"][0]
        q = quantize(model, parse_variant(variant))
        qparams = dict(q.model.named_parameters())
        fields = {"q4_k": {"weight": "q4_k"}, "int8g32": {"weight": "int8", "group_size": 32}, "baseline": None}
        for r in q.plan.weight_rows():
            level = summary["choice"].get(r.component, "baseline")
            chosen_levels.add(level)
            w0 = dict(model.named_parameters())[r.part.name + ".weight"].detach()
            got = qparams[r.part.name + ".weight"].detach()
            want = fields[level]
            if want is None:
                assert torch.equal(got, w0), r.name
            elif want["weight"] == "q4_k":  # the plan's type after llama.cpp's fallback, then its round trip
                assert (r.method, r.fallback or r.precision) == ("gguf", "q4_k"), r.name
                assert torch.equal(got, gguf_roundtrip(w0, r.precision.upper())), r.name
            else:
                assert (r.method, r.precision, r.resolved.group_size) == ("rtn", "int8", 32), r.name
                assert torch.equal(got, fake_quantize_weight(w0, "int8", 32, True)), r.name
    assert {"q4_k", "baseline"} <= chosen_levels
    report = (out / "mini-search.md").read_text()
    assert "Searched at each hand-written policy's bits" in report and "q8_head_down" in report


def test_noise_floor_is_not_paid_for_with_bits():
    from attnres_quant.quant.allocate import noise_floor, predicted_kl

    # Three units: at q8_0 each measures the floor (6e-5) plus a small excess; bf16 (baseline) measures 0.
    def unit(name, excess):
        return Unit(name, {"select": name}, [Option("q4", {}, 450, 0.01), Option("q8_0", {}, 850, 6e-5 + excess),
                                             Option("baseline", {}, 1600, 0.0)])
    units = [unit("a", 0.0), unit("b", 2e-5), unit("c", 1e-6)]
    floor = noise_floor(units)
    assert floor == pytest.approx(6e-5)
    target = (3 * 850 + 750) / 300  # every unit at q8_0 and room for one at bf16
    plain = allocate(units, 300, 0, target_bits=target)
    assert "baseline" in {o.level for o in plain.choice.values()}  # pays 750 bits to remove a floor
    aware = allocate(units, 300, 0, target_bits=target, floor=floor)
    # Above the floor only b's excess is worth bits; the chosen options carry their measured KL.
    assert {n: o.level for n, o in aware.choice.items()} == {"a": "q8_0", "b": "baseline", "c": "q8_0"}
    assert aware.choice["a"].kl == pytest.approx(6e-5)
    assert aware.predicted_kl == pytest.approx(floor + 1e-6) == predicted_kl(
        {"a": Option("q8_0", {}, 0, 0.0), "b": Option("baseline", {}, 0, 0.0), "c": Option("q8_0", {}, 0, 1e-6)},
        floor)
    assert aware.avg_bits <= target
    # A budget that holds every unit at bf16 keeps the model as it is: no floor at all.
    full = allocate(units, 300, 0, target_bits=16, floor=floor)
    assert {o.level for o in full.choice.values()} == {"baseline"} and full.predicted_kl == 0
