"""Policy: PPO training over the env, calibration, artifacts, evaluation and adaptive inference."""

from policy.artifact import PolicyArtifact, PolicyArtifactError, load_policy, save_policy
from policy.classifier import AdaptiveClassifier, Prediction

__all__ = ["AdaptiveClassifier", "PolicyArtifact", "PolicyArtifactError", "Prediction", "load_policy", "save_policy"]
