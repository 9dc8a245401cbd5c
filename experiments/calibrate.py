"""Certify a price-conditioned policy's price on your own unlabeled images (no label is read).

Writes a copy of the policy whose price is the cheapest one whose (1 - delta) upper bound on
disagreement with the full model is at most the tolerance, found by fixed-sequence testing from
the lowest price, and which carries the whole curve of operating points (price -> MFLOPs/image,
ms/image with a latency table, disagreement, its bound, n), so that a tolerance chosen later
(`infer.py --tolerance`, `AdaptiveClassifier(..., tolerance=...)`) maps to a price without retraining.

    python experiments/calibrate.py --backbone checkpoints/fashion-mnist --policy policies/fashion-mnist \\
        --unlabeled deployment_images/ --tolerance 0.1 --delta 0.1 --out runs/fashion-mnist/calibrated
    python experiments/calibrate.py --backbone runs/shapes/backbone --policy runs/shapes/policy \
        --unlabeled shapes/ --out runs/shapes/calibrated     # the backbone's own image folder: its calibration split

A folder of class subfolders is streamed from disk (its folder names, the labels, are not read); when it is the
folder the backbone was trained on, only its recorded calibration split is used (the backbone trained on the rest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backbone.checkpoint import backbone_hash, load_checkpoint, read_config
from backbone.errors import HelpFormatter, ProjectError, finite_float, nonnegative_int, run_cli
from backbone.folders import SPLITS_FILE, ImageFiles, recorded_splits
from backbone.io import check_output_path, write_json
from inference.inputs import has_class_folders, open_images
from policy.artifact import load_policy, save_policy
from policy.calibration import calibrate, unlabeled_table
from policy.job import PolicyJob, job_dataset
from policy.latency_table import LATENCY_FILE, check_latency_digest, latency_grid, load_latency_table
from policy.selection import SelectionRule


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    rule = SelectionRule("certified")
    parser.add_argument("--backbone", required=True, help="checkpoint directory")
    parser.add_argument("--policy", required=True, help="price-conditioned policy artifact made for this backbone")
    parser.add_argument("--unlabeled", required=True,
                        help="images to calibrate on: an .npz with 'x' (any 'y' in it is not read) or a folder of "
                             "PNG/JPEG files, or a folder of class subfolders (streamed; the folder names are not read)")
    parser.add_argument("--workers", type=nonnegative_int, default=2,
                        help="class folders: DataLoader processes reading the files (0: the main process)")
    parser.add_argument("--tolerance", type=finite_float, default=rule.tolerance_pp,
                        help="largest share of images whose answer may differ from the full model's, in %% "
                             "(default %(default)s)")
    parser.add_argument("--delta", type=finite_float, default=rule.delta,
                        help="the bound fails with probability at most delta (default %(default)s)")
    parser.add_argument("--out", required=True, help="directory for the calibrated policy (a new artifact)")
    parser.add_argument("--force", action="store_true", help="replace a policy already in --out")
    parser.add_argument("--json", default=None, help="also write the chosen point and the curve here (default none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    try:
        rule = SelectionRule("certified", args.tolerance, delta=args.delta)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    if (out / "policy.json").exists() and not args.force:
        raise ProjectError(f"{out} already holds a policy; pass --force to replace it, or another --out")
    if out.resolve() == Path(args.policy).resolve():
        raise ProjectError("--out is the policy being calibrated; write the calibrated copy to another directory")

    model = load_checkpoint(args.backbone)
    artifact = load_policy(args.policy, backbone_hash(args.backbone))
    record = recorded_splits(args.backbone, read_config(args.backbone)[1])
    if record is not None and has_class_folders(args.unlabeled) and Path(args.unlabeled).resolve() == Path(record["root"]):
        # the backbone's own folder: its other splits trained the backbone and the policy
        images = job_dataset(PolicyJob(dataset=args.unlabeled, backbone=args.backbone, workers=args.workers)
                             ).splits["calibration"].x
        print(f"{args.unlabeled} is the backbone's own folder: calibrating on its calibration split ({len(images)} "
              f"images, recorded in {Path(args.backbone) / SPLITS_FILE})", file=sys.stderr)
    else:  # a 'y' in an .npz, the folder names of class folders: never read
        images, _, _ = open_images(args.unlabeled, model.config, workers=args.workers, labels=False)
    try:
        if not isinstance(images, ImageFiles):  # files are resized to the backbone's shape on reading
            model.check_images(images)
    except ValueError as err:
        raise ProjectError(f"{args.unlabeled}: {err}; give images of the backbone's shape (a folder of image files "
                           "is resized to it)") from err
    latency_path = Path(args.policy) / LATENCY_FILE
    latency = None
    if latency_path.is_file():
        check_latency_digest(latency_path, artifact.meta)
        latency = load_latency_table(latency_path)
    table = unlabeled_table(model, images, artifact, progress=not args.quiet)
    staged_ms = None if latency is None else latency_grid(latency, "staged")
    calibrated, point = calibrate(artifact, table, rule, str(args.unlabeled), staged_ms)
    extra = {LATENCY_FILE: latency_path.read_bytes()} if latency is not None else None
    save_policy(calibrated, out, extra)
    full_mflops = table.full_flops / 1e6
    print(f"{len(table)} unlabeled images; certified price lambda {point.lam:.4g}: disagreement "
          f"{100 * point.disagreement:.3f}%, {100 * (1 - rule.delta):g}% bound {100 * point.bound:.3f}% <= "
          f"{rule.tolerance_pp:g}%, {point.mflops:.3f} MFLOPs/image ({100 * (1 - point.mflops / full_mflops):.1f}% "
          f"fewer than the full model's {full_mflops:.3f})" + ("" if point.ms is None else f", {point.ms:.3f} ms/image"))
    print(f"calibrated policy saved to {out} (with {len(calibrated.meta['operating_points']['points'])} operating points)")
    result = {"chosen": point.to_dict(), "n": len(table), "rule": rule.to_dict(),
              "points": calibrated.meta["operating_points"]["points"], "out": str(out)}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    run_cli(main)
