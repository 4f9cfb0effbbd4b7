"""Builds sharded TFRecords from ISIC downloads (any layout `data.isic` knows).

    python -m melanoma_tf.build_tfrecords --data-dir D [--data-dir D2 ...] --output-dir tfrecords/NAME \
        [--test-data-dir T] [--split auto|official|stratified] [--test-fraction 0.2] [--folds 5]
        [--seed 0] [--image-size-max N] [--num-workers K] [--include-other]

The test split is the challenge's official test set when a download holds a labelled one
(ISIC 2016 Test, ISIC 2017 Test_v2, ISIC 2018 Test; validation images join the training folds),
else a stratified 20% of the first --data-dir. Further --data-dir folders (e.g. HAM10000 beside
ISIC 2017) add training images: the first folder's test split is exactly what a build of it
alone holds out, so results with and without the extra images compare on the same test images.
An image id found in two folders is reported once and kept from the first; images of one lesion
(`lesion_id`) never straddle the test split or two folds, across folders too.

Everything is written into a temporary sibling folder that replaces the output folder only
when the build is complete, so a killed build never leaves shards that look finished.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import multiprocessing
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from melanoma_tf import atomic, storage, tfrecords
from melanoma_tf.data import images, isic

SHARD_TARGET_BYTES = 100 * 2**20  # TF's performance guide: shards of 100 MB or more


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fork where there is fork: workers use only Pillow and NumPy, never the parent's TensorFlow,
    and a spawned worker would re-import TensorFlow with the main module (seconds per worker)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _shard_count(paths: list[Path]) -> int:
    size = sum(p.stat().st_size for p in paths if p.exists())  # a broken link is reported later
    return max(1, math.ceil(size / SHARD_TARGET_BYTES))


def _as_dirs(data_dir: Path | str | Sequence[Path | str]) -> list[Path]:
    dirs = [Path(data_dir)] if isinstance(data_dir, (str, os.PathLike)) else [Path(d) for d in data_dir]
    if not dirs:
        raise ValueError("no --data-dir given")
    return dirs


def download_names(dirs: Sequence[Path]) -> list[str]:
    """Each folder's name as its records keep it (`image/lesion/download`): the folder's own name,
    numbered where two folders share one."""
    names = [d.resolve().name or str(d) for d in dirs]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def build(data_dir: Path | str | Sequence[Path | str], output_dir: Path | str, *, test_fraction: float = 0.2,
          folds: int = 5, seed: int = 0, image_size_max: int | None = None,
          num_workers: int = 1, include_other: bool = False, strict: bool = False,
          progress: bool = True, split: str = "auto", test_data_dir: Path | str | None = None) -> dict:
    """Builds the records and returns the manifest (also written as manifest.json).

    data_dir: one download folder or several (see the module docstring for how they split).
    split: 'official' makes the challenge's labelled official test set the test split (its
    validation set joins the training folds), so results compare with the leaderboards;
    'stratified' pools everything and holds out `test_fraction`, stratified by class and mask;
    'auto' (default) is 'official' when the download has a labelled test set. The manifest
    records the rule in `split_rule`. test_data_dir: a separate labelled folder (any layout)
    whose images are the test split, and every image of data_dir trains (`test_data_dir` rule);
    an image id in both is an error.
    """
    data_dirs, output_dir = _as_dirs(data_dir), storage.path(output_dir)
    items, download, problems = isic.read_downloads(data_dirs, include_other)
    if strict and problems:
        raise images.BadInput(problems[0].path, problems[0].reason)
    if not items:
        raise ValueError(f"{', '.join(map(str, data_dirs))}: no usable labelled image found ({len(problems)} problems)")
    from_test_dir = None
    if test_data_dir is not None:
        test_items, test_problems = isic.read_dataset(test_data_dir, include_other=include_other)
        train_path = {it.image_id: it.image_path for it in items}
        shared = sorted(set(train_path) & {it.image_id for it in test_items})
        if shared:
            raise ValueError(f"{test_data_dir}: image {shared[0]} is also in the training folder "
                             f"{train_path[shared[0]].parent} ({len(shared)} shared ids); a test image must not "
                             "be trained on")
        if not test_items:
            raise ValueError(f"{test_data_dir}: no usable labelled test image found")
        if strict and test_problems:
            raise images.BadInput(test_problems[0].path, test_problems[0].reason)
        from_test_dir = [False] * len(items) + [True] * len(test_items)
        items, problems = items + test_items, problems + test_problems
        download += [len(data_dirs)] * len(test_items)
        data_dirs = data_dirs + [Path(test_data_dir)]
    names = download_names(data_dirs)

    is_test, fold, split = tfrecords.split_items(items, split, test_fraction, folds, seed, from_test_dir, download)
    split_of = ["test" if t else "train" for t in is_test]
    shard_sets = {}
    for i, it in enumerate(items):
        key = split_of[i] + ("" if it.mask_path is not None else "_nomask")
        shard_sets.setdefault(key, []).append(it.image_path)

    records: dict[str, dict] = {}
    conversions: list[isic.Problem] = []
    tasks = [(it, image_size_max) for it in items]
    with atomic.atomic_path(output_dir) as tmp_dir:  # a killed build leaves no shards that look finished
        tmp_dir.mkdir(parents=True)
        writers = {key: tfrecords.ShardedWriter(tmp_dir, key, _shard_count(paths))
                   for key, paths in shard_sets.items()}
        pool = _worker_context().Pool(num_workers) if num_workers > 1 else None
        try:
            results = pool.imap(images.load_item, tasks, chunksize=4) if pool else map(images.load_item, tasks)
            for i, result in enumerate(tqdm(results, total=len(items), desc="encoding",
                                             unit="img", disable=not progress)):
                it = items[i]
                if isinstance(result, isic.Problem):
                    if strict:
                        raise images.BadInput(result.path, result.reason)
                    problems.append(result)
                    continue
                conversions += [isic.Problem(str(it.image_path), n, it.image_id) for n in result.image.notes]
                example = tfrecords.make_example(
                    image_id=it.image_id, source_id=i + 1, encoded=result.image.encoded,
                    image_format=result.image.format, height=result.image.height,
                    width=result.image.width, label=it.label, source=it.source, fold=int(fold[i]),
                    mask_png=result.mask_png, box=result.box, area=result.area, download=names[download[i]])
                has_mask = result.mask_png is not None
                writers[split_of[i] + ("" if has_mask else "_nomask")].write(example.SerializeToString())
                records[it.image_id] = {
                    "source_id": i + 1, "split": split_of[i], "fold": int(fold[i]), "label": it.label,
                    "has_mask": has_mask, "source": it.source, "download": names[download[i]],
                    "lesion_id": it.lesion_id,
                    "height": result.image.height, "width": result.image.width}
            shards = {key: [p.name for p in w.close()] for key, w in writers.items() if w.count}
        finally:
            if pool:
                pool.terminate()

        manifest = _manifest(data_dirs, names, records, shards, problems, conversions, dict(
            split_rule=split, test_fraction=test_fraction if split == "stratified" else None,
            test_data_dir=str(test_data_dir) if test_data_dir else None, folds=folds, seed=seed,
            image_size_max=image_size_max, include_other=include_other))
        _write_report(tmp_dir / "build_report.csv", problems, conversions)
        atomic.write_json(tmp_dir / "manifest.json", manifest)
    return manifest


def _manifest(data_dirs, names, records, shards, problems, conversions, options) -> dict:
    counts = {}
    for split in tfrecords.SPLITS:
        rows = [r for r in records.values() if r["split"] == split]
        counts[split] = {"total": len(rows), "with_mask": sum(r["has_mask"] for r in rows),
                         **Counter(r["label"] for r in rows)}
    folds: dict[str, list[str]] = {}
    for image_id, r in records.items():
        if r["split"] == "train":
            folds.setdefault(str(r["fold"]), []).append(image_id)
    return {
        "format_version": tfrecords.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_dir": str(data_dirs[0].resolve()),
        "downloads": {name: {"path": str(d.resolve()), "layouts": isic.detect_layouts(d),
                             "images": sum(r["download"] == name for r in records.values())}
                      for name, d in zip(names, data_dirs)},
        "options": options,
        "label_ids": tfrecords.LABEL_IDS,
        "counts": counts,
        "splits": {s: [k for k, r in records.items() if r["split"] == s] for s in tfrecords.SPLITS},
        "folds": dict(sorted(folds.items())),
        "shards": shards,
        "problems": len(problems),
        "conversions": len(conversions),
        "images": records,
    }


def _write_report(path: Path, problems: list[isic.Problem], conversions: list[isic.Problem]) -> None:
    with atomic.atomic_file(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "action", "reason"])
        w.writerows([p.image_id, p.path, "skipped", p.reason] for p in problems)
        w.writerows([p.image_id, p.path, "converted", p.reason] for p in conversions)


def print_summary(manifest: dict, output_dir: Path) -> None:
    print(f"split rule: {manifest['options'].get('split_rule', 'stratified')}")
    for name, d in manifest.get("downloads", {}).items():
        print(f"download {name}: {d['images']} images ({', '.join(d['layouts'])}) from {d['path']}")
    for split, c in manifest["counts"].items():
        labels = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("total", "with_mask"))
        print(f"{split}: {c['total']} images ({labels}), {c['with_mask']} with a mask")
    if manifest["problems"] or manifest["conversions"]:
        with (output_dir / "build_report.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                print(f"  {row['action']}: {row['path']}: {row['reason']}")
    print(f"{manifest['problems']} skipped, {manifest['conversions']} converted; "
          f"report in {output_dir / 'build_report.csv'}, manifest in {output_dir / 'manifest.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, action="append",
                        help="ISIC download folder; repeat to add folders (the first one's images form the "
                             "stratified test split, the others train)")
    parser.add_argument("--test-data-dir", type=Path, default=None,
                        help="a separate labelled folder that is the test split (e.g. ISIC 2017 Test_v2)")
    parser.add_argument("--output-dir", required=True, type=storage.path,
                        help="e.g. tfrecords/isic2017, or a bucket (gs://b/records)")
    parser.add_argument("--split", choices=tfrecords.SPLIT_RULES, default="auto",
                        help="test split: the challenge's official test set when the download has a labelled "
                             "one (auto, official), or a stratified --test-fraction of everything")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="with the stratified split")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of the train split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size-max", type=int, default=None,
                        help="downscale images whose longer side exceeds this")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--include-other", action="store_true",
                        help="keep diagnoses other than melanoma/nevus (label 'other')")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad input")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.data_dir, args.output_dir, test_fraction=args.test_fraction,
                         folds=args.folds, seed=args.seed, image_size_max=args.image_size_max,
                         num_workers=args.num_workers, include_other=args.include_other,
                         strict=args.strict, split=args.split, test_data_dir=args.test_data_dir)
    except (images.BadInput, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(manifest, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
