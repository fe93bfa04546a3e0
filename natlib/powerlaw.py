r"""Power laws in measured times: geometric grids of sizes and log-log slope fits with a
confidence interval.

A cost :math:`y = c\,x^k` is a line of slope :math:`k` in :math:`(\log x, \log y)`;
:func:`fit_slope` fits it by least squares and gives Student's t interval on the slope. The
sweeps of :mod:`natlib.scaling` (which re-exports these names) use it to test the exponents of
:mod:`natlib.costmodel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def geometric_widths(low: int, high: int, per_octave: int = 2) -> list[int]:
    """Widths :math:`\\mathrm{round}(\\text{low} \\cdot 2^{k/p})`, ``per_octave`` :math:`= p`,
    up to ``high``.

    Raises:
        ValueError: unless ``0 < low <= high`` and ``per_octave >= 1``.
    """
    if not 0 < low <= high or per_octave < 1:
        raise ValueError(
            f"need 0 < low <= high and per_octave >= 1, got {low}, {high}, {per_octave}."
        )
    count = math.floor(per_octave * math.log2(high / low) + 1e-9)
    return [round(low * 2 ** (k / per_octave)) for k in range(count + 1)]


@dataclass(frozen=True)
class SlopeFit:
    r"""A least-squares fit :math:`\log y = \text{slope} \cdot \log x + \log \text{scale}` with a
    confidence interval ``(low, high)`` for the slope."""

    slope: float
    low: float
    high: float
    scale: float
    points: int

    def within(self, low: float, high: float) -> bool:
        return low <= self.slope <= high

    def verdict(self, name: str, low: float, high: float) -> str:
        """A line that does not change with timing noise as long as the slope stays inside."""
        return f"{name} slope within [{low}, {high}]: {'yes' if self.within(low, high) else 'no'}"

    def __str__(self) -> str:
        return f"{self.slope:.2f} [{self.low:.2f}, {self.high:.2f}] over {self.points} points"


def fit_slope(
    x: Sequence[float], y: Sequence[float], lower: float | None = None, confidence: float = 0.95
) -> SlopeFit:
    """Fit a power law to the points with ``x >= lower`` (default: the top two octaves,
    ``max(x) / 4``); the interval is Student's t on the slope's standard error.

    Raises:
        ValueError: if ``x`` and ``y`` are not 1-d of one length, a kept point is not
            positive, or fewer than 3 points are kept.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got {x.shape} and {y.shape}.")
    keep = x >= (x.max() / 4 if lower is None else lower)
    if not (np.all(x[keep] > 0) and np.all(y[keep] > 0)):
        raise ValueError("a log-log fit needs positive x and y.")
    if keep.sum() < 3:
        raise ValueError(f"a slope with an interval needs 3 points or more, got {keep.sum()}.")
    result = stats.linregress(np.log(x[keep]), np.log(y[keep]))
    half = stats.t.ppf(0.5 + confidence / 2, keep.sum() - 2) * result.stderr
    return SlopeFit(
        float(result.slope),
        float(result.slope - half),
        float(result.slope + half),
        float(np.exp(result.intercept)),
        int(keep.sum()),
    )
