"""The load test's parts: request bodies, open-loop Poisson traces sent over loopback, their summaries (latency,
throughput, accuracy, where the time goes, 5-second windows), the sustainable-rate search, and the audit run on
the served images' measured disagreements. ``experiments/load_test.py`` wires them to a running application."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from serving.audit import Audit


def machine_note(factor: float) -> dict:
    """The report's note on where it ran, with the 1-minute load average measured before the run: what else the
    machine runs changes the absolute figures, so the report says what it saw rather than assuming."""
    load = os.getloadavg()[0]
    return {"note": "loopback, one machine: the load generator, Ray and both stages share its CPUs; 1-minute load "
                    f"average {load:.1f} on {os.cpu_count()} CPUs before the run (other jobs change the absolute "
                    f"figures); sustainable rates are searched in steps of {factor:g}x, so each is known to one step",
            "load_average_before": load}


@dataclass(frozen=True)
class Phase:
    """A stretch of a trace: Poisson arrivals at ``rate`` requests/s for ``seconds``."""

    name: str
    rate: float
    seconds: float


@dataclass
class Record:
    """One request as the client saw it."""

    phase: str
    sent_s: float
    """Seconds from the trace's start to the request's scheduled arrival."""
    latency_ms: float
    status: int
    """HTTP status; 0 for a client timeout or a broken connection; 503 for a request the server shed."""
    images: int
    correct: int = 0
    lam: float | None = None
    level: int | None = None
    timings: dict | None = None


def png_strings(images: np.ndarray) -> list[str]:
    """Base64 PNG files of uint8 grey images ``(n, H, W)``: what a JSON request carries."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, "L").save(buffer, "PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def request_bodies(pngs: list[str], labels: np.ndarray, size: int, count: int, seed: int = 0,
                   **fields) -> list[tuple[bytes, np.ndarray]]:
    """``count`` JSON bodies of ``size`` images drawn without replacement per body, with their labels."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        rows = rng.choice(len(pngs), size, replace=False)
        bodies.append((json.dumps({"images": [pngs[i] for i in rows], **fields}).encode(), labels[rows]))
    return bodies


def arrivals(phases: list[Phase], seed: int = 0) -> list[tuple[float, str]]:
    """Open-loop Poisson arrival times (s from the start) and their phase names, phase after phase."""
    rng, out, start = np.random.default_rng(seed), [], 0.0
    for phase in phases:
        t = start + rng.exponential(1 / phase.rate)
        while t < start + phase.seconds:
            out.append((float(t), phase.name))
            t += rng.exponential(1 / phase.rate)
        start += phase.seconds
    return out


async def _send(session, url: str, body: bytes, labels: np.ndarray, phase: str, sent_s: float,
                timeout_s: float) -> Record:
    import aiohttp

    start = time.perf_counter()
    try:
        headers = {"Content-Type": "application/json", "X-Request-Start": f"t={time.time():.6f}"}
        async with session.post(f"{url}/", data=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            answer = await response.json()
            status = response.status
    except (TimeoutError, aiohttp.ClientError):
        return Record(phase, sent_s, 1000 * (time.perf_counter() - start), 0, len(labels))
    latency_ms = 1000 * (time.perf_counter() - start)
    if status != 200:
        return Record(phase, sent_s, latency_ms, status, len(labels))
    classes = np.array([p["class"] for p in answer["predictions"]])
    point = answer["operating_point"]
    return Record(phase, sent_s, latency_ms, status, len(labels), int((classes == labels).sum()),
                  point.get("lam"), point.get("level"), answer["timings_ms"])


async def _trace(url: str, times: list[tuple[float, str]], bodies: list[tuple[bytes, np.ndarray]],
                 timeout_s: float) -> list[Record]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)  # open loop: never wait for a free connection
    async with aiohttp.ClientSession(connector=connector) as session:
        start, tasks = time.perf_counter(), []
        for i, (t, phase) in enumerate(times):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body, labels = bodies[i % len(bodies)]
            tasks.append(asyncio.create_task(_send(session, url, body, labels, phase, t, timeout_s)))
        return list(await asyncio.gather(*tasks))


def run_trace(url: str, phases: list[Phase], bodies: list[tuple[bytes, np.ndarray]], seed: int = 0,
              timeout_s: float = 10.0, max_requests: int = 20_000) -> list[Record]:
    """Send the trace of ``phases`` (open loop, at most ``max_requests``), bodies in turn; every request's record."""
    times = arrivals(phases, seed)[:max_requests]
    return asyncio.run(_trace(url, times, bodies, timeout_s))


