"""Checks of values that came in as JSON."""

from __future__ import annotations

import math


def json_number(value: object) -> float | None:
    """`value` as a float if it is a finite JSON number, else None: JSON's `true` is no number here,
    though Python counts a bool as an int, and NaN or infinity (which Python's parser accepts) are
    none either."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None
