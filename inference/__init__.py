"""Serving a trained backbone and policy: the adaptive classifier, the plan of its extension passes, one runner
per inference path, and image files in."""

from inference.classifier import AdaptiveClassifier, Choice, Prediction
from inference.inputs import load_images
from inference.paths import COMPILING_PATHS, INFERENCE_PATHS, make_runner, runner_class
from inference.plan import ExtensionPass, ExtensionPlan, plan_extensions
from inference.runner import Glance, InferencePathError, Runner

__all__ = ["COMPILING_PATHS", "INFERENCE_PATHS", "AdaptiveClassifier", "Choice", "ExtensionPass", "ExtensionPlan",
           "Glance", "InferencePathError", "Prediction", "Runner", "load_images", "make_runner", "plan_extensions",
           "runner_class"]
