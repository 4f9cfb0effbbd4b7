"""Whole-chain evaluation: segmenter -> masked lesion -> classifier, on any labelled ISIC folder.

    python -m melanoma_tf.evaluate --data-dir D --output-dir report/ \\
        (--server HOST:PORT | --seg-model DIR --cls-model DIR) \\
        [--concurrency N] [--threshold T] [--limit N] [--bootstrap N] [--seed S] [--no-explain]

Writes `metrics.json`, `predictions.csv` (one row per image), `masks/<id>_segmentation.png`
(0/255, the ISIC submission format), `explained/<id>.jpg` (the classifier's input and its
Grad-CAM heat map, from the classifier's `explain` signature; not with --no-explain) and the
report (`index.html`, see `melanoma_tf.report`).

Every prediction comes from `MelanomaClient`. With `--seg-model/--cls-model` the embedded TF
Serving-compatible server is started in-process on a free port and the same client talks to
it: a little serialisation overhead buys one implementation of the chain (requests, mask crop,
status rules) for every way of evaluating, where a second in-process predictor could drift
from what the served system does.

Scoring rules:
- Segmentation: images with a ground-truth mask, scored per image with the ISIC challenge's own
  metric functions and macro-averaged as its scorer does; the Otsu baseline on the same images.
- Classification: every melanoma/nevus image the chain answered. When the segmenter finds no
  lesion the chain never calls the image melanoma, so its score is 0 (counted in `no_lesion`).
  An input the classifier's guard refuses (not a dermoscopic lesion, or unusable) is not
  answered: counted in `refused`, left out of the classification metrics.
  An image is called melanoma when score >= threshold: the classifier's served operating
  point unless a threshold is given; when that is not 0.5, the metrics at p >= 0.5 (the
  balanced point of a class-weighted classifier) are reported too. The ISIC scorer uses >,
  which differs only for a probability exactly at the threshold.
- Images the chain could not score (unreadable, server error) or whose mask does not fit are
  left out of what they cannot count for and listed in `problems`.
- 95% CIs: percentile bootstrap over images (classification stratified by class), seeded.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from melanoma_tf import atomic, contract, report
from melanoma_tf.client import LesionPrediction, MelanomaClient
from melanoma_tf.data import isic
from melanoma_tf.data.images import BadInput, load_mask, write_mask
from melanoma_tf.evaluation import baselines, classification, segmentation
from melanoma_tf.evaluation.bootstrap import bootstrap_ci

SEGMENTER, CLASSIFIER = contract.SEGMENTER, contract.CLASSIFIER
SEGMENTATION_KEYS = segmentation.PIXEL_METRICS + ("detection_rate", "segmentation_precision")
DEFAULT_THRESHOLD = 0.5
# Statuses of inputs the classifier's guard refused (`modeling.input_guard`).
REFUSED = frozenset(contract.INPUT_STATUS_NAMES.values())
PREDICTION_COLUMNS = ("image_id", "label", "status", "melanoma_probability", "score", "predicted",
                      "lesion_score", *segmentation.PIXEL_METRICS, "found", "otsu_jaccard",
                      "otsu_dice", "image_path", "truth_mask_path", "mask_path", "explained_path", "error")


class Predictor(Protocol):
    """What `evaluate` needs: `MelanomaClient.predict_many`'s contract."""

    def predict_many(self, images: Iterable[tuple[str, Path]],
                     concurrency: int = 8) -> Iterator[LesionPrediction]: ...


def _base_path(model: Path, link_dir: Path) -> Path:
    """A TF Serving base path for `model`: a base path itself (numbered versions inside), or a
    single SavedModel folder, then linked as version 1 of a temporary base path."""
    model = Path(model).resolve()
    if (model / "saved_model.pb").is_file():
        link_dir.mkdir(parents=True)
        (link_dir / "1").symlink_to(model, target_is_directory=True)
        return link_dir
    if any(p.name.isdigit() and (p / "saved_model.pb").is_file() for p in model.glob("*")):
        return model
    raise FileNotFoundError(f"{model}: neither a SavedModel nor a folder of numbered SavedModel versions")


