"""Which of the segmenter's detections makes the lesion mask, on the real test split.

    python benchmarks/detection_choice.py --model-dir benchmarks/.runs/segmentation-cpu-60min-v2 \
        --records tfrecords/isic-sample

The segmenter keeps up to `max_num_detections` boxes per image and the final mask is the
highest-scoring one's (`evaluation.segmentation.final_lesion_mask`, also in the export). This
restores a training run's latest checkpoint, runs the records' masked test images through the
task's own validation step, and scores other ways to make the one lesion mask from the same
detections, each paired per image with the shipped rule (1,000 bootstrap resamples):

    top score         the shipped rule
    union >= 0.5      every detection scoring at least 0.5, merged
    vote              pixels that detections overlapping the top one (mask IoU > 0.3) cover with
                      more than half of their summed score
    enclosing >= 0.5  the largest box that holds 90% of the top box and scores at least 0.5
                      (a lesion part outscoring the whole lesion)
    oracle            the detection whose mask matches the ground truth best: what any re-ranking
                      of these detections could reach at most, not a rule

Results: benchmarks/results/detection-choice-<run folder>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf
from official.core import task_factory
from tqdm import tqdm

from melanoma_tf import atomic, tfrecords
from melanoma_tf.evaluation import segmentation as seg_metrics
from melanoma_tf.evaluation.bootstrap import bootstrap_ci
from melanoma_tf.serving import export_segmenter
from melanoma_tf.tasks import lesion_segmentation

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def detections(model_dir: Path, records: Path, count: int):
    """Yields (ground-truth mask, boxes in image pixels, scores, 28x28 masks) for each of the
    `count` masked test images."""
    params = export_segmenter.read_params(model_dir)
    params.override({"task": {"use_coco_metrics": False, "validation_data": {
        "input_path": tfrecords.split_pattern(records, "test", with_nomask=False)}}}, is_strict=True)
    task = task_factory.get_task(params.task)
    model = task.build_model()
    tf.train.Checkpoint(model=model).read(tf.train.latest_checkpoint(str(model_dir))).expect_partial()
    task.build_metrics(training=False)  # the validation step updates Model Garden's metrics
    step = tf.function(lambda inputs: task.validation_step(inputs, model)[lesion_segmentation.LESION_LOGS])
    for inputs in task.build_inputs(params.task.validation_data):
        out = {k: v.numpy() for k, v in step(inputs).items()}
        for i in range(min(len(out["mask_png"]), count)):
            count -= 1
            truth = cv2.imdecode(np.frombuffer(out["mask_png"][i], np.uint8), cv2.IMREAD_GRAYSCALE) > 0
            n = int(out["num_detections"][i])
            boxes = out["boxes"][i, :n] / np.tile(out["image_info"][i, 2], 2)
            yield truth.astype(np.uint8), boxes, out["scores"][i, :n], out["masks"][i, :n]
        if count == 0:
            return


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _box_area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))


def _shared_box_area(a: np.ndarray, b: np.ndarray) -> float:
    return _box_area(np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])]))


def candidate_masks(truth: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                    masks: np.ndarray) -> dict[str, np.ndarray]:
    """The lesion mask each rule makes from one image's detections."""
    if len(scores) == 0:
        return dict.fromkeys(("top score", "union >= 0.5", "vote", "enclosing >= 0.5", "oracle"),
                             np.zeros_like(truth))
    every = seg_metrics.paste_masks(boxes, masks, *truth.shape)
    top = int(np.argmax(scores))
    near = [i for i in range(len(scores)) if _iou(every[i], every[top]) > 0.3]
    votes = sum(scores[i] * every[i] for i in near) / sum(scores[i] for i in near)
    enclosing = [i for i in range(len(scores)) if i == top or (
        scores[i] >= 0.5 and _shared_box_area(boxes[i], boxes[top]) >= 0.9 * _box_area(boxes[top]))]
    return {
        "top score": seg_metrics.final_lesion_mask(boxes, scores, masks, *truth.shape)[0],
        "union >= 0.5": np.logical_or(every[top], every[scores >= 0.5].any(0)).astype(np.uint8),
        "vote": (votes > 0.5).astype(np.uint8),
        "enclosing >= 0.5": every[max(enclosing, key=lambda i: _box_area(boxes[i]))],
        "oracle": every[int(np.argmax([_iou(m, truth) for m in every]))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a `train --stage seg` run folder")
    p.add_argument("--records", type=Path, required=True, help="records whose test split is scored")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    per_rule: dict[str, list[dict]] = {}
    count = json.loads((args.records / "manifest.json").read_text())["counts"]["test"]["with_mask"]
    for truth, boxes, scores, masks in tqdm(detections(args.model_dir, args.records, count), "test images", count):
        for rule, mask in candidate_masks(truth, boxes, scores, masks).items():
            per_rule.setdefault(rule, []).append(seg_metrics.image_metrics(mask, truth))
    shipped = np.array([m["jaccard"] for m in per_rule["top score"]])
    checkpoint = Path(tf.train.latest_checkpoint(str(args.model_dir))).name
    result = {"model_dir": args.model_dir.name, "checkpoint": checkpoint, "rules": {}}
    for rule, rows in per_rule.items():
        jaccard = np.array([m["jaccard"] for m in rows])
        low, high = bootstrap_ci(lambda a, b: a.mean() - b.mean(), jaccard, shipped)
        result["rules"][rule] = {**seg_metrics.summarize(rows), "jaccard_minus_top_score": {
            "value": float(jaccard.mean() - shipped.mean()), "ci95": [float(low), float(high)]}}
        s = result["rules"][rule]
        print(f"{rule:18s} Jaccard {s['jaccard']:.3f} thresholded {s['threshold_jaccard']:.3f} "
              f"detection {s['detection_rate']:.3f}  minus top score {jaccard.mean() - shipped.mean():+.3f} "
              f"[{low:+.3f}, {high:+.3f}]")
    output = args.output or RESULTS / f"detection-choice-{args.model_dir.name}.json"
    atomic.write_json(output, result, indent=1)
    print(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
