"""The options the serving application is built from (``experiments/serve.py``'s flags, ``serve run``'s args)."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeOptions:
    """Everything the application is built from; every field has a working default (the digits artifacts)."""

    backbone: str = "checkpoints/digits"
    """Checkpoint directory."""
    policy: str = "policies/digits"
    """Policy artifact directory with operating points (experiments/calibrate.py writes them)."""
    tolerance: float = 5.0
    """Default disagreement with the full configuration, in %: its certified point serves requests without one."""
    tolerance_ceiling: float | None = None
    """The most the latency controller may allow, in % (None: the default tolerance, so the controller is off)."""
    p99_target_ms: float = 250.0
    """The p99 request latency the controller holds, in ms (from the X-Request-Start stamp where a request has
    one, else from its arrival at the ingress)."""
    levels: int = 5
    """Tolerances the controller's ladder is cut at, from the default to the ceiling."""
    window_s: float = 5.0
    """The controller's sliding window, in seconds."""
    audit_share: float = 0.01
    """Share of requests also run at the full configuration, off the critical path."""
    audit_delta: float = 0.1
    """The audit's confidence sequences hold with probability 1 - delta."""
    audit_fallback: bool = False
    """Serve an operating point whose audit alarmed at the full configuration from then on."""
    replicas: int = 1
    """Replicas of each stage."""
    max_batch_size: int = 64
    """Images per batch in each stage (Ray Serve's max_batch_size, counted in images); at least max_images."""
    batch_wait_ms: float = 5.0
    """How long a stage waits to fill a batch, in ms (Ray Serve's batch_wait_timeout_s)."""
    max_images: int = 64
    """Images per request; more is refused with 413."""
    max_ongoing_requests: int = 256
    """Requests a replica takes at once (Ray Serve's default of 5 would starve the batches)."""
    threads: int = 1
    """torch threads per stage replica."""
    replica_cpus: float = 0.5
    """Ray CPUs reserved by each stage replica."""
    seed: int = 0
    """Seed of the audit's draw."""
    admission: bool = True
    """Refuse (503) a request the server cannot answer within the p99 target rather than queue it (load
    shedding, ``serving.admission``)."""
    admission_budget: float = 0.8
    """A served request slower than this share of the p99 target cuts the in-flight bound."""
    admission_max_wait: float = 0.4
    """A request that waited longer than this share of the p99 target before the ingress saw it is refused."""

    def __post_init__(self) -> None:
        if self.max_batch_size < self.max_images:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be at least max_images "
                             f"({self.max_images}): one request is never split across batches")
        for name in ("backbone", "policy"):  # replicas may start in another directory
            object.__setattr__(self, name, str(Path(getattr(self, name)).resolve()))

    @property
    def ceiling(self) -> float:
        return self.tolerance if self.tolerance_ceiling is None else self.tolerance_ceiling
