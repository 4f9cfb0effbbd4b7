"""The main job: from images to a trained, exported, served and evaluated two-stage model.

    python -m melanoma_tf.pipeline [--data-dir D [--data-dir D2 ...] [--test-data-dir T]] [--work-dir W]
        [--profile quick|cpu|paper] [--ensemble-with RUN ...]

Without --data-dir it runs on the embedded default, a synthetic dermoscopy dataset generated
into the work dir. Steps: build TFRecords -> train segmentation -> train classifier (with
5-fold cross-validation in `paper`) -> export both as versioned SavedModels -> start the
embedded TF Serving-compatible server on a free loopback port -> score the test split through
the gRPC client -> evaluate -> write the report -> stop the server. --ensemble-with serves the
mean of the trained classifier and other finished classifier runs on the same view (e.g. a
dermoscopy-trained backbone's), at the threshold chosen on their mean out-of-fold predictions
(`export --ensemble-with`).

Each step records what it was run with in `W/.steps/<step>.json` and is skipped when that
matches (training steps also resume from their own checkpoints), so a rerun after a crash
continues where it stopped. Profiles:

- quick: ResNet-18 FPN Mask R-CNN at 192 px (300 steps) and the paper's AlexNet trained with
  the tuned recipe, no cross-validation; about 5 minutes on a 2-core CPU.
- cpu: for real ISIC data on a CPU: the `lesion_maskrcnn_cpu_cascade` ResNet-101 FPN with cascade
  heads at 256 px for 1563 steps (60 CPU-minutes of a 2-core machine: the segmentation benchmark's
  60-minute point, benchmarks/README.md) and the ImageNet-pretrained EfficientNet-Lite0 on the
  lesion in its context (`melanoma_efficientnet_lite0_context`: the lesion's square with half
  its size of skin per side, kept inside the frame; ahead of the masked lesion on sample v2 and
  on the ISIC 2017 test set, benchmarks/README.md), cross-validated in 5 folds so that its
  served threshold is chosen for 90% sensitivity on out-of-fold predictions, with its input
  guard. With several --data-dir folders (ISIC beside HAM10000) both train on the first folder
  only (`several_downloads_overrides` says why).
- paper: ResNet-101 FPN at 512 px, the paper's AlexNet and optimiser, 5 folds; for a GPU. With
  several folders it takes the same segmenter and classifier overrides as `cpu`.
- smoke: the tiny test configs; checks the plumbing in a few minutes and learns nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from melanoma_tf import atomic, contract
from melanoma_tf.configs import EXPERIMENTS_DIR
from melanoma_tf.configs import segmentation as seg_cfg

SYNTHETIC_IMAGES = 240
SEG_MODEL, CLS_MODEL = contract.SEGMENTER, contract.CLASSIFIER


@dataclasses.dataclass(frozen=True)
class Profile:
    seg_experiment: str
    cls_experiment: str
    cls_folds: int
    cls_epochs: int | None = None
    seg_config_files: tuple[str, ...] = ()
    cls_config_files: tuple[str, ...] = ()
    cls_override: str = ""
    seg_train_steps: int | None = None


PROFILES = {
    "quick": Profile(seg_cfg.QUICK_EXPERIMENT, "melanoma_alexnet_tuned", cls_folds=0, cls_epochs=15),
    "cpu": Profile(seg_cfg.CPU_CASCADE_EXPERIMENT, "melanoma_efficientnet_lite0_context", cls_folds=5,
                   seg_train_steps=1563),
    "paper": Profile(seg_cfg.PAPER_EXPERIMENT, "melanoma_alexnet_paper", cls_folds=5),
    # Plumbing check for tests: the tiny test configs, a couple of minutes, learns nothing.
    "smoke": Profile(seg_cfg.PAPER_EXPERIMENT, "melanoma_alexnet_paper", cls_folds=0,
                     seg_config_files=(str(EXPERIMENTS_DIR / "seg_tiny_test.yaml"),),
                     cls_config_files=("cls_tiny_test.yaml",)),
}


# Profiles that take the recipe measured for sample v2 beside HAM10000 (benchmarks/README.md) when
# --data-dir is given more than once.
SEVERAL_DOWNLOADS = {"cpu", "paper"}


def several_downloads_overrides(profile: str, first_download: str) -> tuple[dict, dict]:
    """(segmenter, classifier) overrides for records of several folders. The segmenter trains on
    the first folder's masks: HAM10000's cost 0.039 Jaccard at the same 60 CPU-minutes. The
    `cpu` classifier trains on the first folder's images only: HAM10000's 200x150 images did not
    help EfficientNet-Lite0 on unseen ISIC 2017 images with any input (issue 34: masked lesion
    -0.023, whole image -0.001 AUC, paired). The paper's AlexNet learns from them (v2's
    out-of-fold AUC 0.589 alone, 0.713 beside HAM10000, variant APH): it draws 2,400 images an
    epoch with each folder equally often and picks its screening threshold on the first
    folder's out-of-fold images, which the test split is."""
    seg = {"task": {"train_data": {"downloads": [first_download]}}}
    if profile == "cpu":
        return seg, {"data": {"downloads": [first_download]}}
    cls = {"data": {"epoch_images": 2400, "balance_downloads": True},
           "evaluation": {"operating_point_downloads": [first_download]}}
    return seg, cls


