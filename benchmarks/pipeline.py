"""The whole pipeline on real ISIC images, within a stated CPU budget, scored on their test split.

    python benchmarks/pipeline.py --data-dir ../shared/data/isic-sample [--data-dir ../shared/data/ham10000-sample] \
        [--profile cpu] [--seg-from benchmarks/.runs/segmentation-cpu-60min] [--cls-from RUN] [--ensemble-with RUN]

Runs `melanoma_tf.pipeline` (records -> segmentation -> classifier -> export -> embedded server ->
gRPC client on the test split -> evaluation and report) and prints the test-split figures next
to the paper's and the classical baselines' (Otsu threshold segmentation on the same images;
colour-and-shape logistic regression, from benchmarks/results/classification.json when present).

The `cpu` profile's segmenter is the 60-minute run of benchmarks/segmentation.py (same experiment,
same steps, same split): --seg-from copies that run's checkpoints into the work dir so the
pipeline resumes at its last step instead of training the same network a second time.
--cls-from does the same for the classifier's cross-validated run of benchmarks/classification.py.
--ensemble-with serves the classifier averaged with other finished runs (`pipeline --ensemble-with`).
Several --data-dir folders build into one set of records whose test split is the first folder's
(`build_tfrecords`). Results: benchmarks/results/pipeline-<data>[+<data>...]-<profile>.json (or
<work dir's name>.json), the report in the work dir; benchmarks/paired_pipelines.py pairs two.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from melanoma_tf import evaluate, pipeline, report

from sample_quality import by_image_quality

ROOT = Path(__file__).resolve().parents[1]


RESULTS = ROOT / "benchmarks" / "results"


def seed_segmentation(seg_from: Path, seg_dir: Path) -> None:
    """Copies a finished segmentation run's latest checkpoint into seg_dir."""
    from melanoma_tf.tasks import lesion_segmentation

    if lesion_segmentation.copy_latest_checkpoint(seg_from, seg_dir) is None:
        raise FileNotFoundError(f"{seg_from}: no checkpoint, not a Model Garden run folder")


def seed_classifier(cls_from: Path, cls_dir: Path) -> None:
    """Copies a finished classifier run (its folds, final model and operating point) into cls_dir.
    The run must hold the profile's params: `training.verbose`, which changes only what a fit
    prints, is set to the pipeline's so the task accepts the run as its own."""
    if not (cls_from / "final_model.keras").is_file():
        raise FileNotFoundError(f"{cls_from}: no final_model.keras, not a finished classifier run")
    if not cls_dir.exists():
        shutil.copytree(cls_from, cls_dir)
    params = cls_dir / "params.yaml"
    params.write_text(re.sub(r"(?m)^(\s+verbose:) \d+$", r"\1 1", params.read_text()))


