"""A one-step Gymnasium env: pick the backbone configuration for one input."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from backbone import AdaPerceiver, flops
from backbone.grid import GridPoint
from envs.features import FeatureSpec, compute_features, staged_flops
from envs.outcome_table import OutcomeTable
from envs.price import Price
from envs.reward import check_reward, cost_grid, reward


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
    (see ``envs.features.FeatureSpec``), plus one column for the price when it is conditioned (``Price.column``).

    **Action**: ``MultiDiscrete([K, L, M])``: index of the token granularity, exit depth
    minus one, and index of the FFN width. The glance's own grid point means "answer with
    the glance"; every other point extends the glance.

    **Reward**: ``accuracy - lam * cost[action]`` (``envs.reward``), the cost a fraction of the
    full configuration's: ``staged_FLOPs(action) / FLOPs(full)`` by default, or the ``cost``
    grid given (e.g. measured staged ms / full ms); the accuracy term is ``reward='correct'``
    (top-1 is the true class), ``'agree'`` (top-1 is the full configuration's) or
    ``'logprob'`` (true class's log-probability).

    **Info**: ``correct`` (bool), ``flops`` (staged backbone FLOPs of the action), ``cost``
    (the priced fraction), ``config`` ((tokens, depth, width)), ``index`` (row of the input), ``lam``.

    **Arguments**: ``table`` (an ``OutcomeTable``) or ``live`` (a ``LiveBackend``), one of
    them; ``lam``, an ``envs.price.Price``: fixed (or a number >= 0), or conditioned on a range (or a pair
    ``(low, high)``) to draw it per episode (log-uniform; ``reset(options={"lam": ...})`` sets it); ``reward``;
    ``cost`` (a ``(K, L, M)`` grid, default staged FLOPs / full FLOPs).

    **Version history**: v0, first version. v1: staged costs, the agree reward, price ranges, cost grids.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium convention)

    def __init__(
        self, table: OutcomeTable | None = None, live: LiveBackend | None = None,
        lam: Price | float | tuple[float, float] = 0.1, reward: str = "correct", cost: np.ndarray | None = None,
    ) -> None:
        if (table is None) == (live is None):
            raise ValueError("give exactly one of table= (an OutcomeTable) or live= (a LiveBackend)")
        self.price, self.reward_kind = Price.of(lam), check_reward(reward)
        self.table, self.live = table, live
        self.lam = self.price.lam  # None for a conditioned price
        if table is not None:
            self.flops, full = table.staged_flops, table.full_flops
            self.token_grans, self.ffn_widths = table.token_grans, table.ffn_widths
            self.n_inputs, n_features = len(table), table.features.shape[1]
        else:
            config = live.model.config
            self.flops, full = staged_flops(live.spec, config), flops(config)
            self.token_grans, self.ffn_widths = config.token_grans, config.ffn_widths
            self.n_inputs, n_features = len(live.labels), live.spec.dim(config)
        self.full_flops = float(full)  # costs are fractions of a fresh full pass
        self.cost = cost_grid(cost, self.flops, self.full_flops)
        n_features += self.price.columns
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(n_features,), dtype=np.float32)
        self.action_space = spaces.MultiDiscrete(list(self.flops.shape))
        self.index, self.episode_lam = 0, self.lam

    def _observe(self) -> np.ndarray:
        if self.table is not None:
            features = self.table.features[self.index]
        else:
            model = self.live.model
            tokens = model.embed(self.live.images[self.index : self.index + 1])
            features = compute_features(model, tokens, self.live.spec)[0].numpy()
        if self.price.conditioned:
            features = np.append(features, self.price.column(self.episode_lam))
        return features.astype(np.float32)

    def _outcome(self, k: int, l: int, m: int) -> tuple[bool, bool, float]:
        """(correct, agrees with the full configuration, true-class log-probability) of the current input."""
        if self.table is not None:
            i = self.index
            return bool(self.table.correct[i, k, l, m]), bool(self.table.agree[i, k, l, m]), float(self.table.true_logprob[i, k, l, m])
        model, label = self.live.model, int(self.live.labels[self.index])
        image = self.live.images[self.index : self.index + 1]
        with torch.inference_mode():
            logits = model(image, *GridPoint.from_action((k, l, m), self.token_grans, self.ffn_widths))
            full_class = int(model(image).argmax(-1))
        logprobs = logits[0].float().log_softmax(-1)
        predicted = int(logprobs.argmax())
        return predicted == label, predicted == full_class, float(logprobs[label])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.index = int(self.np_random.integers(self.n_inputs))
        if options and "index" in options:
            self.index = int(options["index"])
        if self.price.conditioned:
            self.episode_lam = float(options["lam"]) if options and "lam" in options else self.price.draw(self.np_random)
        return self._observe(), {"index": self.index}

    def step(self, action):
        k, l, m = (int(a) for a in action)
        correct, agree, logprob = self._outcome(k, l, m)
        cost = float(self.cost[k, l, m])
        term = {"correct": float(correct), "agree": float(agree), "logprob": logprob}[self.reward_kind]
        value = float(reward(term, cost, self.episode_lam))
        info = {"correct": correct, "flops": float(self.flops[k, l, m]), "cost": cost,
                "config": GridPoint.from_action((k, l, m), self.token_grans, self.ffn_widths),
                "index": self.index, "lam": self.episode_lam}
        return self._observe(), value, True, False, info