# ---- summaries -------------------------------------------------------------------------------------------------
BREAKDOWN = ("http_and_routing", "parse", "glance_routing", "glance_queue", "glance_compute", "extension_routing",
             "extension_queue", "extension_compute", "full_routing", "full_queue", "full_compute", "ingress_other")


def breakdown(record: Record) -> dict[str, float]:
    """Where one request's time went, in ms: HTTP and Ray Serve routing (client time the ingress did not see), the
    ingress's parse, each stage's routing (its handle call minus its queueing and compute), queueing and compute."""
    t = record.timings or {}
    out = dict.fromkeys(BREAKDOWN, 0.0)
    out["http_and_routing"] = record.latency_ms - t.get("server", record.latency_ms)
    out["parse"] = t.get("parse", 0.0)
    for stage in ("glance", "extension", "full"):
        call = t.get(f"{stage}_call", 0.0)
        out[f"{stage}_queue"], out[f"{stage}_compute"] = t.get(f"{stage}_queue", 0.0), t.get(f"{stage}_compute", 0.0)
        out[f"{stage}_routing"] = call - out[f"{stage}_queue"] - out[f"{stage}_compute"] if call else 0.0
    stages = sum(t.get(f"{s}_call", 0.0) for s in ("glance", "extension", "full"))
    out["ingress_other"] = t.get("server", 0.0) - out["parse"] - stages
    return out


SHED = 503
"""The status of a request the server refused under load (admission control): counted apart from failures."""


