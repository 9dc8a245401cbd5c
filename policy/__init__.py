"""Policy: PPO training over the env, calibration, selection and the policy artifact."""

from policy.artifact import PolicyArtifact, PolicyArtifactError, load_policy, save_policy

__all__ = ["PolicyArtifact", "PolicyArtifactError", "load_policy", "save_policy"]
