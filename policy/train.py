"""PPO (stable-baselines3) over the batched table env, a sweep over lambda, and calibration."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecMonitor
from tqdm import tqdm

from envs import OutcomeTable, Price, PriceError, TableVecEnv
from envs.reward import cost_grid
from policy.artifact import PolicyArtifact, make_policy, policy_outcome, price_knobs
from policy.second_look import check_second_look
from policy.selection import SelectionRule, candidate, describe_score, operating_points, select

MAX_TIMESTEPS = 3_000_000
PASSES = 2_000
"""PPO's default budget: this many passes over the policy-train table, at most ``MAX_TIMESTEPS`` env steps."""
COSTS = ("flops", "latency")
"""What an action can be priced by (``PolicyTrainConfig.cost``)."""
LR_SCHEDULES = ("constant", "linear")
"""How PPO's learning rate moves over training (``PolicyTrainConfig.lr_schedule``)."""


@dataclass
class PolicyTrainConfig:
    """Hyperparameters, named as stable-baselines3's ``PPO`` arguments where they are its."""

    lam_range: tuple[float, float] | None = (1e-3, 1.0)
    """One price-conditioned policy: each episode draws its FLOP price log-uniformly from this range and the
    policy sees it, so calibration scans a fine grid of prices without retraining. None: one policy per
    price of ``lambdas``."""
    lambdas: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
    """FLOP prices swept when ``lam_range`` is None."""
    selection: SelectionRule = field(default_factory=SelectionRule)
    """How the price is chosen on calibration: the cheapest policy that keeps the promise (``policy.selection``)."""
    total_timesteps: int | None = None
    """Env steps (inputs seen) of the conditioned policy, or per price of a sweep. None: ``PASSES`` passes over the
    policy-train table, at most ``MAX_TIMESTEPS`` (3,000,000 on Fashion-MNIST's 9,000 rows, 458,000 on digits'
    229: more passes over a small table add time, not a better policy)."""
    num_envs: int = 256
    """Inputs stepped at once by the batched table env."""
    n_steps: int = 8
    batch_size: int = 512
    n_epochs: int = 5
    learning_rate: float = 3e-4
    lr_schedule: str = "constant"
    """'constant': ``learning_rate`` throughout; 'linear': from ``learning_rate`` at the first update down to 0 at
    the last, so the policy kept is not one noisy step of a still-moving iterate."""
    ent_coef: float = 0.0
    """Entropy bonus; accuracy gaps between configurations are ~0.01, so any bonus of that size swamps them."""
    gamma: float = 0.0
    """One-step episodes: nothing to discount."""
    reward: str = "agree"
    """Accuracy term of the reward: 'agree' (prediction is the full configuration's), 'correct' or 'logprob'."""
    cost: str = "flops"
    """What an action is priced by, in training and in the price's calibration: 'flops' (staged FLOPs over the
    full configuration's) or 'latency' (a measured latency table's staged ms over the full configuration's ms,
    the grid given to ``train_and_calibrate``). FLOPs are reported either way."""
    second_look: float | None = None
    """At inference, an extension whose largest softmax probability is below this goes on to the full configuration
    (``policy.second_look``); the price is calibrated with it in place. None: no second look. PPO trains the same."""
    net_arch: list[int] = field(default_factory=lambda: [128, 128])
    """Hidden layers of the actor and of the critic (the price is an input too; [64] was measurably worse)."""
    seed: int = 0
    threads: int = 1
    """torch threads for PPO; one beat two for this small network."""
    quiet: bool = False
    """No progress bars."""

    def __post_init__(self) -> None:
        if self.lam_range is None and not self.lambdas:
            raise PriceError(f"lambdas must be >= 0 and not empty, got {self.lambdas}")
        try:
            self.prices  # noqa: B018 (validates)
        except PriceError as err:
            raise PriceError(f"{'lambdas' if self.lam_range is None else 'lam_range'}: {err}") from err
        for name in ("total_timesteps", "num_envs", "n_steps", "batch_size", "n_epochs", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or self.ent_coef < 0:
            raise ValueError(f"learning_rate must be > 0 and ent_coef >= 0, got {self.learning_rate}, {self.ent_coef}")
        self.second_look = check_second_look(self.second_look)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        if not self.net_arch or min(self.net_arch) < 1:
            raise ValueError(f"net_arch needs hidden layers of >= 1 unit, got {self.net_arch}")

    @property
    def prices(self) -> list[Price]:
        """The prices trained, one policy each: the range ``lam_range`` (one conditioned policy), else each of
        ``lambdas``."""
        if self.lam_range is not None:
            return [Price.of(tuple(self.lam_range))]
        return [Price.fixed(lam) for lam in self.lambdas]

    @property
    def learning_rate_schedule(self) -> float | LinearSchedule:
        """PPO's ``learning_rate`` argument: the number itself, or a function of the progress remaining (1 -> 0)."""
        if self.lr_schedule == "linear":
            return LinearSchedule(self.learning_rate, 0.0, 1.0)
        return self.learning_rate


class RolloutStatsCallback(BaseCallback):
    """Logs accuracy, mean FLOPs, lambda and reward of each rollout to SB3's logger (TensorBoard)."""

    def __init__(self, table_env: TableVecEnv, full_flops: float, price: Price):
        super().__init__()
        self.table_env, self.full_flops, self.price = table_env, full_flops, price

    def _on_step(self) -> bool:
        return True

    bar: tqdm | None = None
    """Progress bar advanced by each rollout (stable-baselines3's own needs the 'rich' package)."""

    def _on_rollout_end(self) -> None:
        if self.bar is not None:
            self.bar.update(self.num_timesteps - self.bar.n)
        stats = self.table_env.pop_stats()
        if stats:
            self.logger.record("adaptive/accuracy", stats["accuracy"])
            self.logger.record("adaptive/mean_flops", stats["flops"])
            self.logger.record("adaptive/flop_fraction", stats["flops"] / self.full_flops)
            self.logger.record("adaptive/cost_fraction", stats["cost"])
            self.logger.record("adaptive/reward", stats["reward"])
            if not self.price.conditioned:
                self.logger.record("adaptive/lambda", self.price.lam)


def feature_scaler(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    std = features.std(axis=0) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


def timesteps(config: PolicyTrainConfig, n_rows: int) -> int:
    """The PPO budget in env steps: ``config.total_timesteps``, or by default ``PASSES`` passes over ``n_rows``
    inputs, at most ``MAX_TIMESTEPS``."""
    return config.total_timesteps or min(MAX_TIMESTEPS, PASSES * n_rows)


def train_one(
    table: OutcomeTable, price: Price | float | tuple[float, float], config: PolicyTrainConfig, scaler,
    log_dir: str | None, meta: dict, cost: np.ndarray | None = None,
) -> PolicyArtifact:
    """Train one PPO policy at ``price`` (fixed, or conditioned on a range) on ``table`` (policy-train).

    ``cost``: each action's price ``(K, L, M)`` as a fraction of the full configuration's (None: staged FLOPs).
    """
    mean, std = scaler
    scaled = dataclasses.replace(table, features=((table.features - mean) / std).astype(np.float32))
    price = Price.of(price)
    if price.conditioned:  # the price column is already in [-1, 1]
        mean, std = np.append(mean, np.float32(0)), np.append(std, np.float32(1))
    table_env = TableVecEnv(scaled, num_envs=config.num_envs, lam=price, seed=config.seed, reward=config.reward,
                            cost=cost)
    ppo = PPO(
        "MlpPolicy",
        VecMonitor(table_env),
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        learning_rate=config.learning_rate_schedule,
        ent_coef=config.ent_coef,
        gamma=config.gamma,
        policy_kwargs={"net_arch": list(config.net_arch)},
        tensorboard_log=log_dir,
        seed=config.seed,
        device="cpu",
        verbose=0,
    )
    callback = RolloutStatsCallback(table_env, table.full_flops, price)
    name = "lambda_conditioned" if price.conditioned else f"lambda_{price.lam:g}"
    steps = timesteps(config, len(table))
    with tqdm(total=steps, desc=f"PPO {name}", unit="step", disable=config.quiet) as bar:
        callback.bar = bar
        ppo.learn(steps, callback=callback, tb_log_name=name)
    policy = make_policy(len(mean), list(table.grid_shape), config.net_arch)
    policy.load_state_dict(ppo.policy.state_dict())
    # a conditioned policy's meta["lam"], the price it acts at, is set by its calibration
    second_look = {} if config.second_look is None else {"second_look": config.second_look}
    return PolicyArtifact(policy, mean, std, {**meta, "lam": None, **price.to_meta(), **second_look})


def train_and_calibrate(
    train_table: OutcomeTable,
    calibration_table: OutcomeTable,
    config: PolicyTrainConfig,
    meta: dict,
    log_dir: str | Path | None = None,
    cost: np.ndarray | None = None,
) -> tuple[PolicyArtifact, list[PolicyArtifact]]:
    """Train the policy (conditioned on a price range, or one per price), then pick its price on calibration.

    The price is chosen by ``config.selection`` (the rule every family is judged by): the cheapest
    candidate that keeps the promise, or the safest one when none does (``meets_target`` False).
    "Cheapest" is by the cost the policy was trained on: staged FLOPs (``config.cost == 'flops'``), or
    ``cost``, each action's price ``(K, L, M)`` as a fraction of the full configuration's (required with
    ``config.cost == 'latency'``: a latency table's staged ms / full ms).
    Returns the chosen artifact (``meta["lam"]`` set, ``meta["cost"]``, ``meta["calibration"]`` every
    candidate's statistic) and every trained artifact.
    """
    if (config.cost == "latency") != (cost is not None):
        raise ValueError(f"config.cost {config.cost!r} needs "
                         + ("a cost grid (e.g. a latency table's staged ms / full ms)" if cost is None
                            else "no cost grid (FLOPs are the table's own)"))
    if cost is not None:
        cost = cost_grid(cost, train_table.staged_flops, train_table.full_flops)
    torch.set_num_threads(config.threads)
    scaler = feature_scaler(train_table.features)
    meta = {**meta, "train_config": asdict(config), "timesteps": timesteps(config, len(train_table)), "cost": config.cost}
    log = str(log_dir) if log_dir else None
    start = time.time()
    prices = config.prices
    artifacts = [train_one(train_table, price, config, scaler, log, meta, cost)
                 for price in tqdm(prices, desc="lambda sweep", disable=len(prices) == 1)]
    network = [artifact.network_flops() for artifact in artifacts]
    # every price of a conditioned policy's grid, or each policy at its own; safest first (the lowest price),
    # an order fixed before any is scored
    scored = [candidate(knob, policy_outcome(artifacts[knob.artifact], calibration_table, knob.lam,
                                             network[knob.artifact], cost), calibration_table)
              for knob in price_knobs(artifacts)]
    selection = select(scored, calibration_table.correct[:, -1, -1, -1], config.selection)
    artifact_index, lam = scored[selection.index].knob
    chosen = dataclasses.replace(artifacts[artifact_index], meta={**artifacts[artifact_index].meta, "lam": lam})
    reference_flops = calibration_table.full_flops
    records = []
    for knob, stats in zip((c.knob for c in scored), selection.scores, strict=True):
        record = {"lambda": knob.lam, "artifact": knob.artifact, **stats,
                  "flop_reduction": 1 - stats["flops"] / reference_flops}
        if cost is not None:  # the cost is a fraction of the full configuration's
            record["cost_reduction"] = 1 - stats["cost"]
        records.append(record)
    best = records[selection.index]
    chosen.meta.update(
        selection=config.selection.to_dict(),
        calibration_delta_pp=best.get("delta_pp", None),
        calibration_disagreement=best["disagreement"],
        # the certified rules' (1 - delta) bound on what they test, in pp (None for the point estimate)
        calibration_bound_pp=(100 * best["disagreement_bound"] if "disagreement_bound" in best
                              else best.get("drop_bound_pp")),
        calibration_flop_reduction=best["flop_reduction"],
        meets_target=selection.meets_target,
        calibration=records,
        train_s=round(time.time() - start, 1),
    )
    if chosen.price.conditioned:  # the price is a runtime knob: the curve maps a tolerance to a price
        mine = [c for c in scored if c.knob.artifact == artifact_index]
        chosen.meta["operating_points"] = {
            "calibrated_on": "calibration split", "labels_read": False,
            "points": [point.to_dict() for point in operating_points(mine, config.selection.delta)]}
    saving = f"FLOP reduction {100 * best['flop_reduction']:.1f}%"
    if cost is not None:
        chosen.meta["calibration_cost_reduction"] = best["cost_reduction"]
        saving = f"{config.cost} reduction {100 * best['cost_reduction']:.1f}%, {saving}"
    tqdm.write(f"chosen lambda {lam:.4g}: {describe_score(best, config.selection)}, {saving}"
               + ("" if selection.meets_target else " (no price passed; the safest taken)"))
    return chosen, artifacts
