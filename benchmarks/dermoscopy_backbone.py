"""A dermoscopy-trained backbone beside ImageNet's (issue 35), on sample v2's stored folds.

    python benchmarks/dermoscopy_backbone.py --run runs/benchmark_cls/C50F [--records tfrecords/isic-sample]
        [--ham ../shared/data/ham10000-sample]

Frozen pooled features of the `sklesion` wheel's HAM10000-trained Xception (254 px) and of
EfficientNet-Lite0's ImageNet weights (224 px), both on the view the run's classifier was
trained on (its params.yaml), each with the same standardised logistic regression (C chosen by
an inner cross-validation) on the run's stored folds: out-of-fold AUCs on the train split, then
fitted on the whole train split and scored on the test split. The Xception head is paired with
the fine-tuned run (out of fold, and its final model on the test split), and so is the mean of
the two models' probabilities (the ensemble issue 35 serves). The test split's seborrheic
keratoses (records built with --include-other, `--records-all`) are scored by every variant too,
for ISIC 2017's melanoma-against-the-rest AUC. Before any figure: how many
test-split images have a near-duplicate among HAM10000's (16x16 grey correlation >= 0.985, with
flips: the check the HAM10000 sample was deduplicated with), since the backbone trained on
HAM10000. Features are cached beside the run (`dermoscopy_features.npz`), so a stopped run
resumes. Writes benchmarks/results/dermoscopy-backbone.json and per-image scores
benchmarks/results/predictions-dermoscopy-backbone.csv.

--write-run DIR turns the Xception head into a classifier run that `export --ensemble-with`
takes: the `melanoma_sklesion_xception_context` network with everything frozen
(`model.trainable_from=none`) and the regression folded into its softmax layer, its out-of-fold
and test predictions and its operating point, checked against the regression on test images. A
linear probe fitted in closed form instead of by epochs of the frozen backbone (about 4 CPU-hours
here for the 5 folds and the final model, against seconds on the cached features).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from melanoma_tf import atomic, build_tfrecords
from melanoma_tf.configs import classification as cls_cfg
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.evaluation import cross_validation
from melanoma_tf.tasks import melanoma_classification as task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from classification import logistic_cv  # noqa: E402  (the same regression as the baseline's)

BACKBONES = {"sklesion_xception": 254, "efficientnet_lite0": 224}


def pooled_features(name: str, size: int, images: np.ndarray, batch: int = 32) -> tuple[np.ndarray, float]:
    """[N, C] global-average-pooled features of uint8 views, and the ms per image it took."""
    import tensorflow as tf

    from melanoma_tf.modeling import backbone_classifier

    maps = backbone_classifier.backbone(name, "imagenet", size)
    model = keras.Sequential([keras.Input((size, size, 3)), maps, keras.layers.GlobalAveragePooling2D()])
    run = tf.function(lambda x: model(tf.image.resize(tf.cast(x, tf.float32), [size, size], antialias=True),
                                      training=False))
    out, start = [], time.perf_counter()
    for i in tqdm(range(0, len(images), batch), desc=f"{name} features", unit="batch"):
        out.append(run(tf.constant(images[i:i + batch])).numpy())
    return np.concatenate(out), (time.perf_counter() - start) * 1000 / len(images)


def grey_thumbnails(images: list[np.ndarray]) -> np.ndarray:
    """Standardised 16x16 grey thumbnails, flattened [N, 256], for correlation by dot product."""
    import cv2

    thumbs = np.stack([cv2.resize(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), (16, 16), interpolation=cv2.INTER_AREA)
                       for im in images]).astype(np.float64).reshape(len(images), -1)
    thumbs -= thumbs.mean(1, keepdims=True)
    return thumbs / (np.linalg.norm(thumbs, axis=1, keepdims=True) + 1e-9)


def near_duplicates(test_ids: list[str], data_dir: Path, ham_dir: Path, threshold: float = 0.985) -> dict:
    """Test-split images whose 16x16 grey thumbnail correlates >= threshold with a HAM10000
    image's, the HAM10000 image flipped either way included."""
    import cv2

    def read(path: Path) -> np.ndarray:
        return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)

    test_paths = [next((data_dir / "images").glob(f"{i}.*"), None) for i in test_ids]
    test = grey_thumbnails([read(p) for p in test_paths if p is not None])
    ham_paths = sorted(p for p in ham_dir.rglob("*.jpg") if "segmentation" not in p.stem)
    ham_images = [read(p) for p in tqdm(ham_paths, desc="HAM10000 thumbnails", unit="img")]
    best = np.full(len(test), -1.0)
    for flip in (None, 0, 1, -1):
        ham = grey_thumbnails([im if flip is None else cv2.flip(im, flip) for im in ham_images])
        best = np.maximum(best, (test @ ham.T).max(1))
    return {"test_images": len(test), "ham10000_images": len(ham_paths), "threshold": threshold,
            "near_duplicates": int((best >= threshold).sum()),
            "highest_correlations": sorted(np.round(best, 4).tolist())[-5:]}


