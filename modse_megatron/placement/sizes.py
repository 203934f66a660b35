"""Expert sizes from MoDSE pair ratios: the one parser of ``"4.5:0.5,4.0:1.0"``.

``MoDSEConfig`` (``moe_expert_size_ratios``, scaled to the uniform parameter count) and the
planner (``widths_from_ratios``, ``modse-plan --ratios``, a fixed unit width) both read ratios
with ``parse_ratio_pairs``, so they accept the same text and fail with the same messages.
Pure Python: no numpy, no torch.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral
from typing import Sequence


def parse_ratio_pairs(text: str) -> list[tuple[Fraction, Fraction]]:
    """``"4.5:0.5,4:1"`` -> exact fractions ``[(9/2, 1/2), (4, 1)]`` (exact, so scaled widths
    are integers exactly when they should be)."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2:
            raise ValueError(
                f"ratio {item.strip()!r} is not a pair a:b: write pairs like 4.5:0.5,4.0:1.0"
            )
        try:
            a, b = Fraction(parts[0].strip()), Fraction(parts[1].strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"ratio {item.strip()!r} has a non-number: write pairs like 4.5:0.5"
            ) from None
        if a <= 0 or b <= 0:
            raise ValueError(
                f"ratio {item.strip()!r} has a non-positive part: every expert needs a width > 0"
            )
        pairs.append((a, b))
    return pairs


def parse_ratios(text: str) -> list[tuple[float, float]]:
    """Parse ``"4.5:0.5,4.0:1.0"`` into ``[(4.5, 0.5), (4.0, 1.0)]`` (``parse_ratio_pairs`` as
    floats)."""
    return [(float(a), float(b)) for a, b in parse_ratio_pairs(text)]


def _positive_int(name: str, value: object, example: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer{example}")
    return int(value)


def widths_from_ratios(
    ratios: str | Sequence[tuple[float, float]], unit: int, repeat: int = 1
) -> list[int]:
    """Expert widths of MoDSE pairs: each ``a:b`` is two experts of widths ``a*unit``, ``b*unit``.

    ``widths_from_ratios("4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5", 256)`` ->
    ``[1152, 128, 1024, 256, 768, 512, 640, 640]``; ``repeat`` repeats the whole list (e.g. 64
    experts from the 4 pairs with ``repeat=8``).  Widths must come out as positive integers.
    """
    pairs = parse_ratios(ratios) if isinstance(ratios, str) else [tuple(p) for p in ratios]
    unit = _positive_int("unit", unit, " width (e.g. 256)")
    repeat = _positive_int("repeat", repeat)
    widths: list[int] = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"ratio {pair!r} is not a pair (a, b)")
        for r in pair:
            x = float(r) * unit
            if not math.isfinite(x) or x <= 0:
                raise ValueError(f"ratio {r} gives width {x}: ratios must be positive numbers")
            if abs(x - round(x)) > 1e-9 * max(1.0, abs(x)):
                raise ValueError(
                    f"ratio {r} x unit {unit} = {x:g} is not an integer width: "
                    f"choose a unit that makes every ratio*unit whole"
                )
            widths.append(int(round(x)))
    if not widths:
        raise ValueError("no ratios given: write pairs like 4.5:0.5,4.0:1.0")
    return widths * repeat


__all__ = ["parse_ratio_pairs", "parse_ratios", "widths_from_ratios"]
