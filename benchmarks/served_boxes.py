"""Does a run's screening threshold hold when the lesion's box comes from elsewhere than the
ground-truth mask, as it does when served? (issue 34)

    python benchmarks/served_boxes.py --run runs/benchmark_cls/C50F --records tfrecords/isic-sample

The run's view (its params.yaml) is cut around four boxes per image: the ground-truth mask's,
Otsu's mask's (`evaluation.baselines`: a real second method, worse than the served segmenter),
and the ground-truth box with each edge moved by up to 10% and 20% of its size
(`masking.jitter_box`, seeded per image: what `evaluation.operating_point_box_jitter` and
`data.box_jitter` use). Out of fold, each fold's model (its best.weights.h5) scores its held-out
images' views from every source, and a threshold reaching the run's target sensitivity is
chosen on each source; the run's final model scores the test split's views from every source.
Reports, per test source: the box's IoU with the ground-truth box, ROC AUC and its paired
difference to the ground-truth views, and sensitivity / specificity at the run's own threshold
and at each out-of-fold source's. Writes benchmarks/results/served-boxes-<run>.json and the
per-image scores benchmarks/results/predictions-served-boxes-<run>.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from official.vision.ops import box_ops
from tqdm import tqdm

from melanoma_tf import atomic, masking, tfrecords
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import baselines
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.serving import export_classifier
from melanoma_tf.tasks import melanoma_classification as task

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = ("ground truth", "otsu", "jitter 0.1", "jitter 0.2")


def views(records: Path, split: str, cfg, index: int) -> dict:
    """Every melanoma/nevus image of the split with a mask: its views from each box source,
    label, fold, id and each source's box IoU with the ground truth's."""
    to_view = masking.view_fn(cfg.view)
    out = {"views": {s: [] for s in SOURCES}, "iou": {s: [] for s in SOURCES}, "labels": [], "folds": [], "ids": []}
    files = sorted(tf.io.gfile.glob(tfrecords.split_pattern(records, split, with_nomask=False)))
    for raw in tqdm(tf.data.TFRecordDataset(files), desc=f"{split} views", unit="img"):
        r = tfrecords.parse_lesion(raw)
        if int(r["label"]) not in (inputs.NEVUS, inputs.MELANOMA):
            continue
        image, truth = r["image"].numpy(), r["mask"].numpy()
        otsu = baselines.otsu_lesion_mask(image)
        truth_box = tf.cast(masking.lesion_box(truth), tf.float32)
        seed = tf.constant([index, len(out["ids"])], tf.int64)  # the same boxes on every rerun
        for source in SOURCES:
            mask = otsu if source == "otsu" else truth
            jitter = float(source.split()[-1]) if source.startswith("jitter") else 0.0
            out["views"][source].append(to_view(image, mask, cfg.input_size, cfg.margin, jitter, seed).numpy())
            # The box the view was cut around (`masking._square_box`'s), against the ground truth's.
            cut = masking.jitter_box(tf.cast(masking.lesion_box(mask), tf.float32), jitter, seed)  # 0: unmoved
            out["iou"][source].append(float(box_ops.bbox_overlap(cut[None, None], truth_box[None, None])[0, 0, 0]))
        out["labels"].append(int(r["label"]))
        out["folds"].append(int(r["fold"]))
        out["ids"].append(r["image_id"].numpy().decode())
    return {**{k: np.array(v) for k, v in out.items() if k not in ("views", "iou")},
            "views": {s: np.stack(v) for s, v in out["views"].items()},
            "iou": {s: np.array(v) for s, v in out["iou"].items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a cross-validated run with a final model")
    p.add_argument("--records", type=Path, required=True)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    params, final = export_classifier.load_trained(args.run)
    target, folds = params.evaluation.target_sensitivity or 0.9, params.training.folds
    train, test = views(args.records, "train", params.data, 0), views(args.records, "test", params.data, 1)

    oof = {s: np.zeros(len(train["labels"])) for s in SOURCES}
    for k in range(folds):
        model = export_classifier.load_trained(args.run, args.run / f"fold_{k}" / "best.weights.h5")[1]
        held = train["folds"] == k
        for s in SOURCES:
            oof[s][held] = task.predict(model, train["views"][s][held])
    # The ground-truth source must reproduce the run's own out-of-fold scores (best epoch).
    with (args.run / "predictions.csv").open() as f:
        stored = {r["image_id"]: float(r["melanoma_probability"]) for r in csv.DictReader(f) if r["split"] == "train"}
    drift = np.abs(oof["ground truth"] - np.array([stored[i] for i in train["ids"]])).max()
    thresholds = {f"out-of-fold, {s}": metrics.threshold_for_sensitivity(train["labels"], oof[s], target)
                  for s in SOURCES}
    thresholds["the run's (out-of-fold, last epoch, ground truth)"] = export_classifier.decision_threshold(
        args.run, params)
    scores = {s: task.predict(final, test["views"][s]) for s in SOURCES}
    labels = test["labels"]
    out = {"run": os.path.relpath(args.run, ROOT), "records": os.path.relpath(args.records, ROOT),
           "view": params.data.view, "margin": params.data.margin, "target_sensitivity": target,
           "train_images": len(train["labels"]), "test_images": len(labels), "test_melanoma": int(labels.sum()),
           "out_of_fold_max_drift_from_run": float(drift), "thresholds": thresholds,
           "out_of_fold_auc": {s: metrics.classification_metrics(train["labels"], oof[s])["roc_auc"] for s in SOURCES},
           "test": {}, "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"out-of-fold scores of the ground-truth views differ from the run's by at most {drift:.2g}")
    for s in SOURCES:
        entry = {"mean_box_iou_with_ground_truth": float(test["iou"][s].mean()),
                 "roc_auc": metrics.metrics_with_ci(labels, scores[s], n=args.bootstrap, seed=0)["roc_auc"],
                 "brier_score": metrics.calibration(labels, scores[s])["brier_score"],
                 "at_threshold": {}}
        if s != "ground truth":
            entry["minus_ground_truth"] = metrics.auc_difference(labels, scores[s], scores["ground truth"],
                                                                 n=args.bootstrap, seed=0)
        for name, t in thresholds.items():
            m = metrics.classification_metrics(labels, scores[s], t)
            entry["at_threshold"][name] = {"sensitivity": m["sensitivity"], "specificity": m["specificity"]}
        out["test"][s] = entry
        at = entry["at_threshold"]
        print(f"test, {s:12s} box IoU {entry['mean_box_iou_with_ground_truth']:.2f}  AUC "
              f"{metrics.format_ci(entry['roc_auc'])}  sens/spec at the run's threshold "
              f"{at[list(thresholds)[-1]]['sensitivity']:.3f}/{at[list(thresholds)[-1]]['specificity']:.3f}, "
              f"at the jitter-0.1 one {at['out-of-fold, jitter 0.1']['sensitivity']:.3f}/"
              f"{at['out-of-fold, jitter 0.1']['specificity']:.3f}")
    atomic.write_json(HERE / "results" / f"served-boxes-{args.run.name}.json", out)
    with atomic.atomic_file(HERE / "results" / f"predictions-served-boxes-{args.run.name}.csv", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "split", "fold", "label", *SOURCES])
        for split, data, score in (("train", train, oof), ("test", test, scores)):
            for i, image_id in enumerate(data["ids"]):
                writer.writerow([image_id, split, data["folds"][i], data["labels"][i],
                                 *(f"{score[s][i]:.6f}" for s in SOURCES)])
    print(json.dumps(thresholds, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
