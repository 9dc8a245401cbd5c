"""Train the adaptive-compute policy (PPO) on a frozen backbone and report it on the test split.

    python experiments/train_policy.py                       # digits, checkpoints/digits -> runs/digits/policy
    python experiments/train_policy.py --dataset fashion-mnist --backbone checkpoints/fashion-mnist
    python experiments/train_policy.py --cost latency --latency runs/digits/latency.json   # priced by measured ms
    python experiments/train_policy.py --dataset photos/ --backbone runs/photos/backbone    # an image folder
"""

from __future__ import annotations

import argparse

from backbone.data import default_paths
from backbone.errors import HelpFormatter, nonnegative_int, positive_int, run_cli
from backbone.io import check_output_path, write_json
from envs import FeatureSpec
from envs.reward import REWARDS
from evaluation.pipeline import format_summary, run_policy_job
from policy.job import PolicyJob
from policy.selection import ALIASES, MODES, SelectionRule
from policy.train import COSTS, LR_SCHEDULES, PolicyTrainConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (the backbone's recorded splits)")
    parser.add_argument("--workers", type=nonnegative_int, default=2,
                        help="image folders: DataLoader processes reading the files (0: the main process)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files")
    parser.add_argument("--backbone", default=None, help="checkpoint directory (default checkpoints/<dataset>)")
    parser.add_argument("--out", default=None,
                        help="artifact directory (default runs/<dataset>/policy, replaced by each run of the default)")
    parser.add_argument("--force", action="store_true", help="replace a policy already in --out")
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file")
    floats = lambda s: tuple(float(v) for v in s.split(","))
    defaults, rule = PolicyTrainConfig(), SelectionRule()
    parser.add_argument("--lam-range", type=floats, default=defaults.lam_range,
                        help="low,high: one policy conditioned on its FLOP price (default %(default)s)")
    parser.add_argument("--lambdas", type=floats, default=None,
                        help="comma-separated prices: one policy per price instead of a conditioned one")
    parser.add_argument("--timesteps", type=positive_int, default=defaults.total_timesteps,
                        help="PPO steps (per price with --lambdas); default: 2,000 passes over the policy-train table, "
                             "at most 3,000,000")
    parser.add_argument("--reward", choices=REWARDS, default=defaults.reward, help="accuracy term of the reward: agreement with the full model, correctness, or log-likelihood")
    parser.add_argument("--cost", choices=COSTS, default=defaults.cost,
                        help="what an action is priced by in training and in the price's calibration: staged FLOPs, "
                        "or the staged ms of a measured latency table (--latency); FLOPs are reported either way")
    parser.add_argument("--latency", default=None,
                        help="latency table from experiments/measure_latency.py (required with --cost latency); "
                        "checked against the backbone's grid and copied beside the policy as latency.json")
    parser.add_argument("--net-arch", type=lambda s: [int(v) for v in s.split(",")], default=defaults.net_arch,
                        help="hidden layers of the policy and value networks, e.g. 64,64")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule,
                        help="PPO's learning rate: constant, or linear from its start down to 0 at the last update "
                        "(default %(default)s)")
    parser.add_argument("--second-look", type=float, default=defaults.second_look, metavar="PROBABILITY",
                        help="at inference, an extension whose largest softmax probability is below this goes on to "
                        "the full configuration, and the price is calibrated with it (default %(default)s: none)")
    parser.add_argument("--selection", choices=MODES + tuple(ALIASES), default=rule.mode,
                        help="how the price is chosen on calibration, by fixed-sequence testing from the lowest price: "
                        "certified: the (1 - delta) upper bound on disagreement with the full model <= tolerance (%%), "
                        "no labels; certified_accuracy: the (1 - delta) upper bound on the accuracy drop <= tolerance "
                        "(pp); point_estimate (alias empirical): the calibration drop <= tolerance - margin, a point "
                        "estimate, not a bound (default %(default)s)")
    parser.add_argument("--tolerance-pp", type=float, default=rule.tolerance_pp,
                        help="disagreement (certified, %%) or accuracy drop (pp) allowed (default %(default)s)")
    parser.add_argument("--margin-pp", type=float, default=rule.margin_pp,
                        help="point-estimate rule: safety margin (pp) subtracted from the tolerance (default %(default)s)")
    parser.add_argument("--delta", type=float, default=rule.delta,
                        help="certified rules: failure probability of the whole fixed sequence (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of PPO (its network, its rollouts and the prices drawn)")
    parser.add_argument("--threads", type=positive_int, default=defaults.threads, help="torch threads for PPO")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-test", action="store_true",
                        help="do not read the test split (recipe search: compare recipes with experiments/develop.py)")
    FeatureSpec.add_flags(parser)
    parser.add_argument("--cache-dir", default=".cache/outcome_tables", help="where outcome tables are cached, by backbone hash and split")
    parser.add_argument("--log-dir", default="runs", help="TensorBoard root")
    args = parser.parse_args(argv)

    check_output_path(args.json, "--json")
    if args.cost == "latency" and args.latency is None:
        parser.error("--cost latency needs --latency PATH (a table from experiments/measure_latency.py)")
    paths = default_paths(args.dataset)
    try:  # every flag is checked before any table is built
        train = PolicyTrainConfig(
            lam_range=None if args.lambdas else args.lam_range, lambdas=args.lambdas or defaults.lambdas,
            total_timesteps=args.timesteps, reward=args.reward, cost=args.cost, net_arch=args.net_arch, seed=args.seed,
            lr_schedule=args.lr_schedule, second_look=args.second_look,
            threads=args.threads, quiet=args.quiet,
            selection=SelectionRule(args.selection, args.tolerance_pp, args.margin_pp, args.delta),
        )
    except ValueError as err:
        parser.error(str(err))
    job = PolicyJob(
        quiet=args.quiet,
        dataset=args.dataset,
        workers=args.workers,
        data_dir=args.data_dir,
        backbone=args.backbone or paths["backbone"],
        out=args.out or paths["new_policy"],
        replace=args.force or args.out is None,  # the default output is the job's own, replaced each run
        cache_dir=args.cache_dir,
        log_dir=args.log_dir,
        features=FeatureSpec.from_flags(args.pooled, args.glance),
        train=train,
        latency=args.latency,
        report_test=not args.no_test,
    )
    summary = run_policy_job(job)
    print(format_summary(summary))
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    run_cli(main)