def write_head_run(run_dir: Path, source: Path, head, oof: np.ndarray, data: dict, test_scores: np.ndarray) -> float:
    """A run folder serving `head` (StandardScaler + logistic regression on the Xception's pooled
    features) on the source run's view; returns the largest gap between its network's and the
    regression's test probabilities (it refuses to write past 1e-3)."""
    from melanoma_tf.modeling import factory

    source_params = cls_cfg.load_config(source / "params.yaml")
    params = cls_cfg.build_config("melanoma_sklesion_xception_context", params_override={
        "data": source_params.data.as_dict(), "training": {"folds": source_params.training.folds},
        "evaluation": {"target_sensitivity": source_params.evaluation.target_sensitivity},
        "model": {"trainable_from": "none"}})
    network = factory.build_classifier(params, training=False)
    scaler, regression = head[0], head[-1]
    weights = regression.coef_[0] / scaler.scale_  # the standardisation folded into the weights
    bias = regression.intercept_[0] - float(weights @ scaler.mean_)
    # softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]: the regression's probability.
    network.get_layer("probabilities").set_weights([np.stack([np.zeros_like(weights), weights], 1).astype(np.float32),
                                                    np.array([0.0, bias], np.float32)])
    check = slice(0, 32)
    gap = float(np.abs(task.predict(network, data["test"].images[check]) - test_scores[check]).max())
    if gap > 1e-3:
        raise RuntimeError(f"the folded head differs from the regression by {gap:.4f} on test images")
    train, test = data["train"], data["test"]
    rows = [{"image_id": i, "split": split, "fold": int(f), "label": int(y), "melanoma_probability": float(s),
             "melanoma_probability_last_epoch": float(s)}
            for split, subset, scores in (("train", train, oof), ("test", test, test_scores))
            for i, f, y, s in zip(subset.image_ids, subset.folds, subset.labels, scores)]
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(run_dir / "params.yaml") as tmp:
        cls_cfg.save_config(params, str(tmp))
    # Out-of-fold rows (the train split's, listed first) choose the threshold, as a trained run's do.
    point = cross_validation.operating_point({"oof": rows[:len(train)]}, params, run_dir)
    cross_validation.write_predictions(run_dir / "predictions.csv", rows, point["threshold"])
    with atomic.atomic_path(run_dir / "final_model.keras") as tmp:
        network.save(str(tmp))
    return gap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished cross-validated classifier run")
    p.add_argument("--records", type=Path, default=ROOT / "tfrecords/isic-sample")
    p.add_argument("--records-all", type=Path, default=ROOT / "tfrecords/isic-sample-all",
                   help="records with seborrheic keratoses too (built when absent): melanoma against the rest")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/isic-sample")
    p.add_argument("--ham", type=Path, default=ROOT.parent / "shared/data/ham10000-sample")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/dermoscopy-backbone.json")
    p.add_argument("--write-run", type=Path, default=None, metavar="DIR",
                   help="also write the Xception head as a classifier run (for export --ensemble-with)")
    args = p.parse_args(argv)

    params = cls_cfg.load_config(args.run / "params.yaml")
    data = {split: inputs.read_lesions(args.records, split, params.data) for split in ("train", "test")}
    if not (args.records_all / "manifest.json").exists():
        build_tfrecords.build(args.data_dir, args.records_all, folds=5, seed=0, include_other=True)
    data["keratoses"] = inputs.read_lesions(args.records_all, "test", params.data, classes=(inputs.OTHER,))
    leak = near_duplicates(list(data["test"].image_ids), args.data_dir, args.ham) if args.ham.is_dir() else None
    cache = args.run / "dermoscopy_features.npz"
    features = dict(np.load(cache)) if cache.exists() else {}
    for name, size in BACKBONES.items():
        for split in data:
            if f"{name}/{split}" not in features:
                features[f"{name}/{split}"], features[f"{name}/{split}/ms"] = pooled_features(
                    name, size, data[split].images)
                np.savez(cache, **features)
    train, test = data["train"], data["test"]
    folds, n, seed = params.training.folds, args.bootstrap, params.training.seed
    fine_tuned = {split: cross_validation.read_predictions(args.run, split) for split in ("train", "test")}
    tuned = {split: np.array([fine_tuned[split][i][1] for i in data[split].image_ids]) for split in ("train", "test")}
    tuned["keratoses"] = task.predict(keras.models.load_model(args.run / "final_model.keras", compile=False),
                                      data["keratoses"].images, params.evaluation.tta)
    scores = {"fine-tuned run": tuned}
    for name in BACKBONES:
        oof, _ = logistic_cv(features[f"{name}/train"], train, folds, select_c=True)
        head = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-5, -1, 9), scoring="roc_auc",
                                                                    class_weight="balanced", max_iter=5000))
        head.fit(features[f"{name}/train"], train.labels)
        scores[f"{name} frozen + regression"] = {"train": oof, **{
            split: head.predict_proba(features[f"{name}/{split}"])[:, 1] for split in ("test", "keratoses")}}
        if name == "sklesion_xception" and args.write_run:
            gap = write_head_run(args.write_run, args.run, head, oof, data,
                                 scores[f"{name} frozen + regression"]["test"])
            print(f"{args.write_run}: the Xception head as a run (network minus regression: {gap:.2e} at most)")
    xception = scores["sklesion_xception frozen + regression"]
    scores["ensemble: mean of fine-tuned run and sklesion_xception"] = {
        split: (tuned[split] + xception[split]) / 2 for split in data}
    # Melanoma against nevus and seborrheic keratosis: the test split with its keratoses as negatives.
    rest_labels = np.concatenate([test.labels, np.zeros(len(data["keratoses"]), int)])
    rest = {variant: np.concatenate([score["test"], score["keratoses"]]) for variant, score in scores.items()}
    rows = {}
    for variant, score in scores.items():
        rows[variant] = {
            "cv_auc_out_of_fold": metrics.metrics_with_ci(train.labels, score["train"], n=n, seed=seed)["roc_auc"],
            "test_auc": metrics.metrics_with_ci(test.labels, score["test"], n=n, seed=seed)["roc_auc"],
            "cv_minus_fine_tuned_run": metrics.auc_difference(train.labels, score["train"], tuned["train"], n=n,
                                                              seed=seed),
            "test_minus_fine_tuned_run": metrics.auc_difference(test.labels, score["test"], tuned["test"], n=n,
                                                                seed=seed),
            "test_auc_melanoma_vs_rest": metrics.metrics_with_ci(rest_labels, rest[variant], n=n, seed=seed)["roc_auc"],
            "test_vs_rest_minus_fine_tuned_run": metrics.auc_difference(
                rest_labels, rest[variant], rest["fine-tuned run"], n=n, seed=seed)}
    threshold = metrics.threshold_for_sensitivity(train.labels, scores[
        "ensemble: mean of fine-tuned run and sklesion_xception"]["train"], params.evaluation.target_sensitivity)
    ensemble = scores["ensemble: mean of fine-tuned run and sklesion_xception"]["test"]
    ensemble_test = metrics.classification_metrics(test.labels, ensemble, threshold)
    ensemble_test["brier"] = float(np.mean((ensemble - test.labels) ** 2))
    result = {
        "run": os.path.relpath(args.run, ROOT), "records": os.path.relpath(args.records, ROOT),
        "view": params.data.view, "margin": params.data.margin,
        "train_images": len(train), "train_melanoma": int(train.labels.sum()),
        "test_images": len(test), "test_melanoma": int(test.labels.sum()),
        "test_seborrheic_keratoses": len(data["keratoses"]),
        "near_duplicates_in_ham10000": leak,
        "feature_ms_per_image": {name: float(features[f"{name}/train/ms"]) for name in BACKBONES},
        "variants": rows,
        "ensemble_at_out_of_fold_threshold": {"threshold": threshold, **{
            k: ensemble_test[k] for k in ("sensitivity", "specificity", "brier") if k in ensemble_test}},
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic.write_json(args.output, result)
    with atomic.atomic_file(args.output.parent / "predictions-dermoscopy-backbone.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "split", "label", *scores])
        for split, subset in data.items():  # keratoses: split "keratoses", label 2
            for i, image_id in enumerate(subset.image_ids):
                writer.writerow([image_id, split, int(subset.labels[i]),
                                 *(f"{s[split][i]:.6f}" for s in scores.values())])
    for variant, row in rows.items():
        print(f"{variant:55s} CV {metrics.format_ci(row['cv_auc_out_of_fold'])}  "
              f"test {metrics.format_ci(row['test_auc'])}  "
              f"test - run {metrics.format_ci(row['test_minus_fine_tuned_run'])}  "
              f"vs rest {metrics.format_ci(row['test_auc_melanoma_vs_rest'])}, - run "
              f"{metrics.format_ci(row['test_vs_rest_minus_fine_tuned_run'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
