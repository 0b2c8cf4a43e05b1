"""Issue 18 items 3-5: the sensitivity verb, the mixed-precision search and their report parts.

A tiny random AttnRes checkpoint (2 layers, hidden 64) keeps every probe under a second."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from attnres_quant.cli import main as cli_main
from attnres_quant.quant.allocate import Option, Unit, allocate, lower_hull

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to a busy machine


# --------------------------------------------------------------------------- allocation (pure)
def _unit(name, pts, free=False):
    return Unit(name, {"select": name}, [Option(lvl, {}, b, kl, sem) for lvl, b, kl, sem in pts], free=free)


def brute_force(units, n, fixed, target):
    import itertools

    best = None
    for combo in itertools.product(*[u.options for u in units]):
        bits = fixed + sum(o.bits for o in combo)
        if bits <= target * n + 1e-9:
            kl = sum(o.kl for o in combo)
            best = kl if best is None else min(best, kl)
    return best


def test_allocation_meets_the_budget_and_matches_brute_force_on_convex_units():
    units = [_unit("a", [("int4", 400, 0.05, 0), ("int8", 800, 0.004, 0), ("baseline", 1600, 0, 0)]),
             _unit("b", [("int4", 400, 0.01, 0), ("int8", 800, 0.001, 0), ("baseline", 1600, 0, 0)]),
             _unit("c", [("int4", 200, 0.30, 0), ("int8", 400, 0.01, 0), ("baseline", 800, 0, 0)])]
    n = 300
    for target in (3.7, 4.0, 5.0, 6.0, 8.0, 12.0, 14.0):
        alloc = allocate(units, n, 100, target_bits=target)
        assert alloc.avg_bits <= target + 1e-9
        assert alloc.predicted_kl == pytest.approx(brute_force(units, n, 100, target))
    # The most damaging part per bit (c) is upgraded first.
    assert allocate(units, n, 100, target_bits=4.5).choice["c"].level == "int8"
    with pytest.raises(ValueError, match="cheapest level"):
        allocate(units, n, 100, target_bits=3.6)


def test_kl_budget_spends_the_fewest_bits():
    units = [_unit("a", [("int4", 400, 0.05, 0), ("int8", 800, 0.004, 0)]),
             _unit("b", [("int4", 400, 0.01, 0), ("int8", 800, 0.001, 0)])]
    alloc = allocate(units, 200, 0, max_kl=0.02)
    assert alloc.predicted_kl <= 0.02 and alloc.choice["b"].level == "int4"  # upgrading a alone suffices


def test_hull_drops_dominated_and_concave_levels():
    opts = [Option("x", {}, 1, 1.0), Option("y", {}, 2, 0.9), Option("z", {}, 3, 0.0), Option("w", {}, 4, 0.5)]
    assert [o.level for o in lower_hull(opts)] == ["x", "z"]


def test_free_parts_stay_high_only_when_lowering_them_measurably_hurts():
    hurts = _unit("depth.sources", [("s-int4", 0, 0.04, 0.001), ("s-int8", 0, 0.0003, 0.0001),
                                    ("baseline", 0, 0, 0)], free=True)
    noise = _unit("depth.softmax", [("c-int8", 0, 0.00001, 0.00002), ("baseline", 0, 0, 0)], free=True)
    alloc = allocate([hurts, noise], 10, 40, target_bits=4)
    assert alloc.choice["depth.sources"].level == "baseline"
    assert alloc.choice["depth.softmax"].level == "c-int8"


# --------------------------------------------------------------------------- verbs on a tiny checkpoint
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from attnres_quant.evaluation.testing import write_tiny_attnres

    return write_tiny_attnres(tmp_path_factory.mktemp("ckpt") / "tiny-block", intermediate_size=128)


def config(tmp_path, ckpt, **over):
    cfg = {"name": "mini", "seed": 0, "device": "cpu", "dtype": "float32", "model": {"path": str(ckpt)},
           "variants": [{"name": "int4_all", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
                         "rules": [{"select": "depth.*", "weight": "int4", "group_size": 32},
                                   {"select": "depth.sources", "storage": "int4"}]},
                        {"name": "w8", "method": "rtn", "default": {"weight": "int8"}}],
           "quality": {"max_tokens": 160, "seq_len": 64}, "bench": {"enabled": False}}
    cfg.update(over)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_measure_kl_is_the_quality_steps_kl_with_its_standard_error(tiny_ckpt):
    from attnres_quant.evaluation import quality
    from attnres_quant.loading import load_model
    from attnres_quant.pipeline.sensitivity import measure_kl
    from attnres_quant.quant import parse_variant, quantize

    base, tok = load_model(str(tiny_ckpt), dtype="float32")
    q = quantize(base, parse_variant({"name": "x", "method": "rtn", "default": {"weight": "int4", "group_size": 32}}))
    ids = torch.randint(3, len(tok), (1, 150), generator=torch.Generator().manual_seed(0))
    ours = measure_kl(base, q.model, tok, ids, seq_len=64)
    ref = quality(base, q.model, tok, ids.flatten().tolist(), seq_len=64)
    for key in ("kl_mean", "kl_p50", "kl_p90", "kl_p99", "kl_max", "top1_agreement"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    assert ours["tokens"] == ref["tokens"] == 150
    # The standard error is the sample standard deviation over sqrt(n), from per-token KL.
    from attnres_quant.evaluation.metrics import kl_per_token

    with torch.no_grad():
        ids_b = torch.cat([torch.tensor([[tok.bos_token_id]]), ids[:, :64]], 1)
        per_tok = kl_per_token(base(ids_b).logits[0, :-1], q.model(ids_b).logits[0, :-1]).double()
    assert ours["kl_sem"] > 0 and ours["kl_sem"] < ours["kl_mean"]
    assert per_tok.numel() == 64  # first window alone: its KL values are part of the 150


def test_sensitivity_ranks_every_part_with_depth_beside_projections_and_resumes(tmp_path, tiny_ckpt):
    out = tmp_path / "reports"
    assert cli_main(["sensitivity", str(config(tmp_path, tiny_ckpt)), "--out", str(out)]) == 0
    res = json.loads((out / "mini-sensitivity" / "results.json").read_text())
    probes = res["meta"]["sensitivity"]["probes"]["tiny-block"]
    units = {p["unit"] for p in probes.values()}
    assert {"attn.q", "mlp.down", "embed", "lm_head", "depth.query", "depth.key_norm", "depth.softmax",
            "depth.sources"} <= units
    # One probe per part at the target: int4 g32 weights, int8 depth logits, int4 stored sources.
    assert {p["level"] for p in probes.values()} == {"int4g32", "c-int8", "s-int4"} and len(probes) == len(units)
    for name in probes:
        cell = res["cells"][f"tiny-block/{name}/quality"]
        assert cell["status"] == "ok" and cell["value"]["kl_sem"] >= 0, name
    # The probe changes exactly its part: lm_head int4 g32 changes the lm_head only (plan).
    plan = res["cells"]["tiny-block/lm_head.int4g32/plan"]["value"]
    assert plan["weights_by_precision"].get("int4") == 320 * 64
    report = (out / "mini-sensitivity.md").read_text()
    assert "Sensitivity ranking (one part at a time)" in report and "sensitivity_ranked_tiny-block.png" in report
    assert (out / "mini-sensitivity" / "sensitivity_ranked_tiny-block.png").stat().st_size > 1000
    # --resume finds every probe done and measures nothing again.
    before = {k: v["value"] for k, v in res["cells"].items()}
    assert cli_main(["sensitivity", str(config(tmp_path, tiny_ckpt)), "--out", str(out), "--resume"]) == 0
    after = json.loads((out / "mini-sensitivity" / "results.json").read_text())
    assert {k: v["value"] for k, v in after["cells"].items()} == before


def test_sensitivity_per_layer_probes_one_layer(tmp_path, tiny_ckpt):
    out = tmp_path / "reports"
    assert cli_main(["sensitivity", str(config(tmp_path, tiny_ckpt)), "--out", str(out), "--per-layer",
                     "--components", "mlp.down", "--target", "int8", "--per-channel"]) == 0
    res = json.loads((out / "mini-sensitivity" / "results.json").read_text())
    names = sorted(res["meta"]["sensitivity"]["probes"]["tiny-block"])
    assert names == ["mlp.down.L0.int8", "mlp.down.L1.int8"]
    plan = res["cells"]["tiny-block/mlp.down.L1.int8/plan"]["value"]
    assert plan["weights_by_precision"]["int8"] == 64 * 128


def test_search_meets_the_budget_verifies_and_writes_a_runnable_policy(tmp_path, tiny_ckpt):
    out = tmp_path / "reports"
    cfg = config(tmp_path, tiny_ckpt)
    levels = ["--levels", "int4:32,int8"]  # two levels (and the baseline) keep the probes few
    assert cli_main(["search", str(cfg), "--target-bits", "6", "--out", str(out), *levels]) == 0
    res = json.loads((out / "mini-search" / "results.json").read_text())
    s = res["meta"]["search"]["models"]["tiny-block"]
    plan = res["cells"]["tiny-block/searched-6bpw/plan"]["value"]
    assert plan["avg_bits"] <= 6 and plan["avg_bits"] == pytest.approx(s["predicted_bits"], rel=1e-9)
    q = res["cells"]["tiny-block/searched-6bpw/quality"]["value"]
    assert q["kl_mean"] > 0 and q["kl_sem"] > 0
    assert set(s["compared"]) == {"int4_all", "w8"}
    policy = Path(s["yaml"])
    assert policy.is_file()
    from attnres_quant.pipeline.config import load_config
    from attnres_quant.pipeline.runner import validate_variants

    loaded, _ = load_config(policy)
    assert [v.name for v in validate_variants(loaded, str(policy))] == ["searched-6bpw"]
    report = (out / "mini-search.md").read_text()
    assert "Mixed-precision search" in report and "pareto_tiny-block.png" in report
    assert "KL percentiles" in report
    # Another budget resumes the same probes (nothing re-measured) and keeps the first policy beside the new one.
    probe_cells = {k: v for k, v in res["cells"].items() if ".int4g32/" in k or ".int8/" in k}
    assert cli_main(["search", str(cfg), "--target-bits", "9", "--out", str(out), "--resume", *levels]) == 0
    res9 = json.loads((out / "mini-search" / "results.json").read_text())
    assert {k: res9["cells"][k] for k in probe_cells} == probe_cells
    assert set(res9["meta"]["search"]["policies"]["tiny-block"]) == {"searched-6bpw", "searched-9bpw"}
    assert res9["cells"]["tiny-block/searched-9bpw/quality"]["value"]["kl_mean"] < q["kl_mean"]
    assert "searched-6bpw (searched earlier)" in (out / "mini-search.md").read_text()
    # The policy runs as a study (`run` on the written YAML): same bits as the search measured.
    assert cli_main(["run", str(policy), "--out", str(tmp_path / "r2"), "--tasks", "proxy_mc", "--limit", "4"]) == 0
    run_res = json.loads((tmp_path / "r2" / "searched-6bpw" / "results.json").read_text())
    assert run_res["cells"]["tiny-block/searched-6bpw/plan"]["value"]["avg_bits"] == pytest.approx(plan["avg_bits"])
    assert run_res["cells"]["tiny-block/searched-6bpw/quality"]["value"]["kl_mean"] == pytest.approx(q["kl_mean"],
                                                                                                      rel=1e-6)


def test_search_errors_are_one_paragraph(tmp_path, tiny_ckpt, capsys):
    cfg = config(tmp_path, tiny_ckpt)
    assert cli_main(["search", str(cfg), "--target-bits", "2", "--out", str(tmp_path / "o"),
                     "--components", "lm_head", "--levels", "int8"]) == 2
    err = capsys.readouterr().err
    assert "no policy fits" in err and "Fix:" in err and "Traceback" not in err
    assert cli_main(["search", str(cfg), "--target-bits", "4", "--levels", "int5"]) == 2
    assert "unknown weight precision" in capsys.readouterr().err


def test_experts_and_layers_make_one_unit_each_on_a_moe_model():
    from attnres_quant.architectures.kimi_testing import tiny_kimi
    from attnres_quant.pipeline.sensitivity import probe_units
    from attnres_quant.quant import parse_variant, resolve_components, resolve_plan

    model = tiny_kimi()
    parts = resolve_components(model)
    units = probe_units(parts, experts=True)
    expert_parts = {(p.component, p.layer, p.expert) for p in parts if p.expert is not None}
    expert_units = [u for u in units if u.expert is not None]
    assert expert_parts and {(u.component, u.layer, u.expert) for u in expert_units} == expert_parts
    # One expert's probe quantizes exactly that expert's tensor.
    u = expert_units[0]
    plan = resolve_plan(model, parse_variant({"name": "p", "method": "rtn",
                                              "rules": [{**u.selectors(), "weight": "int8"}]}))
    changed = [r for r in plan.weight_rows() if r.precision == "int8"]
    assert [(r.component, r.layer, r.part.expert) for r in changed] == [(u.component, u.layer, u.expert)]
    assert not any(u.component in ("norm", "attn.state") for u in units)