@contextlib.contextmanager
def serve_in_process(seg_model: Path, cls_model: Path, **client_kwargs) -> Iterator[MelanomaClient]:
    """A client of the embedded server, started on a free port with the two SavedModels."""
    from melanoma_tf.serving import start_server

    with tempfile.TemporaryDirectory(prefix="melanoma-eval-") as tmp:
        models = {SEGMENTER: _base_path(seg_model, Path(tmp) / SEGMENTER),
                  CLASSIFIER: _base_path(cls_model, Path(tmp) / CLASSIFIER)}
        with start_server(models, port=0, poll_seconds=0) as server, \
                MelanomaClient(server.target, **client_kwargs) as client:
            yield client


def _image_row(item: isic.LesionItem, result: LesionPrediction, masks_dir: Path,
               problems: list[dict], explained_dir: Path | None = None) -> dict:
    """Everything known about one image: the chain's answer and its per-image metrics."""
    row: dict = {"image_id": item.image_id, "label": item.label, "melanoma": int(item.label == isic.MELANOMA),
                 "status": result.status, "error": result.error or "", "image_path": str(item.image_path.resolve()),
                 "truth_mask_path": str(item.mask_path.resolve()) if item.mask_path else "",
                 "melanoma_probability": result.melanoma_probability, "lesion_score": result.segmentation_score}
    if result.error is not None:
        problems.append({"image_id": item.image_id, "path": str(item.image_path), "reason": result.error})
        return row
    if result.status not in REFUSED:  # a refused input is not answered: counted, not scored
        row["score"] = 0.0 if result.status == "no_lesion" else result.melanoma_probability
    mask = result.lesion_mask
    row["mask_path"] = f"masks/{write_mask(masks_dir, item.image_id, mask).name}"
    if result.heat_map is not None and explained_dir is not None:
        path = explained_dir / f"{item.image_id}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(report.explained(result.classifier_input, result.heat_map),
                                            cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        row["explained_path"] = f"explained/{path.name}"
    if item.mask_path is None:
        return row
    try:
        truth = load_mask(item.mask_path, *mask.shape)
    except BadInput as e:
        problems.append({"image_id": item.image_id, "path": e.path, "reason": e.reason})
        return row
    row.update(segmentation.image_metrics(mask, truth))
    otsu = segmentation.image_metrics(baselines.otsu_lesion_mask(report.decode_rgb(item.image_path)), truth)
    row.update({f"otsu_{k}": v for k, v in otsu.items()})
    return row


def segmentation_with_ci(per_image: list[dict], prefix: str = "", n: int = 1000,
                         seed: int = 0) -> dict:
    """Macro averages, detection rate and segmentation precision with 95% bootstrap CIs, and
    the Table I counts, from `segmentation.image_metrics` rows (keys optionally prefixed)."""
    rows = [{k: m[prefix + k] for k in segmentation.PIXEL_METRICS + ("found", "missed", "false_lesion")}
            for m in per_image]
    summary = segmentation.summarize(rows)
    table = np.array([[m[k] for k in segmentation.PIXEL_METRICS + ("found", "false_lesion")] for m in rows])

    def vector(t: np.ndarray) -> list[float]:
        found, false_lesion = t[:, -2].sum(), t[:, -1].sum()
        precision = found / (found + false_lesion) if found + false_lesion else math.nan
        return [*t[:, :-2].mean(axis=0), found / len(t), precision]

    low, high = bootstrap_ci(vector, table, n=n, seed=seed)
    out: dict = {k: {"value": summary[k], "ci95": [float(low[i]), float(high[i])]}
                 for i, k in enumerate(SEGMENTATION_KEYS)}
    out["table1"] = {"found": int(summary["table1_found"]), "missed": int(summary["table1_missed"]),
                     "background_called_lesion": int(summary["table1_background_called_lesion"])}
    out["num_images"] = len(rows)
    return out


def jaccard_minus_otsu(per_image: list[dict], n: int = 1000, seed: int = 0) -> dict:
    """Mean Jaccard of the model minus Otsu's on the same images, with a paired bootstrap 95%
    interval (both means on every resample): whether the model beats the classical baseline,
    which two overlapping marginal intervals cannot say."""
    model = np.array([r["jaccard"] for r in per_image], float)
    otsu = np.array([r["otsu_jaccard"] for r in per_image], float)
    low, high = bootstrap_ci(lambda a, b: a.mean() - b.mean(), model, otsu, n=n, seed=seed)
    return {"value": float(model.mean() - otsu.mean()), "ci95": [float(low), float(high)], "num_images": len(model)}


