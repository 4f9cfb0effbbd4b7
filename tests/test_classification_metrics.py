"""The paired AUC comparison a benchmark uses to say whether a model beats its baseline."""

from __future__ import annotations

import numpy as np

from melanoma_tf.evaluation import classification as metrics


def test_auc_difference_is_paired():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], [150, 50])
    baseline = y + rng.normal(0, 1.0, y.size)
    better = y + rng.normal(0, 0.5, y.size)
    same = metrics.auc_difference(y, baseline, baseline, n=200)
    assert same == {"value": 0.0, "ci95": [0.0, 0.0]}
    up = metrics.auc_difference(y, better, baseline, n=200)
    down = metrics.auc_difference(y, baseline, better, n=200)
    assert up["value"] == -down["value"] > 0.1
    assert 0 < up["ci95"][0] < up["value"] < up["ci95"][1]
    # Adding a little noise to the baseline: both AUCs move together on every resample, so the
    # paired interval is far narrower than either AUC's own interval.
    nearly = baseline + rng.normal(0, 0.05, y.size)
    paired = metrics.auc_difference(y, nearly, baseline, n=200)["ci95"]
    marginal = metrics.metrics_with_ci(y, baseline, n=200)["roc_auc"]["ci95"]
    assert paired[1] - paired[0] < (marginal[1] - marginal[0]) / 4
