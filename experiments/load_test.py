"""Load-test the Ray Serve application on loopback (bounded in requests and seconds), adaptive against the full
configuration on the same application in the same run; writes JSON, Markdown and a plot.

1. Sustainable rate, per request size: open-loop Poisson traces at rising rates; the highest whose p99 is within
   the target with no errors and at most --max-shed of the requests shed (503, admission control), for requests
   pinned at the default operating point and at the full configuration.
2. Burst: base rate, then 2x the default point's sustainable rate, then base again, with the latency controller
   on (requests name no tolerance); the same trace with every request at the full configuration.
3. Audit: streams of requests drawn from the test images and from shifted ones (inverted; translated 4 pixels
   right, wrapping; the lower half erased), each image's disagreement with the full configuration measured by
   the classifier, audited at --audit-share.
4. CPU per request by process: sequential requests of each size and mode, each Ray process's CPU time over them
   (what a request costs the machine, whatever else runs on it).

    python experiments/load_test.py --backbone checkpoints/fashion-mnist --policy policies/fashion-mnist \\
        --dataset fashion-mnist --tolerance 1 --tolerance-ceiling 1.2 --p99-target-ms 250
"""

import argparse
import sys
import time

import numpy as np
import torch

from backbone.data import load_dataset
from backbone.errors import HelpFormatter, ProjectError, finite_float, positive_int, positive_ints, run_cli
from backbone.io import check_output_path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--backbone", default="checkpoints/fashion-mnist", help="checkpoint directory")
    parser.add_argument("--policy", default="policies/fashion-mnist", help="policy artifact with operating points")
    parser.add_argument("--dataset", default="fashion-mnist", help="whose test images the requests carry")
    parser.add_argument("--data-dir", default=None, help="directory of the dataset's files (default: the system's)")
    parser.add_argument("--tolerance", type=finite_float, default=1.0, help="default tolerance, %%")
    parser.add_argument("--tolerance-ceiling", type=finite_float, default=1.2, help="the controller's ceiling, %%")
    parser.add_argument("--p99-target-ms", type=finite_float, default=250.0, help="p99 latency target")
    parser.add_argument("--sizes", type=positive_ints, default=[16, 1], help="images per request, comma-separated")
    parser.add_argument("--start-rate", type=finite_float, default=2.0,
                        help="first rate of the search (req/s), for every request size")
    parser.add_argument("--factor", type=finite_float, default=1.5, help="rate step of the search")
    parser.add_argument("--step-seconds", type=finite_float, default=8.0, help="seconds per search step")
    parser.add_argument("--max-shed", type=finite_float, default=0.01,
                        help="share of a search step's requests the server may shed (503) and still sustain its rate")
    parser.add_argument("--burst-seconds", type=finite_float, default=20.0, help="seconds of each burst phase")
    parser.add_argument("--audit-share", type=finite_float, default=0.01, help="share of requests audited")
    parser.add_argument("--audit-streams", type=positive_int, default=20, help="simulated audit streams per case")
    parser.add_argument("--audit-images", type=positive_int, default=5000, help="test images the audit draws from")
    parser.add_argument("--max-batch-size", type=positive_int, default=64, help="images per stage batch")
    parser.add_argument("--batch-wait-ms", type=finite_float, default=5.0, help="how long a stage fills a batch")
    parser.add_argument("--replicas", type=positive_int, default=1, help="replicas of each stage")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per stage replica")
    parser.add_argument("--num-cpus", type=positive_int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--port", type=positive_int, default=8765, help="loopback HTTP port")
    parser.add_argument("--out", default="reports/load_test_fashion-mnist_cpu",
                        help="report path without suffix: .json, .md and .png are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals, bodies and audit draws")
    args = parser.parse_args(argv)
    for suffix in (".json", ".md", ".png"):
        check_output_path(args.out + suffix, "--out")
    try:
        from serving import load_test as lt
        from serving.app import ServeOptions
        from serving.local import local_server
        from serving.report import write_report
    except ImportError as err:
        raise ProjectError(f"the load test needs Ray Serve and aiohttp ({err.name}); pip install -e '.[serve]'") from None
    torch.set_num_threads(args.threads)

    test = load_dataset(args.dataset, args.data_dir).splits["test"]
    pngs = lt.png_strings(np.round(test.x[:2000, 0].numpy() * 255).astype(np.uint8))
    labels = test.y[:2000].numpy()
    options = ServeOptions(args.backbone, args.policy, args.tolerance, args.tolerance_ceiling, args.p99_target_ms,
                           audit_share=args.audit_share, replicas=args.replicas, max_batch_size=args.max_batch_size,
                           batch_wait_ms=args.batch_wait_ms, max_images=min(args.max_batch_size, 64),
                           threads=args.threads, seed=args.seed)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": f"python experiments/load_test.py {command}".strip(), "options": vars(args),
              **lt.machine_note(args.factor), "sustainable": {}, "burst": {}}
    started = time.time()
    with local_server(options, port=args.port, num_cpus=args.num_cpus) as url:
        for size in args.sizes:
            print(f"{size}-image requests:")
            start = args.start_rate
            modes = {"adaptive": {"tolerance": args.tolerance}, "full": {"full": True}}
            report["sustainable"][size] = {}
            for mode, fields in modes.items():
                bodies = lt.request_bodies(pngs, labels, size, 200, args.seed, **fields)
                lt.run_trace(url, [lt.Phase("warm-up", 5, 2)], bodies)  # first calls build caches
                print(f" {mode}:")
                report["sustainable"][size][mode] = lt.sustainable_rate(url, bodies, args.p99_target_ms, start,
                                                                        args.factor, args.step_seconds, seed=args.seed,
                                                                        max_shed=args.max_shed)
            a, f = (report["sustainable"][size][m]["images_per_s"] for m in modes)
            report["sustainable"][size]["ratio"] = a / f if a and f else None
        size = args.sizes[0]
        rate = report["sustainable"][size]["adaptive"]["rate"] or args.start_rate
        phases = [lt.Phase("before", rate / 2, args.burst_seconds), lt.Phase("burst", 2 * rate, args.burst_seconds),
                  lt.Phase("after", rate / 2, 1.5 * args.burst_seconds)]
        seconds = sum(p.seconds for p in phases)
        print(f"burst trace of {size}-image requests: {rate / 2:.3g} -> {2 * rate:.3g} -> {rate / 2:.3g} req/s")
        time.sleep(args.burst_seconds)  # quiet: the controller returns to its default rung before the trace
        for mode, fields in {"adaptive": {}, "full": {"full": True}}.items():
            began = time.time()
            records = lt.run_trace(url, phases, lt.request_bodies(pngs, labels, size, 200, args.seed + 1, **fields),
                                   args.seed + 1)
            report["burst"][mode] = {"summary": lt.summarize(records, seconds, args.p99_target_ms),
                                     "phases": {p.name: lt.summarize([r for r in records if r.phase == p.name],
                                                                     p.seconds, args.p99_target_ms) for p in phases},
                                     "timeline": lt.timeline(records)}
            for name, summary in [*report["burst"][mode]["phases"].items(), ("all", report["burst"][mode]["summary"])]:
                print(f"  {mode}, {name}: p99 {summary['p99_ms']:.1f} ms (served), {summary['shed']} of "
                      f"{summary['requests']} shed, {summary['errors']} errors, "
                      f"{100 * summary['windows_within_target']:.0f}% of {summary['windows']} 5 s windows within target")
            if mode == "adaptive":  # the controller's moves during the adaptive trace, in s from its start
                levels = [b["level"] for b in report["burst"][mode]["timeline"] if b["level"] is not None]
                report["burst"][mode]["final_level"] = levels[-1] if levels else None
                moves = lt.get_json(f"{url}/stats")["timeline"]
                report["controller_moves"] = [m | {"t": m["time"] - began} for m in moves if m["time"] >= began]
            time.sleep(2)
        stats = lt.get_json(f"{url}/stats")
        report["ladder"], report["admission"] = stats["ladder"], stats["admission"]
        report["cpu_per_request"] = {}
        for size in args.sizes:
            for mode, fields in {"adaptive": {"tolerance": args.tolerance}, "full": {"full": True}}.items():
                bodies = lt.request_bodies(pngs, labels, size, 50, args.seed + 2, **fields)
                found = report["cpu_per_request"][f"{mode} {size}"] = lt.cpu_per_request(url, bodies)
                print(f"CPU per {size}-image {mode} request: {found['cpu_ms']:.1f} ms (wall {found['wall_ms']:.1f} ms): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in found["by_process_ms"].items()))
        report["live_audit"] = stats["audit"]
    report["audit"] = audit_cases(args, test, lt)
    report["seconds"] = time.time() - started
    write_report(report, args.out)
    print(f"wrote {args.out}.json, .md and .png")
    return report


def audit_cases(args, test, lt) -> dict:
    """The audit on streams drawn from the test images and from inverted ones, disagreements measured."""
    from backbone.grid import GridPoint
    from inference import AdaptiveClassifier

    classifier = AdaptiveClassifier.from_dirs(args.backbone, args.policy, tolerance=args.tolerance)
    c = classifier.backbone.config
    full = GridPoint(c.token_grans[-1], c.depth, c.ffn_widths[-1])
    x = test.x[: args.audit_images]
    out = {}
    lower_half = torch.arange(x.shape[-2])[:, None] >= x.shape[-2] // 2
    shifts = (("in-distribution", x, 50_000), ("inverted", 1 - x, 10_000),
              ("translated 4 px", torch.roll(x, 4, dims=-1), 10_000), ("lower half erased", x * ~lower_half, 10_000))
    for name, images, requests in shifts:
        served = classifier.predict_batched(images, 256).classes
        reference = classifier.predict_batched(images, 256, full).classes
        disagree = (served != reference).numpy()
        out[name] = {size: lt.audit_streams(disagree, args.tolerance, requests, size, args.audit_share,
                                            streams=args.audit_streams, seed=args.seed) for size in args.sizes}
        print(f"audit, {name}: disagreement {100 * disagree.mean():.2f}% at {classifier.lam:.4g}; alarms "
              + ", ".join(f"{s}-image {v['alarms']}/{v['streams']}" for s, v in out[name].items()))
    return out


if __name__ == "__main__":
    run_cli(main)
