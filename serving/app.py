"""The Ray Serve application: an HTTP ingress and two stages, each batched by Ray Serve itself.

    POST /  ─► Ingress (FastAPI): parse, pick the operating point, answer, audit, control, metrics
                 ├► GlanceStage     @serve.batch: the glance and the policy at the request's price; the glance's
                 │                  answer for the inputs the policy keeps there, glance states for the others
                 └► ExtensionStage  @serve.batch over requests: the glance states of every request in a batch,
                                    extended in one homogeneous pass per configuration group (tokens, width), each
                                    row leaving at its own depth (the classifier's own plan: exactly the
                                    configurations' arithmetic); and batches at the full configuration (the
                                    audit, and requests with "full": true)

One extension call per request, not one per configuration: a Ray Serve call costs its replica ~6-7 ms of CPU on
this project's CPU machine (measured, docs/serving.md), more than a small pass, and Ray Serve's own split of a
batch by multiplexed id (one id per configuration) cost a 16-image Fashion-MNIST request ~2 calls.

``build_app(ServeOptions(...))`` is the application (``experiments/serve.py`` runs it); ``app_builder`` is the
same for ``serve run serving/serve_config.yaml``. Needs ``pip install -e ".[serve]"``.
"""

import asyncio
import collections
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from backbone import flops
from backbone.checkpoint import read_config
from backbone.grid import GridPoint
from inference.classifier import AdaptiveClassifier
from policy.artifact import load_policy
from policy.selection import NothingCertifiedError
from serving.admission import Admission, AdmissionConfig
from serving.audit import Audit
from serving.controller import ControllerConfig, LatencyController
from serving.operating import OperatingCurve, ServedPoint
from serving.options import ServeOptions
from serving.request_body import RequestError, parse_request
from serving.stages import ExtendCall, ExtensionStage, FullCall, GlanceCall, GlanceResult, GlanceStage, StageResult

__all__ = ["ServeOptions", "app_builder", "build_app", "check"]
logger = logging.getLogger("ray.serve")
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 150, 200, 250, 300, 400, 500, 750, 1000, 2000, 5000]


def config_id(config: GridPoint) -> str:
    """A configuration as a name: ``tokens,depth,width``."""
    return f"{config.tokens},{config.depth},{config.width:g}"


def _since_request_start(headers) -> float:
    """ms since the ``X-Request-Start: t=<unix seconds>`` a client or load balancer stamped on the request (0
    without one): the controller then sees the queueing before the ingress too (in the HTTP proxy), which the
    ingress's own clock cannot. Same-host clocks only; a stamp in the future or over an hour old is ignored."""
    stamp = headers.get("x-request-start", "").removeprefix("t=")
    try:
        waited = 1000 * (time.time() - float(stamp))
    except ValueError:
        return 0.0
    return waited if 0 <= waited < 3.6e6 else 0.0


# ---- the ingress -----------------------------------------------------------------------------------------------
api = FastAPI(title="AdaPerceiver adaptive classifier",
              description="POST images; each gets its own configuration, served at a certified operating point.")


