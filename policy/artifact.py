"""Policy artifact: ``policy.safetensors`` (weights, feature scaler) + ``policy.json`` (everything else).

Loading rebuilds stable-baselines3's ``ActorCriticPolicy`` from the JSON and loads the
weights with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from stable_baselines3.common.policies import ActorCriticPolicy

from backbone import measure_flops
from backbone.io import atomic_write, write_json
from envs import FeatureSpec, OutcomeTable
from envs.reward import lam_feature
from policy.selection import Outcome

WEIGHTS = "policy.safetensors"
SIDECAR = "policy.json"
SCALER_KEYS = ("feature_mean", "feature_std")


class PolicyArtifactError(ValueError):
    """A policy artifact that is missing, corrupt, or made for another backbone."""


@dataclass
class PolicyArtifact:
    """A trained policy with its feature scaler and the facts needed to use it."""

    policy: ActorCriticPolicy
    feature_mean: np.ndarray
    feature_std: np.ndarray
    meta: dict
    """``token_grans``, ``depths``, ``ffn_widths``, ``features``, ``lam``, ``backbone_hash``, ``net_arch``, ..."""

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(**self.meta["features"])

    def normalize(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.feature_mean) / self.feature_std).astype(np.float32)

    @property
    def lam_range(self) -> tuple[float, float] | None:
        """``(low, high)`` of a price-conditioned policy (the price is an input), else None."""
        found = self.meta.get("lam_range")
        return None if found is None else (float(found[0]), float(found[1]))

    @torch.inference_mode()
    def act(self, features: np.ndarray | torch.Tensor, lam: float | None = None) -> np.ndarray:
        """Deterministic actions ``(n, 3)`` (token index, depth - 1, width index) for raw features ``(n, F)``.

        A price-conditioned policy acts at ``lam`` (default: the calibrated ``meta["lam"]``).
        """
        features = features.cpu().numpy() if isinstance(features, torch.Tensor) else features
        features = np.asarray(features, dtype=np.float32)
        if self.lam_range is not None:
            lam = float(self.meta["lam"] if lam is None else lam)
            column = np.full((len(features), 1), lam_feature(lam, *self.lam_range), dtype=np.float32)
            features = np.concatenate([features, column], axis=1)
        obs = torch.as_tensor(self.normalize(features))
        self.policy.set_training_mode(False)
        return self.policy._predict(obs, deterministic=True).cpu().numpy().reshape(-1, 3)

    def network_flops(self) -> int:
        """FLOPs per input of the policy network's deterministic forward (actor only), counted by torch."""
        obs = torch.zeros(1, self.feature_mean.shape[0])
        return measure_flops(lambda: self.policy._predict(obs, deterministic=True))


def policy_outcome(artifact: PolicyArtifact, table: OutcomeTable, lam: float | None = None,
                   network_flops: float | None = None) -> Outcome:
    """The policy's predictions and per-input FLOPs on ``table`` at price ``lam``: the staged cost of each
    chosen configuration (glance included) plus the policy network."""
    actions = artifact.act(table.features, lam=lam)
    network = artifact.network_flops() if network_flops is None else network_flops
    return Outcome(table.predictions(actions), table.staged_flops[tuple(actions.T)] + network)


def make_policy(n_features: int, nvec: list[int], net_arch: list[int]) -> ActorCriticPolicy:
    observation_space = spaces.Box(-np.inf, np.inf, shape=(n_features,), dtype=np.float32)
    return ActorCriticPolicy(observation_space, spaces.MultiDiscrete(nvec), lambda _: 0.0, net_arch=list(net_arch))


def save_policy(artifact: PolicyArtifact, directory: str | Path) -> Path:
    directory = Path(directory)
    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in artifact.policy.state_dict().items()}
    tensors["feature_mean"] = torch.as_tensor(artifact.feature_mean, dtype=torch.float32)
    tensors["feature_std"] = torch.as_tensor(artifact.feature_std, dtype=torch.float32)
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    write_json(directory / SIDECAR, artifact.meta)
    return directory


def check_backbone_hash(meta: dict, backbone_hash: str | None, what: str) -> None:
    """Refuse a policy (its ``meta``) made for another backbone than ``backbone_hash`` (no check when None)."""
    if backbone_hash is not None and meta.get("backbone_hash") != backbone_hash:
        raise PolicyArtifactError(
            f"{what} was trained for backbone {str(meta.get('backbone_hash'))[:12]}..., not this one "
            f"({backbone_hash[:12]}...); train a policy for this backbone with experiments/train_policy.py"
        )


def load_policy(directory: str | Path, backbone_hash: str | None = None) -> PolicyArtifact:
    """Load an artifact; with ``backbone_hash``, refuse one made for another backbone."""
    directory = Path(directory)
    sidecar, weights = directory / SIDECAR, directory / WEIGHTS
    for path in (sidecar, weights):
        if not path.is_file():
            raise PolicyArtifactError(f"{path} not found; train one with experiments/train_policy.py")
    try:
        meta = json.loads(sidecar.read_text())
        tensors = load_file(weights)
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise PolicyArtifactError(f"{directory}: unreadable policy artifact ({err})") from err
    check_backbone_hash(meta, backbone_hash, str(directory))
    nvec = [len(meta["token_grans"]), len(meta["depths"]), len(meta["ffn_widths"])]
    policy = make_policy(int(tensors["feature_mean"].shape[0]), nvec, meta["net_arch"])
    state = {k.removeprefix("policy."): v for k, v in tensors.items() if k.startswith("policy.")}
    try:
        policy.load_state_dict(state)
    except RuntimeError as err:
        raise PolicyArtifactError(f"{weights} does not match {sidecar}: {err}") from err
    policy.set_training_mode(False)
    return PolicyArtifact(policy, tensors["feature_mean"].numpy(), tensors["feature_std"].numpy(), meta)
