"""Operating points for requests: a tolerance maps to the cheapest price the policy's stored curve certifies,
and the ladder of cheaper certified points the latency controller may move along, up to a tolerance ceiling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy.selection import NothingCertifiedError, OperatingPoint, certified_point, points_of


@dataclass(frozen=True)
class ServedPoint:
    """An operating point as a response names it: the price served and the tolerance it is certified at."""

    tolerance: float
    """Disagreement with the full configuration promised, in %."""
    point: OperatingPoint
    """The cheapest point of the curve certified at ``tolerance`` (fixed-sequence testing along the curve)."""

    @property
    def lam(self) -> float:
        return self.point.lam

    @property
    def key(self) -> str:
        """A short name for logs, metrics and the audit: ``lam=<price> tol=<tolerance>%``."""
        return f"lam={self.lam:.4g} tol={self.tolerance:g}%"

    def to_dict(self) -> dict:
        """What a response says: price, tolerance (%), the calibration bound (a share), its delta and n, MFLOPs."""
        p = self.point
        return {"lam": p.lam, "tolerance": self.tolerance, "bound": p.bound, "delta": p.delta, "n": p.n,
                "mflops": p.mflops}


class OperatingCurve:
    """The certified operating points of a price-conditioned policy (``meta["operating_points"]``)."""

    def __init__(self, points: list[OperatingPoint]) -> None:
        if not points:
            raise NothingCertifiedError("this policy carries no operating points; calibrate it with "
                                        "experiments/calibrate.py before serving it")
        self.points = sorted(points, key=lambda p: p.lam)

    @classmethod
    def from_meta(cls, meta: dict) -> OperatingCurve:
        return cls(points_of(meta))

    def at(self, tolerance: float) -> ServedPoint:
        """The cheapest point certified at ``tolerance`` (%); ``NothingCertifiedError`` says what would be."""
        return ServedPoint(float(tolerance), certified_point(self.points, tolerance))

    def ladder(self, tolerance: float, ceiling: float, levels: int = 5) -> list[ServedPoint]:
        """The points a controller may serve, the default first: ``levels`` tolerances evenly spaced from
        ``tolerance`` to ``ceiling`` (%), each mapped to its certified point, keeping only those cheaper than
        the one before. Never a point certified only above ``ceiling``."""
        if ceiling < tolerance:
            raise NothingCertifiedError(f"the tolerance ceiling {ceiling:g}% is below the default tolerance "
                                        f"{tolerance:g}%; give a ceiling at or above it")
        ladder = [self.at(tolerance)]
        for t in np.linspace(tolerance, ceiling, max(levels, 1))[1:]:
            served = self.at(round(float(t), 6))
            if served.point.mflops < ladder[-1].point.mflops:
                ladder.append(served)
        return ladder
