"""Admission control (load shedding): refuse a request the server cannot answer within the latency target rather
than queue it, so that a burst beyond what the machine serves keeps the served requests' p99 within the target.

Two rules, checked when a request reaches the ingress, before its body is read:

- **a bound on in-flight requests**, moved by AIMD on the served requests' latencies (the TCP and Netflix
  concurrency-limits scheme; Clipper's AIMD of the batch size is the same idea): a served request slower than
  the latency budget cuts the bound by a factor (at most once per ``decrease_every_ms``, as one burst of slow
  requests is one signal); a fast one while the bound is half used raises it by ``increase / bound``. The bound
  settles where cuts and raises balance: with a cut of 20% and a raise of 0.05 per bound's worth of requests,
  where one request in about 4 x bound^2 is slow (1% at a bound of 5), so the budget holds for a high
  percentile, not the median. At the bound a request would queue behind work the server cannot finish in time.
- **a queue-wait deadline**: a request that has already waited longer than ``max_wait_ms`` before the ingress
  saw it (in the HTTP proxy and the ingress's event loop, from the ``X-Request-Start`` stamp) cannot be answered
  in time, however short the queue behind it.

Pure Python: ``shed_reason`` and ``next_limit`` are functions of the signals; ``Admission`` keeps the state.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionConfig:
    """When the ingress refuses a request (503)."""

    latency_budget_ms: float = 200.0
    """A served request slower than this (ms, in the ingress) cuts the in-flight bound: the p99 target less the
    HTTP proxy's share and a margin (the bound settles where a few requests pass the budget)."""
    max_wait_ms: float = 100.0
    """A request that waited longer than this (ms) before the ingress saw it is refused."""
    initial_limit: float = 8.0
    """In-flight bound at the start."""
    min_limit: float = 1.0
    """The bound never goes below this: with nothing in flight a request is always admitted."""
    max_limit: float = 256.0
    """The bound never grows past this (the ingress's max_ongoing_requests)."""
    backoff: float = 0.8
    """Factor a slow request cuts the bound by."""
    decrease_every_ms: float = 100.0
    """At most one cut per this many ms."""
    increase: float = 0.05
    """A fast request raises the bound by this over the bound (the bound grows by this per bound's worth)."""

    def __post_init__(self) -> None:
        if not (self.latency_budget_ms > 0 and self.max_wait_ms > 0 and self.decrease_every_ms >= 0):
            raise ValueError(f"admission budgets must be positive, got {self}")
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(f"need 1 <= min_limit <= initial_limit <= max_limit, got {self}")
        if not self.increase > 0:
            raise ValueError(f"increase must be positive, got {self.increase}")
        if not 0 < self.backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {self.backoff}")


def shed_reason(in_flight: int, limit: float, waited_ms: float, max_wait_ms: float) -> tuple[str, str] | None:
    """Why a new request is refused: the rule (``waited`` or ``in_flight``) and one line for the client; None to
    admit it. ``in_flight``: requests admitted and not yet answered; ``limit``: the in-flight bound;
    ``waited_ms``: how long the request waited before the ingress."""
    if waited_ms > max_wait_ms:
        return "waited", (f"overloaded: the request waited {waited_ms:.0f} ms before the server could start it (budget "
                f"{max_wait_ms:g} ms); retry later")
    if in_flight >= limit:
        return "in_flight", (f"overloaded: {in_flight} requests in flight, the most this server answers within its latency "
                f"target now is {limit:.0f}; retry later")
    return None


def next_limit(limit: float, latency_ms: float, in_flight: int, since_decrease_ms: float,
               config: AdmissionConfig) -> float:
    """The in-flight bound after one served request of ``latency_ms`` (``in_flight`` still in flight as it ends,
    ``since_decrease_ms`` since the last cut): cut by ``backoff`` when slow, + increase/limit when fast and the
    bound is at least half used, else unchanged; within [min_limit, max_limit]."""
    c = config
    if latency_ms > c.latency_budget_ms:
        if since_decrease_ms < c.decrease_every_ms:
            return limit
        return max(c.min_limit, limit * c.backoff)
    if in_flight + 1 >= limit / 2:  # + 1: the request that just ended was in flight too
        return min(c.max_limit, limit + c.increase / limit)
    return limit


class Admission:
    """One ingress replica's admission state: the in-flight count, the bound, and how many requests it shed."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.limit = self.config.initial_limit
        self.in_flight = 0
        self.shed = {"in_flight": 0, "waited": 0}
        self._last_decrease = float("-inf")

    def admit(self, waited_ms: float) -> tuple[str, str] | None:
        """Admit a request (counted in flight until ``done``): None; or the rule and the line that refuse it
        (counted as shed)."""
        reason = shed_reason(self.in_flight, self.limit, waited_ms, self.config.max_wait_ms)
        if reason is None:
            self.in_flight += 1
        else:
            self.shed[reason[0]] += 1
        return reason

    def done(self, now_s: float, latency_ms: float | None) -> None:
        """An admitted request ended at ``now_s`` (seconds, monotonic); ``latency_ms`` None when it was refused
        after admission (a bad body), which says nothing about load."""
        self.in_flight -= 1
        if latency_ms is None:
            return
        limit = next_limit(self.limit, latency_ms, self.in_flight, 1000 * (now_s - self._last_decrease), self.config)
        if limit < self.limit:
            self._last_decrease = now_s
        self.limit = limit

    def to_dict(self) -> dict:
        return {"limit": self.limit, "in_flight": self.in_flight, "shed": dict(self.shed)}
