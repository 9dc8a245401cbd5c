"""PPO (stable-baselines3) over the batched table env, a sweep over lambda, and calibration."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecMonitor
from tqdm import tqdm

from envs import OutcomeTable, TableVecEnv
from policy.artifact import PolicyArtifact, make_policy
from policy.evaluation import evaluate_actions, full_actions


@dataclass
class PolicyTrainConfig:
    """Hyperparameters, named as stable-baselines3's ``PPO`` arguments where they are its."""

    lambdas: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
    """FLOP prices swept; the cheapest policy within ``tolerance_pp`` on calibration wins."""
    tolerance_pp: float = 0.1
    """Largest accuracy drop against the full configuration allowed, in pp."""
    calibration_margin_pp: float = 0.1
    """Safety margin for calibration noise: a policy must be within ``tolerance_pp - margin`` on calibration.

    The standard error of a paired accuracy difference on a few thousand inputs is ~0.1 pp,
    so the default asks for no drop at all on calibration to keep test within 0.1 pp."""
    total_timesteps: int = 200_000
    """Env steps (inputs seen) per lambda."""
    num_envs: int = 256
    """Inputs stepped at once by the batched table env."""
    n_steps: int = 8
    batch_size: int = 512
    n_epochs: int = 5
    learning_rate: float = 3e-4
    ent_coef: float = 0.0
    """Entropy bonus; accuracy gaps between configurations are ~0.01, so any bonus of that size swamps them."""
    gamma: float = 0.0
    """One-step episodes: nothing to discount."""
    reward: str = "correct"
    """Accuracy term of the reward: 'correct' (0/1) or 'logprob' (true-class log-probability)."""
    net_arch: list[int] = field(default_factory=lambda: [64])
    """Hidden layers of the actor and of the critic; small, since a big one memorises the policy-train inputs."""
    seed: int = 0
    threads: int = 1
    """torch threads for PPO; one beat two for this small network."""


class RolloutStatsCallback(BaseCallback):
    """Logs accuracy, mean FLOPs, lambda and reward of each rollout to SB3's logger (TensorBoard)."""

    def __init__(self, table_env: TableVecEnv, full_flops: float, lam: float):
        super().__init__()
        self.table_env, self.full_flops, self.lam = table_env, full_flops, lam

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        stats = self.table_env.pop_stats()
        if stats:
            self.logger.record("adaptive/accuracy", stats["accuracy"])
            self.logger.record("adaptive/mean_flops", stats["flops"])
            self.logger.record("adaptive/flop_fraction", stats["flops"] / self.full_flops)
            self.logger.record("adaptive/reward", stats["reward"])
            self.logger.record("adaptive/lambda", self.lam)


def feature_scaler(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    std = features.std(axis=0) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


def train_one(
    table: OutcomeTable, lam: float, config: PolicyTrainConfig, scaler, log_dir: str | None, meta: dict
) -> PolicyArtifact:
    """Train one PPO policy at FLOP price ``lam`` on ``table`` (the policy-train split)."""
    mean, std = scaler
    scaled = OutcomeTable(**{**table.__dict__, "features": ((table.features - mean) / std).astype(np.float32)})
    table_env = TableVecEnv(scaled, num_envs=config.num_envs, lam=lam, seed=config.seed, reward=config.reward)
    ppo = PPO(
        "MlpPolicy",
        VecMonitor(table_env),
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        learning_rate=config.learning_rate,
        ent_coef=config.ent_coef,
        gamma=config.gamma,
        policy_kwargs={"net_arch": list(config.net_arch)},
        tensorboard_log=log_dir,
        seed=config.seed,
        device="cpu",
        verbose=0,
    )
    callback = RolloutStatsCallback(table_env, table.full_flops, lam)
    ppo.learn(config.total_timesteps, callback=callback, tb_log_name=f"lambda_{lam:g}")
    policy = make_policy(table.features.shape[1], list(table.grid_shape), config.net_arch)
    policy.load_state_dict(ppo.policy.state_dict())
    return PolicyArtifact(policy, mean, std, {**meta, "lam": lam})


def train_and_calibrate(
    train_table: OutcomeTable,
    calibration_table: OutcomeTable,
    config: PolicyTrainConfig,
    meta: dict,
    log_dir: str | Path | None = None,
) -> tuple[PolicyArtifact, list[PolicyArtifact]]:
    """Train one policy per lambda, measure each on calibration, keep the cheapest within tolerance.

    Returns the chosen artifact and every artifact of the sweep (each with its calibration record
    in ``meta["calibration"]``).
    Falls back to the most accurate policy when none meets the tolerance (``meets_target`` False).
    """
    torch.set_num_threads(config.threads)
    scaler = feature_scaler(train_table.features)
    reference = evaluate_actions(calibration_table, full_actions(calibration_table))["accuracy"]
    meta = {**meta, "train_config": asdict(config)}
    records, artifacts = [], []
    for lam in tqdm(config.lambdas, desc="lambda sweep"):
        start = time.time()
        artifact = train_one(train_table, lam, config, scaler, str(log_dir) if log_dir else None, meta)
        overhead = calibration_table.feature_flops + artifact.network_flops()
        result = evaluate_actions(calibration_table, artifact.act(calibration_table.features), overhead)
        delta_pp = 100 * (result["accuracy"] - reference)
        records.append({
            "lambda": lam,
            "calibration_accuracy": result["accuracy"],
            "calibration_delta_pp": delta_pp,
            "calibration_flop_reduction": result["flop_reduction"],
            "meets_target": delta_pp >= -(config.tolerance_pp - config.calibration_margin_pp) - 1e-9,
            "train_s": round(time.time() - start, 1),
        })
        artifacts.append(artifact)
        tqdm.write(f"lambda {lam:g}: calibration delta {delta_pp:+.2f} pp, FLOP reduction {100 * result['flop_reduction']:.1f}%")
    feasible = [i for i, r in enumerate(records) if r["meets_target"]]
    if feasible:
        best = max(feasible, key=lambda i: records[i]["calibration_flop_reduction"])
    else:
        best = max(range(len(records)), key=lambda i: (records[i]["calibration_delta_pp"], records[i]["calibration_flop_reduction"]))
    chosen = artifacts[best]
    for artifact, record in zip(artifacts, records, strict=True):
        artifact.meta["calibration"] = record
    chosen.meta.update(
        calibration_delta_pp=records[best]["calibration_delta_pp"],
        calibration_flop_reduction=records[best]["calibration_flop_reduction"],
        meets_target=records[best]["meets_target"],
        sweep=records,
    )
    return chosen, artifacts
