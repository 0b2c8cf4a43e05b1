"""``python -m attnres_quant search CONFIG --target-bits B`` (or ``--max-kl K``): a mixed-precision policy.

1. Probe every unit (component group; with ``--per-layer`` each layer of it, ``--experts`` each expert) at
   every level of the ladder (``--levels``, default :data:`DEFAULT_LEVELS`: RTN int4 group 128 / 32, llama.cpp
   Q4_K / Q5_K / Q6_K / Q8_0, int8 group 32 / per channel; the baseline is the top level), the depth path
   included: pseudo-queries and key norms as weights, the depth softmax at int8 / bf16 compute and the depth
   sources at int4 / int8 storage (``sensitivity.measure_kl``).
2. Allocate (``quant.allocate``): least predicted KL within the bit budget (bits per weight as the plan counts
   them, damage above the probes' noise floor), or fewest bits within the KL budget.
3. Verify: quantize the chosen policy and measure it the same way, beside the config's own variants and those
   of every ``--compare`` config (the hand-written policies), on the same text; with ``--match-compared`` also
   search and verify at each hand-written policy's bits.
4. Write the policy as a ready study config (``run`` loads it) and render the report
   (``<out>/<config name>-search.md``: search summary and comparison, sensitivity ranking, Pareto plot).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

from ..errors import UserError
from .runner import DEFAULT_OUT
from .sensitivity import build_probes, level_name, open_probe_store, parse_level, select_model, unit_bits

# int4 per group of 128 / 32 (RTN, bf16 scales), the llama.cpp K-quants and Q8_0 (llama-quantize's mixes are
# made of them; rows that do not fit a K-quant's super-block take llama.cpp's fallback, and a level whose plan is
# another level's on a unit is probed once), int8 per group of 32 and per channel.
DEFAULT_LEVELS = "int4:128,int4:32,q4_k,q5_k,q6_k,q8_0,int8:32,int8"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("config", help="study config YAML (models, baseline, quality, tasks); its variants are "
                                       "measured beside the searched policy")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-bits", type=_positive_float, metavar="B",
                        help="average bits per weight of the policy, as `plan` counts them (incl. scales)")
    budget.add_argument("--max-kl", type=_positive_float, metavar="K",
                        help="predicted mean KL budget (nats/token): the fewest bits that stay within it")
    parser.add_argument("--levels", default=DEFAULT_LEVELS, metavar="P[:G],...",
                        help=f"weight precisions each unit may take, besides the baseline (default {DEFAULT_LEVELS})")
    parser.add_argument("--per-layer", action="store_true", help="choose per layer (more probes)")
    parser.add_argument("--experts", action="store_true", help="choose per routed expert (MoE models)")
    parser.add_argument("--components", default=None, metavar="C1,C2",
                        help="search only these components (globs); the others stay at the baseline")
    parser.add_argument("--compare", action="append", default=[], metavar="CONFIG",
                        help="also measure the variants of this config (repeatable), e.g. configs/deployment.yaml")
    parser.add_argument("--match-compared", action="store_true",
                        help="also search at the bits per weight of every compared (hand-written) policy and "
                             "verify each: the report's matched-budget table (searched-<bits>bpw policies)")
    parser.add_argument("--model", default=None, help="the model to search (default: the config's first)")
    parser.add_argument("--name", default=None, help="name of the policy (default searched-<B>bpw / searched-kl<K>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for `run` (e.g. --set tasks=[] for KL only)")
    parser.add_argument("--resume", action="store_true", help="reuse the probes already in results.json")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT}/, as `run`)")


def policy_name(args) -> str:
    from .config import check_slug

    if args.name:
        try:
            return check_slug(args.name, "--name")
        except ValueError as exc:
            raise UserError(str(exc), "command line", "pass a name such as searched-4.5bpw") from None
    return f"searched-{args.target_bits:g}bpw" if args.target_bits is not None else f"searched-kl{args.max_kl:g}"


# --------------------------------------------------------------------------- hand-written policies
def compared_variants(config, compare_paths: list[str], skeleton, source: str, taken: set[str]):
    """The config's own variants and those of each --compare config (named CONFIG.VARIANT), each checked
    against the searched model; a variant that does not apply to it is left out with a note."""
    from ..quant import parse_variant, resolve_plan
    from .config import load_config

    raw_items = [(source, v.get("name"), v) for v in config.variants]
    for path in compare_paths:
        other, _ = load_config(path)
        raw_items += [(path, f"{other.name}.{v.get('name')}", v) for v in other.variants]
    out, notes = [], []
    for where, name, item in raw_items:
        if name in taken:
            continue
        variant = parse_variant({**item, "name": name}, source=where)
        try:
            resolve_plan(skeleton, variant, source=where)
        except UserError as exc:
            notes.append(f"{name}: not applicable ({exc.what})")
            continue
        taken.add(name)
        out.append(variant)
    return out, notes


# --------------------------------------------------------------------------- allocation input
def build_units(store, label: str, records: dict, model, source: str):
    """quant.allocate Units from the measured probes: per unit, its levels (bits from the plan, KL from the
    probe's quality cell) plus the baseline level (KL 0), on the loaded model (its dtype sets the baseline bits and
    the scale overhead). Returns (units, n_weights, fixed_bits)."""
    from ..quant import Variant, parse_variant, resolve_plan
    from ..quant.allocate import Option, Unit
    from .sensitivity import probe_variant, ProbeUnit

    base_plan = resolve_plan(model, Variant(name="baseline", method="none"))
    base_rows = {r.name: r for r in base_plan.weight_rows() if r.tied_to is None}
    n_weights = base_plan.summary()["n_weights"]
    by_unit: dict[str, list[tuple[str, dict]]] = {}
    for name, rec in records.items():
        by_unit.setdefault(rec["unit"], []).append((name, rec))
    units, covered = [], set()
    for unit_name, items in by_unit.items():
        rec0 = items[0][1]
        unit = ProbeUnit(unit_name, rec0["component"], rec0["layer"], rec0["expert"])
        options, rows = [], None
        for name, rec in items:
            q = store.get(label, name, "quality")
            if not q or q.get("status") != "ok":
                continue  # a failed probe: that level is not offered
            plan = resolve_plan(model, parse_variant(probe_variant(unit, rec["fields"]), source=source))
            bits, rows = unit_bits(plan, rows)
            options.append(Option(rec["level"], rec["fields"], 0.0 if unit.free else bits,
                                  q["value"]["kl_mean"], q["value"].get("kl_sem") or 0.0))
        rows = rows or set()
        covered |= rows
        base_bits = sum(base_rows[r].numel * base_rows[r].bits for r in rows if r in base_rows)
        options.append(Option("baseline", {}, 0.0 if unit.free else base_bits, 0.0, 0.0))
        units.append(Unit(unit_name, unit.selectors(), options, free=unit.free))
    fixed = sum(r.numel * r.bits for name, r in base_rows.items() if name not in covered)
    return units, n_weights, fixed


def policy_variant(name: str, allocation, units) -> dict:
    """The chosen levels as one variant (method rtn): a rule per (component, expert, level), layers merged."""
    merged: dict[tuple, dict] = {}
    for unit in units:
        opt = allocation.choice[unit.name]
        if opt.level == "baseline":
            continue
        sel = unit.select
        key = (sel["select"], tuple(sel.get("experts") or ()), tuple(sorted(opt.fields.items())))
        rule = merged.setdefault(key, {"select": sel["select"], **({"layers": []} if "layers" in sel else {}),
                                       **({"experts": sel["experts"]} if "experts" in sel else {}), **opt.fields})
        if "layers" in sel:
            rule["layers"] = sorted(set(rule["layers"]) | set(sel["layers"]))
    return {"name": name, "method": "rtn", "rules": list(merged.values())}


def write_policy_yaml(path: Path, raw: dict, spec_index: int, variant: dict, summary: str,
                      original_tasks: list | None = None) -> None:
    """A ready study config: the source config's settings, the searched model only, the policy as its variant."""
    from .results import atomic_write_text

    study = copy.deepcopy(raw)
    models = ([study.pop("model")] if study.get("model") else []) + list(study.get("models") or [])
    study["models"] = [models[spec_index]]
    study["name"] = f"{variant['name']}"
    study["description"] = (f"Policy found by `search` ({summary}); run it with "
                            f"`python -m attnres_quant run {path.as_posix()}`.")
    study["variants"] = [variant]
    if not study.get("tasks") and original_tasks:  # `--set tasks=[]` searched on KL alone; `run` needs tasks
        study["tasks"] = original_tasks
    header = "# Written by `python -m attnres_quant search`; a study config `run` loads as it is.\n"
    atomic_write_text(path, header + yaml.safe_dump(study, sort_keys=False, width=110))


