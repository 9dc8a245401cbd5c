"""The FLOP price ``lambda`` of the reward, as one typed value: fixed, or conditioned on a range.

A **fixed** price is one ``lam >= 0``: every episode pays it and the policy does not see it. A
**conditioned** price is a range ``0 < low < high``: each episode draws its own price log-uniformly
from it and the policy sees it as one extra observation column (``log lam`` mapped from
``[log low, log high]`` to ``[-1, 1]``), so one policy serves every price of the range and the
calibration scans a grid of them (``grid``) without retraining.

The same value travels through the envs, training, the artifact (its ``policy.json`` keeps the keys
``lam`` and ``lam_range``: ``to_meta`` / ``from_meta``), calibration and the report's PPO family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backbone.errors import ProjectError

GRID = 61
"""Prices of a conditioned policy scanned on calibration (log-spaced over its range)."""


class PriceError(ProjectError):
    """A FLOP price that is not a finite number >= 0, or a range that is not ``0 < low < high``."""


@dataclass(frozen=True)
class Price:
    """The FLOP price of the reward: ``Price.fixed(lam)`` or ``Price.between(low, high)`` (``Price.of`` takes either
    form, or a ``float`` / ``(low, high)``)."""

    lam: float | None = None
    """The one price of a fixed-price policy (None for a conditioned one)."""
    low: float | None = None
    """Lowest price of a conditioned policy's range (None for a fixed one)."""
    high: float | None = None
    """Highest price of a conditioned policy's range (None for a fixed one)."""

    def __post_init__(self) -> None:
        if (self.lam is None) == (self.low is None and self.high is None) or (self.low is None) != (self.high is None):
            raise PriceError(f"a price is one lam or a range (low, high), got lam={self.lam}, low={self.low}, "
                             f"high={self.high}")
        if self.lam is not None:
            message = f"lam must be a finite number >= 0, got {self.lam!r}"
            lam = _number(self.lam, message)
            if not (math.isfinite(lam) and lam >= 0):
                raise PriceError(message)
            object.__setattr__(self, "lam", lam)
            return
        message = f"a lambda range needs finite 0 < low < high, got {(self.low, self.high)}"
        low, high = (_number(v, message) for v in (self.low, self.high))
        if not (math.isfinite(high) and 0 < low < high):
            raise PriceError(message)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def fixed(cls, lam: float) -> Price:
        return cls(lam=lam)

    @classmethod
    def between(cls, low: float, high: float) -> Price:
        return cls(low=low, high=high)

    @classmethod
    def of(cls, value: Price | float | tuple[float, float] | list[float]) -> Price:
        """``value`` as a Price: a Price as is, a number as a fixed price, a pair as a conditioned one."""
        if isinstance(value, Price):
            return value
        if isinstance(value, tuple | list):
            if len(value) != 2:
                raise PriceError(f"a lambda range needs finite 0 < low < high, got {tuple(value)}")
            return cls.between(*value)
        return cls.fixed(value)

    @property
    def conditioned(self) -> bool:
        """The price is drawn per episode and shown to the policy (a range), not fixed."""
        return self.low is not None

    @property
    def bounds(self) -> tuple[float, float] | None:
        """``(low, high)`` of a conditioned price, None for a fixed one."""
        return (self.low, self.high) if self.conditioned else None

    @property
    def columns(self) -> int:
        """Observation columns the price adds: 1 for a conditioned price, 0 for a fixed one."""
        return int(self.conditioned)

    def grid(self, n: int = GRID) -> np.ndarray:
        """The prices calibration scans, lowest first: ``n`` log-spaced over a conditioned range; a fixed price's
        grid is itself (``n`` ignored)."""
        if not self.conditioned:
            return np.array([self.lam])
        if n < 1:
            raise PriceError(f"a price grid needs n >= 1 prices, got {n}")
        return np.geomspace(self.low, self.high, n)

    def column(self, lam: np.ndarray | float) -> np.ndarray | None:
        """The observation column of price(s) ``lam`` (float32, ``log lam`` mapped from ``[log low, log high]`` to
        ``[-1, 1]``); None for a fixed price, which the policy does not see."""
        if not self.conditioned:
            return None
        span = np.log(self.high) - np.log(self.low)
        return (2 * (np.log(np.asarray(lam, dtype=np.float64)) - np.log(self.low)) / span - 1).astype(np.float32)

    def draw(self, rng: np.random.Generator, size: int | None = None) -> np.ndarray | float:
        """The prices of ``size`` episodes (one float when ``size`` is None): log-uniform over a conditioned range;
        a fixed price is returned as is, without touching ``rng``."""
        if not self.conditioned:
            return self.lam if size is None else np.full(size, self.lam)
        drawn = np.exp(rng.uniform(np.log(self.low), np.log(self.high), size=size))
        return float(drawn) if size is None else drawn

    def to_meta(self) -> dict:
        """The price as a policy artifact's ``meta`` keys (JSON): ``{"lam": lam}`` for a fixed price,
        ``{"lam_range": [low, high]}`` for a conditioned one (whose ``meta["lam"]`` is its calibrated price)."""
        return {"lam_range": [self.low, self.high]} if self.conditioned else {"lam": self.lam}

    @classmethod
    def from_meta(cls, meta: dict) -> Price:
        """The price of an artifact's ``meta`` (as ``to_meta`` writes it): its ``lam_range``, else its ``lam``."""
        found = meta.get("lam_range")
        if found is not None:
            if not (isinstance(found, list | tuple) and len(found) == 2):
                raise PriceError(f"lam_range must be [low, high], got {found!r}")
            return cls.between(*found)
        return cls.fixed(meta.get("lam"))

    def __str__(self) -> str:
        return f"lambda in [{self.low:g}, {self.high:g}]" if self.conditioned else f"lambda {self.lam:g}"


def _number(value, message: str) -> float:
    """``value`` as a float; ``PriceError(message)`` when it is not a number (a bool, a string, None)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise PriceError(message)
    return float(value)
