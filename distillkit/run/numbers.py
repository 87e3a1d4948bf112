"""Loss values as people read them: four decimals, or four significant digits when that shows nothing."""

from __future__ import annotations

import math


def format_loss(value: float) -> str:
    """``0.9306`` for values of at least 1e-3 in size, ``2.346e-06`` below; ``0``, ``nan``, ``inf`` as such.

    A small loss (a well-matched term, a late step) printed with four decimals would read ``0.0000``; below
    1e-3 it is shown in scientific notation with four significant digits instead.
    """
    if not math.isfinite(value) or value == 0:
        return "0" if value == 0 else str(value)
    return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3e}"