# --------------------------------------------------------------------------- verb
def main(args) -> int:
    from ..loading import structure_model
    from ..quant import parse_variant
    from ..quant.allocate import allocate
    from .config import load_config
    from .lock import StudyLock
    from .runner import _log, quiet_libraries, resolve_device

    quiet_libraries()
    source = str(args.config)
    config, raw = load_config(args.config, args.set)
    device = resolve_device(args.device or config.device)
    spec = select_model(config, args.model, source)[0] if args.model else config.models[0]
    if not args.model and len(config.models) > 1:
        _log(f"searching for {spec.label}, the config's first model (--model chooses another)")
    spec_index = [m.label for m in config.models].index(spec.label)
    levels = [parse_level(t) for t in args.levels.split(",") if t.strip()]
    if not levels:
        raise UserError("--levels names no precision", "command line", f"e.g. --levels {DEFAULT_LEVELS}")
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    name = policy_name(args)
    skeleton = structure_model(spec.path, trust_remote_code=spec.trust_remote_code, dtype=config.dtype)
    records, probe_vs = build_probes(skeleton, levels, per_layer=args.per_layer, experts=args.experts,
                                     components=components, source=f"{source} (model {spec.label})")
    compared, notes = compared_variants(config, args.compare, skeleton, source, set(records) | {name,
                                                                                                config.baseline.name})
    for note in notes:
        _log(note)
    options = {"levels": [level_name(f) for f in levels], "per_layer": args.per_layer, "experts": args.experts,
               "components": components, "model": spec.label, "compare": list(args.compare),
               "target_bits": args.target_bits, "max_kl": args.max_kl, "policy": name}
    placeholder = parse_variant({"name": name, "method": "none"})
    config.models = [spec]
    # The budget is not part of the fingerprint: a search at another budget resumes the same probes.
    probe_options = {k: v for k, v in options.items() if k not in ("target_bits", "max_kl", "policy")}
    store, study_dir = open_probe_store(config, raw, args, source, device, "search", probe_options,
                                        [placeholder] + compared + probe_vs)
    with StudyLock(study_dir):
        from .sensitivity import ProbeContext

        earlier = dict(((store.meta.get("search") or {}).get("policies") or {}).get(spec.label) or {})
        store.meta["search"] = {"options": options, "probes": {spec.label: records},
                                "policies": {spec.label: earlier}}
        store.meta["variants"] = [name] + [p for p in earlier if p != name] + [v.name for v in compared + probe_vs]
        store.save()
        ctx = ProbeContext(store, config, spec, device, source)
        ctx.baseline_cells()
        for i, variant in enumerate(probe_vs):
            if not ctx.cells_done(variant.name):
                _log(f"{spec.label}: probe {i + 1}/{len(probe_vs)} {variant.name}")
            ctx.measure(variant)
        units, n_weights, fixed = build_units(store, spec.label, records, ctx.baseline, source)
        run = SearchRun(store, ctx, units, n_weights, fixed, raw, spec_index, study_dir, args, source, options)
        summary = run.policy(name, args.target_bits, args.max_kl, required=True)
        for variant in compared:
            if not ctx.cells_done(variant.name):
                _log(f"{spec.label}: hand-written policy {variant.name}")
            ctx.measure(variant)
        if args.match_compared:
            for target, names in matched_targets(ctx.baseline, compared, source).items():
                run.policy(f"searched-{target:.3f}bpw", target, None, matched=names)
        summary["compared"], summary["notes"] = [v.name for v in compared], notes
        store.meta["search"]["models"] = {spec.label: summary}
        store.meta["search"]["policies"][spec.label][name] = summary
        store.save()
        from ..report.render import render_report

        report = render_report(study_dir / "results.json", Path(args.out) / f"{study_dir.name}.md")
    print_summary(store, spec.label, name, compared, args.target_bits, run.matched)
    _log(f"policy: {summary['yaml']}; report: {report}")
    return 0


