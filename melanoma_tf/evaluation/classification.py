"""Melanoma-vs-nevus metrics (the paper's, plus the ones that do not depend on a threshold),
bootstrap confidence intervals, the paper's Table II, ROC and confusion-matrix plots.

Labels are 1 = melanoma (positive), 0 = nevus; scores are melanoma probabilities. Every metric
comes from scikit-learn; plots use matplotlib's object API (Agg canvas, no pyplot state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from sklearn.calibration import CalibrationDisplay, calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from melanoma_tf import atomic, storage
from melanoma_tf.evaluation.bootstrap import bootstrap_ci

METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "balanced_accuracy",
           "sensitivity_at_80_specificity", "sensitivity_at_90_specificity")
OPERATING_POINT_FILE = "operating_point.json"  # a training run's chosen threshold, read by the exporter
PAPER = {"accuracy": 0.802, "sensitivity": 0.702, "specificity": 0.901, "precision": 0.878}


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Highest sensitivity on the ROC curve among thresholds whose specificity is >= the target."""
    fpr, tpr, _ = roc_curve(y_true, score)
    return float(tpr[fpr <= 1.0 - specificity + 1e-12].max())


def threshold_for_sensitivity(y_true: np.ndarray, score: np.ndarray, sensitivity: float) -> float:
    """The highest threshold at which these predictions reach the target sensitivity: a screening
    tool's operating point, chosen on predictions the model did not train on."""
    _, tpr, thresholds = roc_curve(np.asarray(y_true).astype(int), score, drop_intermediate=False)
    return float(thresholds[np.argmax(tpr >= sensitivity)])  # thresholds decrease, tpr increases


def calibration(y_true: np.ndarray, score: np.ndarray, bins: int = 10) -> dict:
    """Brier score and the reliability table (uniform bins of predicted probability): is the
    melanoma probability a probability?"""
    y_true, score = np.asarray(y_true).astype(int), np.asarray(score, float)
    observed, predicted = calibration_curve(y_true, score, n_bins=bins, strategy="uniform")
    counts = np.histogram(score, bins=np.linspace(0, 1, bins + 1))[0]
    return {"brier_score": float(brier_score_loss(y_true, score)),
            "reliability": [{"mean_predicted": float(p), "fraction_melanoma": float(o)}
                            for p, o in zip(predicted, observed)],
            "images_per_bin": counts.tolist()}


def classification_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """All METRICS for one set of predictions; raises ValueError when a class is missing."""
    y_true, score = np.asarray(y_true).astype(int), np.asarray(score, float)
    if len(np.unique(y_true)) < 2:
        raise ValueError("both classes are needed for ROC-based metrics")
    pred = (score >= threshold).astype(int)
    return {
        "roc_auc": float(roc_auc_score(y_true, score)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "sensitivity": float(recall_score(y_true, pred, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(y_true, pred, pos_label=0, zero_division=0)),
        "precision": float(precision_score(y_true, pred, pos_label=1, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "sensitivity_at_80_specificity": sensitivity_at_specificity(y_true, score, 0.8),
        "sensitivity_at_90_specificity": sensitivity_at_specificity(y_true, score, 0.9),
    }


def metrics_with_ci(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5,
                    n: int = 1000, seed: int = 0) -> dict[str, dict[str, float | list[float]]]:
    """{metric: {"value": v, "ci95": [low, high]}}; class-stratified bootstrap, seeded."""
    y_true, score = np.asarray(y_true).astype(int), np.asarray(score, float)
    values = classification_metrics(y_true, score, threshold)

    def vector(y, s):
        m = classification_metrics(y, s, threshold)
        return [m[k] for k in METRICS]

    low, high = bootstrap_ci(vector, y_true, score, n=n, seed=seed, strata=y_true)
    return {k: {"value": values[k], "ci95": [float(low[i]), float(high[i])]} for i, k in enumerate(METRICS)}


def auc_difference(y_true: np.ndarray, score: np.ndarray, reference: np.ndarray, n: int = 1000,
                   seed: int = 0) -> dict[str, float | list[float]]:
    """ROC AUC of `score` minus that of `reference` on the same images, with a paired bootstrap
    95% CI (both scored on every resample): whether a model beats a baseline, which two
    overlapping marginal CIs cannot say."""
    def difference(y, a, b):
        return roc_auc_score(y, a) - roc_auc_score(y, b)

    y_true = np.asarray(y_true).astype(int)
    low, high = bootstrap_ci(difference, y_true, np.asarray(score, float), np.asarray(reference, float),
                             n=n, seed=seed, strata=y_true)
    return {"value": float(difference(y_true, score, reference)), "ci95": [low, high]}


def summarize_folds(per_fold: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "sd"}} over folds (sample standard deviation)."""
    out = {}
    for k in METRICS:
        v = np.array([m[k] for m in per_fold], float)
        out[k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    return out


def table_ii(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, dict[str, int]]:
    """The paper's Table II: counts by actual (rows) and predicted (columns) class."""
    pred = (np.asarray(score) >= threshold).astype(int)
    (tp, fn), (fp, tn) = confusion_matrix(np.asarray(y_true).astype(int), pred, labels=[1, 0])
    return {"actual_melanoma": {"predicted_melanoma": int(tp), "predicted_nevus": int(fn)},
            "actual_nevus": {"predicted_melanoma": int(fp), "predicted_nevus": int(tn)}}


def _figure(size=(4.5, 4.5)):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=120)


def _save(fig, path: str | Path) -> Path:
    """PNG, written atomically, locally or into a bucket."""
    with atomic.atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return storage.path(path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """One ROC curve per entry {name: (y_true, score)} on shared axes, with the chance line."""
    fig = _figure()
    ax = fig.subplots()
    for i, (name, (y_true, score)) in enumerate(curves.items()):
        RocCurveDisplay.from_predictions(np.asarray(y_true).astype(int), score, name=name, ax=ax,
                                         plot_chance_level=i == len(curves) - 1)
    ax.set(title=title, xlabel="1 - specificity", ylabel="sensitivity")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(y_true: np.ndarray, score: np.ndarray, path: str | Path, threshold: float = 0.5,
                   title: str = "") -> Path:
    """Table II as a picture: rows actual, columns predicted, melanoma first."""
    fig = _figure((4.0, 3.6))
    ax = fig.subplots()
    pred = (np.asarray(score) >= threshold).astype(int)
    ConfusionMatrixDisplay.from_predictions(np.asarray(y_true).astype(int), pred, labels=[1, 0],
                                            display_labels=["melanoma", "nevus"], ax=ax,
                                            colorbar=False, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(y_true: np.ndarray, score: np.ndarray, path: str | Path, title: str = "", bins: int = 10) -> Path:
    """Reliability diagram: observed melanoma fraction against mean predicted probability per bin."""
    fig = _figure()
    ax = fig.subplots()
    CalibrationDisplay.from_predictions(np.asarray(y_true).astype(int), score, n_bins=bins, ax=ax,
                                        name=f"Brier {brier_score_loss(np.asarray(y_true).astype(int), score):.3f}")
    ax.set(title=title, xlabel="predicted melanoma probability", ylabel="fraction melanoma")
    fig.tight_layout()
    return _save(fig, path)


def format_ci(entry: Mapping[str, float | list[float]]) -> str:
    """'0.712 [0.650, 0.771]' for a metrics_with_ci entry."""
    low, high = entry["ci95"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"
