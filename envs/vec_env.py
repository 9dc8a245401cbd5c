"""A batched stable-baselines3 ``VecEnv`` that steps many inputs at once from an outcome table."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from envs.adaptive_env import AdaptiveComputeEnv, LiveBackend
from envs.outcome_table import OutcomeTable
from envs.price import Price
from envs.reward import check_reward, cost_grid, reward


class TableVecEnv(VecEnv):
    """``num_envs`` copies of ``AdaptiveComputeEnv`` over one table, stepped with numpy indexing.

    ``lam`` is a ``Price`` (or a number, or a range ``(low, high)``): a conditioned price has each episode draw its
    own (log-uniform), shown as the observation's last column (``Price.column``); ``self.lam`` holds each env's
    current price.
    ``cost``: the price of each action ``(K, L, M)`` as a fraction of the full configuration's
    (default staged FLOPs / full FLOPs; e.g. measured staged ms / full ms, ``envs.reward.cost_grid``).

    Same spaces, reward and info keys as ``AdaptiveComputeEnv``; every step ends every
    episode, so the returned observation is the next input's and the finished one is
    in ``info["terminal_observation"]``. Running sums of reward, correctness and FLOPs
    are kept in ``stats`` for logging (``pop_stats`` reads and clears them).
    """

    def __init__(
        self, table: OutcomeTable, num_envs: int = 256, lam: Price | float | tuple[float, float] = 0.1, seed: int = 0,
        reward: str = "correct", cost: np.ndarray | None = None,
    ) -> None:
        self.price, self.reward_kind = Price.of(lam), check_reward(reward)
        self.cost = cost_grid(cost, table.staged_flops, table.full_flops)  # refuses a grid of another shape
        n_features = table.features.shape[1] + self.price.columns
        observation_space = spaces.Box(-np.inf, np.inf, shape=(n_features,), dtype=np.float32)
        action_space = spaces.MultiDiscrete(list(table.flops.shape))
        self.render_mode = None
        super().__init__(num_envs, observation_space, action_space)
        self.table = table
        self.lam = np.full(num_envs, 0.0 if self.price.conditioned else self.price.lam)  # conditioned: drawn on reset
        self.accuracy_term = {"correct": table.correct, "agree": table.agree, "logprob": table.true_logprob}[reward]
        self.rng = np.random.default_rng(seed)
        self.index = np.zeros(num_envs, dtype=np.int64)
        self.actions: np.ndarray | None = None
        self.stats = {"episodes": 0, "reward": 0.0, "correct": 0, "flops": 0.0, "cost": 0.0}

    def _draw(self) -> np.ndarray:
        self.index = self.rng.integers(len(self.table), size=self.num_envs)
        if self.price.conditioned:
            self.lam = self.price.draw(self.rng, size=self.num_envs)
        return self._observe()

    def _observe(self) -> np.ndarray:
        """Observations of the current inputs (and prices)."""
        features = self.table.features[self.index]
        column = self.price.column(self.lam)
        return features if column is None else np.concatenate([features, column[:, None]], axis=1)

    def reset(self) -> np.ndarray:
        return self._draw()

    def step_async(self, actions: np.ndarray) -> None:
        self.actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs, 3)

    def step_wait(self):
        k, l, m = self.actions.T
        correct = self.table.correct[self.index, k, l, m]
        cost = self.cost[k, l, m]
        rewards = reward(self.accuracy_term[self.index, k, l, m], cost, self.lam).astype(np.float32)
        flops = self.table.staged_flops[k, l, m]
        terminal = self._observe()
        infos = [
            {"terminal_observation": terminal[i], "correct": bool(correct[i]), "flops": float(flops[i]),
             "cost": float(cost[i])}
            for i in range(self.num_envs)
        ]
        self.stats["episodes"] += self.num_envs
        self.stats["reward"] += float(rewards.sum())
        self.stats["correct"] += int(correct.sum())
        self.stats["flops"] += float(flops.sum())
        self.stats["cost"] += float(cost.sum())
        return self._draw(), rewards, np.ones(self.num_envs, dtype=bool), infos

    def pop_stats(self) -> dict:
        """Mean reward, accuracy, FLOPs and cost (a fraction of the full configuration's) since the last call
        (``{}`` if no episode ended)."""
        n = self.stats["episodes"]
        out = {} if n == 0 else {
            "reward": self.stats["reward"] / n, "accuracy": self.stats["correct"] / n, "flops": self.stats["flops"] / n,
            "cost": self.stats["cost"] / n,
        }
        self.stats = {"episodes": 0, "reward": 0.0, "correct": 0, "flops": 0.0, "cost": 0.0}
        return out

    def close(self) -> None:
        pass

    def get_attr(self, attr_name, indices=None):
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        return [getattr(self, method_name)(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False for _ in self._get_indices(indices)]


def make_live_vec_env(live: LiveBackend, num_envs: int = 2, lam: Price | float | tuple[float, float] = 0.1,
                      subprocess: bool = False) -> VecEnv:
    """``num_envs`` live-mode envs (each runs the backbone), in stable-baselines3's ``SubprocVecEnv`` or ``DummyVecEnv``.

    Live mode is for data too large to tabulate or augmented on the fly; with ``subprocess`` every env runs the
    backbone in its own process.
    """
    def make(rank: int):
        def build() -> AdaptiveComputeEnv:
            env = AdaptiveComputeEnv(live=live, lam=lam)
            env.reset(seed=rank)
            return env

        return build

    factories = [make(rank) for rank in range(num_envs)]
    return SubprocVecEnv(factories) if subprocess else DummyVecEnv(factories)
