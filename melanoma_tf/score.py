"""Batch scoring: `python -m melanoma_tf.score --server localhost:8500 --input DIR_OR_CSV --output scores.csv`.

Crash safety: every result is appended as one CSV line and flushed as it arrives, so
a killed run loses at most the line being written.  On restart the output is read
back, a partial last line (no trailing newline) is cut off, and every image id
already present is skipped, so nothing is scored twice.  Masks (`--masks-dir`) are
written to a temporary file and renamed before their row is written, so a row never
points at a half-written mask.  `--server` takes one address, a DNS name with several
addresses (a Kubernetes headless Service) or a comma-separated list; requests are spread
over the replicas (gRPC round_robin) and a request that a dying replica drops is retried
on another.  While no server is ready (down or restarting), a request waits up to
`--server-wait` seconds before its image is recorded as failed; at the start, no server
answering within `--connect-timeout` seconds stops the run.  Images that fail
(unreadable, undecodable, rejected) are written with their error and the run goes on;
`--retry-failed` drops those rows and scores them again. `--input`, `--output` and `--masks-dir`
may be bucket URLs (gs://): an output there is uploaded whole every few seconds rather than
flushed per line, so a killed run loses at most those seconds' rows.

A server outage is not an image's error: a call that no server answered (UNAVAILABLE, or
DEADLINE_EXCEEDED after `--timeout` plus `--server-wait`) stops the run, the images not yet
scored get no row, and the exit status is 3, so a restarted run (a Kubernetes Job's next pod)
scores exactly those.

Exit status (EXIT_* below): 0 every input image has a result without error; 1 the run finished
but some images have an error row (0 with `--allow-image-errors`, e.g. in a Kubernetes Job,
which then ends Complete); 2 usage error; 3 no server answered, at the start within
`--connect-timeout` or during the run (the rest was not scored: retry later).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
from pathlib import Path

from melanoma_tf import atomic, contract, storage
from melanoma_tf.data import images

COLUMNS = ["image_id", "path", "melanoma_probability", "is_melanoma", "lesion_score", "box",
           "status", "error", "latency_ms"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
FSYNC_EVERY_SECONDS = 5.0

log = logging.getLogger("melanoma_tf.score")

EXIT_OK, EXIT_IMAGE_ERRORS, EXIT_USAGE, EXIT_NO_SERVER = 0, 1, 2, 3
# The gRPC statuses of a call no server answered: the servers' failure, not the image's.
OUTAGE_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


class UsageError(Exception):
    """Bad input or output arguments (EXIT_USAGE)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def discover_images(input_path: Path, recursive: bool = False) -> list[tuple[str, Path]]:
    """(image_id, path) for a folder of jpg/jpeg/png or a CSV with an image_path/path column."""
    if input_path.is_dir():
        pattern = "**/*" if recursive else "*"
        paths = sorted(p for p in input_path.glob(pattern)
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        stems = [p.stem for p in paths]
        if len(set(stems)) == len(stems):
            return list(zip(stems, paths))
        log.warning("duplicate file names under %s: using relative paths as image ids", input_path)
        return [(p.relative_to(input_path).with_suffix("").as_posix(), p) for p in paths]
    if input_path.is_file() and input_path.suffix.lower() == ".csv":
        with input_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            column = "image_path" if "image_path" in fields else "path" if "path" in fields else None
            if column is None:
                raise UsageError(f"{input_path}: needs an 'image_path' or 'path' column")
            items = []
            for row in reader:
                path = storage.path(row[column])
                if not path.is_absolute():
                    path = input_path.parent / path
                image_id = (row.get("image_id") or "").strip() or path.stem
                items.append((image_id, path))
        return items
    raise UsageError(f"{input_path}: not a folder nor a .csv file")


def load_existing(output: Path) -> dict[str, dict[str, str]]:
    """Rows already in `output` by image id; truncates a partial last line first."""
    if not output.exists():
        return {}
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        log.warning("%s: dropping a partial last line left by an interrupted run", output)
        atomic.write_bytes(output, data)
    if not data:
        return {}
    lines = data.decode("utf-8").splitlines()
    header = next(csv.reader([lines[0]]))
    if header != COLUMNS:
        raise UsageError(f"{output}: existing file has columns {header}, expected {COLUMNS}")
    rows: dict[str, dict[str, str]] = {}
    for row in csv.DictReader(lines):
        rows.setdefault(row["image_id"], row)
    return rows


def rewrite_without(output: Path, drop: set[str]) -> None:
    """Atomically rewrite `output` without the rows of `drop` (for --retry-failed)."""
    with output.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["image_id"] not in drop]
    with atomic.atomic_file(output, newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        _sync(handle)


def _sync(handle) -> None:
    """Flushes to disk; a bucket's file (GFile) uploads what was written."""
    handle.flush()
    if hasattr(handle, "fileno"):
        os.fsync(handle.fileno())


def _number(value: float) -> str:
    return f"{value:.6f}" if value is not None and math.isfinite(value) else ""


def result_row(result, path: Path) -> list[str]:
    """One CSV row for a `LesionPrediction`."""
    decision = "" if result.is_melanoma is None else ("1" if result.is_melanoma else "0")
    box = " ".join(f"{v:.1f}" for v in result.lesion_box) if result.lesion_box else ""
    return [result.image_id, _one_line(path), _number(result.melanoma_probability), decision,
            _number(result.segmentation_score), box, result.status, _one_line(result.error or ""),
            f"{result.latency_ms.get('total', 0.0):.1f}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.score",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", default=None,
                        help="gRPC server host:port, a DNS name of several, or a comma-separated list; "
                             "repeatable (default localhost:8500)")
    parser.add_argument("--input", required=True, type=storage.path, help="image folder or CSV")
    parser.add_argument("--output", required=True, type=storage.path, help="scores CSV (appended/resumed)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="images in flight (about 2x the server's max_batch_size / threads)")
    parser.add_argument("--masks-dir", type=storage.path, default=None,
                        help="write <image_id>_segmentation.png masks here")
    parser.add_argument("--threshold", type=float, default=None,
                        help="melanoma decision threshold (default: the classifier's served operating point)")
    parser.add_argument("--recursive", action="store_true", help="search the folder recursively")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of one call with its retries, seconds")
    parser.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds for the servers to answer at the start")
    parser.add_argument("--server-wait", type=float, default=120.0,
                        help="seconds a call waits for a ready server while none is up (restarts)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="drop rows with an error from the output and score them again")
    parser.add_argument("--segmenter", default=contract.SEGMENTER)
    parser.add_argument("--classifier", default=contract.CLASSIFIER)
    parser.add_argument("--segmenter-version", type=int, default=None)
    parser.add_argument("--segmenter-label", default=None)
    parser.add_argument("--classifier-version", type=int, default=None)
    parser.add_argument("--classifier-label", default=None)
    parser.add_argument("--allow-image-errors", action="store_true",
                        help="exit 0 when the run finished with per-image errors (listed in the CSV)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Score every input image once; see the module docstring for the guarantees."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from melanoma_tf import client as client_lib  # TensorFlow: imported once the arguments parse

    try:
        servers = client_lib.server_addresses(args.server or ["localhost:8500"])
        items = discover_images(args.input, args.recursive)
        existing = load_existing(args.output)
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.retry_failed:
        failed = {image_id for image_id, row in existing.items() if row["error"]}
        if failed:
            rewrite_without(args.output, failed)
            existing = {k: v for k, v in existing.items() if k not in failed}
    paths: dict[str, Path] = {}
    for image_id, path in items:
        if image_id in paths:
            log.warning("duplicate image id %s (%s): scoring it once", image_id, path)
            continue
        paths[image_id] = path
    todo = [(image_id, path) for image_id, path in paths.items() if image_id not in existing]
    print(f"{len(paths)} images, {len(paths) - len(todo)} already in {args.output}, "
          f"{len(todo)} to score", file=sys.stderr)

    from tqdm import tqdm

    try:
        client = client_lib.MelanomaClient(
            servers, segmenter=args.segmenter, classifier=args.classifier,
            segmenter_version=args.segmenter_version, segmenter_label=args.segmenter_label,
            classifier_version=args.classifier_version, classifier_label=args.classifier_label,
            threshold=args.threshold, timeout=args.timeout, server_wait=args.server_wait,
            connect_timeout=args.connect_timeout)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_SERVER
    written, new_failed, outage = 0, 0, None
    flush_each_row = not storage.is_url(args.output)  # a bucket re-uploads the whole file per flush
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a", newline="") as handle, client:
        writer = csv.writer(handle, lineterminator="\n")
        if not existing and not (args.output.exists() and args.output.stat().st_size):
            writer.writerow(COLUMNS)
            handle.flush()
        last_sync = time.monotonic()
        progress = tqdm(total=len(todo), unit="img", disable=args.no_progress,
                        dynamic_ncols=True, smoothing=0.1)
        results = client.predict_many(todo, concurrency=args.concurrency)
        for result in results:
            if result.error_code in OUTAGE_CODES:
                outage = result.error
                results.close()  # waits for the calls in flight; their images stay unscored
                break
            path = paths[result.image_id]
            if result.error is None and args.masks_dir is not None and result.lesion_mask is not None:
                try:
                    images.write_mask(args.masks_dir, result.image_id, result.lesion_mask)
                except OSError as exc:
                    result = _with_error(result, f"cannot write mask: {exc}")
            if result.error is not None:
                new_failed += 1
            writer.writerow(result_row(result, path))
            written += 1
            if flush_each_row:
                handle.flush()
            if time.monotonic() - last_sync > FSYNC_EVERY_SECONDS:
                _sync(handle)
                last_sync = time.monotonic()
            progress.update(1)
            progress.set_postfix(failed=new_failed, refresh=False)
        progress.close()
        _sync(handle)
    if outage is not None:
        print(f"error: stopped, no server answered ({outage}); {len(todo) - written} images left unscored: "
              "run again to score them", file=sys.stderr)
        return EXIT_NO_SERVER
    old_failed = sum(1 for image_id, row in existing.items() if image_id in paths and row["error"])
    print(f"scored {len(todo)} images ({new_failed} failed); "
          f"{old_failed} earlier failures kept in {args.output}", file=sys.stderr)
    if not (new_failed or old_failed) or args.allow_image_errors:
        return EXIT_OK
    return EXIT_IMAGE_ERRORS


def _with_error(result, message: str):
    import dataclasses

    return dataclasses.replace(result, status="error", error=message)


if __name__ == "__main__":
    sys.exit(main())
