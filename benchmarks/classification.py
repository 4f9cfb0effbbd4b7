"""Classifier benchmark on the real ISIC sample: the 5-fold protocol with ground-truth masks.

    python benchmarks/classification.py [--variant NAME] [--experiment E] [--config-file F]...
        [--params-override S] [--epochs N] [--no-final] [--baseline-only] [--score-finished-folds]
        [--segmentation-features SEG_RUN] [--pair-with RUN]

Builds the records once (into --records), cross-validates the configured AlexNet on the masked
lesions (`melanoma_tf.tasks.melanoma_classification.train`), and fits a colour-and-shape logistic
regression on the same masked lesions and the same folds. --segmentation-features adds a
logistic-regression head on the frozen ResNet of a segmentation run
(`experiments.segmentation_features`), on the same folds. Each variant's numbers are merged into
benchmarks/results/classification.json under its name, so variants can be compared; the table
printed at the end shows all of them. A run stopped before its last fold (the same flags plus
--score-finished-folds) is scored over the folds it finished, paired with the regression on
those images.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time
from pathlib import Path

import cv2
import keras
import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from melanoma_tf import atomic, build_tfrecords
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.experiments import segmentation_features
from melanoma_tf.modeling import lesion_descriptors
from melanoma_tf.tasks import melanoma_classification as task

ROOT = Path(__file__).resolve().parents[1]


RESULTS = ROOT / "benchmarks" / "results"


def lesion_features(image: np.ndarray) -> np.ndarray:
    """Colour and shape of one masked lesion (the lesion view; lesion = non-black).

    Colour: mean, standard deviation and 10th/90th percentiles of each channel in RGB, HSV and
    CIE Lab over the lesion. Shape: area, compactness (perimeter^2 / 4 pi area), solidity,
    elongation, and asymmetry (area not covered by the lesion mirrored about its principal axes).
    """
    mask = image.max(-1) > 0
    if mask.sum() < 10:
        return np.zeros(4 * 9 + 6)
    colours = [image, cv2.cvtColor(image, cv2.COLOR_RGB2HSV), cv2.cvtColor(image, cv2.COLOR_RGB2LAB)]
    pixels = np.concatenate([c[mask].astype(float) for c in colours], axis=1)
    colour = np.concatenate([pixels.mean(0), pixels.std(0), *np.percentile(pixels, [10, 90], axis=0)])
    m8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area = float(mask.sum())
    perimeter = cv2.arcLength(contour, True)
    hull = cv2.contourArea(cv2.convexHull(contour)) or area
    mom = cv2.moments(m8, binaryImage=True)
    cov = np.array([[mom["mu20"], mom["mu11"]], [mom["mu11"], mom["mu02"]]]) / mom["m00"]
    evals, evecs = np.linalg.eigh(cov)
    centre = (mom["m10"] / mom["m00"], mom["m01"] / mom["m00"])
    angle = np.degrees(np.arctan2(evecs[1, 1], evecs[0, 1]))
    aligned = cv2.warpAffine(m8, cv2.getRotationMatrix2D(centre, angle, 1.0), m8.shape[::-1])
    asymmetry = [np.logical_xor(aligned, np.flip(aligned, axis)).sum() / (2 * area) for axis in (0, 1)]
    shape = [area / mask.size, perimeter ** 2 / (4 * np.pi * area), area / hull,
             np.sqrt(evals[1] / max(evals[0], 1e-6)), *asymmetry]
    return np.concatenate([colour, shape])


BASELINE = "StandardScaler + LogisticRegression(C=0.1, balanced), 42 colour/shape features"
DESCRIPTOR_BASELINE = ("the same regression on the 23 in-graph descriptors of model.descriptors "
                       "(modeling/lesion_descriptors.py): what the hybrid network's head starts from")
SEGMENTATION_HEAD = ("StandardScaler + LogisticRegressionCV(balanced, C in 1e-5..1e-1 chosen by inner 5-fold "
                     "AUC), lesion-averaged C3-C5 features of the frozen segmentation ResNet")


def logistic_cv(features: np.ndarray, data: inputs.LesionSet, num_folds: int,
                select_c: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Out-of-fold melanoma probabilities of a standardised, class-balanced logistic regression
    on per-image features, and its per-fold metrics. select_c picks the regularisation by an
    inner cross-validation on each fold's training images (thousands of features)."""
    score, per_fold = np.zeros(len(data)), []
    for k in range(num_folds):
        train_idx, held_idx = inputs.fold_indices(data.folds, k, num_folds)
        regression = (LogisticRegressionCV(Cs=np.logspace(-5, -1, 9), scoring="roc_auc", class_weight="balanced",
                                           max_iter=5000) if select_c else
                      LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))
        model = make_pipeline(StandardScaler(), regression)
        model.fit(features[train_idx], data.labels[train_idx])
        score[held_idx] = model.predict_proba(features[held_idx])[:, 1]
        per_fold.append(metrics.classification_metrics(data.labels[held_idx], score[held_idx]))
    return score, per_fold


