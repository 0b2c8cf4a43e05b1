"""Mixed-precision allocation: pick one precision level per unit (a component group, or one layer /
expert of it) under a budget, from measured per-unit damage.

The model of the damage is the usual additive one (HAWQ, llama-quantize's target-bpw, ModelOpt
AutoQuantize): quantizing several units costs about the sum of the KLs each costs alone. The
search verb checks the prediction with a real measurement of the chosen policy.

Algorithm: greedy on the lower convex hull of each unit's (bits, KL) options ("KL saved per bit").
Every unit starts at its cheapest level; the upgrades (hull steps) of all units are taken in order
of KL saved per extra bit, skipping a step that does not fit the budget (and the later steps of
that unit, which build on it). With a bit budget this is the Lagrangian solution at every
multiplier the budget passes through, and it also spends the budget the Lagrangian leaves over
when the next multiplier's step does not fit. With a KL budget (``max_kl``) the same order is
followed until the predicted KL is within the budget, so the fewest bits are spent.

**Noise floor.** Any perturbation of a bf16 model -- int8 on one projection, the depth softmax in bf16 --
moves the logits by a small, nearly constant KL (bf16 rounding cascades; ~6e-5 nats/token on tiny-block),
and that floor does not add up over units: quantizing all of them at Q8_0 measures about one floor plus the
units' excesses, not one floor per unit. With ``floor`` (``noise_floor``: the least KL any probe measured) a
unit's damage is its *excess* over the floor, and the prediction is the floor plus the summed excesses (when
anything is quantized). Without it the allocation pays for bf16 units only to remove floors that do not add.

*Free* units (depth.softmax, depth.sources: computations, no stored weights, so they cost no bits
as the plan counts them) are decided apart: such a unit is kept at its highest level when lowering
it does measurable damage (KL above ``noise_sigmas`` standard errors), else lowered (runtime
memory and speed are then saved for nothing in quality).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Option:
    """One precision level of a unit: its precision fields (a rule's keys), the unit's weight bits
    (numel x bits per weight, summed over its tensors) and the damage measured with only this unit
    at this level (KL mean and its standard error; 0 for the baseline level)."""

    level: str
    fields: dict
    bits: float
    kl: float
    kl_sem: float = 0.0


@dataclass
class Unit:
    name: str
    select: dict  # rule selectors: {select, layers?, experts?}
    options: list[Option]
    free: bool = False  # a computation: no weight bits


@dataclass
class Allocation:
    choice: dict[str, Option]
    total_bits: float  # weight bits of all units + the fixed (unsearched) weights
    n_weights: int
    predicted_kl: float
    steps: list[str] = field(default_factory=list)  # the upgrades taken, in order

    @property
    def avg_bits(self) -> float:
        return self.total_bits / self.n_weights if self.n_weights else 0.0


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bits, KL), cheapest first; dominated ones dropped."""
    pts = sorted(options, key=lambda o: (o.bits, o.kl))
    kept: list[Option] = []
    for o in pts:
        if kept and o.kl >= kept[-1].kl:  # more bits, no less damage: dominated
            continue
        while len(kept) >= 2 and _cross(kept[-2], kept[-1], o) <= 0:
            kept.pop()  # kept[-1] lies above the segment kept[-2] -> o
        kept.append(o)
    return kept


def _cross(a: Option, b: Option, c: Option) -> float:
    return (b.bits - a.bits) * (c.kl - a.kl) - (b.kl - a.kl) * (c.bits - a.bits)


def _free_choice(unit: Unit, noise_sigmas: float) -> Option:
    """The cheapest-in-runtime level whose damage is within noise, else the most precise one."""
    by_damage = sorted(unit.options, key=lambda o: o.kl)
    best = by_damage[0]
    for o in unit.options:  # options are listed low precision first
        if o.kl - best.kl <= noise_sigmas * max(o.kl_sem, 1e-12):
            return o
    return best


def noise_floor(units: list[Unit]) -> float:
    """The least KL measured by any probe (a unit at a level other than its baseline): the floor of a perturbation."""
    kls = [o.kl for u in units for o in u.options if o.level != "baseline"]
    return max(min(kls), 0.0) if kls else 0.0


def _excess(unit: Unit, floor: float) -> Unit:
    if not floor or unit.free:
        return unit
    return Unit(unit.name, unit.select, [o if o.level == "baseline" else replace(o, kl=max(o.kl - floor, 0.0))
                                         for o in unit.options], unit.free)


def predicted_kl(choice: dict[str, Option], floor: float = 0.0) -> float:
    """Summed damage of the chosen levels (excesses over ``floor``), plus the floor when anything is lowered."""
    lowered = any(o.level != "baseline" for o in choice.values())
    return sum(o.kl for o in choice.values()) + (floor if lowered else 0.0)


def allocate(units: list[Unit], n_weights: int, fixed_bits: float = 0.0, *, target_bits: float | None = None,
             max_kl: float | None = None, noise_sigmas: float = 2.0, floor: float = 0.0) -> Allocation:
    """Choose a level per unit: least predicted KL with average bits <= ``target_bits``, or fewest bits with
    predicted KL <= ``max_kl``; damage is counted above ``floor`` (module doc). Raises ValueError when even the
    cheapest levels exceed the bit budget. The chosen Options carry their measured KL."""
    if (target_bits is None) == (max_kl is None):
        raise ValueError("give exactly one of target_bits and max_kl")
    measured = {u.name: {o.level: o for o in u.options} for u in units}
    excess = [_excess(u, floor) for u in units]
    alloc = _allocate(excess, n_weights, fixed_bits, target_bits, max_kl, noise_sigmas, floor)
    if floor and alloc.predicted_kl > 0:  # the floor is paid once, unless nothing is lowered: is that affordable?
        keep = {u.name: next((o for o in u.options if o.level == "baseline"), None) for u in excess if not u.free}
        bits = fixed_bits + sum(o.bits for o in keep.values() if o is not None)
        fits = target_bits is None or bits <= target_bits * n_weights * (1 + 1e-12)
        if all(keep.values()) and fits and (max_kl is None or alloc.predicted_kl > max_kl):
            choice = {**alloc.choice, **keep}
            alloc = Allocation(choice, bits, n_weights, predicted_kl(choice, floor), alloc.steps + ["all baseline"])
    alloc.choice = {name: measured[name][o.level] for name, o in alloc.choice.items()}
    return alloc


def _allocate(units, n_weights, fixed_bits, target_bits, max_kl, noise_sigmas, floor) -> Allocation:
    choice: dict[str, Option] = {}
    hulls: dict[str, list[Option]] = {}
    for u in units:
        if u.free:
            choice[u.name] = _free_choice(u, noise_sigmas)
        else:
            hulls[u.name] = lower_hull(u.options)
            choice[u.name] = hulls[u.name][0]
    bits = fixed_bits + sum(o.bits for o in choice.values())
    budget = None if target_bits is None else target_bits * n_weights
    if budget is not None and bits > budget * (1 + 1e-12):
        raise ValueError(f"the cheapest level of every unit already takes {bits / n_weights:.3f} bits per weight, "
                         f"above the target {target_bits}")
    steps = []
    for name, hull in hulls.items():
        for a, b in zip(hull, hull[1:]):
            steps.append(((a.kl - b.kl) / (b.bits - a.bits), name, a, b))
    steps.sort(key=lambda s: (-s[0], s[1], s[3].bits))
    blocked: set[str] = set()
    taken = []
    for _slope, name, a, b in steps:
        if name in blocked or choice[name] is not a:
            continue
        if max_kl is not None and predicted_kl(choice, floor) <= max_kl:
            break
        extra = b.bits - a.bits
        if budget is not None and bits + extra > budget * (1 + 1e-12):
            blocked.add(name)
            continue
        choice[name] = b
        bits += extra
        taken.append(f"{name}: {a.level} -> {b.level}")
    return Allocation(choice, bits, n_weights, predicted_kl(choice, floor), taken)
