"""The second look (``policy.second_look``): an extension less sure than the threshold is answered by the full
configuration, extended from the same glance, and pays that extension; on outcome tables and in the classifier
alike, with what the classifier charges equal to what torch counts it doing."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import synthetic_table
from test_inference import random_artifact

from backbone import measure_flops
from backbone.checkpoint import backbone_hash, save_checkpoint
from backbone.data import load_dataset
from envs import FeatureSpec
from envs.features import compute_features
from inference import AdaptiveClassifier
from policy import PolicyArtifactError, save_policy
from policy.artifact import policy_outcome
from policy.second_look import check_second_look, looked_again


def test_only_unsure_extensions_go_on_to_the_full_configuration():
    glance, full = (0, 0, 0), (1, 1, 1)
    actions = np.array([glance, (1, 0, 1), (1, 0, 1), full, (0, 1, 0)])
    confidence = np.array([0.2, 0.49, 0.51, 0.2, 0.3])
    # the glance's own answer and the full configuration never look again; an extension does below 0.5 only
    assert looked_again(confidence, actions, glance, full, 0.5).tolist() == [False, True, False, False, True]
    assert not looked_again(confidence, actions, glance, full, None).any()
    for bad in (0, 1, 1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="softmax probability in"):
            check_second_look(bad)


def test_on_a_table_the_answer_and_the_cost_are_the_full_configurations_where_it_looks_again():
    # four inputs on a (2, 2, 2) grid, glance (0, 0, 0), full (1, 1, 1); every configuration but the full one is wrong
    correct = np.zeros((4, 2, 2, 2), bool)
    correct[:, 1, 1, 1] = True
    confidence = np.full((4, 2, 2, 2), 0.9, np.float32)
    confidence[1, 1, 0, 1] = 0.4  # input 1's extension is unsure
    confidence[0, 0, 0, 0] = 0.1  # input 0's glance is unsure, and answers anyway
    staged = np.arange(1, 9).reshape(2, 2, 2) * 100
    table = synthetic_table(correct, confidence=confidence, staged=staged)
    actions = np.array([(0, 0, 0), (1, 0, 1), (1, 0, 1), (1, 1, 1)])
    artifact = SimpleNamespace(act=lambda features, lam=None: actions, network_flops=lambda: 7, second_look=0.5,
                               feature_spec=FeatureSpec(glance_tokens=1, glance_depth=1, glance_width=0.5))
    outcome = policy_outcome(artifact, table)
    assert (outcome.predicted == table.labels).tolist() == [False, True, False, True]
    # input 1 pays its extension (staged 600) and the one from the glance (100) to the full configuration (800)
    assert outcome.flops.tolist() == [107, 600 + 700 + 7, 607, 807]
    assert [tuple(a) for a in outcome.actions] == [tuple(a) for a in actions]  # where each first answer came from
    assert outcome.looked_again.tolist() == [False, True, False, False]
    priced = policy_outcome(artifact, table, cost=staged / 800.0)
    assert priced.cost.tolist() == pytest.approx([100 / 800, 1300 / 800, 600 / 800, 1.0])
    artifact.second_look = None  # without it the unsure extension answers, wrongly, at its own cost
    plain = policy_outcome(artifact, table)
    assert (plain.predicted == table.labels).tolist() == [False, False, False, True] and plain.flops[1] == 607


@pytest.fixture(scope="module")
def digits_images():
    return load_dataset("digits").splits["test"].x[:64]


def test_the_classifier_looks_again_as_the_table_does_and_charges_what_torch_counts(tmp_path, tiny_model, digits_images):
    save_checkpoint(tiny_model, tmp_path / "backbone", {"dataset": "digits", "split_seed": 0})
    features = compute_features(tiny_model, tiny_model.embed(digits_images), FeatureSpec()).numpy()
    artifact = random_artifact(tiny_model.config, backbone_hash(tmp_path / "backbone"),
                               scaler=(features.mean(0), features.std(0) + 1e-6))
    save_policy(artifact, tmp_path / "plain")
    reference = AdaptiveClassifier.from_dirs(tmp_path / "backbone", tmp_path / "plain")
    plain, full, glance = reference.predict(digits_images), reference.full_point, reference.glance_point
    extended = np.array([c not in (glance, full) for c in plain.configs])
    # a threshold between the extensions' confidences, so that some look again and some do not
    threshold = float(np.median(plain.confidence.numpy()[extended]))
    artifact.meta["second_look"] = threshold
    save_policy(artifact, tmp_path / "looks")
    classifier = AdaptiveClassifier.from_dirs(tmp_path / "backbone", tmp_path / "looks")
    out = classifier.predict(digits_images)
    again = extended & (plain.confidence.numpy() < threshold)
    assert 0 < again.sum() < extended.sum()
    assert [c == full for c in out.configs] == (again | np.array([c == full for c in plain.configs])).tolist()
    fresh = tiny_model.run(tiny_model.embed(digits_images[again]), *full)
    assert torch.allclose(out.logits[again], fresh, atol=1e-4)
    assert torch.equal(out.logits[~again], plain.logits[~again])
    np.testing.assert_array_equal(out.flops, plain.flops + again * classifier.second_look_flops)
    assert out.flops.sum() == measure_flops(lambda: classifier.predict(digits_images))


def test_a_second_look_without_a_glance_is_refused(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "backbone", {"dataset": "digits", "split_seed": 0})
    spec = FeatureSpec(pooled=True, glance=False)
    artifact = random_artifact(tiny_model.config, backbone_hash(tmp_path / "backbone"), spec=spec)
    artifact.meta["second_look"] = 0.5
    save_policy(artifact, tmp_path / "policy")
    with pytest.raises(PolicyArtifactError, match="continues from the glance"):
        AdaptiveClassifier.from_dirs(tmp_path / "backbone", tmp_path / "policy")


def test_the_milliseconds_of_a_second_look_are_its_extension_from_the_glance_on_top():
    from policy.latency_table import LatencyTableError, ms_per_input

    staged = np.arange(1, 9, dtype=float).reshape(2, 2, 2)  # the glance (0, 0, 0) takes 1 ms, the full config 8
    table = {"staged_ms": staged.tolist(), "fresh_ms": (10 * staged).tolist(), "glance_ms": 1.0}
    actions = np.array([(0, 0, 0), (1, 0, 1), (1, 0, 1)])
    again = np.array([False, True, False])
    assert ms_per_input(table, "staged", actions, again).tolist() == [1.0, 6.0 + 7.0, 6.0]
    assert ms_per_input(table, "staged", actions).tolist() == [1.0, 6.0, 6.0]
    with pytest.raises(LatencyTableError, match="continues from the glance"):
        ms_per_input(table, "fresh", actions, again)