def summarize(records: list[Record], seconds: float, p99_target_ms: float, window_s: float = 5.0) -> dict:
    """p50/p99 latency of the served requests (ms), throughput (images/s over ``seconds``), accuracy, the requests
    shed (503) and their share, errors (any other failure, a timeout among them), the mean breakdown, and the
    share of ``window_s`` windows (by arrival) whose p99 is within the target: over served requests and errors
    (an error counts as infinitely slow), shed requests left out; a window with nothing served is not within."""
    ok = [r for r in records if r.status == 200]
    shed = sum(r.status == SHED for r in records)
    latency = np.array([r.latency_ms for r in ok]) if ok else np.array([np.inf])
    images = sum(r.images for r in ok)
    windows = {}
    for r in records:
        windows.setdefault(int(r.sent_s // window_s), [])
        if r.status != SHED:
            windows[int(r.sent_s // window_s)].append(r.latency_ms if r.status == 200 else np.inf)
    within = [bool(w) and float(np.percentile(w, 99)) <= p99_target_ms for w in windows.values()]
    parts = [breakdown(r) for r in ok]
    return {"requests": len(records), "ok": len(ok), "shed": shed, "shed_share": shed / max(len(records), 1),
            "errors": len(records) - len(ok) - shed,
            "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(np.percentile(latency, 99)),
            "images_per_s": images / seconds, "accuracy": sum(r.correct for r in ok) / max(images, 1),
            "windows": len(within), "windows_within_target": float(np.mean(within)) if within else 0.0,
            "breakdown_ms": {k: float(np.mean([p[k] for p in parts])) if parts else 0.0 for k in BREAKDOWN}}


def sustains(summary: dict, p99_target_ms: float, max_shed: float = 0.01) -> bool:
    """A trace is sustained: no errors, at most ``max_shed`` of its requests shed, the served requests' p99 within
    the target."""
    return not summary["errors"] and summary["shed_share"] <= max_shed and summary["p99_ms"] <= p99_target_ms


def sustainable_rate(url: str, bodies, p99_target_ms: float, start_rate: float, factor: float = 1.5,
                     seconds: float = 8.0, max_steps: int = 10, seed: int = 0, max_shed: float = 0.01,
                     log=print) -> dict:
    """The highest Poisson rate (requests/s) of ``start_rate * factor^k`` whose trace is sustained (``sustains``),
    and every step's summary. A failing step is run once more (another draw of arrivals)
    before the search stops: on a shared machine one stall of another job's making can end it early; both runs
    are kept in ``steps``."""
    steps, best = [], None
    for k in range(max_steps):
        rate = start_rate * factor**k
        for attempt in range(2):
            records = run_trace(url, [Phase(f"rate {rate:.3g}", rate, seconds)], bodies, seed + k + 1000 * attempt)
            summary = summarize(records, seconds, p99_target_ms) | {"rate": rate, "attempt": attempt}
            steps.append(summary)
            log(f"  {rate:7.2f} req/s: p99 {summary['p99_ms']:7.1f} ms, {summary['images_per_s']:7.1f} images/s, "
                f"{summary['errors']} errors, {100 * summary['shed_share']:.1f}% shed")
            time.sleep(1.0)  # drain
            if sustains(summary, p99_target_ms, max_shed):
                break
        if not sustains(summary, p99_target_ms, max_shed):
            break
        best = summary
    return {"rate": None if best is None else best["rate"],
            "images_per_s": None if best is None else best["images_per_s"], "steps": steps}


def timeline(records: list[Record], bin_s: float = 1.0) -> list[dict]:
    """Per ``bin_s`` of arrivals: requests, shed requests, p99 latency of the served ones (ms) and the mean controller rung and price served."""
    bins = {}
    for r in records:
        bins.setdefault(int(r.sent_s // bin_s), []).append(r)
    out = []
    for b, rs in sorted(bins.items()):
        ok = [r for r in rs if r.status == 200]
        levels = [r.level for r in ok if r.level is not None]
        lams = [r.lam for r in ok if r.lam is not None]
        out.append({"t": b * bin_s, "requests": len(rs), "shed": sum(r.status == SHED for r in rs), "p99_ms": float(np.percentile([r.latency_ms for r in ok], 99))
                    if ok else None, "level": max(levels) if levels else None,
                    "lam": float(np.mean(lams)) if lams else None})
    return out


# ---- the audit on measured disagreements ------------------------------------------------------------------
def audit_streams(disagree: np.ndarray, tolerance: float, requests: int, size: int, share: float = 0.01,
                  delta: float = 0.1, streams: int = 20, seed: int = 0) -> dict:
    """Streams of ``requests`` requests of ``size`` images drawn from a pool whose per-image disagreement with the
    full configuration is ``disagree`` ``(n,)`` bool, audited at ``share``: how many streams alarm, and after how
    many requests."""
    rng = np.random.default_rng(seed)
    fired = []
    for s in range(streams):
        audit = Audit(share, delta, seed=seed + s)
        audited = np.flatnonzero(rng.random(requests) < share)  # the same draw as Audit.wants, vectorised
        at = None
        for request in audited:
            rows = rng.choice(len(disagree), size, replace=False)
            if audit.record("point", tolerance, int(disagree[rows].sum()), size):
                at = int(request) + 1
                break
        fired.append(at)
    hits = [f for f in fired if f is not None]
    return {"requests": requests, "size": size, "share": share, "streams": streams, "rate": float(disagree.mean()),
            "alarms": len(hits), "median_requests_to_alarm": float(np.median(hits)) if hits else None,
            "max_requests_to_alarm": max(hits) if hits else None}


def records_json(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]


def get_json(url: str) -> dict:
    """GET ``url`` as JSON (the application's /stats)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def ray_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each Ray process on this machine, by process title."""
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if not cmdline.startswith("ray::") and not any(k in cmdline for k in ("/raylet", "/gcs_server")):
            continue
        name = cmdline.split()[0].split("/")[-1]
        name = name.removeprefix("ray::ServeReplica:adaperceiver:").removeprefix("ray::").split(".")[0]
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[name] = out.get(name, 0.0) + t.user + t.system
    return out


def cpu_per_request(url: str, bodies: list[tuple[bytes, np.ndarray]], requests: int = 50) -> dict:
    """Sequential requests (no overlap, so no batching across them): each Ray process's CPU ms per request, the
    total, and the wall ms per request. What a request costs the machine whatever else runs on it."""
    import urllib.request

    def send(body: bytes) -> None:
        request = urllib.request.Request(f"{url}/", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    for body, _ in bodies[:5]:
        send(body)
    before, start = ray_cpu_seconds(), time.perf_counter()
    for i in range(requests):
        send(bodies[i % len(bodies)][0])
    wall, after = time.perf_counter() - start, ray_cpu_seconds()
    per = {k: 1000 * (after[k] - before.get(k, 0.0)) / requests for k in after}
    per = {k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    return {"requests": requests, "wall_ms": 1000 * wall / requests, "cpu_ms": sum(per.values()), "by_process_ms": per}
