"""Serve the folds' average or the final model, with or without test-time views? All four on
the test split, paired with the final model, and their cost.

    python benchmarks/fold_ensemble.py --run runs/benchmark_cls/C50 --records tfrecords/isic-sample

A cross-validated run with a final model (`benchmarks/classification.py` without --no-final):
the final model and the mean of its folds' models (`export_classifier.load_fold_ensemble`, what
`export --fold-ensemble` serves) score the test split's views, once and as the mean of the 8
flips and quarter turns of each view (`evaluation.tta`); ROC AUC of each, its paired
difference to the final model, sensitivity and specificity at the run's threshold, the Brier
score, and the seconds per image on this machine (batches of 32, after a warm-up batch).
Writes benchmarks/results/fold-ensemble-<run>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import numpy as np

from melanoma_tf import atomic
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.serving import export_classifier
from melanoma_tf.tasks import melanoma_classification as task

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def seconds_per_image(model, images: np.ndarray, tta: bool, batch: int = 32) -> float:
    model.predict_on_batch(images[:batch])  # warm-up: tracing
    start = time.perf_counter()
    task.predict(model, images, tta, batch_size=batch)
    return (time.perf_counter() - start) / len(images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--records", type=Path, required=True)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    params, final = export_classifier.load_trained(args.run)
    _, ensemble = export_classifier.load_fold_ensemble(args.run)
    test = inputs.read_lesions(args.records, "test", params.data)
    variants = {"final": (final, False), "fold_ensemble": (ensemble, False),
                "final_tta": (final, True), "fold_ensemble_tta": (ensemble, True)}
    scores = {name: task.predict(model, test.images, tta) for name, (model, tta) in variants.items()}
    threshold = export_classifier.decision_threshold(args.run, params)
    out = {"run": os.path.relpath(args.run, ROOT), "records": os.path.relpath(args.records, ROOT),
           "images": len(test), "melanoma": int(test.labels.sum()), "threshold": threshold,
           "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    for name, (model, tta) in variants.items():
        m = metrics.metrics_with_ci(test.labels, scores[name], threshold, n=args.bootstrap)
        out[name] = {"roc_auc": m["roc_auc"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                     "brier_score": metrics.calibration(test.labels, scores[name])["brier_score"],
                     "seconds_per_image": seconds_per_image(model, test.images, tta)}
        line = f"{name:18s} AUC {metrics.format_ci(m['roc_auc'])}, {out[name]['seconds_per_image'] * 1000:.1f} ms/image"
        if name != "final":
            out[f"{name}_minus_final"] = metrics.auc_difference(test.labels, scores[name], scores["final"],
                                                                n=args.bootstrap)
            line += f", minus final {metrics.format_ci(out[f'{name}_minus_final'])}"
        print(line)
    out["per_image"] = [{"image_id": i, "label": int(y), **{k: float(s[j]) for k, s in scores.items()}}
                        for j, (i, y) in enumerate(zip(test.image_ids, test.labels))]
    atomic.write_json(HERE / "results" / f"fold-ensemble-{args.run.name}.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