class SearchRun:
    """Allocate, verify and write policies of one searched model (the main budget and, with --match-compared,
    one per hand-written policy's bits), all from the same measured units."""

    def __init__(self, store, ctx, units, n_weights, fixed, raw, spec_index, study_dir, args, source, options):
        self.store, self.ctx, self.units, self.n_weights, self.fixed = store, ctx, units, n_weights, fixed
        self.raw, self.spec_index, self.study_dir, self.args, self.source = raw, spec_index, study_dir, args, source
        self.options = options
        self.matched: dict[str, list[str]] = {}  # searched policy -> hand-written policies at its bits

    def policy(self, name: str, target_bits, max_kl, *, required: bool = False, matched: list[str] | None = None):
        """Allocate at the budget, measure the policy, write its YAML; the summary (None when nothing fits and
        the budget is not ``required``: a hand-written policy below the cheapest levels)."""
        from .. import safe_yaml
        from ..quant import parse_variant
        from ..quant.allocate import allocate, noise_floor
        from .runner import _log

        label, store = self.ctx.label, self.store
        floor = noise_floor(self.units)
        try:
            alloc = allocate(self.units, self.n_weights, self.fixed, target_bits=target_bits, max_kl=max_kl,
                             floor=floor)
        except ValueError as exc:
            if not required:
                _log(f"{label}: no searched policy at {target_bits:.3f} bits/weight ({exc})")
                return None
            raise UserError(f"no policy fits: {exc}", "command line (--target-bits)",
                            "raise --target-bits, or add a cheaper level to --levels (e.g. int4:128 or int4 "
                            "per channel, `int4`)") from None
        policy = policy_variant(name, alloc, self.units)
        policies = store.meta["search"]["policies"][label]
        if name in policies and policies[name].get("variant") != policy:  # same name, another policy: anew
            for key in [k for k in store.cells if k.startswith(f"{label}/{name}/")]:
                del store.cells[key]
        if name not in store.meta["variants"]:
            store.meta["variants"].append(name)
        _log(f"{label}: policy {name}: {alloc.avg_bits:.3f} bits/weight, predicted KL {alloc.predicted_kl:.5f}; "
             "verifying")
        self.ctx.measure(parse_variant(policy, source=f"{self.source} (searched policy)"))
        yaml_path = self.study_dir / f"{name}.yaml"
        budget = f"target {target_bits:g} bits/weight" if target_bits is not None else f"KL budget {max_kl}"
        original = safe_yaml.read_file(Path(self.args.config), "study config") or {}
        write_policy_yaml(yaml_path, self.raw, self.spec_index, policy, f"{budget}, {alloc.avg_bits:.3f} bits/weight",
                          original.get("tasks") if isinstance(original, dict) else None)
        summary = {
            "policy": name, "target_bits": target_bits, "max_kl": max_kl, "levels": self.options["levels"],
            "n_units": len(self.units), "predicted_kl": alloc.predicted_kl, "predicted_bits": alloc.avg_bits,
            "noise_floor": floor,
            "choice": {u: o.level for u, o in alloc.choice.items()}, "kept": kept_above_cheapest(alloc, self.units),
            "steps": alloc.steps, "variant": policy, "yaml": yaml_path.as_posix()}
        if matched is not None:
            summary["matched"] = matched
            self.matched[name] = matched
        policies[name] = summary
        store.save()
        return summary


