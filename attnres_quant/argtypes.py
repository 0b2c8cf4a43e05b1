"""argparse value types shared by the verbs (one clear line per bad value)."""

from __future__ import annotations

import argparse


def int_in(low: int, high: int | None = None):
    """argparse type: a whole number in [low, high] (``high`` None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {bound})")
        return value
    parse.__name__ = "integer"
    return parse


def limit_value(text: str) -> int | float:
    """argparse type of ``--limit``: N samples (N >= 1) or a fraction 0 < x < 1 of each task (lm-eval's rule)."""
    from .pipeline.config import check_limit

    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write e.g. 20 or 0.1)") from None
    try:
        return check_limit(int(number) if number.is_integer() else number)
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


limit_value.__name__ = "limit"