def _entry(labels, score, per_fold, n_boot, seed, **extra) -> dict:
    return {"pooled": metrics.metrics_with_ci(labels, score, n=n_boot, seed=seed),
            "mean_sd": metrics.summarize_folds(per_fold), **extra}


def finished_folds(model_dir: Path) -> list[dict]:
    """The fold results a cross-validated run has written so far (all of them once it is done)."""
    return [json.loads(p.read_text()) for p in sorted(model_dir.glob("fold_*/result.json"))]


def out_of_fold(model_dir: Path) -> dict[str, float]:
    """A cross-validated run's last-epoch out-of-fold melanoma probability of each image scored
    so far."""
    return {p["image_id"]: p["melanoma_probability_last_epoch"]
            for fold in finished_folds(model_dir) for p in fold["predictions"]}


def partial_entry(model_dir: Path, n_boot: int, seed: int) -> dict:
    """The metrics of a run stopped before its last fold, over the folds it finished: the same
    fields as a whole run's, pooled over fewer images."""
    folds = finished_folds(model_dir)
    if not folds:
        raise SystemExit(f"{model_dir}: no finished fold (fold_*/result.json) to score")
    labels = np.array([p["label"] for f in folds for p in f["predictions"]])
    last = np.array([p["melanoma_probability_last_epoch"] for f in folds for p in f["predictions"]])
    best = np.array([p["melanoma_probability"] for f in folds for p in f["predictions"]])
    at_last = _entry(labels, last, [f["metrics_last_epoch"] for f in folds], n_boot, seed)
    downloads = np.array([p.get("download", "") for f in folds for p in f["predictions"]])
    by_download = {} if len(set(downloads)) < 2 else {"pooled_last_epoch_by_download": {
        str(d): metrics.metrics_with_ci(labels[downloads == d], last[downloads == d], n=n_boot, seed=seed)
        for d in np.unique(downloads)}}
    return {**_entry(labels, best, [f["metrics"] for f in folds], n_boot, seed),
            "pooled_last_epoch": at_last["pooled"], "mean_sd_last_epoch": at_last["mean_sd"], **by_download,
            "folds_finished": [f["fold"] for f in folds], "images": len(labels),
            "best_epochs": [f["best_epoch"] for f in folds], "test": None}