def score_keratoses(data_dir: Path, work: Path, rows: list[dict]) -> dict:
    """Melanoma against nevus + seborrheic keratosis (ISIC 2017 Part 3) through the served chain:
    the first folder's test-split keratoses, found in a build of it with --include-other (whose
    melanoma/nevus test split is the pipeline's, checked), scored by the pipeline's exported
    models, beside the pipeline's own melanoma/nevus predictions."""
    from melanoma_tf import build_tfrecords
    from melanoma_tf.contract import CLASSIFIER, SEGMENTER
    from melanoma_tf.data import isic
    from melanoma_tf.evaluation import classification as metrics

    cache = ROOT / "benchmarks" / ".cache" / f"{data_dir.resolve().name}-with-other"
    if not (cache / "manifest.json").is_file():
        build_tfrecords.build(data_dir, cache, include_other=True, num_workers=2, progress=False)
    test = {i: r["label"] for i, r in json.loads((cache / "manifest.json").read_text())["images"].items()
            if r["split"] == "test"}
    if {i for i, label in test.items() if label != "other"} != {r["image_id"] for r in rows}:
        raise SystemExit(f"{cache}: its melanoma/nevus test split is not the pipeline's; not comparable")
    keratoses = sorted(i for i, label in test.items() if label == "other")
    paths = {it.image_id: it.image_path for it in isic.read_downloads([data_dir], include_other=True)[0]}
    with evaluate.serve_in_process(work / "exports" / SEGMENTER, work / "exports" / CLASSIFIER) as client:
        scored = list(client.predict_many([(i, paths[i]) for i in keratoses], concurrency=4))
    if any(r.error for r in scored):
        raise SystemExit(f"keratoses not scored: {[r.error for r in scored if r.error][:3]}")
    sk = [0.0 if r.status == "no_lesion" else r.melanoma_probability for r in scored]  # as evaluate scores them
    answered = [r for r in rows if r["score"] is not None]
    y = np.array([r["melanoma"] for r in answered] + [0] * len(sk))
    score = np.array([r["score"] for r in answered] + sk)
    threshold = scored[0].threshold
    return {"images": len(y), "keratoses": len(sk), "threshold": threshold,
            "metrics": metrics.metrics_with_ci(y, score, threshold),
            "keratosis_scores": {r.image_id: round(s, 6) for r, s in zip(scored, sk)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, action="append", default=None,
                   help="download folder, repeat to add folders (default ../shared/data/isic-sample)")
    p.add_argument("--profile", choices=sorted(pipeline.PROFILES), default="cpu")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="default benchmarks/.runs/pipeline-<data>-<profile>; also names the results file")
    p.add_argument("--seg-from", type=Path, default=None,
                   help="a finished segmentation run with this profile's settings, to reuse")
    p.add_argument("--cls-from", type=Path, default=None,
                   help="a finished classifier run (benchmarks/classification.py) with this profile's settings")
    p.add_argument("--ensemble-with", type=Path, action="append", default=[], metavar="RUN",
                   help="a finished classifier run to average with the pipeline's in the served model")
    args = p.parse_args(argv)
    data_dirs = args.data_dir or [ROOT.parent / "shared/data/isic-sample"]
    name = f"pipeline-{'+'.join(d.resolve().name for d in data_dirs)}-{args.profile}"
    if args.work_dir:  # a variant of the default run: its results are named after its work dir
        name = args.work_dir.name
    work = args.work_dir or ROOT / "benchmarks" / ".runs" / name
    if args.seg_from:
        seed_segmentation(args.seg_from, work / "runs" / "seg")
    if args.cls_from:
        seed_classifier(args.cls_from, work / "runs" / "cls")
    start = time.time()
    pipeline.run(data_dirs[0] if len(data_dirs) == 1 else data_dirs, work, args.profile,
                 ensemble_with=args.ensemble_with)
    metrics = json.loads((work / "report" / "metrics.json").read_text())
    rows_all = report.read_predictions(work / "report" / "predictions.csv")
    rows = [r for r in rows_all if r["jaccard"] is not None]
    steps = {m.stem: json.loads(m.read_text())["seconds"] for m in (work / ".steps").glob("*.json")}
    result = {"data_dir": [os.path.relpath(d, ROOT) for d in data_dirs] if len(data_dirs) > 1
              else os.path.relpath(data_dirs[0], ROOT), "profile": args.profile,
              "settings": pipeline.PROFILES[args.profile].__dict__,
              "seg_from": os.path.relpath(args.seg_from, ROOT) if args.seg_from else "",
              "cls_from": os.path.relpath(args.cls_from, ROOT) if args.cls_from else "",
              "ensemble_with": [os.path.relpath(d, ROOT) for d in args.ensemble_with],
              "wall_minutes_this_run": round((time.time() - start) / 60, 1), "step_seconds": steps,
              # what each step took when it ran (a rerun skips finished steps and keeps these)
              "pipeline_minutes": round(sum(steps.values()) / 60, 1),
              "counts": metrics["counts"], "segmentation": metrics["segmentation"],
              "segmentation_otsu": metrics["segmentation_otsu"],
              "jaccard_minus_otsu": metrics.get("jaccard_minus_otsu") or evaluate.jaccard_minus_otsu(rows),
              "segmentation_by_image_quality": by_image_quality(rows, data_dirs[0]),
              "classification": metrics["classification"],
              "classification_at_0.5": metrics.get("classification_at_0.5"),
              "calibration": metrics.get("calibration"),
              "melanoma_vs_nevus_and_sk": score_keratoses(data_dirs[0], work, rows_all),
              "paper": report.PAPER, "report": os.path.relpath(work / "report" / "index.html", ROOT),
              # kept so that a later run can be paired with this one image by image
              "per_image": [{"image_id": r["image_id"], "melanoma": r["melanoma"], "score": r["score"],
                             "jaccard": r["jaccard"]} for r in rows_all]}
    baseline = RESULTS / "classification-v2.json"
    if baseline.is_file():
        result["logistic_regression_cv"] = json.loads(baseline.read_text())["baseline"]["pooled"]["roc_auc"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")

    seg, otsu, cls = result["segmentation"], result["segmentation_otsu"], result["classification"] or {}
    print(f"\n{metrics['counts']['images']} test images of {data_dirs[0]}")
    for key in ("jaccard", "threshold_jaccard", "dice", "detection_rate", "segmentation_precision"):
        print(f"segmentation {key:24s} model {seg[key]['value']:.3f} {seg[key]['ci95']}   "
              f"Otsu {otsu[key]['value']:.3f}")
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "balanced_accuracy"):
        if key in cls:
            print(f"classification {key:22s} {cls[key]['value']:.3f} {cls[key]['ci95']}")
    for key, value in (result["classification_at_0.5"] or {}).items():
        if key in ("sensitivity", "specificity", "balanced_accuracy"):
            print(f"  at p >= 0.5 {key:22s} {value['value']:.3f} {value['ci95']}")
    print(f"results: {RESULTS / f'{name}.json'}; report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
