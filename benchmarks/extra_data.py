"""Does HAM10000 beside ISIC help the classifier? Measured on today's v2 test split.

    python benchmarks/extra_data.py [--variant E|H|HO|HB|C|CB ...] [--records tfrecords/isic-ham-all]

Records: `build_tfrecords --data-dir ../shared/data/isic-sample --data-dir
../shared/data/ham10000-sample --include-other` (built here when missing). The first folder's test
split is exactly the one a build of sample v2 alone holds out (checked against --reference-records,
image id for image id), and HAM10000 only trains, so every variant is scored on the same images
as every earlier v2 figure.

Protocol, one fit per variant (5-fold cross-validation of 12,000 images does not fit a session on
2 cores): train on the train split minus stored fold 0, choose the screening threshold (90%
sensitivity) on fold 0's sample-v2 melanomas and nevi (a lesion-grouped validation split the model
never trained on), then score the test split: melanoma against nevus, and melanoma against nevus +
seborrheic keratosis (ISIC 2017 Part 3), each paired with variant E on the same images.

Variants (`melanoma_efficientnet_lite0`, the masked lesion, unless named):
  E   sample v2 only, today's recipe (10 epochs over ~1,180 images)
  H   sample v2 + HAM10000 melanomas and nevi; epochs of data.epoch_images drawn images
  HO  H + every other diagnosis (HAM's bkl, bcc, akiec, vasc, df and v2's keratoses) as not melanoma
  HB  H with sample v2's images repeated so that an epoch draws as many of them as of HAM10000's
  C   E on the lesion in its context (`melanoma_efficientnet_lite0_context`, the `cpu` classifier)
  CB  HB on the lesion in its context, also paired with C
Results merge into benchmarks/results/extra-data-v2.json; each fit resumes from its own folder.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
import time
from pathlib import Path

import keras
import numpy as np

from melanoma_tf import atomic, build_tfrecords
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.tasks import melanoma_classification as task

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data"
EXPERIMENT, CONTEXT = "melanoma_efficientnet_lite0", "melanoma_efficientnet_lite0_context"
VALIDATION_FOLD = 0
VARIANTS = {
    "E": {"downloads": ["isic-sample"], "others": False, "override": ""},
    "H": {"downloads": ["isic-sample", "ham10000-sample"], "others": False, "override": "data.epoch_images=2400"},
    "HO": {"downloads": ["isic-sample", "ham10000-sample"], "others": True, "override": "data.epoch_images=2400"},
    "HB": {"downloads": ["isic-sample", "ham10000-sample"], "others": False,
           "override": "data.epoch_images=2400,data.balance_downloads=true"},
    "C": {"downloads": ["isic-sample"], "others": False, "override": "", "experiment": CONTEXT},
    "CB": {"downloads": ["isic-sample", "ham10000-sample"], "others": False,
           "override": "data.epoch_images=2400,data.balance_downloads=true", "experiment": CONTEXT,
           "paired_with": "C"},
}


def _records(path: Path, *data_dirs: Path, include_other: bool) -> dict:
    if not (path / "manifest.json").exists():
        build_tfrecords.build(list(data_dirs), path, folds=5, seed=0, include_other=include_other, num_workers=2)
    return json.loads((path / "manifest.json").read_text())


def check_same_test_split(combined: dict, reference: dict) -> int:
    """The combined build's melanoma/nevus test images are exactly the one-folder build's."""
    def test_ids(manifest):
        return {i for i, r in manifest["images"].items() if r["split"] == "test" and r["label"] != "other"}

    if test_ids(combined) != test_ids(reference):
        raise SystemExit("the combined records' test split differs from sample v2's own: not comparable")
    return len(test_ids(reference))


def _keep(data: inputs.LesionSet, ids: set[str]) -> inputs.LesionSet:
    return data.subset(np.flatnonzero(np.isin(data.image_ids, list(ids))))


def run_variant(name: str, records: Path, manifest: dict, run_root: Path) -> dict:
    spec = VARIANTS[name]
    params = task.resolve_params(spec.get("experiment", EXPERIMENT), params_override=",".join(
        s for s in ("training.verbose=2", spec["override"]) if s))
    from_download = {i for i, r in manifest["images"].items() if r["download"] in spec["downloads"]}
    train_all = _keep(inputs.read_index(records, "train", params.data), from_download)
    train = train_all.subset(np.flatnonzero(train_all.folds != VALIDATION_FOLD))
    if spec["others"]:
        others = _keep(inputs.read_other_negatives(records, "train", params.data), from_download)
        train = train.concat(others.subset(np.flatnonzero(others.folds != VALIDATION_FOLD)))
    v2 = {i for i, r in manifest["images"].items() if r["download"] == "isic-sample"}
    val = _keep(train_all.subset(np.flatnonzero(train_all.folds == VALIDATION_FOLD)), v2)
    run_dir = run_root / name
    print(f"{name}: {len(train)} training images ({train.labels.sum()} melanoma), {len(val)} validation (v2 fold 0)")
    start = time.perf_counter()
    done = run_dir / "scores.npz"
    if not done.exists():
        task.prepare_model_dir(params, run_dir)
        model, _ = task.fit(train, val, params, run_dir / "fit", params.training.epochs)
        test = inputs.read_index(records, "test", params.data)
        test_other = inputs.read_index(records, "test", params.data, classes=(inputs.OTHER,))

        def scores(lesions: inputs.LesionSet) -> np.ndarray:
            return task.predict(model, inputs.images(lesions, params.data))

        with atomic.atomic_path(done) as tmp:
            np.savez(tmp.open("wb"), val_ids=val.image_ids, val_labels=val.labels, val=scores(val),
                     test_ids=test.image_ids, test_labels=test.labels, test=scores(test),
                     sk_ids=test_other.image_ids, sk=scores(test_other))
        keras.backend.clear_session()
    timing = json.loads((run_dir / "fit" / task.TIMING_FILE).read_text())
    return {"experiment": spec.get("experiment", EXPERIMENT),
            "training_images": len(set(train.image_ids)), "training_melanomas": int(train.labels[
                np.unique(train.image_ids, return_index=True)[1]].sum()),
            "override": spec["override"], "downloads": spec["downloads"], "others_as_negative": spec["others"],
            "cpu_minutes": round(timing["cpu_seconds"] / 60, 1), "wall_minutes": round(timing["wall_seconds"] / 60, 1),
            "seconds_this_call": round(time.perf_counter() - start)}


def score(run_root: Path, name: str, references: list[str], n_boot: int = 1000) -> dict:
    """Test metrics of one variant, paired against each reference variant on the same images."""
    s = np.load(run_root / name / "scores.npz")
    threshold = metrics.threshold_for_sensitivity(s["val_labels"], s["val"], 0.9)
    y = s["test_labels"]
    y_rest = np.concatenate([y, np.zeros(len(s["sk"]), int)])
    rest = np.concatenate([s["test"], s["sk"]])
    out = {"threshold": threshold, "threshold_chosen_on": f"{len(s['val_labels'])} v2 fold-0 images "
           f"({int(s['val_labels'].sum())} melanoma), 90% sensitivity",
           "melanoma_vs_nevus": {"images": len(y), "melanoma": int(y.sum()),
                                 "metrics": metrics.metrics_with_ci(y, s["test"], threshold, n=n_boot),
                                 "calibration": metrics.calibration(y, s["test"])},
           "melanoma_vs_nevus_and_sk": {"images": len(y_rest), "keratoses": len(s["sk"]),
                                        "metrics": metrics.metrics_with_ci(y_rest, rest, threshold, n=n_boot)}}
    for reference in references:
        r = np.load(run_root / reference / "scores.npz")
        assert (s["test_ids"] == r["test_ids"]).all() and (s["sk_ids"] == r["sk_ids"]).all()
        out["melanoma_vs_nevus"]["roc_auc_minus_" + reference] = metrics.auc_difference(
            y, s["test"], r["test"], n=n_boot)
        out["melanoma_vs_nevus_and_sk"]["roc_auc_minus_" + reference] = metrics.auc_difference(
            y_rest, rest, np.concatenate([r["test"], r["sk"]]), n=n_boot)
    return out


def write_predictions(run_root: Path, names: list[str], path: Path) -> None:
    """Per-image scores of the variants fitted here (fold-0 validation, test, test keratoses),
    one column each, for later pairing: the runs' folders are not kept."""
    fitted = {n: np.load(run_root / n / "scores.npz") for n in names if (run_root / n / "scores.npz").exists()}
    if not fitted:
        return
    first = next(iter(fitted.values()))
    for name, s in fitted.items():
        if any((s[f"{split}_ids"] != first[f"{split}_ids"]).any() for split in ("val", "test", "sk")):
            raise ValueError(f"{name}: scored other images than {next(iter(fitted))}")
    with atomic.atomic_file(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "split", "label", *fitted])
        for split, labels in (("val", first["val_labels"]), ("test", first["test_labels"]),
                              ("sk", np.full(len(first["sk_ids"]), 2))):
            for i, image_id in enumerate(first[f"{split}_ids"]):
                writer.writerow([image_id, split, int(labels[i]), *(f"{s[split][i]:.6f}" for s in fitted.values())])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", choices=list(VARIANTS), default=None)
    p.add_argument("--records", type=Path, default=ROOT / "tfrecords/isic-ham-all")
    p.add_argument("--reference-records", type=Path, default=ROOT / "tfrecords/isic-sample")
    p.add_argument("--runs", type=Path, default=ROOT / "runs/benchmark_extra_data")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/extra-data-v2.json")
    args = p.parse_args(argv)
    manifest = _records(args.records, SAMPLES / "isic-sample", SAMPLES / "ham10000-sample", include_other=True)
    same = check_same_test_split(manifest, _records(args.reference_records, SAMPLES / "isic-sample",
                                                    include_other=False))
    print(f"test split: the same {same} melanoma/nevus images as sample v2's own build")
    results = json.loads(args.output.read_text()) if args.output.exists() else {"variants": {}}
    results["protocol"] = __doc__.split("\n\n")[2].replace("\n", " ")
    results["test_split_checked"] = f"{same} melanoma/nevus test images equal sample v2's one-folder build"
    for name in args.variant or list(VARIANTS):
        entry = run_variant(name, args.records, manifest, args.runs)
        finished = datetime.datetime.now().isoformat("T", "seconds")
        results["variants"].setdefault(name, {}).update(entry, finished=finished)
        atomic.write_json(args.output, results)
    for name in results["variants"]:
        references = [r for r in ("E", VARIANTS[name].get("paired_with")) if r and r != name]
        if all((args.runs / n / "scores.npz").exists() for n in [name, *references]):
            results["variants"][name]["test"] = score(args.runs, name, references)
    atomic.write_json(args.output, results)
    write_predictions(args.runs, list(results["variants"]),
                      args.output.with_name(f"predictions-{args.output.stem}.csv"))
    for name, v in results["variants"].items():
        t = v.get("test")
        if t:
            m, r = t["melanoma_vs_nevus"]["metrics"], t["melanoma_vs_nevus_and_sk"]["metrics"]
            print(f"{name:3s} mel/nev AUC {metrics.format_ci(m['roc_auc'])}  "
                  f"mel/rest AUC {metrics.format_ci(r['roc_auc'])}"
                  f"  sens {m['sensitivity']['value']:.3f} spec {m['specificity']['value']:.3f} "
                  f"(threshold {t['threshold']:.3f})  {v['cpu_minutes']} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