def compare_with_baseline(variants: dict, data: inputs.LesionSet, base_score: np.ndarray, n_boot: int,
                          seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Adds each variant's paired AUC difference to the regression (`metrics.auc_difference`),
    for the variants whose out-of-fold predictions are on disk, on the images they scored (all
    of `data`, or the finished folds' of a stopped run); returns their labels and scores."""
    scores = {}
    for name, entry in variants.items():
        score = out_of_fold(ROOT / entry.get("model_dir", "-"))
        if not score or not set(score) <= set(data.image_ids):
            continue  # not on disk, or trained on other images (another mask source): not comparable
        keep = np.array([i in score for i in data.image_ids])
        scores[name] = data.labels[keep], np.array([score[i] for i in np.asarray(data.image_ids)[keep]])
        entry["roc_auc_minus_baseline"] = metrics.auc_difference(*scores[name], base_score[keep],
                                                                 n=n_boot, seed=seed)
    return scores


def paired_out_of_fold(score: dict[str, float], other: dict[str, float], data: inputs.LesionSet, n_boot: int,
                       seed: int) -> dict:
    """AUC of `score` minus `other` on the images both scored out of fold, paired bootstrap."""
    common = [i for i in data.image_ids if i in score and i in other]
    if not common:
        raise SystemExit("--pair-with: the two runs scored no image in common")
    labels = dict(zip(data.image_ids, data.labels))
    y = np.array([labels[i] for i in common])
    a, b = np.array([score[i] for i in common]), np.array([other[i] for i in common])
    return {"images": len(common), "melanoma": int(y.sum()),
            "roc_auc": metrics.metrics_with_ci(y, a, n=n_boot, seed=seed)["roc_auc"],
            "roc_auc_other": metrics.metrics_with_ci(y, b, n=n_boot, seed=seed)["roc_auc"],
            "roc_auc_minus_other": metrics.auc_difference(y, a, b, n=n_boot, seed=seed)}


def training_cost(model_dir: Path) -> dict:
    """CPU and wall minutes of every fit of a run (`timing.json` of each fold and the final
    model; resumed fits included)."""
    def minutes(run: Path) -> dict | None:
        path = run / task.TIMING_FILE
        if not path.is_file():
            return None
        t = json.loads(path.read_text())
        return {"cpu": round(t["cpu_seconds"] / 60, 1), "wall": round(t["wall_seconds"] / 60, 1)}

    folds = [m for m in (minutes(p) for p in sorted(model_dir.glob("fold_*"))) if m]
    return {"per_fold": folds, "final": minutes(model_dir / "final"),
            "cv_cpu": round(sum(f["cpu"] for f in folds), 1)}


def melanoma_vs_rest(model_dir: Path, params, data_dir: Path, records_all: Path, n_boot: int, seed: int) -> dict:
    """ISIC 2017 Part 3's melanoma task on the test split: melanoma against nevus and seborrheic
    keratosis, the keratoses of the test split of records built with --include-other (their
    melanomas and nevi are split exactly as without: `tfrecords.split_items`)."""
    if not (records_all / "manifest.json").exists():
        build_tfrecords.build(data_dir, records_all, folds=5, seed=0, include_other=True)
    others = inputs.read_lesions(records_all, "test", params.data, classes=(inputs.OTHER,))
    model = keras.models.load_model(model_dir / "final_model.keras", compile=False)
    other_score = task.predict(model, others.images, params.evaluation.tta)
    with (model_dir / "predictions.csv").open() as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    labels = np.array([int(r["label"]) for r in test] + [0] * len(other_score))
    score = np.array([float(r["melanoma_probability"]) for r in test] + other_score.tolist())
    threshold = json.loads((model_dir / "test_metrics.json").read_text())["threshold"]
    return {"images": len(labels), "melanoma": int(labels.sum()), "seborrheic_keratosis": len(other_score),
            "threshold": threshold, "metrics": metrics.metrics_with_ci(labels, score, threshold, n=n_boot, seed=seed)}


def print_table(results: dict) -> None:
    """One row per variant. 'last' columns score each fold's last epoch; 'best' its best epoch by
    held-out AUC, which is chosen on the scored images and therefore optimistic."""
    cols = ("AUC last [95% CI]", "minus LR [95% CI]", "AUC best [95% CI]", "fold AUC", "sens", "spec",
            "bal.acc", "sens@90sp", "test AUC", "min")
    rows = []
    baseline = results.get("baseline") or {}
    for name, r in [("logistic regression (colour+shape)", baseline),
                    ("logistic regression (in-graph descriptors)", baseline.get("descriptors_only"))] + sorted(
            results.get("variants", {}).items(), key=lambda kv: kv[1].get("finished", "")):
        if not r:
            continue
        last, best = r.get("pooled_last_epoch", r["pooled"]), r["pooled"]
        fold = r.get("mean_sd_last_epoch", r["mean_sd"])["roc_auc"]
        test = r.get("test")
        difference = r.get("roc_auc_minus_baseline")
        if "folds_finished" in r:
            name = f"{name} [{len(r['folds_finished'])} of {results['dataset']['folds']} folds, {r['images']} images]"
        rows.append((name, metrics.format_ci(last["roc_auc"]), metrics.format_ci(difference) if difference else "-",
                     metrics.format_ci(best["roc_auc"]),
                     f"{fold['mean']:.3f}±{fold['sd']:.3f}", *(f"{last[k]['value']:.3f}" for k in (
                         "sensitivity", "specificity", "balanced_accuracy", "sensitivity_at_90_specificity")),
                     f"{test['metrics']['roc_auc']['value']:.3f}" if test else "-",
                     f"{r['minutes']:.0f}" if r.get("minutes") else "-"))
    width = max(len(r[0]) for r in rows)
    widths = [21, 22, 21, 11, 5, 5, 7, 9, 8, 4]
    header = f"{'variant':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/isic-sample")
    p.add_argument("--records", type=Path, default=ROOT / "tfrecords/isic-sample", help="records cache")
    p.add_argument("--records-all", type=Path, default=ROOT / "tfrecords/isic-sample-all",
                   help="records cache with seborrheic keratoses too (melanoma against the rest)")
    p.add_argument("--variant", default=None, help="name in the results (default: the experiment)")
    p.add_argument("--model-dir", type=Path, default=None, help="default runs/benchmark_cls/<variant>")
    p.add_argument("--experiment", default="melanoma_alexnet_paper")
    p.add_argument("--config-file", action="append", default=[])
    p.add_argument("--params-override", default="")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-final", action="store_true", help="cross-validation only (no final model, no test)")
    p.add_argument("--baseline-only", action="store_true")
    p.add_argument("--score-finished-folds", action="store_true",
                   help="no training: score the folds the variant's run has finished (a run stopped early)")
    p.add_argument("--segmentation-features", type=Path, default=None, metavar="SEG_RUN",
                   help="also cross-validate a head on the frozen ResNet features of this segmentation run")
    p.add_argument("--pair-with", type=Path, default=None, metavar="RUN",
                   help="another cross-validated run (e.g. the same network on fewer images): the AUC "
                        "difference, paired, on the images both scored out of fold")
    p.add_argument("--output", type=Path, default=RESULTS / "classification.json")
    args = p.parse_args(argv)

    if not (args.records / "manifest.json").exists():
        build_tfrecords.print_summary(build_tfrecords.build(args.data_dir, args.records, folds=5, seed=0),
                                      args.records)
    name = args.variant or args.experiment
    override = ",".join(s for s in (args.params_override, "training.final_model=false" if args.no_final else "") if s)
    params = task.resolve_params(args.experiment, args.config_file, override, None, args.epochs)
    # The regressions read the masked lesion, whatever the network sees, so that every variant
    # is paired with the same baseline.
    data = inputs.read_lesions(args.records, "train", params.data.replace(view="lesion", margin=0.1))
    folds, seed, n_boot = params.training.folds, params.training.seed, params.evaluation.bootstrap_samples
    model_dir = args.model_dir or ROOT / "runs/benchmark_cls" / name
    if args.score_finished_folds:
        if not model_dir.is_dir():
            raise SystemExit(f"{model_dir}: no such run")
        task.prepare_model_dir(params, model_dir)  # refuses a run trained with other params

    dataset = {"data_dir": os.path.relpath(args.data_dir, ROOT), "records": os.path.relpath(args.records, ROOT),
               "images": len(data),
               "melanoma": int(data.labels.sum()), "folds": folds,
               "note": f"train split, mask sources {list(params.data.mask_sources)}; folds as stored in the records"}
    base_score, base_folds = logistic_cv(np.stack([lesion_features(im) for im in data.images]), data, folds)
    baseline = _entry(data.labels, base_score, base_folds, n_boot, seed, model=BASELINE)
    described = np.concatenate([lesion_descriptors.LesionDescriptors()(data.images[i:i + 64]).numpy()
                                for i in range(0, len(data), 64)])
    desc_score, desc_folds = logistic_cv(described, data, folds)
    baseline["descriptors_only"] = _entry(data.labels, desc_score, desc_folds, n_boot, seed, model=DESCRIPTOR_BASELINE)
    variants = {}
    curves = {"logistic regression": (data.labels, base_score),
              "logistic regression, descriptors": (data.labels, desc_score)}
    if args.segmentation_features:
        start = time.perf_counter()
        extractor = segmentation_features.SegmentationFeatures(args.segmentation_features)
        seg_score, seg_folds = logistic_cv(extractor.extract(data.images, progress="segmentation features"),
                                           data, folds, select_c=True)
        entry = _entry(data.labels, seg_score, seg_folds, n_boot, seed, model=SEGMENTATION_HEAD,
                       checkpoint=extractor.checkpoint, minutes=(time.perf_counter() - start) / 60,
                       finished=datetime.datetime.now().isoformat(timespec="seconds"))
        variants["S head on the segmentation ResNet's features"] = entry
        curves["segmentation features"] = (data.labels, seg_score)
    if not args.baseline_only and args.score_finished_folds:
        variants[name] = {**partial_entry(model_dir, n_boot, seed),
                          "experiment": args.experiment, "config_files": args.config_file,
                          "params_override": override, "training_minutes": training_cost(model_dir),
                          "model_dir": os.path.relpath(model_dir, ROOT),
                          "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    elif not args.baseline_only:
        start = time.perf_counter()
        out = task.train(args.records, model_dir, args.experiment, args.config_file, override, None, args.epochs)
        minutes = (time.perf_counter() - start) / 60
        cv = json.loads((model_dir / "cv_metrics.json").read_text())
        oof = out_of_fold(model_dir)
        score = np.array([oof[i] for i in data.image_ids])
        extra = {}
        if out["test"]:
            extra["test_melanoma_vs_rest"] = melanoma_vs_rest(model_dir, params, args.data_dir, args.records_all,
                                                              n_boot, seed)
        if list(params.data.mask_sources) != ["ground_truth"]:
            # Also scored on the ground-truth-masked images alone: comparable with the other runs.
            truth = set(inputs.read_lesions(args.records, "train", params.data.replace(
                mask_sources=["ground_truth"], include_unmasked=False)).image_ids)
            keep = np.array([i in truth for i in data.image_ids])
            extra["pooled_last_epoch_ground_truth_masks"] = {
                "images": int(keep.sum()),
                "metrics": metrics.metrics_with_ci(data.labels[keep], score[keep], n=n_boot, seed=seed)}
        if "pooled_last_epoch_by_download" in cv:  # records of several downloads, e.g. v2 + HAM10000
            extra["pooled_last_epoch_by_download"] = cv["pooled_last_epoch_by_download"]
        if args.pair_with:
            extra["paired_with"] = paired_out_of_fold(oof, out_of_fold(args.pair_with), data, n_boot, seed)
            extra["paired_with"]["run"] = os.path.relpath(args.pair_with, ROOT)
        variants[name] = {**extra,
            "experiment": args.experiment, "config_files": args.config_file, "params_override": override,
            "pooled": cv["pooled"]["metrics"], "mean_sd": cv["mean_sd"],
            "pooled_last_epoch": cv["pooled_last_epoch"]["metrics"], "mean_sd_last_epoch": cv["mean_sd_last_epoch"],
            "best_epochs": [f["best_epoch"] for f in cv["per_fold"]],
            "test": out["test"], "minutes": minutes, "training_minutes": training_cost(model_dir),
            "model_dir": os.path.relpath(model_dir, ROOT),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    # Read only now: other variants may have finished while this one trained.
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    results.update(dataset=dataset, baseline=baseline)
    results.setdefault("variants", {}).update(variants)
    for variant, labels_score in compare_with_baseline(results["variants"], data, base_score, n_boot, seed).items():
        label = variant.split()[0].rstrip(":")  # the table names them in full
        if "folds_finished" in results["variants"][variant]:
            label += f", {len(results['variants'][variant]['folds_finished'])} of {folds} folds"
        curves[label] = labels_score
    baseline["descriptors_only"]["roc_auc_minus_baseline"] = metrics.auc_difference(
        data.labels, desc_score, base_score, n=n_boot, seed=seed)
    if args.segmentation_features:
        variants["S head on the segmentation ResNet's features"]["roc_auc_minus_baseline"] = \
            metrics.auc_difference(data.labels, seg_score, base_score, n=n_boot, seed=seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.output, results)
    metrics.plot_roc(curves, args.output.with_suffix(".png"), "5-fold CV, ISIC sample (out-of-fold, last epoch)")
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
