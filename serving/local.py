"""A local Ray instance serving the application on loopback, started and stopped as one unit (the CLI, the load
test and the tests use it); or an application deployed on a running cluster (``address``)."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray import serve

from serving.app import ServeOptions, build_app, check

APP_NAME = "adaperceiver"


def start(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, metrics_port: int | None = None) -> str:
    """Start Ray (a local instance, or join ``address``) and Serve, deploy the application; its URL once ready."""
    check(options)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Ray runs its workers (the replicas) at niceness 15 by default: on a machine shared with other jobs
            # they would be starved by every ordinary process; a local instance runs them at the usual priority
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _metrics_export_port=metrics_port)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_ready(url)
    return url


def stop(joined: bool = False) -> None:
    """Take the application down and disconnect; a local instance (``joined`` False) is shut down with Serve, a
    joined cluster keeps running Serve and its other applications."""
    try:
        serve.delete(APP_NAME)
        if not joined:
            serve.shutdown()
    finally:
        ray.shutdown()


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Wait until ``url``/healthz answers (the replicas have loaded the checkpoint)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@contextmanager
def local_server(options: ServeOptions, port: int = 8000, num_cpus: int = 2,
                 metrics_port: int | None = None) -> Iterator[str]:
    """The application on ``http://127.0.0.1:port`` in a fresh local Ray instance, shut down on leaving."""
    try:
        yield start(options, port=port, num_cpus=num_cpus, metrics_port=metrics_port)
    finally:
        stop()
