"""Is a classifier's score drawn by what surrounds the lesion? The test split with and without
ink or stickers, rulers and dark dermoscope rims, two cross-validated runs paired.

    python benchmarks/shortcut_audit.py --run runs/benchmark_cls/C50 --baseline runs/benchmark_cls/E \
        --records tfrecords/isic-sample

Reads each run's test-split predictions (`predictions.csv`, its final model on the test split)
and served threshold (`test_metrics.json`), tags each test image from its pixels and
ground-truth mask (`worst_segmentations.attributes`, and long straight lines outside the lesion
for rulers), and reports, per tag and for the images with none of them: ROC AUC and the
specificity and sensitivity at each run's threshold, with the run-minus-baseline AUC difference
paired on the same images. A context view that learned markers would gain on the tagged images
and not on the clean ones. Then where the run's final model looks (`modeling/grad_cam.py`): on
views with black padding (where the lesion's square leaves the image, so its extent shows the
lesion's size), the share of the heat map on the padding against the padding's share of the
view, and how well the padded area alone separates the classes. Last the lesion-size-only
control: a logistic regression on the ground-truth mask's size relative to the frame (area, box
sides, the square's side), cross-validated on the run's stored folds and fitted on its training
split for the test split, paired with the run on the same images: what size alone would give.
Writes benchmarks/results/shortcut-audit-<run>.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf
from classification import logistic_cv
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from worst_segmentations import attributes, test_images

from melanoma_tf import atomic, tfrecords
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.modeling import grad_cam
from melanoma_tf.serving import export_classifier

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Tag thresholds: a share of the frame (ink/sticker colours, the black rim) or a line count.
INK_OR_STICKER, DARK_RIM, RULER_LINES = 0.005, 0.05, 1


def ruler_lines(image: np.ndarray, mask: np.ndarray) -> int:
    """Long straight edges outside the lesion (a ruler's side or scale; hair is curved and short):
    probabilistic Hough segments at least a third of the image's shorter side long."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 60, 160)
    edges[cv2.dilate((mask > 0).astype(np.uint8), np.ones((15, 15), np.uint8)) > 0] = 0
    side = min(gray.shape)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold=60, minLineLength=side // 3, maxLineGap=4)
    return 0 if lines is None else len(lines)


def tags(image: np.ndarray, mask: np.ndarray) -> dict[str, bool]:
    a = attributes(image, mask)
    return {"ink_or_sticker": a["sticker_or_ink_fraction"] >= INK_OR_STICKER,
            "dark_rim": a["dark_frame_fraction"] >= DARK_RIM,
            "ruler": ruler_lines(image, mask) >= RULER_LINES}


def test_predictions(run: Path) -> tuple[dict[str, tuple[int, float]], float]:
    with (run / "predictions.csv").open() as f:
        rows = {r["image_id"]: (int(r["label"]), float(r["melanoma_probability"]))
                for r in csv.DictReader(f) if r["split"] == "test"}
    return rows, json.loads((run / "test_metrics.json").read_text())["threshold"]


def padding_heat(run: Path, records: Path) -> dict:
    """How much of the final model's Grad-CAM falls on the views' black padding (pixels black in
    every channel: beyond the image; the test images have no pure black of their own to speak of)."""
    params, model = export_classifier.load_trained(run)
    test = inputs.read_lesions(records, "test", params.data)
    area, share = [], []
    for i in range(0, len(test), 32):
        views = test.images[i:i + 32]
        heat = grad_cam.heat_map(model, tf.constant(views)).numpy()
        for h, padded in zip(heat, (views == 0).all(-1)):
            area.append(padded.mean())
            share.append(h[padded].sum() / h.sum() if h.sum() > 0 else np.nan)
    area, share = np.array(area), np.array(share)
    padded = (area > 0.01) & np.isfinite(share)
    return {"view": params.data.view, "margin": params.data.margin, "images": len(test),
            "images_with_padding": int(padded.sum()),
            "mean_padding_area": float(area[padded].mean()) if padded.any() else 0.0,
            "mean_heat_share_on_padding": float(share[padded].mean()) if padded.any() else 0.0,
            "images_heat_share_above_area": float((share[padded] > area[padded]).mean()) if padded.any() else 0.0,
            "padding_area_alone_roc_auc": float(roc_auc_score(test.labels, area))}


SIZE_FEATURES = ("area / frame", "box height / frame height", "box width / frame width",
                 "box's longer side / frame's shorter side")


def size_features(mask: np.ndarray) -> np.ndarray:
    """The lesion's size relative to its frame, nothing else: what a view could leak through
    how much of the frame the lesion or its square takes (logs: sizes are multiplicative)."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return np.log(np.full(len(SIZE_FEATURES), 1e-4))
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    h, w = mask.shape[:2]
    return np.log([len(rows) / mask.size, height / h, width / w, max(height, width) / min(h, w)])


def size_control(run: Path, records: Path, n_boot: int) -> dict:
    """The lesion-size-only control on the run's folds and test split, paired with the run."""
    with (run / "predictions.csv").open() as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    features = {}
    for split in ("train", "test"):
        for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(tfrecords.split_pattern(records, split, False)))):
            ex = tfrecords.parse_lesion(raw)
            image_id = ex["image_id"].numpy().decode()
            if image_id in rows:
                features[image_id] = size_features(ex["mask"].numpy().squeeze() > 0)
    out = {"features": list(SIZE_FEATURES), "model": "StandardScaler + LogisticRegression(C=0.1, balanced)"}
    for split in ("train", "test"):
        ids = [i for i, r in rows.items() if r["split"] == split and i in features]
        x = np.stack([features[i] for i in ids])
        labels = np.array([int(rows[i]["label"]) for i in ids])
        run_score = np.array([float(rows[i]["melanoma_probability"]) for i in ids])
        if split == "train":  # out of fold, on the run's own folds: the colour/shape baseline's regression
            folds = np.array([int(rows[i]["fold"]) for i in ids])
            lesions = inputs.LesionSet(images=None, labels=labels, folds=folds, image_ids=np.array(ids))
            size_score, _ = logistic_cv(x, lesions, len(np.unique(folds)))
        else:
            train = [i for i, r in rows.items() if r["split"] == "train" and i in features]
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))
            model.fit(np.stack([features[i] for i in train]), [int(rows[i]["label"]) for i in train])
            size_score = model.predict_proba(x)[:, 1]
        key = "cross_validation" if split == "train" else "test_split"
        out[key] = {"images": len(ids), "melanoma": int(labels.sum()),
                    "size_only_roc_auc": metrics.metrics_with_ci(labels, size_score, n=n_boot, seed=0)["roc_auc"],
                    "run_roc_auc": metrics.metrics_with_ci(labels, run_score, n=n_boot, seed=0)["roc_auc"],
                    "run_minus_size_only": metrics.auc_difference(labels, run_score, size_score, n=n_boot, seed=0)}
        print(f"size only, {key}: AUC {metrics.format_ci(out[key]['size_only_roc_auc'])}, run minus size "
              f"{metrics.format_ci(out[key]['run_minus_size_only'])}")
    return out


