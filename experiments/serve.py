"""Serve the adaptive classifier over HTTP with Ray Serve (pip install -e ".[serve]"): a local Ray instance by
default, --address to deploy on a running cluster. POST images to / (see serving/request_body.py); GET /stats;
Prometheus metrics on --metrics-port of each Ray node.

    python experiments/serve.py --backbone checkpoints/fashion-mnist --policy policies/fashion-mnist --tolerance 1
    python experiments/serve.py --backbone checkpoints/digits --policy policies/digits --tolerance 5 --duration-s 60
"""

import argparse
import time

from backbone.errors import HelpFormatter, ProjectError, finite_float, nonnegative_float, positive_int, run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--backbone", default="checkpoints/digits", help="checkpoint directory")
    parser.add_argument("--policy", default="policies/digits", help="policy artifact with operating points")
    parser.add_argument("--tolerance", type=finite_float, default=5.0,
                        help="default disagreement with the full model, in %%: its certified point serves requests "
                             "that name none")
    parser.add_argument("--tolerance-ceiling", type=finite_float, default=None,
                        help="the most the latency controller may allow, in %% (default: --tolerance, controller off)")
    parser.add_argument("--p99-target-ms", type=finite_float, default=250.0, help="p99 latency the controller holds")
    parser.add_argument("--levels", type=positive_int, default=5, help="rungs of the controller's ladder")
    parser.add_argument("--audit-share", type=nonnegative_float, default=0.01,
                        help="share of requests also run at the full configuration, off the critical path")
    parser.add_argument("--audit-fallback", action="store_true",
                        help="serve an operating point whose audit alarmed at the full configuration")
    parser.add_argument("--no-admission", action="store_true",
                        help="queue every request instead of refusing (503) those the server cannot answer in time")
    parser.add_argument("--admission-budget", type=nonnegative_float, default=0.8,
                        help="a served request slower than this share of the p99 target cuts the in-flight bound")
    parser.add_argument("--admission-max-wait", type=nonnegative_float, default=0.4,
                        help="a request that waited longer than this share of the p99 target before the ingress "
                             "is refused")
    parser.add_argument("--replicas", type=positive_int, default=1, help="replicas of each stage")
    parser.add_argument("--max-batch-size", type=positive_int, default=64, help="images per stage batch")
    parser.add_argument("--batch-wait-ms", type=nonnegative_float, default=5.0, help="how long a stage fills a batch")
    parser.add_argument("--max-images", type=positive_int, default=64, help="images per request")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per stage replica")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen beyond loopback)")
    parser.add_argument("--port", type=positive_int, default=8000, help="HTTP port")
    parser.add_argument("--address", default=None, help="a running Ray cluster to join (default: a local instance)")
    parser.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of the local instance (default: all)")
    parser.add_argument("--metrics-port", type=positive_int, default=8080,
                        help="Prometheus port of the local instance's metrics agent")
    parser.add_argument("--duration-s", type=nonnegative_float, default=0.0,
                        help="stop after this many seconds (0: serve until Ctrl-C)")
    args = parser.parse_args(argv)
    try:
        from serving import local
        from serving.app import ServeOptions
    except ImportError as err:
        raise ProjectError(f"Ray Serve is not installed ({err.name}); pip install -e '.[serve]'") from None

    options = ServeOptions(args.backbone, args.policy, args.tolerance, args.tolerance_ceiling, args.p99_target_ms,
                           args.levels, audit_share=args.audit_share, audit_fallback=args.audit_fallback,
                           replicas=args.replicas, max_batch_size=max(args.max_batch_size, args.max_images),
                           batch_wait_ms=args.batch_wait_ms, max_images=args.max_images, threads=args.threads,
                           admission=not args.no_admission, admission_budget=args.admission_budget,
                           admission_max_wait=args.admission_max_wait)
    url = local.start(options, args.host, args.port, args.address, args.num_cpus,
                      None if args.address else args.metrics_port)
    print(f"serving at {url}/ (stats: {url}/stats; metrics: http://127.0.0.1:{args.metrics_port}/metrics); "
          "Ctrl-C stops", flush=True)
    try:
        deadline = time.monotonic() + args.duration_s if args.duration_s else float("inf")
        while time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        local.stop(joined=args.address is not None)


if __name__ == "__main__":
    run_cli(main)