def classification_with_ci(rows: list[dict], threshold: float, n: int = 1000, seed: int = 0) -> dict:
    """The classification metrics with 95% CIs, Table II and counts; {"error": why} when the
    images hold one class only (ROC AUC, sensitivity or specificity would be undefined)."""
    y = np.array([r["melanoma"] for r in rows], int)
    score = np.array([r["score"] for r in rows], float)
    counts = {"num_images": len(rows), "num_melanoma": int(y.sum()),
              "no_lesion": sum(r["status"] == "no_lesion" for r in rows)}
    try:
        metrics = classification.metrics_with_ci(y, score, threshold, n=n, seed=seed)
    except ValueError as e:
        return {**counts, "error": str(e)}
    return {**metrics, "table2": classification.table_ii(y, score, threshold), **counts}


def _write_predictions(path: Path, rows: list[dict], threshold: float) -> None:
    with atomic.atomic_file(path, newline="") as f:
        writer = csv.DictWriter(f, PREDICTION_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            out = {k: row.get(k, "") for k in PREDICTION_COLUMNS}
            if "score" in row:
                out["predicted"] = int(row["score"] >= threshold)
            # Full precision (repr): the file must give back exactly the scores the metrics used.
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else
                             repr(v) if isinstance(v, float) else v for k, v in out.items()})


def _served_threshold(thresholds: set[float]) -> float:
    """The one threshold the served classifier decided at (0.5 if no answer carried one)."""
    if len(thresholds) > 1:
        raise ValueError(f"the classifier answered with different thresholds {sorted(thresholds)} (several "
                         "versions served?): pin a classifier version or pass a threshold")
    return thresholds.pop() if thresholds else DEFAULT_THRESHOLD


