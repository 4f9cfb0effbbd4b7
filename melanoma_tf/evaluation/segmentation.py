"""Lesion segmentation metrics, per image and averaged, scored as the ISIC challenge scores them.

Per-image pixel metrics come from the ISIC challenge's own scorer (`isic-challenge-scoring`), so
our numbers are theirs by construction. On top: the lesion detection rate (an image counts as
found when its final mask has IoU >= 0.5 with the ground truth) and the paper's Table I
confusion: found (TP), missed (FN: nothing detected), background called lesion (FP: a mask
that misses the lesion, IoU < 0.5); the paper's "segmentation precision" is TP / (TP + FP).
"""

from __future__ import annotations

import numpy as np
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.confusion import create_binary_confusion_matrix
from official.vision.ops import mask_ops

PIXEL_METRICS = ("jaccard", "threshold_jaccard", "dice", "accuracy", "sensitivity", "specificity")
FOUND_IOU = 0.5


def final_lesion_mask(boxes: np.ndarray, scores: np.ndarray, masks: np.ndarray,
                      height: int, width: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The highest-scoring instance mask pasted at full resolution.

    `boxes` are [ymin, xmin, ymax, xmax] in image pixels and `masks` Mask R-CNN's per-box masks
    (e.g. 28x28), for the valid detections only. Other instances are not merged in: there is
    one lesion per image, and a union would grow the mask with every false positive.
    Returns (uint8 0/1 mask [H, W], box, score); an all-zero mask and score 0 when nothing was
    detected.
    """
    if len(scores) == 0:
        return np.zeros((height, width), np.uint8), np.zeros(4, np.float32), 0.0
    best = int(np.argmax(scores))
    pasted = paste_masks(boxes[best:best + 1], masks[best:best + 1], height, width)[0]
    return pasted.astype(np.uint8), boxes[best].astype(np.float32), float(scores[best])


def paste_masks(boxes: np.ndarray, masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-box masks pasted at full resolution, [N, H, W] 0/1; `boxes` [N, 4] as
    [ymin, xmin, ymax, xmax] in image pixels."""
    # Model Garden's paste wants [x, y, width, height].
    xywh = np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1)
    return mask_ops.paste_instance_masks(masks, xywh, height, width)


def image_metrics(pred: np.ndarray, truth: np.ndarray, jaccard_threshold: float = 0.65) -> dict[str, float]:
    """ISIC pixel metrics of one image plus whether its lesion was found / missed / mistaken."""
    cm = create_binary_confusion_matrix(truth_binary_values=truth > 0, prediction_binary_values=pred > 0)
    out = {
        "jaccard": isic_metrics.binary_jaccard(cm),
        "threshold_jaccard": isic_metrics.binary_threshold_jaccard(cm, threshold=jaccard_threshold),
        "dice": isic_metrics.binary_dice(cm),
        "accuracy": isic_metrics.binary_accuracy(cm),
        "sensitivity": isic_metrics.binary_sensitivity(cm),
        "specificity": isic_metrics.binary_specificity(cm),
    }
    detected = bool(pred.any())
    out["found"] = float(detected and out["jaccard"] >= FOUND_IOU)
    out["missed"] = float(not detected)
    out["false_lesion"] = float(detected and out["jaccard"] < FOUND_IOU)
    return {k: float(v) for k, v in out.items()}


def summarize(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Macro averages as the ISIC challenge reports them, detection rate and Table I counts."""
    if not per_image:
        return {}
    out = {k: float(np.mean([m[k] for m in per_image])) for k in PIXEL_METRICS}
    found = sum(m["found"] for m in per_image)
    false_lesion = sum(m["false_lesion"] for m in per_image)
    out.update({
        "detection_rate": found / len(per_image),
        "table1_found": found,
        "table1_missed": sum(m["missed"] for m in per_image),
        "table1_background_called_lesion": false_lesion,
        "segmentation_precision": found / (found + false_lesion) if found + false_lesion else 0.0,
        "num_images": float(len(per_image)),
    })
    return out