def matched_targets(model, compared, source: str) -> dict[float, list[str]]:
    """{bits per weight: [hand-written policies]}: the plan's bits of each compared policy on the searched model
    (``Plan.summary()``, the count every policy and every probe is given), policies within 0.0005 bits of each
    other sharing the smallest of their counts."""
    from ..quant import resolve_plan

    by_bits = sorted((resolve_plan(model, v, source=source).summary()["avg_bits"], v.name) for v in compared)
    groups: dict[float, list[str]] = {}
    for bits, vname in by_bits:
        near = [b for b in groups if abs(b - bits) < 5e-4]
        groups.setdefault(near[0] if near else bits, []).append(vname)
    return groups


def kept_above_cheapest(alloc, units) -> dict[str, str]:
    """{unit: chosen level} of the units not at their cheapest level (weights: fewest bits; computations: the
    first, lowest-precision level of their ladder)."""
    kept = {}
    for u in units:
        cheapest = u.options[0] if u.free else min(u.options, key=lambda o: (o.bits, -o.kl))
        if alloc.choice[u.name].level != cheapest.level:
            kept[u.name] = alloc.choice[u.name].level
    return kept


def print_summary(store, label: str, name: str, compared, target_bits, matched=None) -> None:
    def row(v):
        q = (store.get(label, v, "quality") or {}).get("value") or {}
        p = (store.get(label, v, "plan") or {}).get("value") or {}
        return p.get("avg_bits"), q.get("kl_mean"), q.get("kl_sem")

    bits, kl, sem = row(name)
    if bits is None or kl is None:
        print(f"\nthe searched policy {name} failed to run; see the report")
        return
    meets = "meets" if target_bits is None or bits <= target_bits + 1e-9 else "DOES NOT meet"
    print(f"\n{name}: {bits:.3f} bits/weight ({meets} the budget), measured KL {kl:.5f} ± {sem:.5f}")
    at_bits = {h: p for p, hs in (matched or {}).items() for h in hs}
    for v in compared:
        b, k, s = row(v.name)
        if b is None or k is None:
            print(f"  {v.name:<40} failed")
            continue
        line = (f"  {v.name:<40} {b:7.3f} bits  KL {k:.5f} ± {s:.5f}  {name} KL <= this: "
                f"{'yes' if kl <= k else 'no'}")
        if v.name in at_bits:
            mb, mk, _ = row(at_bits[v.name])
            if mb is not None and mk is not None:
                line += (f"; {at_bits[v.name]} ({mb:.3f} bits) KL {mk:.5f}: "
                         f"{'<=' if mk <= k and mb <= b + 1e-9 else 'NOT <='}")
        print(line)