def _finite(obj):
    """JSON has no NaN: undefined values (e.g. a CI no resample could compute) become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate(data_dir: str | Path | Sequence[str | Path], predictor: Predictor, output_dir: str | Path, *,
             threshold: float | None = None, concurrency: int = 4, limit: int | None = None,
             image_ids: Iterable[str] | None = None, bootstrap: int = 1000, seed: int = 0,
             progress: bool = True, source: str = "", write_html: bool = True, weights_licence: str = "") -> dict:
    """Runs the chain on every melanoma/nevus image of `data_dir` (one folder or several), scores it and writes
    metrics.json, predictions.csv, masks/ and (with `write_html`) index.html into `output_dir`.

    `predictor` is a `MelanomaClient` (or anything with its `predict_many`); `source` says in
    the report where the predictions came from; `image_ids` keeps only those images (e.g. the
    test split of a TFRecord manifest). Returns the metrics as written.
    """
    data_dirs = [Path(data_dir)] if isinstance(data_dir, (str, os.PathLike)) else [Path(d) for d in data_dir]
    output_dir = Path(output_dir)
    items, _, read_problems = isic.read_downloads(data_dirs)
    if image_ids is not None:
        keep = set(image_ids)
        items = [item for item in items if item.image_id in keep]
    items = items[:limit] if limit is not None else items
    if not items:
        raise ValueError(f"{', '.join(map(str, data_dirs))}: no melanoma or nevus image to evaluate")
    by_id = {item.image_id: item for item in items}
    output_dir.mkdir(parents=True, exist_ok=True)
    problems = [{"image_id": p.image_id, "path": p.path, "reason": p.reason} for p in read_problems]
    rows, versions, served = [], {}, set()
    with atomic.atomic_path(output_dir / "masks") as new_masks, \
            atomic.atomic_path(output_dir / "explained") as new_explained:
        new_masks.mkdir()
        new_explained.mkdir()
        results = predictor.predict_many([(i.image_id, i.image_path) for i in items], concurrency=concurrency)
        for result in tqdm(results, total=len(items), unit="img", desc="evaluating", disable=not progress):
            rows.append(_image_row(by_id[result.image_id], result, new_masks, problems, new_explained))
            versions.update(result.model_versions)
            if math.isfinite(result.threshold):
                served.add(result.threshold)
    rows.sort(key=lambda r: r["image_id"])
    segmented = [r for r in rows if "jaccard" in r]
    answered = [r for r in rows if "score" in r]
    if threshold is None:
        threshold = _served_threshold(served)
    metrics = {
        "data_dir": ", ".join(str(d.resolve()) for d in data_dirs),
        "source": source,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model_versions": versions,
        "threshold": threshold,
        "bootstrap": {"samples": bootstrap, "seed": seed, "confidence": 0.95},
        "counts": {"images": len(rows), "melanoma": sum(r["melanoma"] for r in rows),
                   "nevus": sum(1 - r["melanoma"] for r in rows),
                   "with_mask": sum(bool(r["truth_mask_path"]) for r in rows),
                   "answered": len(answered), "no_lesion": sum(r["status"] == "no_lesion" for r in rows),
                   "refused": sum(r["status"] in REFUSED for r in rows),
                   "errors": sum(bool(r["error"]) for r in rows)},
        "segmentation": segmentation_with_ci(segmented, n=bootstrap, seed=seed) if segmented else None,
        "segmentation_otsu": segmentation_with_ci(segmented, "otsu_", bootstrap, seed) if segmented else None,
        "jaccard_minus_otsu": jaccard_minus_otsu(segmented, bootstrap, seed) if segmented else None,
        "classification": classification_with_ci(answered, threshold, bootstrap, seed) if answered else None,
        # A screening threshold trades specificity for sensitivity; p >= 0.5 is the classifier's
        # balanced point (class-weighted training weighs both classes equally there).
        "classification_at_0.5": (classification_with_ci(answered, DEFAULT_THRESHOLD, bootstrap, seed)
                                  if answered and threshold != DEFAULT_THRESHOLD else None),
        # Is the served melanoma probability a probability? (Brier score, reliability table)
        "calibration": classification.calibration([r["melanoma"] for r in answered], [r["score"] for r in answered])
        if answered and len({r["melanoma"] for r in answered}) == 2 else None,
        "paper": report.PAPER,
        "weights_licence": weights_licence,
        "problems": problems,
    }
    metrics = _finite(metrics)
    atomic.write_json(output_dir / "metrics.json", metrics)
    _write_predictions(output_dir / "predictions.csv", rows, threshold)
    if write_html:
        report.write_report(output_dir)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m melanoma_tf.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path, action="append",
                   help="labelled ISIC folder (any layout); repeatable")
    p.add_argument("--output-dir", required=True, type=Path, help="report folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="gRPC target HOST:PORT of TF Serving or the embedded server")
    where.add_argument("--seg-model", type=Path, help="segmenter SavedModel (or its versions folder)")
    p.add_argument("--cls-model", type=Path, help="classifier SavedModel (or its versions folder)")
    p.add_argument("--concurrency", type=int, default=4, help="images in flight")
    p.add_argument("--threshold", type=float, default=None,
                   help="melanoma decision threshold (default: the classifier's served operating point)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (by id)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per RPC, seconds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-explain", action="store_true",
                   help="skip the classifier's heat maps (explained/): one forward pass per image, no backward")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; 2 for usage errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.seg_model is None) != (args.cls_model is None):
        parser.error("--seg-model and --cls-model go together (or use --server)")
    client_kwargs = dict(threshold=args.threshold, timeout=args.timeout, explain=not args.no_explain)
    if args.server:
        chain, source = MelanomaClient(args.server, **client_kwargs), f"gRPC server {args.server}"
    else:
        chain = serve_in_process(args.seg_model, args.cls_model, **client_kwargs)
        source = f"in-process: {args.seg_model.resolve()}, {args.cls_model.resolve()}"
    # What the classifier's pretrained weights' licence asks (an export says it in assets.extra;
    # a remote server's files are out of reach).
    licences = ([] if args.server else sorted(args.cls_model.glob("assets.extra/weights_licence.txt"))
                + sorted(args.cls_model.glob("*/assets.extra/weights_licence.txt")))
    with chain as client:
        metrics = evaluate(args.data_dir, client, args.output_dir, threshold=args.threshold,
                           concurrency=args.concurrency, limit=args.limit, bootstrap=args.bootstrap,
                           seed=args.seed, progress=not args.no_progress, source=source,
                           weights_licence=licences[-1].read_text().strip() if licences else "")
    print("\n".join(report.headline(metrics)) or "nothing scored")
    print(f"report: {(args.output_dir / 'index.html').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