class Steps:
    """Runs named steps once per configuration; a step's key chains the keys before it."""

    def __init__(self, work_dir: Path):
        self.dir = work_dir / ".steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._chain = ""

    def run(self, name: str, config: dict, fn: Callable[[], Any]) -> Any:
        key = hashlib.sha256(json.dumps([self._chain, config], sort_keys=True, default=str).encode()).hexdigest()
        self._chain = key
        marker = self.dir / f"{name}.json"
        if marker.is_file() and json.loads(marker.read_text())["key"] == key:
            print(f"[{name}] up to date, skipped")
            return json.loads(marker.read_text())["result"]
        start = time.time()
        print(f"[{name}] running")
        result = fn()
        atomic.write_json(marker, {"key": key, "config": config, "result": result,
                                   "seconds": round(time.time() - start, 1)}, default=str)
        print(f"[{name}] done in {time.time() - start:.0f} s")
        return result


def run(data_dir: Path | Sequence[Path] | None, work_dir: Path, profile: str = "quick",
        test_data_dir: Path | None = None, ensemble_with: Sequence[Path] = ()) -> dict:
    """Runs (or resumes) every step; returns the served chain's test-split metrics. data_dir: one
    download folder or several (e.g. ISIC 2017 and HAM10000; `build_tfrecords` says how they split).
    With test_data_dir every image of data_dir trains and that separate labelled folder is the test
    split (e.g. ISIC-2017_Test_v2 beside its ground-truth CSV)."""
    from melanoma_tf import build_tfrecords
    from melanoma_tf.data import synthetic

    prof = PROFILES[profile]
    work_dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(work_dir)
    records, exports = work_dir / "tfrecords", work_dir / "exports"
    seg_dir, cls_dir, report_dir = work_dir / "runs" / "seg", work_dir / "runs" / "cls", work_dir / "report"

    if data_dir is None:
        data_dirs = [Path(steps.run("data", {"synthetic": SYNTHETIC_IMAGES, "seed": 0}, lambda: str(
            synthetic.generate_dataset(work_dir / "synthetic", num_images=SYNTHETIC_IMAGES, seed=0))))]
    else:
        data_dirs = [Path(data_dir)] if isinstance(data_dir, (str, os.PathLike)) else [Path(d) for d in data_dir]
        resolved = [str(d.resolve()) for d in data_dirs]
        # One folder keeps the key earlier runs recorded, so their steps stay up to date.
        steps.run("data", {"data_dir": resolved[0] if len(resolved) == 1 else resolved}, lambda: resolved)

    def build_records():
        manifest = build_tfrecords.build(data_dirs, records, num_workers=os.cpu_count() or 1,
                                         test_data_dir=test_data_dir)
        build_tfrecords.print_summary(manifest, records)
        return manifest["counts"]

    steps.run("records", {"test_data_dir": str(Path(test_data_dir).resolve())} if test_data_dir else {},
              build_records)
    seg_override, cls_override = {}, prof.cls_override
    if len(data_dirs) > 1 and profile in SEVERAL_DOWNLOADS:
        seg_override, cls_override = several_downloads_overrides(profile, build_tfrecords.download_names(data_dirs)[0])

    def train_segmentation():
        from melanoma_tf.tasks import lesion_segmentation

        lesion_segmentation.train(records, seg_dir, prof.seg_experiment, prof.seg_config_files, seg_override,
                                  train_steps=prof.seg_train_steps)
        return json.loads((seg_dir / lesion_segmentation.EVAL_METRICS_FILE).read_text())

    # The overrides join a step's key only when set, so one-folder runs keep their recorded keys.
    steps.run("segmentation", dataclasses.asdict(prof) | ({"seg_override": seg_override} if seg_override else {}),
              train_segmentation)

    def train_classifier():
        from melanoma_tf.tasks import melanoma_classification

        out = melanoma_classification.train(records, cls_dir, prof.cls_experiment, prof.cls_config_files,
                                            cls_override, folds=prof.cls_folds, epochs=prof.cls_epochs)
        return out["test"]

    steps.run("classification", {"cls_override": cls_override} if cls_override != prof.cls_override else {},
              train_classifier)

    def export_both():
        from melanoma_tf.serving import export_classifier, export_segmenter, versions
        # Versions are immutable: a retrained model becomes the next version, which the server serves.
        paths = {name: Path(versions.next_version(str(exports / name))) for name in (SEG_MODEL, CLS_MODEL)}
        export_segmenter.export(seg_dir, paths[SEG_MODEL], classifier_dir=cls_dir)
        export_classifier.export(cls_dir, paths[CLS_MODEL], ensemble_with=list(ensemble_with))
        return {name: str(path) for name, path in paths.items()}

    ensemble = [str(Path(d).resolve()) for d in ensemble_with]
    exported = steps.run("export", {"ensemble_with": ensemble} if ensemble else {}, export_both)

    def serve_and_evaluate():
        from melanoma_tf import evaluate
        from melanoma_tf.client import MelanomaClient
        from melanoma_tf.serving import start_server

        manifest = json.loads((records / "manifest.json").read_text())
        models = {name: str(exports / name) for name in (SEG_MODEL, CLS_MODEL)}
        with start_server(models, port=0) as server:
            print(f"[serve] embedded TF Serving API on {server.target}")
            with MelanomaClient(server.target, explain=True) as client:
                test_dirs = [test_data_dir] if test_data_dir else data_dirs
                metrics = evaluate.evaluate(
                    test_dirs, client, report_dir, image_ids=manifest["splits"]["test"],
                    source=f"test split of {', '.join(map(str, test_dirs))}, served over gRPC by the embedded server")
        return {key: metrics[key] for key in ("threshold", "segmentation", "classification", "classification_at_0.5",
                                              "calibration")}

    result = steps.run("evaluate", {}, serve_and_evaluate)
    print(summary(result, report_dir, exports, exported))
    return result