@dataclass
class Served:
    """One request's answer before it becomes JSON."""

    logits: torch.Tensor
    configs: list[GridPoint]
    flops: np.ndarray
    timings: dict = field(default_factory=dict)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP in and out: operating points, the latency controller, the audit and the request metrics."""

    def __init__(self, options: ServeOptions, glance, extension) -> None:
        torch.set_num_threads(1)
        self.options, self.glance, self.extension = options, glance, extension
        self.config, _ = read_config(options.backbone)
        c = self.config
        self.full_config = GridPoint(c.token_grans[-1], c.depth, c.ffn_widths[-1])
        self.full_flops = float(flops(c))
        self.curve = OperatingCurve.from_meta(load_policy(options.policy).meta)
        self.ladder = self.curve.ladder(options.tolerance, options.ceiling, options.levels)
        self.controller = LatencyController(len(self.ladder), ControllerConfig(options.p99_target_ms, options.window_s))
        self.audit = Audit(options.audit_share, options.audit_delta, options.seed)
        self.admission = Admission(AdmissionConfig(
            latency_budget_ms=options.admission_budget * options.p99_target_ms,
            max_wait_ms=options.admission_max_wait * options.p99_target_ms, max_limit=options.max_ongoing_requests))
        self._audits: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self.shares: dict[str, int] = {}
        self.timeline: list[dict] = []
        self.metrics = {
            "requests": Counter("adaperceiver_requests", description="Requests by HTTP status", tag_keys=("status",)),
            "latency": Histogram("adaperceiver_request_latency_ms", description="Request latency in the ingress, ms",
                                 boundaries=LATENCY_BOUNDARIES_MS),
            "images": Counter("adaperceiver_images", description="Images served, by configuration",
                              tag_keys=("configuration",)),
            "lam": Gauge("adaperceiver_operating_point_lam", description="Price of the controller's operating point"),
            "level": Gauge("adaperceiver_operating_point_level", description="Controller rung (0: the default)"),
            "bound": Gauge("adaperceiver_audit_upper_bound", description="Audit's upper bound on disagreement",
                           tag_keys=("point",)),
            "alarms": Counter("adaperceiver_audit_alarms", description="Audit alarms", tag_keys=("point",)),
            "shed": Counter("adaperceiver_shed", description="Requests refused with 503 by admission control, by rule",
                            tag_keys=("reason",)),
            "limit": Gauge("adaperceiver_admission_limit", description="Admission control's in-flight bound"),
        }
        self._set_point_gauges()

    @api.post("/")
    async def classify(self, request: Request) -> JSONResponse:
        """Classify the images of one request (see ``serving.request_body`` for the body)."""
        start = time.perf_counter()
        waited_ms = _since_request_start(request.headers)
        if not self.options.admission:
            return await self._classify(request, start, waited_ms)
        shed = self.admission.admit(waited_ms)  # before the body is read: a refusal should cost little
        if shed is not None:
            rule, line = shed
            self.metrics["shed"].inc(tags={"reason": rule})
            return self._refuse(503, line, {"Retry-After": "1"})
        latency_ms = None
        try:
            response = await self._classify(request, start, waited_ms)
            if response.status_code == 200:
                latency_ms = waited_ms + 1000 * (time.perf_counter() - start)
            return response
        finally:
            self.admission.done(time.monotonic(), latency_ms)

    async def _classify(self, request: Request, start: float, waited_ms: float) -> JSONResponse:
        try:
            parsed = parse_request(await request.body(), request.headers.get("content-type", ""),
                                   dict(request.query_params), self.config, self.options.max_images)
            point = self._point(parsed.tolerance)
        except RequestError as err:
            return self._refuse(err.status, str(err))
        except NothingCertifiedError as err:
            return self._refuse(422, str(err))
        images = torch.from_numpy(parsed.images)
        parse_ms = 1000 * (time.perf_counter() - start)
        full = parsed.full or (self.options.audit_fallback and self.audit.alarmed(point.key))
        served = await (self._full(images) if full else self._adaptive(images, point))
        served.timings = {"parse": parse_ms, **served.timings}
        classes = served.logits.argmax(-1)
        if not full and self.audit.wants():
            task = asyncio.create_task(self._audit_request(images, classes, point))  # off the critical path
            self._audits.add(task)
            task.add_done_callback(self._audits.discard)
        body = self._body(served, None if full else point, parsed.logits)
        latency_ms = 1000 * (time.perf_counter() - start)
        body["timings_ms"]["server"] = latency_ms
        self._observe(waited_ms + latency_ms, served.configs)  # the wait before the ingress, then its own
        return JSONResponse(body)

    @api.get("/stats")
    async def stats(self) -> dict:
        """The controller, the audit and the share of images per configuration, as JSON."""
        now = time.monotonic()
        return {"level": self.controller.level, "p99_ms": self.controller.p99(now),
                "ladder": [p.to_dict() for p in self.ladder], "admission": self.admission.to_dict(),
                "timeline": self.timeline[-2000:],
                "audit": {key: s.to_dict() for key, s in self.audit.streams.items()},
                "images_per_configuration": dict(self.shares), "options": asdict(self.options)}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    # ---- the steps -------------------------------------------------------------------------------------
    def _point(self, tolerance: float | None) -> ServedPoint:
        """The request's own certified point, or the controller's rung for a request without a tolerance."""
        if tolerance is None:
            return self.ladder[self.controller.level]
        return self.curve.at(tolerance)

    async def _adaptive(self, images: torch.Tensor, point: ServedPoint) -> Served:
        sent = time.perf_counter()
        glance: GlanceResult = await self.glance.remote(GlanceCall(images, point.lam))
        glance_ms = 1000 * (time.perf_counter() - sent)
        logits = glance.logits.clone()
        pending = np.flatnonzero(~glance.answered)  # batch rows, in the order of glance.state's rows
        timings = {"glance_call": glance_ms, "glance_queue": glance.queue_ms, "glance_compute": glance.compute_ms,
                   "glance_batch_images": glance.batch_images, "extended": len(pending)}
        if len(pending):
            sent = time.perf_counter()
            call = ExtendCall(glance.state, [glance.configs[row] for row in pending])
            result: StageResult = await self.extension.remote(call)
            logits[torch.from_numpy(pending)] = result.logits
            timings |= {"extension_call": 1000 * (time.perf_counter() - sent), "extension_queue": result.queue_ms,
                        "extension_compute": result.compute_ms, "extension_batch_images": result.batch_images}
            if result.looked_again is not None and result.looked_again.any():  # answered by the full configuration
                again = pending[result.looked_again]
                paid = glance.flops.copy()
                paid[again] += result.second_look_flops
                looked = set(again.tolist())
                configs = [self.full_config if row in looked else config for row, config in enumerate(glance.configs)]
                timings["looked_again"] = len(again)
                return Served(logits, configs, paid, timings)
        return Served(logits, glance.configs, glance.flops, timings)

    async def _full(self, images: torch.Tensor) -> Served:
        sent = time.perf_counter()
        result: StageResult = await self.extension.full.remote(FullCall(images))
        timings = {"full_call": 1000 * (time.perf_counter() - sent), "full_queue": result.queue_ms,
                   "full_compute": result.compute_ms, "full_batch_images": result.batch_images}
        return Served(result.logits, [self.full_config] * len(images), np.full(len(images), self.full_flops), timings)

    async def _audit_request(self, images: torch.Tensor, classes: torch.Tensor, point: ServedPoint) -> None:
        full: StageResult = await self.extension.full.remote(FullCall(images))
        disagreements = int((full.logits.argmax(-1) != classes).sum())
        fired = self.audit.record(point.key, point.tolerance, disagreements, len(classes))
        stream = self.audit.streams[point.key]
        self.metrics["bound"].set(stream.upper, tags={"point": point.key})
        if fired:
            self.metrics["alarms"].inc(tags={"point": point.key})
            logger.warning(f"audit alarm at {point.key}: disagreement with the full configuration is above "
                           f"{point.tolerance:g}% with confidence {1 - stream.delta:g} ({stream.disagreements} of "
                           f"{stream.n} audited images, evidence {stream.evidence:.3g} >= 1/delta)"
                           + ("; serving it at the full configuration from now on" if self.options.audit_fallback else ""))

    def _body(self, served: Served, point: ServedPoint | None, with_logits: bool) -> dict:
        confidence, classes = served.logits.softmax(-1).max(-1)
        op = {"full": True} if point is None else point.to_dict() | {"level": self.ladder.index(point)
                                                                      if point in self.ladder else None}
        images = [{"class": int(k), "confidence": float(p), "mflops": float(f) / 1e6,
                   "configuration": {"tokens": c.tokens, "depth": c.depth, "width": c.width}, "operating_point": op}
                  for k, p, f, c in zip(classes.tolist(), confidence.tolist(), served.flops, served.configs, strict=True)]
        if with_logits:
            for image, row in zip(images, served.logits.tolist(), strict=True):
                image["logits"] = row
        return {"predictions": images, "operating_point": op, "timings_ms": dict(served.timings)}

    def _observe(self, latency_ms: float, configs: list[GridPoint]) -> None:
        self.metrics["requests"].inc(tags={"status": "200"})
        self.metrics["latency"].observe(latency_ms)
        for key, count in collections.Counter(config_id(c) for c in configs).items():
            self.shares[key] = self.shares.get(key, 0) + count
            self.metrics["images"].inc(count, tags={"configuration": key})
        self.controller.observe(time.monotonic(), latency_ms)
        self._control()
        if self._ticker is None:  # started here: the replica's event loop runs requests, not __init__
            self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        """Let the controller step back while no requests come (it only moves when asked)."""
        while True:
            await asyncio.sleep(0.5)
            self._control()
            self.metrics["limit"].set(self.admission.limit)  # here, not per request: a metric update costs CPU

    def _control(self) -> None:
        before = self.controller.level
        if self.controller.update(time.monotonic()) != before:
            self._set_point_gauges()
            point = self.ladder[self.controller.level]
            logger.info(f"latency controller: p99 against {self.options.p99_target_ms:g} ms moves to rung "
                        f"{self.controller.level} ({point.key})")
            self.timeline.append({"time": time.time(), "level": self.controller.level, **point.to_dict()})

    def _set_point_gauges(self) -> None:
        self.metrics["lam"].set(self.ladder[self.controller.level].lam)
        self.metrics["level"].set(self.controller.level)

    def _refuse(self, status: int, message: str, headers: dict | None = None) -> JSONResponse:
        self.metrics["requests"].inc(tags={"status": str(status)})
        return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def check(options: ServeOptions) -> None:
    """Fail before Ray starts, with one ``ProjectError`` line: the artifacts load and match, and the default
    tolerance and the ceiling are certified."""
    AdaptiveClassifier.from_dirs(options.backbone, options.policy, tolerance=options.tolerance)
    OperatingCurve.from_meta(load_policy(options.policy).meta).ladder(options.tolerance, options.ceiling, options.levels)


def build_app(options: ServeOptions):
    """The application: the ingress bound to one glance stage and one extension stage deployment."""
    stage = {"num_replicas": options.replicas, "max_ongoing_requests": options.max_ongoing_requests,
             "ray_actor_options": {"num_cpus": options.replica_cpus}}
    glance = GlanceStage.options(**stage).bind(options)
    extension = ExtensionStage.options(**stage).bind(options)
    return Ingress.options(max_ongoing_requests=options.max_ongoing_requests,
                           ray_actor_options={"num_cpus": 0}).bind(options, glance, extension)


def app_builder(args: dict):
    """``serve run`` / ``serve deploy``'s builder: ``args`` are ``ServeOptions`` fields."""
    return build_app(ServeOptions(**args))
