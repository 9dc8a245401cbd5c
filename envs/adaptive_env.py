"""A one-step Gymnasium env: pick the backbone configuration for one input."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from backbone import AdaPerceiver, flops_grid
from envs.features import FeatureSpec, compute_features
from envs.outcome_table import OutcomeTable


@dataclass
class LiveBackend:
    """Inputs to run through the frozen backbone at every step instead of a table."""

    model: AdaPerceiver
    images: torch.Tensor
    """``(n, C, H, W)`` float32 in ``[0, 1]``."""
    labels: torch.Tensor
    """``(n,)`` int64."""
    spec: FeatureSpec


class AdaptiveComputeEnv(gym.Env):
    """Contextual bandit over the configurations of a frozen AdaPerceiver.

    **Episode**: one step. ``reset`` draws an input uniformly (from ``self.np_random``);
    ``step`` runs it at the chosen configuration and the episode terminates.

    **Observation**: ``Box(-inf, inf, (F,), float32)``, the policy features of the input
    (see ``envs.features.FeatureSpec``).

    **Action**: ``MultiDiscrete([K, L, M])``: index of the token granularity, exit depth
    minus one, and index of the FFN width.

    **Reward**: ``correct - lam * FLOPs(action) / FLOPs(full)``; ``correct`` is 1 when the
    top-1 prediction is the true class, else 0 (``reward="logprob"`` uses the true
    class's log-probability instead).

    **Info**: ``correct`` (bool), ``flops`` (backbone FLOPs of the action),
    ``config`` ((tokens, depth, width)), ``index`` (row of the input).

    **Arguments**: ``table`` (an ``OutcomeTable``) or ``live`` (a ``LiveBackend``), one of
    them; ``lam`` >= 0; ``reward`` 'correct' or 'logprob'.

    **Version history**: v0, first version.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium convention)

    def __init__(
        self, table: OutcomeTable | None = None, live: LiveBackend | None = None, lam: float = 0.1, reward: str = "correct"
    ) -> None:
        if (table is None) == (live is None):
            raise ValueError("give exactly one of table= (an OutcomeTable) or live= (a LiveBackend)")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if reward not in ("correct", "logprob"):
            raise ValueError(f"reward must be 'correct' or 'logprob', got {reward!r}")
        self.table, self.live, self.lam, self.reward_kind = table, live, float(lam), reward
        if table is not None:
            self.flops = table.flops
            self.token_grans, self.ffn_widths = table.token_grans, table.ffn_widths
            self.n_inputs, n_features = len(table), table.features.shape[1]
        else:
            config = live.model.config
            self.flops = flops_grid(config).numpy()
            self.token_grans, self.ffn_widths = config.token_grans, config.ffn_widths
            self.n_inputs, n_features = len(live.labels), live.spec.dim(config)
        self.full_flops = float(self.flops[-1, -1, -1])
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(n_features,), dtype=np.float32)
        self.action_space = spaces.MultiDiscrete(list(self.flops.shape))
        self.index = 0

    def _observe(self) -> np.ndarray:
        if self.table is not None:
            return self.table.features[self.index]
        model = self.live.model
        tokens = model.embed(self.live.images[self.index : self.index + 1])
        return compute_features(model, tokens, self.live.spec)[0].numpy()

    def _outcome(self, k: int, l: int, m: int) -> tuple[bool, float]:
        if self.table is not None:
            return bool(self.table.correct[self.index, k, l, m]), float(self.table.true_logprob[self.index, k, l, m])
        model, label = self.live.model, int(self.live.labels[self.index])
        with torch.inference_mode():
            logits = model(self.live.images[self.index : self.index + 1], self.token_grans[k], l + 1, self.ffn_widths[m])
        logprobs = logits[0].float().log_softmax(-1)
        return bool(logprobs.argmax().item() == label), float(logprobs[label])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.index = int(self.np_random.integers(self.n_inputs))
        if options and "index" in options:
            self.index = int(options["index"])
        return self._observe().astype(np.float32), {"index": self.index}

    def step(self, action):
        k, l, m = (int(a) for a in action)
        correct, logprob = self._outcome(k, l, m)
        cost = float(self.flops[k, l, m])
        accuracy_term = float(correct) if self.reward_kind == "correct" else logprob
        reward = accuracy_term - self.lam * cost / self.full_flops
        info = {"correct": correct, "flops": cost, "config": (self.token_grans[k], l + 1, self.ffn_widths[m]), "index": self.index}
        return self._observe().astype(np.float32), reward, True, False, info

