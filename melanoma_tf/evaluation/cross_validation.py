"""Summaries of a cross-validation: per-fold and pooled out-of-fold metrics with bootstrap
intervals, the operating point chosen out of fold, and the predictions table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from melanoma_tf import atomic
from melanoma_tf.configs import classification as configs
from melanoma_tf.dataloaders.classification_input import LesionSet
from melanoma_tf.evaluation import classification as metrics


def fold_metrics(labels: np.ndarray, score: np.ndarray, threshold: float) -> dict | None:
    try:
        return metrics.classification_metrics(labels, score, threshold)
    except ValueError:  # a held-out fold with one class only (tiny datasets)
        return None


def fold_result(k: int, train: LesionSet, held: LesionSet, best: np.ndarray, last: np.ndarray,
                best_epoch: int, threshold: float, served_like: np.ndarray | None = None) -> dict:
    """One fold's sizes, metrics at its best and last epoch, and held-out predictions (with
    `served_like`, also the last epoch's on views cut around jittered boxes)."""
    predictions = [{"image_id": i, "download": d, "label": int(y), "melanoma_probability": float(b),
                    "melanoma_probability_last_epoch": float(s)}
                   for i, d, y, b, s in zip(held.image_ids, held.downloads, held.labels, best, last)]
    if served_like is not None:
        for p, served in zip(predictions, served_like):
            p["melanoma_probability_served_like"] = float(served)
    return {"fold": k, "n_train": len(train), "n_val": len(held), "n_val_melanoma": int(held.labels.sum()),
            "best_epoch": best_epoch, "metrics": fold_metrics(held.labels, best, threshold),
            "metrics_last_epoch": fold_metrics(held.labels, last, threshold), "predictions": predictions}


def evaluate(labels: np.ndarray, score: np.ndarray, params: configs.ClassificationExperiment,
             threshold: float | None = None) -> dict:
    """Metrics with bootstrap intervals at `threshold` (default evaluation.threshold)."""
    ev = params.evaluation
    threshold = ev.threshold if threshold is None else threshold
    return {"n": int(len(labels)), "n_melanoma": int(labels.sum()), "threshold": threshold,
            "metrics": metrics.metrics_with_ci(labels, score, threshold, ev.bootstrap_samples,
                                               params.training.seed),
            "table_ii": metrics.table_ii(labels, score, threshold), "paper": metrics.PAPER}


def operating_point(cv: dict, params: configs.ClassificationExperiment, model_dir: Path) -> dict | None:
    """With evaluation.target_sensitivity, the threshold that reaches it on the out-of-fold
    predictions (each fold's last epoch: not selected on them), written to operating_point.json
    for the exporter; None without a target."""
    target, downloads = params.evaluation.target_sensitivity, list(params.evaluation.operating_point_downloads)
    if not target:
        return None
    oof = [p for p in cv["oof"] if not downloads or p.get("download", "") in downloads]
    if not oof:
        raise ValueError(f"evaluation.operating_point_downloads {downloads}: no out-of-fold prediction "
                         "comes from these download folders")
    labels = np.array([p["label"] for p in oof])
    jitter = params.evaluation.operating_point_box_jitter
    column = "melanoma_probability_served_like" if jitter else "melanoma_probability_last_epoch"
    score = np.array([p[column] for p in oof])
    threshold = metrics.threshold_for_sensitivity(labels, score, target)
    chosen = metrics.classification_metrics(labels, score, threshold)
    point = {"threshold": threshold, "target_sensitivity": target,
             "chosen_on": f"out-of-fold predictions (last epoch) of {len(labels)} training images"
                          + (f" from {', '.join(downloads)}" if downloads else "")
                          + (f", their boxes jittered by {jitter}" if jitter else ""),
             "sensitivity": chosen["sensitivity"], "specificity": chosen["specificity"]}
    atomic.write_json(model_dir / metrics.OPERATING_POINT_FILE, point)
    print(f"operating point: threshold {threshold:.4f} gives sensitivity {point['sensitivity']:.3f}, "
          f"specificity {point['specificity']:.3f} out of fold")
    return point


def summarize_cv(cv: dict, params: configs.ClassificationExperiment, model_dir: Path, title: str = "") -> dict:
    """cv_metrics.json, roc_cv.png and confusion_cv.png from cross_validate's results.

    `pooled`/`mean_sd` use each fold's best epoch by held-out AUC, as early stopping restores it:
    that epoch is chosen on the images it is then scored on, so these are optimistic. The
    `*_last_epoch` entries use each fold's last epoch and carry no such selection.
    """
    labels = np.array([p["label"] for p in cv["oof"]])
    score = np.array([p["melanoma_probability"] for p in cv["oof"]])
    last = np.array([p["melanoma_probability_last_epoch"] for p in cv["oof"]])
    per_fold = [r["metrics"] for r in cv["folds"] if r["metrics"]]
    per_fold_last = [r["metrics_last_epoch"] for r in cv["folds"] if r["metrics_last_epoch"]]
    summary = {
        "protocol": f"{params.training.folds}-fold cross-validation over the train split, out-of-fold "
                    "predictions pooled; best epoch = highest held-out AUC (optimistic), last epoch = unselected",
        "per_fold": [{k: r[k] for k in ("fold", "n_train", "n_val", "n_val_melanoma", "best_epoch", "metrics",
                                        "metrics_last_epoch")} for r in cv["folds"]],
        "mean_sd": metrics.summarize_folds(per_fold) if per_fold else None,
        "pooled": evaluate(labels, score, params),
        "mean_sd_last_epoch": metrics.summarize_folds(per_fold_last) if per_fold_last else None,
        "pooled_last_epoch": evaluate(labels, last, params),
    }
    downloads = np.array([p.get("download", "") for p in cv["oof"]])
    if len(set(downloads)) > 1:  # e.g. sample v2's own images apart from HAM10000's
        summary["pooled_last_epoch_by_download"] = {
            str(d): evaluate(labels[downloads == d], last[downloads == d], params) for d in np.unique(downloads)}
    atomic.write_json(model_dir / "cv_metrics.json", summary)
    metrics.plot_roc({"out-of-fold": (labels, score)}, model_dir / "roc_cv.png", title or "Cross-validation ROC")
    metrics.plot_confusion(labels, score, model_dir / "confusion_cv.png", params.evaluation.threshold,
                           title or "Cross-validation (pooled)")
    return summary


def write_predictions(path: Path, rows: list[dict], threshold: float) -> None:
    """predictions.csv: one row per out-of-fold and test image, decided at `threshold`."""
    with atomic.atomic_file(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "split", "fold", "label", "melanoma_probability", "predicted",
                         "melanoma_probability_last_epoch"])
        for r in rows:
            last = r.get("melanoma_probability_last_epoch")
            writer.writerow([r["image_id"], r["split"], r["fold"], r["label"], f"{r['melanoma_probability']:.6f}",
                             int(r["melanoma_probability"] >= threshold), "" if last is None else f"{last:.6f}"])


def read_predictions(model_dir: Path, split: str = "train") -> dict[str, tuple[int, float]]:
    """{image_id: (label, melanoma probability)} of a run's predictions.csv for one split: out of
    fold at each fold's last epoch ('train', what operating points are chosen on) or the final
    model's ('test')."""
    path = Path(model_dir) / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {model_dir} a finished cross-validated run?")
    with path.open(newline="") as f:
        return {r["image_id"]: (int(r["label"]), float(r["melanoma_probability_last_epoch"]
                                                        or r["melanoma_probability"]))
                for r in csv.DictReader(f) if r["split"] == split}
