"""Gymnasium env over a frozen AdaPerceiver: outcome tables, the FLOP price, the one-step env, a batched VecEnv."""

import gymnasium

from envs.adaptive_env import AdaptiveComputeEnv, LiveBackend
from envs.features import FeatureSpec, compute_features, features_from, staged_flops
from envs.outcome_table import OutcomeTable, build_outcome_table, cached_outcome_table, load_table, save_table
from envs.price import Price, PriceError
from envs.vec_env import TableVecEnv, make_live_vec_env

ENV_ID = "AdaptiveCompute-v1"
if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="envs.adaptive_env:AdaptiveComputeEnv")

__all__ = [
    "ENV_ID",
    "AdaptiveComputeEnv",
    "FeatureSpec",
    "LiveBackend",
    "OutcomeTable",
    "Price",
    "PriceError",
    "TableVecEnv",
    "build_outcome_table",
    "cached_outcome_table",
    "compute_features",
    "features_from",
    "load_table",
    "make_live_vec_env",
    "save_table",
    "staged_flops",
]
