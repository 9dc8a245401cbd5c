"""The uncertainty of every headline: a paired accuracy difference, a front ratio, a trained family over seeds.

All three resample the test images (a paired bootstrap: the same redrawn images for the
family and the reference, and for every fixed configuration of the hindsight front), so an
interval says how much the figure would move on another draw of test images of the same
distribution; the seeds say how much it moves between trainings of the same recipe.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

RESAMPLES = 2000
"""Bootstrap resamples of the test images."""


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` float32 counts of each image in each bootstrap resample (multinomial, sums to ``n``)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float32)


def paired_stats(correct: np.ndarray, reference: np.ndarray, tolerance_pp: float = 0.1, seed: int = 0,
                 resamples: int = RESAMPLES) -> dict:
    """Accuracy difference ``correct - reference`` in pp with a 95% paired percentile-bootstrap interval, the
    bootstrap probability that the true difference is below ``-tolerance_pp``, and the exact McNemar p-value.

    ``correct``, ``reference``: ``(n,)`` bool, the same images.
    """
    diff = correct.astype(np.float64) - reference.astype(np.float64)
    lost, gained = int(np.sum(reference & ~correct)), int(np.sum(~reference & correct))
    p = 1.0 if lost + gained == 0 else binomtest(min(lost, gained), lost + gained, 0.5).pvalue
    if lost + gained == 0:  # nothing to resample
        draws = np.zeros(1)
    else:
        draws = 100 * (resample_weights(len(diff), resamples, seed) @ diff.astype(np.float32)) / len(diff)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"delta_pp": 100 * float(diff.mean()), "delta_pp_ci": [float(low), float(high)],
            "p_below_tolerance": float(np.mean(draws < -tolerance_pp - 1e-9)), "lost": lost, "gained": gained,
            "mcnemar_p": float(p)}


def front_ratio_interval(correct: np.ndarray, flops: np.ndarray, grid_correct: np.ndarray, grid_flops: np.ndarray,
                         seed: int = 0, resamples: int = 500) -> dict:
    """Bootstrap of the front ratio: on each resample of the test images, the family's mean FLOPs over those of
    the cheapest fixed configuration at least as accurate *on that resample* (the hindsight front redrawn too).

    ``correct`` ``(n,)`` bool and ``flops`` ``(n,)`` of the family; ``grid_correct`` ``(n, G)`` bool and
    ``grid_flops`` ``(G,)`` of every fixed configuration. Returns the median and the 95% interval.
    """
    n = len(correct)
    weights = resample_weights(n, resamples, seed)
    accuracy = weights @ correct.astype(np.float32) / n  # (R,)
    mean_flops = weights @ flops.astype(np.float32) / n
    grid_accuracy = weights @ grid_correct.reshape(n, -1).astype(np.float32) / n  # (R, G)
    reaching = grid_accuracy >= accuracy[:, None] - 1e-6
    cheapest = np.where(reaching, grid_flops.reshape(1, -1), np.inf).min(axis=1)
    most_accurate = grid_flops.reshape(-1)[grid_accuracy.argmax(axis=1)]
    ratio = mean_flops / np.where(np.isfinite(cheapest), cheapest, most_accurate)
    low, median, high = np.percentile(ratio, [2.5, 50, 97.5])
    return {"median": float(median), "ci": [float(low), float(high)], "resamples": resamples}


SEED_KEYS = ("accuracy", "delta_pp", "p_below_tolerance", "disagreement", "flop_reduction", "front_ratio")


def over_seeds(rows: list[dict], labels: list[str]) -> dict:
    """Mean and sample sd over the rows of one family trained with several seeds, and each seed's figures."""
    summary = {"n_seeds": len(rows), "seeds": labels}
    for key in SEED_KEYS:
        values = np.array([row[key] for row in rows if row.get(key) is not None], dtype=np.float64)
        if len(values):
            summary[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    folds = [fold for row in rows for fold in row["selection"]["folds"]]
    summary["worst_held_out_disagreement"] = max(fold["held_out_disagreement"] for fold in folds)
    summary["per_seed"] = [{"seed": label, **{key: row.get(key) for key in SEED_KEYS},
                            "chosen": [{k: v for k, v in fold.items() if k != "calibration"}
                                       for fold in row["selection"]["folds"]]}
                           for label, row in zip(labels, rows, strict=True)]
    return summary
