"""Constructor argument checks shared by the modules and models: each error names the argument, the value given
and what is allowed, at construction rather than deep inside torch at the first forward."""
from __future__ import annotations

import math
import numbers


def check_int(name: str, value, minimum: int) -> int:
    """`value` is an integer (not a bool, float or string) >= minimum; returns it as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value, *, low: float, high: float = math.inf, low_inclusive: bool = True,
               high_inclusive: bool = True) -> float:
    """`value` is a finite real number (not a bool) in [low, high], ends excluded where told."""
    closed_high = high_inclusive and math.isfinite(high)
    interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r} ({type(value).__name__})")
    inside = (value >= low if low_inclusive else value > low) and (value <= high if closed_high else value < high)
    if not inside or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_probability(name: str, value, *, one_allowed: bool = True) -> float:
    """A dropout-style rate in [0, 1] (or [0, 1) where a rate of 1 has no meaning for the op)."""
    return check_real(name, value, low=0.0, high=1.0, high_inclusive=one_allowed)


def check_heads(dim_name: str, dim: int, heads_name: str, heads: int):
    """Multi-head attention splits the embedding evenly: dim must be a multiple of the head count."""
    if dim % heads:
        raise ValueError(f"{dim_name} ({dim}) must be divisible by {heads_name} ({heads}); "
                         f"{dim_name} / {heads_name} is the head dimension")


def check_image_size(value) -> tuple[int, int]:
    """img_size: an int (square) or a (height, width) pair of ints, each >= 1."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Integral, tuple, list)):
        raise TypeError(f"img_size must be an int or a (height, width) pair of ints, got {value!r} "
                        f"({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        value = (value, value)
    if len(value) != 2:
        raise ValueError(f"img_size must be an int or a (height, width) pair of ints, got {value!r}")
    return check_int("img_size height", value[0], 1), check_int("img_size width", value[1], 1)
