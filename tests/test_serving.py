"""The serving parts that need no Ray: operating points per request, the latency controller, admission control,
the online audit, request parsing, and the classifier at another price sharing its runner."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.data import load_dataset
from inference import AdaptiveClassifier, load_images
from policy.artifact import load_policy
from policy.selection import NothingCertifiedError, OperatingPoint
from serving.admission import Admission, AdmissionConfig, next_limit, shed_reason
from serving.audit import Audit, AuditStream, evidence, look_delta
from serving.controller import ControllerConfig, LatencyController
from serving.operating import OperatingCurve
from serving.request_body import RequestError, parse_request

DIGITS = ("checkpoints/digits", "policies/digits")


@pytest.fixture(scope="module")
def classifier():
    return AdaptiveClassifier.from_dirs(*DIGITS)


@pytest.fixture(scope="module")
def digits():
    split = load_dataset("digits").splits["test"]
    return split.x[:48], split.y[:48]


def point(lam: float, mflops: float, bound: float) -> OperatingPoint:
    return OperatingPoint(lam, mflops, bound / 2, bound, 1000, 0.1)


# ---- operating points ------------------------------------------------------------------------------------------
CURVE = OperatingCurve([point(0.1, 10, 0.004), point(0.2, 8, 0.006), point(0.3, 6, 0.012), point(0.4, 4, 0.009)])


def test_a_tolerance_serves_the_cheapest_point_before_the_first_failure():
    assert CURVE.at(0.5).lam == 0.1
    assert CURVE.at(1.0).lam == 0.2  # 0.3 fails at 1%, so 0.4 (bound 0.9%) is not reached
    assert CURVE.at(1.2).lam == 0.4
    with pytest.raises(NothingCertifiedError, match="at least 0.4%"):
        CURVE.at(0.3)


def test_the_ladder_runs_from_the_default_to_the_ceiling_cheaper_each_rung():
    ladder = CURVE.ladder(0.5, 1.2, levels=8)
    assert [p.lam for p in ladder] == [0.1, 0.2, 0.4]
    assert all(p.tolerance <= 1.2 for p in ladder) and ladder[0].tolerance == 0.5
    assert [p.lam for p in CURVE.ladder(0.5, 1.0, levels=8)] == [0.1, 0.2]  # never past the ceiling
    with pytest.raises(NothingCertifiedError, match="ceiling"):
        CURVE.ladder(1.0, 0.5)


def test_the_digits_policy_certifies_five_percent_and_refuses_a_tenth():
    curve = OperatingCurve.from_meta(load_policy(DIGITS[1]).meta)
    served = curve.at(5.0)
    assert served.point.bound <= 0.05 and served.point.mflops == min(p.mflops for p in curve.points)
    with pytest.raises(NothingCertifiedError, match="no operating point is certified at a disagreement of 0.1%"):
        curve.at(0.1)


# ---- the latency controller --------------------------------------------------------------------------------
def simulate(latency_of, seconds: float, rate: float = 50, levels: int = 3, config=None):
    """Requests at ``rate``/s for ``seconds``; ``latency_of(t, level)`` ms; the level over time."""
    controller = LatencyController(levels, config or ControllerConfig(p99_target_ms=250, window_s=2, hold_s=1))
    trace = []
    for t in np.arange(0, seconds, 1 / rate):
        level = controller.update(t)
        controller.observe(t, latency_of(t, level))
        trace.append((t, level))
    return controller, np.array(trace)


def test_the_controller_steps_down_under_a_burst_and_back_after_it():
    def latency(t, level):  # the burst overloads the default point; the next rung holds the target
        if 10 <= t < 20:
            return 400.0 if level == 0 else 200.0
        return 50.0

    _, trace = simulate(latency, 40)
    during, after = trace[(trace[:, 0] >= 13) & (trace[:, 0] < 20)], trace[trace[:, 0] >= 30]
    assert (trace[trace[:, 0] < 10, 1] == 0).all()
    assert (during[:, 1] == 1).all()  # moved once and stayed: 200 ms is within the target, not below half of it
    assert (after[:, 1] == 0).all()
    assert trace[:, 1].max() == 1


def test_the_controller_never_passes_the_last_rung():
    controller, trace = simulate(lambda t, level: 1000.0, 30, levels=3)
    assert trace[:, 1].max() == 2 and controller.level == 2


def test_a_whole_thin_window_steps_back_and_a_fresh_move_waits_for_one():
    controller = LatencyController(3, ControllerConfig(min_samples=20, window_s=5, hold_s=0))
    controller.level = 2
    assert controller.update(0.0) == 1  # no move yet: a whole window has passed
    assert controller.update(4.0) == 1  # the window restarted at the move; too soon to call it idle
    assert controller.update(5.0) == 0 and controller.update(20.0) == 0


# ---- the audit ---------------------------------------------------------------------------------------------
def test_the_looks_spend_at_most_delta():
    assert sum(look_delta(0.1, k) for k in range(1, 100_000)) < 0.1


def stream_alarms(rate: float, tolerance: float, looks: int, per_look: int, rng) -> int | None:
    stream = AuditStream(tolerance)
    for _ in range(looks):
        if stream.record(int(rng.binomial(per_look, rate)), per_look):
            return stream.looks
    return None


def test_the_audit_fires_on_a_shifted_stream():
    rng = np.random.default_rng(0)
    fired = [stream_alarms(0.05, 1.0, 100, 16, rng) for _ in range(20)]  # 5% disagreement against a 1% promise
    assert all(f is not None for f in fired)
    assert max(fired) <= 100


def test_the_audit_rarely_fires_at_the_certified_rate():
    rng = np.random.default_rng(1)
    streams = 100
    fired = sum(stream_alarms(0.01, 1.0, 150, 16, rng) is not None for _ in range(streams))
    assert fired <= 0.1 * streams  # at most delta; an upper-bound alarm would fire on every stream
    stream = AuditStream(1.0)
    stream.record(0, 16)
    assert stream.upper > 0.01 and not stream.alarmed  # a fresh stream certifies little, and alarms on nothing


def test_the_alarms_test_keeps_delta_at_the_worst_rate_within_the_promise():
    """Ville's inequality, simulated: streams of images at exactly the promised rate (the null's worst case) whose
    evidence ever reaches 1/delta, looked at after every image for 4,000 images, are at most delta."""
    rng = np.random.default_rng(0)
    streams, images, delta = 4000, 4000, 0.1
    counts = np.cumsum(rng.random((streams, images)) < 0.01, axis=1)
    ever = (evidence(counts, np.arange(1, images + 1), 0.01) >= 1 / delta).any(axis=1)
    assert ever.mean() <= delta + 3 * np.sqrt(delta * (1 - delta) / streams), ever.mean()
    assert ever.mean() > 0.005  # the bound is spent, not wasted: the test is not vacuous at its own boundary
    # half the promised rate: alarms are far rarer still
    low = np.cumsum(rng.random((streams, images)) < 0.005, axis=1)
    assert (evidence(low, np.arange(1, images + 1), 0.01) >= 1 / delta).any(axis=1).mean() < 0.01


def test_the_alarm_catches_a_shift_in_1_image_requests_where_spending_per_look_does_not():
    """A 6% disagreement against a 1% promise, one image per audited request, 150 audited requests (10,000+
    requests at a 1% audit): the e-process alarms in most streams, a lower bound spent look by look in few."""
    rng = np.random.default_rng(2)
    fired, spent_rule = 0, 0
    for _ in range(40):
        stream, lower_fired = AuditStream(1.0), False
        for _ in range(150):
            stream.record(int(rng.random() < 0.06), 1)
            lower_fired |= stream.lower > 0.01
        fired += stream.alarmed
        spent_rule += lower_fired
    assert fired >= 30 and spent_rule <= 20, (fired, spent_rule)


def test_the_audit_draws_its_share():
    audit = Audit(share=0.1, seed=0)
    assert 800 < sum(audit.wants() for _ in range(10_000)) < 1200
    assert not any(Audit(share=0.0).wants() for _ in range(100))


# ---- requests ----------------------------------------------------------------------------------------------
def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def test_a_png_body_reads_as_the_file_would(classifier, digits, tmp_path):
    data = png_bytes(digits[0][0])
    (tmp_path / "a.png").write_bytes(data)
    from_file, _, _ = load_images(tmp_path, classifier.backbone.config)
    parsed = parse_request(data, "image/png", {"tolerance": "5"}, classifier.backbone.config)
    np.testing.assert_array_equal(parsed.images, from_file.numpy())
    assert parsed.tolerance == 5.0 and not parsed.full


def test_json_arrays_and_base64_files(classifier, digits):
    x = digits[0][:3]
    body = json.dumps({"images": [x[0][0].tolist(), x[1].tolist(), base64.b64encode(png_bytes(x[2])).decode()],
                       "full": True}).encode()
    parsed = parse_request(body, "application/json", {}, classifier.backbone.config)
    assert parsed.images.shape == (3, 1, 8, 8) and parsed.full and parsed.tolerance is None
    np.testing.assert_allclose(parsed.images[:2], x[:2].numpy(), atol=1e-7)
    np.testing.assert_allclose(parsed.images[2], x[2].numpy(), atol=1 / 255)


@pytest.mark.parametrize(("body", "kind", "status", "says"), [
    (b"hello", "image/png", 400, "not a readable image"),
    (b'{"images": [[[0.5, 0.5], [0.5, 0.5]]]}', "application/json", 400, "has shape (1, 2, 2)"),
    (json.dumps({"images": [[[float("nan")] * 8] * 8]}).encode(), "application/json", 400, "NaN"),
    (json.dumps({"images": [[[2.0] * 8] * 8]}).encode(), "application/json", 400, "[0, 1]"),
    (json.dumps({"images": [[[0.0] * 8] * 8] * 65}).encode(), "application/json", 413, "at most 64"),
    (json.dumps({"images": [[[0.0] * 8] * 8], "tolerance": "lots"}).encode(), "application/json", 400, "tolerance"),
    (b'{"images": [', "application/json", 400, "not valid JSON"),
    (b'{"pictures": []}', "application/json", 400, "\"images\""),
    (b"x", "text/plain", 415, "unsupported content type"),
    (b"", "image/png", 400, "empty"),
])
def test_bad_requests_are_one_clear_line(classifier, body, kind, status, says):
    with pytest.raises(RequestError) as caught:
        parse_request(body, kind, {}, classifier.backbone.config)
    assert caught.value.status == status and says in str(caught.value) and "\n" not in str(caught.value)


# ---- the classifier at another price ------------------------------------------------------------------------
def test_with_price_is_the_classifier_built_at_that_price(classifier, digits):
    x = digits[0]
    cheap, dear = max(p.lam for p in OperatingCurve.from_meta(classifier.artifact.meta).points), 1e-3
    for lam in (cheap, dear):
        twin, built = classifier.with_price(lam), AdaptiveClassifier(classifier.backbone, classifier.artifact, lam=lam)
        assert twin.runner is classifier.runner and twin.lam == lam
        a, b = twin.predict(x), built.predict(x)
        assert a.configs == b.configs
        torch.testing.assert_close(a.logits, b.logits)
    assert classifier.with_price(cheap).predict(x).flops.mean() < classifier.with_price(dear).predict(x).flops.mean()


# ---- the load test's pure parts ------------------------------------------------------------------------------
def test_arrivals_are_poisson_at_each_phase_rate():
    from serving.load_test import Phase, arrivals

    times = arrivals([Phase("a", 50, 20), Phase("b", 200, 10)], seed=0)
    a = [t for t, p in times if p == "a"]
    b = [t for t, p in times if p == "b"]
    assert 900 < len(a) < 1100 and 1800 < len(b) < 2200
    assert max(a) < 20 <= min(b) and max(b) < 30 and times == sorted(times)


def test_the_breakdown_adds_up_to_the_client_latency_and_windows_are_judged():
    from serving.load_test import Record, breakdown, summarize

    timings = {"server": 60.0, "parse": 5.0, "glance_call": 30.0, "glance_queue": 4.0, "glance_compute": 20.0,
               "extension_call": 20.0, "extension_queue": 2.0, "extension_compute": 10.0}
    record = Record("p", 0.0, 100.0, 200, 16, 15, 0.1, 0, timings)
    parts = breakdown(record)
    assert sum(parts.values()) == pytest.approx(100.0)
    assert parts["http_and_routing"] == 40.0 and parts["glance_routing"] == 6.0 and parts["extension_routing"] == 8.0
    slow = [Record("p", 5.0 + i / 100, 400.0, 200, 16, 16) for i in range(10)]
    summary = summarize([record] * 10 + slow, seconds=10, p99_target_ms=250)
    assert summary["windows"] == 2 and summary["windows_within_target"] == 0.5
    assert summary["images_per_s"] == 32.0 and summary["accuracy"] == pytest.approx(310 / 320)


def test_shed_requests_are_counted_apart_from_errors_and_left_out_of_the_served_p99():
    from serving.load_test import Record, summarize, sustains

    served = [Record("p", i / 10, 100.0, 200, 16, 16) for i in range(50)]  # 0-5 s: served fast
    shed = [Record("p", 5 + i / 10, 2.0, 503, 16) for i in range(30)]  # 5-8 s: all shed
    timeout = [Record("p", 1.0, 10_000.0, 0, 16)]
    summary = summarize(served + shed, seconds=8, p99_target_ms=250)
    assert (summary["ok"], summary["shed"], summary["errors"]) == (50, 30, 0)
    assert summary["shed_share"] == 30 / 80 and summary["p99_ms"] == 100.0
    assert summary["windows"] == 2 and summary["windows_within_target"] == 0.5  # nothing served: not within
    assert not sustains(summary, 250) and sustains(summarize(served + shed[:0], 8, 250), 250)
    with_error = summarize(served + timeout, seconds=8, p99_target_ms=250)
    assert with_error["errors"] == 1 and with_error["shed"] == 0 and not sustains(with_error, 250)
    assert sustains(summarize(served * 2 + shed[:1], 8, 250), 250, max_shed=0.01)  # 1 of 101 shed


def test_audit_streams_alarm_on_a_shifted_pool_only():
    from serving.load_test import audit_streams

    clean, shifted = np.zeros(1000, bool), np.arange(1000) < 100  # 0% and 10% disagreement against 1%
    assert audit_streams(clean, 1.0, 20_000, 16, streams=3)["alarms"] == 0
    hit = audit_streams(shifted, 1.0, 10_000, 16, streams=3)
    assert hit["alarms"] == 3 and hit["max_requests_to_alarm"] <= 10_000


def test_a_request_start_stamp_counts_the_wait_before_the_ingress():
    pytest.importorskip("ray")
    import time

    from serving.app import _since_request_start

    assert 1900 < _since_request_start({"x-request-start": f"t={time.time() - 2:.6f}"}) < 2500
    assert _since_request_start({}) == 0.0 and _since_request_start({"x-request-start": "t=soon"}) == 0.0
    assert _since_request_start({"x-request-start": f"t={time.time() + 60}"}) == 0.0


# ---- admission control -----------------------------------------------------------------------------------------
ADMISSION = AdmissionConfig(latency_budget_ms=200, max_wait_ms=100, initial_limit=8, min_limit=1, max_limit=16,
                            backoff=0.5, decrease_every_ms=100, increase=1.0)


def test_a_request_is_shed_at_the_in_flight_bound_or_past_its_wait_budget_and_admitted_otherwise():
    assert shed_reason(in_flight=3, limit=4, waited_ms=99, max_wait_ms=100) is None
    rule, line = shed_reason(in_flight=4, limit=4, waited_ms=0, max_wait_ms=100)
    assert rule == "in_flight" and "4 requests in flight" in line and "\n" not in line
    rule, line = shed_reason(in_flight=0, limit=4, waited_ms=101, max_wait_ms=100)
    assert rule == "waited" and "waited 101 ms" in line
    assert shed_reason(in_flight=0, limit=1, waited_ms=0, max_wait_ms=100) is None  # nothing in flight: admitted


def test_the_in_flight_bound_is_cut_by_slow_requests_and_grows_by_one_per_bound_of_fast_ones():
    assert next_limit(8, 250, 7, 1000, ADMISSION) == 4  # slow: x0.5
    assert next_limit(8, 250, 7, 50, ADMISSION) == 8  # cut 50 ms ago: the same burst of slow requests
    assert next_limit(1.2, 250, 0, 1000, ADMISSION) == 1  # never below min_limit
    assert next_limit(8, 150, 3, 0, ADMISSION) == 8 + 1 / 8  # fast and half used (3 + the one that ended)
    assert next_limit(8, 150, 2, 0, ADMISSION) == 8  # fast but the bound is not what limits
    assert next_limit(16, 150, 15, 0, ADMISSION) == 16  # never past max_limit


def test_admission_sheds_a_burst_beyond_the_service_rate_and_reopens_after_it():
    """A simulated server that serves 10 requests/s, one at a time, latency = queue wait + 100 ms: under 40
    arrivals/s the bound falls until served requests stay within the budget and most of the burst is shed;
    afterwards requests at 2/s are all admitted again."""
    admission, queue_free, t, served = Admission(ADMISSION), 0.0, 0.0, []
    ends: list[tuple[float, float]] = []  # (end s, latency ms) of admitted requests not yet ended

    def arrive(now: float) -> bool:
        nonlocal queue_free
        for end, latency in sorted(ends):
            if end <= now:
                admission.done(end, latency)
                ends.remove((end, latency))
        if admission.admit(waited_ms=0) is not None:
            return False
        queue_free = max(queue_free, now) + 0.1
        ends.append((queue_free, 1000 * (queue_free - now)))
        served.append(1000 * (queue_free - now))
        return True

    burst = [arrive(t := t + 0.025) for _ in range(400)]  # 10 s at 40/s
    assert 0.6 < 1 - np.mean(burst) < 0.85  # ~3/4 must go: 10 of 40 per second can be served
    assert np.percentile(served[len(served) // 2:], 99) <= 400  # bounded: 2 x budget at most, not a growing queue
    after = [arrive(t := t + 0.5) for _ in range(20)]
    assert all(after) and admission.in_flight <= 1


def test_the_cpu_ceiling_is_full_cpu_over_adaptive_cpu_per_size():
    from serving.report import cpu_ceilings

    measured = {"adaptive 16": {"cpu_ms": 20.0}, "full 16": {"cpu_ms": 80.0}, "adaptive 1": {"cpu_ms": 10.0},
                "full 1": {"cpu_ms": 9.0}, "adaptive 4": {"cpu_ms": 5.0}}  # no full run at 4 images: no ceiling
    assert cpu_ceilings(measured) == {"16": 4.0, "1": 0.9}


def test_the_report_note_states_the_load_it_measured(monkeypatch):
    from serving import load_test

    monkeypatch.setattr(load_test.os, "getloadavg", lambda: (7.25, 1.0, 1.0))
    loaded = load_test.machine_note(1.5)
    assert loaded["load_average_before"] == 7.25 and "load average 7.2 " in loaded["note"] and "1.5x" in loaded["note"]
    monkeypatch.setattr(load_test.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert "load average 0.0 " in load_test.machine_note(1.5)["note"]