def group_metrics(labels: np.ndarray, score: np.ndarray, threshold: float, n_boot: int) -> dict:
    if len(set(labels.tolist())) < 2:
        return {"images": len(labels), "melanoma": int(labels.sum()), "note": "one class only: no AUC"}
    m = metrics.metrics_with_ci(labels, score, threshold, n=n_boot, seed=0)
    return {"images": len(labels), "melanoma": int(labels.sum()),
            **{k: m[k] for k in ("roc_auc", "sensitivity", "specificity")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="the classifier run audited (its final model's test rows)")
    p.add_argument("--baseline", type=Path, required=True, help="the run it is paired with, e.g. the masked lesion")
    p.add_argument("--records", type=Path, required=True, help="the records both were trained and tested on")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    run, run_threshold = test_predictions(args.run)
    base, base_threshold = test_predictions(args.baseline)
    images = test_images(args.records)
    ids = sorted(set(run) & set(base) & set(images))
    tagged = {i: tags(*images[i]) for i in ids}
    labels = np.array([run[i][0] for i in ids])
    scores = {"run": np.array([run[i][1] for i in ids]), "baseline": np.array([base[i][1] for i in ids])}
    groups = {"all": np.ones(len(ids), bool),
              "none of the tags": np.array([not any(tagged[i].values()) for i in ids])}
    for tag in ("ink_or_sticker", "dark_rim", "ruler"):
        groups[tag] = np.array([tagged[i][tag] for i in ids])
    out = {"run": os.path.relpath(args.run, ROOT), "baseline": os.path.relpath(args.baseline, ROOT),
           "records": os.path.relpath(args.records, ROOT), "thresholds": {"run": run_threshold,
                                                                        "baseline": base_threshold},
           "tag_rules": {"ink_or_sticker": f"sticker_or_ink_fraction >= {INK_OR_STICKER}",
                         "dark_rim": f"dark_frame_fraction >= {DARK_RIM}",
                         "ruler": f">= {RULER_LINES} straight line(s) of >= 1/3 the shorter side outside the lesion"},
           "groups": {}, "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    for name, keep in groups.items():
        entry = {"run": group_metrics(labels[keep], scores["run"][keep], run_threshold, args.bootstrap),
                 "baseline": group_metrics(labels[keep], scores["baseline"][keep], base_threshold, args.bootstrap)}
        if len(set(labels[keep].tolist())) == 2:
            entry["roc_auc_run_minus_baseline"] = metrics.auc_difference(
                labels[keep], scores["run"][keep], scores["baseline"][keep], n=args.bootstrap, seed=0)
        out["groups"][name] = entry
        auc = {k: entry[k].get("roc_auc", {}).get("value", float("nan")) for k in ("run", "baseline")}
        diff = entry.get("roc_auc_run_minus_baseline")
        print(f"{name:18s} {entry['run']['images']:4d} images ({entry['run']['melanoma']} mel): AUC run "
              f"{auc['run']:.3f} baseline {auc['baseline']:.3f}"
              + (f", paired {metrics.format_ci(diff)}" if diff else ""))
    out["padding_heat"] = padding_heat(args.run, args.records)
    print(f"padding: {out['padding_heat']}")
    out["size_only"] = size_control(args.run, args.records, args.bootstrap)
    output = args.output or HERE / "results" / f"shortcut-audit-{args.run.name}.json"
    atomic.write_json(output, out)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