def summary(result: dict, report_dir: Path, exports: Path, exported: dict[str, str]) -> str:
    """The console lines a finished run ends with: headline figures with their 95% intervals,
    where the report and the models are, and how to serve them."""
    from melanoma_tf import report

    lines = ["", "Test split, scored over gRPC by the served models:"]
    lines += [f"  {line}" for line in report.headline(result)]
    lines += [f"  report: {report_dir / 'index.html'}", f"  models: {', '.join(exported.values())}",
              f"  serve:  python -m melanoma_tf.serve --model-config serving/models.config "
              f"--model-base-path-map /models={exports}   (models.config pins the versions it serves)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, action="append", default=None,
                   help="ISIC download (default: synthetic data); repeat to add folders, e.g. HAM10000 "
                        "beside ISIC 2017 (the first folder's images form the stratified test split)")
    p.add_argument("--work-dir", type=Path, default=Path("work"))
    p.add_argument("--test-data-dir", type=Path, default=None,
                   help="a separate labelled ISIC folder to test on; then every image of --data-dir trains")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--ensemble-with", type=Path, action="append", default=[], metavar="RUN",
                   help="a finished classifier run to average with the trained one in the served model; repeatable")
    args = p.parse_args(argv)
    if args.test_data_dir and args.data_dir is None:
        p.error("--test-data-dir needs --data-dir (the synthetic default has its own test split)")
    run(args.data_dir, args.work_dir, args.profile, args.test_data_dir, args.ensemble_with)
    return 0


if __name__ == "__main__":
    sys.exit(main())
