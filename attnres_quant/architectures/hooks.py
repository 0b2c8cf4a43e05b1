"""A family's own computation components (precision hooks) as the plan and the quantizer see them.

The built-in computations (``depth.softmax``, ``depth.sources``, ``attn.kv_cache``, ``attn.state``) are
handled in ``quant/plan.py`` and ``quant/apply.py``.  A family that brings new ones (mHC's ``hc.pre``,
``hc.post``, ``hc.comb``, ``hc.streams``) describes each with a :class:`PrecisionHook` in its ``Family``
record (``hooks``); the plan asks it which precision field applies and how its row reads, and the
quantizer asks it to set the hook on the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class PrecisionHook:
    """One computation component of a family."""

    field: str  # the precision field a rule sets on it: "compute" or "storage"
    suffix: str  # appended to the module name in the plan row (".comb", ".streams")
    # (resolved value or None, model dtype name) -> (precision, granularity, kept at baseline?)
    row: Callable[[str | None, str], tuple[str, str, bool]]
    # (module, resolved value or None, model torch dtype) -> None: sets (or clears) the module's hook
    apply: Callable[[Any, str | None, Any], None]


__all__ = ["PrecisionHook"]
