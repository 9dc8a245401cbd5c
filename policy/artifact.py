"""Policy artifact: ``policy.safetensors`` (weights, feature scaler) + ``policy.json`` (everything else).

Loading rebuilds stable-baselines3's ``ActorCriticPolicy`` from the JSON and loads the
weights with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from stable_baselines3.common.policies import ActorCriticPolicy

from backbone import measure_flops
from backbone.errors import ProjectError
from backbone.io import json_text, sha256_file, write_file_set
from envs import FeatureSpec, OutcomeTable, Price, PriceError
from envs.price import GRID
from policy.second_look import check_second_look, glance_action, looked_again, second_look_cost
from policy.selection import Outcome, PriceKnob

WEIGHTS = "policy.safetensors"
SIDECAR = "policy.json"
SCALER_KEYS = ("feature_mean", "feature_std")


class PolicyArtifactError(ProjectError):
    """A policy artifact that is missing, corrupt, or made for another backbone."""


@dataclass
class PolicyArtifact:
    """A trained policy with its feature scaler and the facts needed to use it."""

    policy: ActorCriticPolicy
    feature_mean: np.ndarray
    feature_std: np.ndarray
    meta: dict
    """``token_grans``, ``depths``, ``ffn_widths``, ``features``, ``lam`` (the price it acts at), ``lam_range`` (a
    price-conditioned policy's range; ``price``), ``backbone_hash``, ``net_arch``, ..."""

    def __post_init__(self) -> None:
        # made once, so that ``act_tensor`` runs torch operations only
        self._scaler = tuple(torch.as_tensor(a, dtype=torch.float32) for a in (self.feature_mean, self.feature_std))
        self._nvec = [int(n) for n in self.policy.action_space.nvec]
        self.policy.set_training_mode(False)

    def to(self, device: torch.device | str) -> PolicyArtifact:
        """Move the network and its scaler to ``device`` (in place); returns self."""
        self.policy.to(device)
        self._scaler = tuple(t.to(device) for t in self._scaler)
        return self

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(**self.meta["features"])

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Observations ``(n, F)`` the network reads: raw features ``(n, F)`` (price column included) standardised
        by the training scaler, on the scaler's device."""
        mean, std = self._scaler
        return (features.to(mean.device) - mean) / std

    @property
    def price(self) -> Price:
        """The price the policy was trained on: conditioned on ``meta["lam_range"]`` (the price is an input, acted at
        ``meta["lam"]`` unless told otherwise), else fixed at ``meta["lam"]``."""
        return Price.from_meta(self.meta)

    @property
    def second_look(self) -> float | None:
        """The threshold under which an extension's answer goes on to the full configuration (``policy.second_look``);
        None for a policy without a second look."""
        try:
            return check_second_look(self.meta.get("second_look"))
        except ValueError as err:
            raise PolicyArtifactError(f"policy.json: {err}; {RETRAIN}") from None

    @property
    def lam_range(self) -> tuple[float, float] | None:
        """``(low, high)`` of a price-conditioned policy (the price is an input), else None (``price.bounds``)."""
        return self.price.bounds if self.meta.get("lam_range") is not None else None

    @torch.inference_mode()
    def act(self, features: np.ndarray | torch.Tensor, lam: float | None = None) -> np.ndarray:
        """Deterministic actions ``(n, 3)`` (token index, depth - 1, width index) for raw features ``(n, F)``.

        A price-conditioned policy acts at ``lam`` (default: the calibrated ``meta["lam"]``).
        """
        # a copy: a memory-mapped table's features are read-only, which torch warns about
        features = torch.tensor(np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features,
                                           dtype=np.float32))
        return self.act_tensor(features, self.lam_column(lam)).cpu().numpy()

    def lam_column(self, lam: float | None = None) -> float | None:
        """The observation column of price ``lam`` (default: the calibrated one); None for a policy without one."""
        if self.meta.get("lam_range") is None:  # a fixed price: the policy does not see it
            return None
        return float(self.price.column(float(self.meta["lam"] if lam is None else lam)))

    def act_tensor(self, features: torch.Tensor, lam_column: float | None) -> torch.Tensor:
        """``act`` on a float32 tensor ``(n, F)`` and a ``lam_column``, torch operations only (so it can be compiled
        with the glance): int64 actions ``(n, 3)``, on the policy network's device (the CPU unless moved)."""
        if lam_column is not None:
            features = torch.cat([features, torch.full_like(features[:, :1], lam_column)], dim=1)
        return self._actions(self.normalize(features))

    def _actions(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic actions ``(n, 3)`` of normalised observations ``(n, F)``.

        stable-baselines3's deterministic MultiCategorical action is the argmax of each axis's logits;
        taking it from the actor's logits skips building the distribution (a third of the policy's time
        at batch 1).
        """
        policy = self.policy
        logits = policy.action_net(policy.mlp_extractor.forward_actor(policy.pi_features_extractor(obs)))
        axes = logits.split(self._nvec, dim=1)
        return torch.stack([axis.argmax(dim=1) for axis in axes], dim=1)

    def network_flops(self) -> int:
        """FLOPs per input of the policy network as ``act`` runs it (actor only), counted by torch."""
        obs = torch.zeros(1, self.feature_mean.shape[0], device=self._scaler[0].device)
        return measure_flops(lambda: self._actions(obs))


def policy_outcome(artifact: PolicyArtifact, table: OutcomeTable, lam: float | None = None,
                   network_flops: float | None = None, cost: np.ndarray | None = None) -> Outcome:
    """The policy's predictions and per-input FLOPs on ``table`` at price ``lam``: the staged cost of each
    chosen configuration (glance included) plus the policy network, and, for an artifact with a second look
    (``policy.second_look``), the extension to the full configuration of each unsure extension (``looked_again``).

    ``cost`` (a ``(K, L, M)`` grid, e.g. measured staged ms) prices each input at its action for the
    selection rule instead of FLOPs (``Outcome.cost``); FLOPs are reported either way.
    """
    actions = artifact.act(table.features, lam=lam)
    network = artifact.network_flops() if network_flops is None else network_flops
    index = tuple(actions.T)
    predicted, paid = table.predictions(actions), table.staged_flops[index] + network
    priced = None if cost is None else np.asarray(cost, dtype=np.float64)[index]
    threshold = artifact.second_look
    if threshold is not None:  # unsure extensions go on to the full configuration, from the same glance
        spec = artifact.feature_spec
        if not spec.glance:
            raise PolicyArtifactError("a second look continues from the glance; this policy has none")
        glance, full = glance_action(spec, table.token_grans, table.ffn_widths), tuple(n - 1 for n in table.grid_shape)
        again = looked_again(table.confidence[(np.arange(len(actions)), *index)], actions, glance, full, threshold)
        predicted = np.where(again, table.predicted[:, -1, -1, -1], predicted)
        paid = paid + again * second_look_cost(table.staged_flops, glance)
        if priced is not None:
            priced = priced + again * second_look_cost(cost, glance)
        return Outcome(predicted, paid, priced, actions, again)
    return Outcome(predicted, paid, priced, actions)


def price_knobs(artifacts: list[PolicyArtifact], n: int = GRID) -> list[PriceKnob]:
    """The candidates of trained policies, safest first: each artifact at each price of its grid (``Price.grid``:
    ``n`` prices of a conditioned one, a fixed one's own), ordered by price, then artifact, so that the order is
    fixed before any calibration input is read."""
    knobs = [PriceKnob(i, float(lam)) for i, artifact in enumerate(artifacts) for lam in artifact.price.grid(n)]
    return sorted(knobs, key=lambda knob: (knob.lam, knob.artifact))


def make_policy(n_features: int, nvec: list[int], net_arch: list[int]) -> ActorCriticPolicy:
    observation_space = spaces.Box(-np.inf, np.inf, shape=(n_features,), dtype=np.float32)
    return ActorCriticPolicy(observation_space, spaces.MultiDiscrete(nvec), lambda _: 0.0, net_arch=list(net_arch))


def save_policy(artifact: PolicyArtifact, directory: str | Path, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the weights and the sidecar as one unit: the sidecar records the weights' sha256, and both
    files are renamed into place together, so a policy whose files come from two writes is refused on load.

    ``extra_files`` (name -> bytes, e.g. the latency table the policy was priced by) are written in the same
    unit, beside them.
    """
    directory = Path(directory)
    for name in extra_files or {}:
        if Path(name).name != name or name in (WEIGHTS, SIDECAR):
            raise ValueError(f"an extra policy file needs a plain name other than {WEIGHTS} and {SIDECAR}, got {name!r}")
    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in artifact.policy.state_dict().items()}
    tensors["feature_mean"] = torch.as_tensor(artifact.feature_mean, dtype=torch.float32)
    tensors["feature_std"] = torch.as_tensor(artifact.feature_std, dtype=torch.float32)
    weights = save(tensors)
    meta = {**artifact.meta, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    write_file_set({
        directory / WEIGHTS: lambda tmp: Path(tmp).write_bytes(weights),
        directory / SIDECAR: lambda tmp: Path(tmp).write_text(json_text(meta)),
        **{directory / name: (lambda tmp, data=data: Path(tmp).write_bytes(data)) for name, data in (extra_files or {}).items()},
    })
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
    if not isinstance(meta, dict):
        raise PolicyArtifactError(f"{sidecar}: not a policy sidecar (a JSON object); {RETRAIN}")
    if "weights_sha256" in meta and sha256_file(weights) != meta["weights_sha256"]:
        raise PolicyArtifactError(
            f"{weights} is not the file {sidecar} was written with (changed since, or an interrupted write); "
            "train the policy again with experiments/train_policy.py"
        )
    check_backbone_hash(meta, backbone_hash, str(directory))
    _check_sidecar(meta, sidecar)
    mean, std = _check_scaler(tensors, weights)
    nvec = [len(meta["token_grans"]), len(meta["depths"]), len(meta["ffn_widths"])]
    try:
        policy = make_policy(len(mean), nvec, meta["net_arch"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise PolicyArtifactError(f"{sidecar}: net_arch {meta['net_arch']} is not a policy network; {RETRAIN}") from err
    state = {k.removeprefix("policy."): v for k, v in tensors.items() if k.startswith("policy.")}
    try:
        policy.load_state_dict(state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise PolicyArtifactError(f"{weights} does not match {sidecar}: {reason}; {RETRAIN}") from err
    policy.set_training_mode(False)
    return PolicyArtifact(policy, mean, std, meta)


RETRAIN = "train the policy again with experiments/train_policy.py"
SIDECAR_KEYS = ("token_grans", "depths", "ffn_widths", "features", "net_arch", "lam")


def _check_sidecar(meta: dict, sidecar: Path) -> None:
    """Refuse a ``policy.json`` without the keys loading and acting need, or with ill-typed ones."""
    missing = [key for key in SIDECAR_KEYS if key not in meta]
    if missing:
        raise PolicyArtifactError(f"{sidecar}: missing {missing}; {RETRAIN}")
    for key in ("token_grans", "depths", "ffn_widths", "net_arch"):
        value = meta[key]
        numbers = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not numbers or (key != "net_arch" and not value):
            raise PolicyArtifactError(f"{sidecar}: {key} must be a list of numbers, got {value!r}; {RETRAIN}")
    if not all(isinstance(v, int) and v > 0 for v in meta["net_arch"]):
        raise PolicyArtifactError(f"{sidecar}: net_arch must list positive layer sizes, got {meta['net_arch']}; {RETRAIN}")
    try:
        FeatureSpec(**meta["features"])
    except (TypeError, ValueError) as err:
        raise PolicyArtifactError(f"{sidecar}: features {meta['features']!r} is not a feature spec ({err}); {RETRAIN}") from err
    try:  # lam_range [low, high] with 0 < low < high, else lam a finite number >= 0
        Price.from_meta(meta)
    except PriceError as err:
        raise PolicyArtifactError(f"{sidecar}: {err}; {RETRAIN}") from err


def _check_scaler(tensors: dict[str, torch.Tensor], weights: Path) -> tuple[np.ndarray, np.ndarray]:
    """The feature scaler ``(mean, std)``: present, one value per feature, finite, and ``std > 0``."""
    missing = [key for key in SCALER_KEYS if key not in tensors]
    if missing:
        raise PolicyArtifactError(f"{weights}: missing tensors {missing}; {RETRAIN}")
    mean, std = (tensors[key].float().numpy() for key in SCALER_KEYS)
    if mean.ndim != 1 or mean.shape != std.shape or not len(mean):
        raise PolicyArtifactError(f"{weights}: feature_mean {tuple(mean.shape)} and feature_std {tuple(std.shape)} "
                                  f"must both be (n_features,); {RETRAIN}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise PolicyArtifactError(f"{weights}: feature_std must be finite and > 0 and feature_mean finite "
                                  f"(min std {std.min():.3g}); {RETRAIN}")
    return mean, std
