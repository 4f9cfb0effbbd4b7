"""Test-time augmentation for both stages, with and without, on the real test split.

    python benchmarks/tta.py [--exports benchmarks/.runs/pipeline-isic-sample-cpu/exports]

Loads the exported segmenter and classifier (the SavedModels TF Serving serves) and, for every
melanoma/nevus image of the records' test split, runs the segmenter on the 8 symmetries of the
image (`evaluation.tta`): the plain mask is the identity view's, the TTA mask the pixel-wise
majority of the 8 views mapped back. Each mask gives a masked lesion (`masking.mask_lesion`),
which the classifier scores once or averaged over its 8 views. As in the served chain, an image
whose mask is empty scores 0. Reports segmentation metrics on the images with a ground-truth
mask and classification metrics with 95% CIs for the 4 combinations, and seconds per image.
Results: benchmarks/results/tta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from melanoma_tf import atomic, contract, masking
from melanoma_tf.data import isic
from melanoma_tf.data.images import load_mask
from melanoma_tf.evaluation import classification as cls_metrics
from melanoma_tf.evaluation import segmentation as seg_metrics
from melanoma_tf.evaluation import tta
from melanoma_tf.serving import versions

ROOT = Path(__file__).resolve().parents[1]


RESULTS = ROOT / "benchmarks" / "results"
RUN = ROOT / "benchmarks" / ".runs" / "pipeline-isic-sample-cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/isic-sample")
    p.add_argument("--records", type=Path, default=RUN / "tfrecords", help="its manifest gives the test split")
    p.add_argument("--exports", type=Path, default=RUN / "exports")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--output", type=Path, default=RESULTS / "tta.json")
    args = p.parse_args(argv)

    test_ids = set(json.loads((args.records / "manifest.json").read_text())["splits"]["test"])
    items, _ = isic.read_dataset(args.data_dir)
    items = [i for i in items if i.image_id in test_ids][:args.limit]
    seg_path, cls_path = (Path(versions.newest_version(str(args.exports / name)))
                          for name in (contract.SEGMENTER, contract.CLASSIFIER))
    segment = tf.saved_model.load(str(seg_path)).signatures["serving_image_tensor"]
    classify = tf.saved_model.load(str(cls_path)).signatures["serving_default"]
    size = int(classify.structured_input_signature[1]["masked_image"].shape[1])

    def lesion_mask(views: np.ndarray) -> np.ndarray:
        return segment(tf.constant(views))["lesion_mask"].numpy().astype(np.float32)

    def melanoma(masked: np.ndarray) -> np.ndarray:
        return classify(masked_image=tf.constant(masked))["melanoma_probability"].numpy()

    rows, seconds = [], {"segmenter_view": [], "classifier_view": []}
    for item in tqdm(items, unit="img", desc="8 views per image"):
        image = tf.io.decode_image(item.image_path.read_bytes(), channels=3, expand_animations=False).numpy()
        start = time.perf_counter()
        views = [tta.unview(lesion_mask(tta.view(image[None], t, m)), t, m)[0] for t, m in tta.VIEWS]
        seconds["segmenter_view"].append((time.perf_counter() - start) / len(views))
        masks = {"plain": views[0].astype(np.uint8), "tta": (np.mean(views, axis=0) >= 0.5).astype(np.uint8)}
        row = {"image_id": item.image_id, "melanoma": int(item.label == isic.MELANOMA)}
        for name, mask in masks.items():
            if not mask.any():
                row[f"{name}_mask_plain_cls"] = row[f"{name}_mask_tta_cls"] = 0.0
            else:
                masked = np.asarray(masking.mask_lesion(image, mask, size))[None]
                start = time.perf_counter()
                row[f"{name}_mask_tta_cls"] = float(tta.average(melanoma, masked)[0])
                seconds["classifier_view"].append((time.perf_counter() - start) / len(tta.VIEWS))
                row[f"{name}_mask_plain_cls"] = float(melanoma(masked)[0])
            if item.mask_path is not None:
                truth = load_mask(item.mask_path, *mask.shape)
                row[f"{name}_mask_metrics"] = seg_metrics.image_metrics(mask, truth)
        rows.append(row)

    labels = np.array([r["melanoma"] for r in rows])
    result = {"data_dir": str(args.data_dir), "segmenter": str(seg_path), "classifier": str(cls_path),
              "images": len(rows), "melanoma": int(labels.sum()),
              "seconds_per_view": {k: float(np.median(v)) for k, v in seconds.items() if v},
              "segmentation": {}, "classification": {}}
    for mask in ("plain", "tta"):
        scored = [r[f"{mask}_mask_metrics"] for r in rows if f"{mask}_mask_metrics" in r]
        result["segmentation"][f"{mask}_mask"] = seg_metrics.summarize(scored)
        for cls in ("plain", "tta"):
            score = np.array([r[f"{mask}_mask_{cls}_cls"] for r in rows])
            result["classification"][f"{mask}_mask_{cls}_classifier"] = cls_metrics.metrics_with_ci(labels, score)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.output, result)
    for mask in ("plain", "tta"):
        seg = result["segmentation"][f"{mask}_mask"]
        print(f"{mask:>5} mask: Jaccard {seg['jaccard']:.3f}, thresholded {seg['threshold_jaccard']:.3f}, "
              f"Dice {seg['dice']:.3f} ({seg['num_images']:.0f} images)")
        for cls in ("plain", "tta"):
            auc = result["classification"][f"{mask}_mask_{cls}_classifier"]["roc_auc"]
            print(f"        {cls:>5} classifier: AUC {cls_metrics.format_ci(auc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
