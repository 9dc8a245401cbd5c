"""The Ray Serve application on loopback with the digits backbone: it answers over HTTP what
``AdaptiveClassifier.predict`` answers, refuses bad requests with one clear 4xx line and keeps serving, audits,
sheds load with a 503 and one line, exports its metrics, and the README's client example runs against it. One
local Ray instance (2 CPUs, no dashboard) for the module, shut down at its end."""

import concurrent.futures
import io
import json
import os
import runpy
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray")
pytest.importorskip("fastapi")

from backbone.data import load_dataset
from inference import AdaptiveClassifier
from policy import load_policy, save_policy
from serving.app import ServeOptions
from serving.local import local_server

pytestmark = pytest.mark.slow
SECOND_LOOK = 0.85
"""The shipped digits policy served with a second look at this threshold: at tolerance 3.5 some of the 48 test images'
extensions are less sure than it and some are not (at 5.0, one is less sure), so the extension stage looks again."""


@pytest.fixture(scope="module")
def looks(tmp_path_factory) -> tuple[str, str]:
    """The digits backbone, and the shipped digits policy with a second look (``policy.second_look``)."""
    artifact = load_policy("policies/digits")
    artifact.meta["second_look"] = SECOND_LOOK
    directory = tmp_path_factory.mktemp("looks") / "policy"
    save_policy(artifact, directory)
    return "checkpoints/digits", str(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(looks):
    metrics_port = free_port()
    # a p99 target no request meets: the controller moves from 3.5% to the ceiling's point as soon as it may
    options = ServeOptions(*looks, tolerance=3.5, tolerance_ceiling=5.0, p99_target_ms=1.0, audit_share=1.0,
                           max_images=48, max_batch_size=64)
    with local_server(options, port=free_port(), metrics_port=metrics_port) as url:
        yield url, metrics_port


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").splits["test"].x[:48]


@pytest.fixture(scope="module")
def classifier(looks):
    return AdaptiveClassifier.from_dirs(*looks)


def post(url: str, body: bytes, kind: str = "application/json", query: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/{query}", body, {"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def post_images(url: str, images: torch.Tensor, **fields) -> dict:
    status, body = post(url, json.dumps({"images": images.tolist(), **fields}).encode())
    assert status == 200, body
    return body


def configs_of(body: dict) -> list[tuple]:
    return [(p["configuration"]["tokens"], p["configuration"]["depth"], p["configuration"]["width"])
            for p in body["predictions"]]


@pytest.mark.parametrize("tolerance", [None, 3.5, 5.0])
def test_http_answers_what_predict_answers(server, digits, classifier, looks, tolerance):
    url, _ = server
    body = post_images(url, digits, logits=True, **({} if tolerance is None else {"tolerance": tolerance}))
    if tolerance is None:  # the controller's point, whichever rung it is on: the one the response names
        reference = classifier.with_price(body["operating_point"]["lam"])
        assert body["operating_point"]["tolerance"] in (3.5, 4.625)
    else:
        reference = AdaptiveClassifier.from_dirs(*looks, tolerance=tolerance)
    expected = reference.predict(digits)
    assert [p["class"] for p in body["predictions"]] == expected.classes.tolist()
    assert configs_of(body) == [tuple(c) for c in expected.configs]
    np.testing.assert_allclose([p["logits"] for p in body["predictions"]], expected.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose([p["mflops"] for p in body["predictions"]], expected.flops / 1e6)
    point = body["operating_point"]
    assert point["lam"] == reference.lam
    assert point["bound"] <= point["tolerance"] / 100 and (tolerance is None or point["tolerance"] == tolerance)
    if tolerance == 3.5:  # the dearer point extends some inputs past the glance: the extension stage answered them,
        # and looked again at the unsure ones, as predict does
        assert len(set(configs_of(body))) > 1 and body["timings_ms"]["extended"] >= 1
        assert 1 <= body["timings_ms"]["looked_again"] < body["timings_ms"]["extended"]


def test_a_png_body_and_the_full_configuration(server, digits, classifier):
    url, _ = server
    buffer = io.BytesIO()
    Image.fromarray((digits[0, 0].numpy() * 255).round().astype(np.uint8), "L").save(buffer, "PNG")
    status, body = post(url, buffer.getvalue(), "image/png", "?tolerance=5")
    assert status == 200 and len(body["predictions"]) == 1
    c = classifier.backbone.config
    full = (c.token_grans[-1], c.depth, c.ffn_widths[-1])
    body = post_images(url, digits[:8], full=True, logits=True)
    assert configs_of(body) == [full] * 8 and body["operating_point"] == {"full": True}
    np.testing.assert_allclose([p["logits"] for p in body["predictions"]],
                               classifier.predict(digits[:8], full).logits.numpy(), atol=1e-4)


@pytest.mark.parametrize(("body", "kind", "status", "says"), [
    (b"not an image", "image/png", 400, "not a readable image"),
    (json.dumps({"images": [[[0.5] * 4] * 4]}).encode(), "application/json", 400, "shape"),
    (b'{"images": [' + json.dumps([[0.5] * 8] * 7 + [[0.5] * 7 + [float("nan")]]).encode() + b"]}",
     "application/json", 400, "NaN"),
    (json.dumps({"images": [[[0.0] * 8] * 8] * 49}).encode(), "application/json", 413, "at most 48"),
    (json.dumps({"images": [[[0.0] * 8] * 8], "tolerance": 0.1}).encode(), "application/json", 422,
     "no operating point is certified"),
    (json.dumps({"images": [[[0.0] * 8] * 8], "tolerance": "high"}).encode(), "application/json", 400, "tolerance"),
])
def test_bad_requests_get_a_4xx_with_one_line_and_serving_goes_on(server, digits, body, kind, status, says):
    url, _ = server
    got, answer = post(url, body, kind)
    assert got == status and says in answer["error"] and "\n" not in answer["error"]
    assert len(post_images(url, digits[:2])["predictions"]) == 2


def test_the_controller_moves_under_a_missed_target_and_never_past_the_ceiling(server, digits):
    url, _ = server
    points = [post_images(url, digits[:2])["operating_point"] for _ in range(40)]
    assert {p["level"] for p in points} <= {0, 1} and points[-1]["level"] == 1  # two rungs: 3.5% and 4.625%
    assert all(p["tolerance"] <= 5.0 for p in points) and points[-1]["lam"] == 1.0
    moves = json.load(urllib.request.urlopen(f"{url}/stats", timeout=10))["timeline"]
    assert moves and moves[0]["level"] == 1


def test_under_overload_requests_are_shed_with_a_503_and_one_line_and_serving_goes_on(server, digits):
    """The test server's p99 target (1 ms) is never met, so admission control's in-flight bound sits at its
    floor of one: of concurrent requests some are shed; a request stamped as having waited 1 s is shed."""
    url, _ = server
    body = json.dumps({"images": digits[:2].tolist()}).encode()
    stale = urllib.request.Request(f"{url}/", body, {"Content-Type": "application/json",
                                                     "X-Request-Start": f"t={time.time() - 1:.6f}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stale, timeout=60)
    answer = json.load(refused.value)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert "waited" in answer["error"] and "\n" not in answer["error"] and list(answer) == ["error"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [status for status, _ in pool.map(lambda _: post(url, body), range(16))]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1
    stats = json.load(urllib.request.urlopen(f"{url}/stats", timeout=10))["admission"]
    assert stats["shed"]["waited"] >= 1 and stats["shed"]["in_flight"] >= statuses.count(503)
    assert stats["in_flight"] == 0 and len(post_images(url, digits[:2])["predictions"]) == 2


def test_the_audit_and_the_metrics(server, digits):
    url, metrics_port = server
    post_images(url, digits[:16])
    deadline, stats = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        stats = json.load(urllib.request.urlopen(f"{url}/stats", timeout=10))
        if any(s["n"] > 0 for s in stats["audit"].values()):
            break
        time.sleep(0.5)
    streams = stats["audit"]
    assert streams and all(s["n"] >= s["disagreements"] >= 0 and 0 <= s["lower"] <= s["upper"] <= 1
                           for s in streams.values())
    names = ("adaperceiver_requests", "adaperceiver_request_latency_ms", "adaperceiver_images",
             "adaperceiver_batch_images", "adaperceiver_extension_passes", "adaperceiver_operating_point_lam",
             "adaperceiver_audit_upper_bound", "adaperceiver_shed", "adaperceiver_admission_limit")
    text, deadline = "", time.monotonic() + 60  # each replica exports on its own period
    while time.monotonic() < deadline and not all(name in text for name in names):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        except OSError:
            pass
        time.sleep(1)
    for name in names:
        assert name in text, name


def test_the_readme_client_example_runs(server, capsys, monkeypatch):
    url, _ = server
    monkeypatch.setitem(os.environ, "ADAPERCEIVER_URL", url)
    runpy.run_path("serving/client_example.py", run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("MFLOPs" in line and "tolerance 5.0%" in line for line in lines)
