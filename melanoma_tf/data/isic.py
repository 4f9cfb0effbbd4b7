"""Finds the images, masks and labels of an ISIC download, whatever layout it came in.

A download folder may hold several layouts at once (e.g. the 2017 training and validation
folders side by side). Each known layout names where its images, masks and label files are;
`read_dataset` collects them all, joins them on the image id and reports what does not fit
(image without label, duplicate id) instead of guessing. Pixels are checked later, in
parallel, by `melanoma_tf.data.images`.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

MELANOMA, NEVUS, OTHER = "melanoma", "nevus", "other"
# Layout parts holding a challenge's official test set (labelled when its ground-truth CSV is there).
OFFICIAL_TEST_SOURCES = ("isic2016/Test", "isic2017/Test_v2", "isic2018/Test")
LABELS = (NEVUS, MELANOMA, OTHER)  # index = class id in the records
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_MASK_SUFFIX = re.compile(r"_(segmentation|Segmentation)$")
_SKIP_IMAGE = re.compile(r"_(superpixels|segmentation|Segmentation)$")


@dataclasses.dataclass(frozen=True)
class LesionItem:
    """One image of the download, before its pixels are read."""

    image_id: str
    image_path: Path
    label: str  # MELANOMA, NEVUS or OTHER
    source: str  # layout and part it came from, e.g. "isic2017/Training"
    mask_path: Path | None = None
    lesion_id: str | None = None  # groups images of one lesion (HAM10000, isic-cli)


@dataclasses.dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    image_id: str = ""


@dataclasses.dataclass
class _Part:
    """One split of one layout: where its images, masks and labels are."""

    source: str
    image_dirs: list[Path]
    mask_dirs: list[Path]
    label_files: list[tuple[Path, Callable[[Path], dict[str, tuple[str, str | None]]]]]


# --- label files -------------------------------------------------------------------------------
# Each reader maps image id -> (label, lesion id or None).

def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _flag(value: str | None) -> bool:
    return value is not None and value.strip() not in ("", "0", "0.0", "false", "False")


def _melanoma_sk_csv(path: Path) -> dict[str, tuple[str, str | None]]:
    """ISIC 2017 Part 3 and our simple layout: image_id, melanoma, seborrheic_keratosis."""
    out = {}
    for row in _rows(path):
        if _flag(row.get("melanoma")):
            label = MELANOMA
        elif _flag(row.get("seborrheic_keratosis")):
            label = OTHER
        else:
            label = NEVUS
        out[row["image_id"].strip()] = (label, None)
    return out


def _isbi2016_csv(path: Path) -> dict[str, tuple[str, str | None]]:
    """ISBI 2016 Part 3: no header; `id,benign|malignant` (train) or `id,0.0|1.0` (test).

    2016 has no nevus class: "benign" is mostly nevi, so it maps to NEVUS (stated in the README).
    """
    out = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            if len(row) < 2 or not row[0].strip().startswith("ISIC_"):
                continue
            value = row[1].strip().lower()
            out[row[0].strip()] = (MELANOMA if value in ("malignant", "1", "1.0") else NEVUS, None)
    return out


def _isic2018_task3_csv(path: Path) -> dict[str, tuple[str, str | None]]:
    """ISIC 2018 Task 3: image, MEL, NV, BCC, ... one-hot floats."""
    out = {}
    for row in _rows(path):
        label = MELANOMA if _flag(row.get("MEL")) else NEVUS if _flag(row.get("NV")) else OTHER
        out[row["image"].strip()] = (label, None)
    return out


def _diagnosis_label(text: str) -> str:
    text = text.strip().lower()
    if text in ("mel",) or "melanoma" in text:
        return MELANOMA
    if text in ("nv",) or "nevus" in text or "naevus" in text:
        return NEVUS
    return OTHER


def _ham10000_csv(path: Path) -> dict[str, tuple[str, str | None]]:
    """HAM10000_metadata.csv: lesion_id, image_id, dx (mel, nv, bkl, ...)."""
    return {r["image_id"].strip(): (_diagnosis_label(r["dx"]), r.get("lesion_id") or None)
            for r in _rows(path)}


def _isic_cli_csv(path: Path) -> dict[str, tuple[str, str | None]]:
    """`isic image download` metadata.csv: isic_id, diagnosis_1..5 (or the older `diagnosis`)."""
    out = {}
    for row in _rows(path):
        text = next((row[k] for k in ("diagnosis_3", "diagnosis_2", "diagnosis", "diagnosis_1")
                     if row.get(k)), "")
        out[row["isic_id"].strip()] = (_diagnosis_label(text), row.get("lesion_id") or None)
    return out


# --- layouts -----------------------------------------------------------------------------------

def _existing(root: Path, names: Iterable[str]) -> list[Path]:
    return [root / n for n in names if (root / n).is_dir()]


def _find_label_file(root: Path, name: str) -> Path | None:
    for p in (root / name, root / Path(name).stem / name):
        if p.is_file():
            return p
    return None


def _layout_parts(root: Path) -> list[_Part]:
    parts: list[_Part] = []

    def add(source: str, images: list[str], masks: list[str], labels: list[tuple[str, Callable]]):
        image_dirs = _existing(root, images)
        label_files = [(p, reader) for name, reader in labels
                       if (p := _find_label_file(root, name)) is not None]
        if image_dirs or label_files:
            parts.append(_Part(source, image_dirs, _existing(root, masks), label_files))

    for split in ("Training", "Test"):
        add(f"isic2016/{split}", [f"ISBI2016_ISIC_Part1_{split}_Data", f"ISBI2016_ISIC_Part3_{split}_Data"],
            [f"ISBI2016_ISIC_Part1_{split}_GroundTruth"],
            [(f"ISBI2016_ISIC_Part3_{split}_GroundTruth.csv", _isbi2016_csv)])
    for split in ("Training", "Validation", "Test_v2"):
        add(f"isic2017/{split}", [f"ISIC-2017_{split}_Data"], [f"ISIC-2017_{split}_Part1_GroundTruth"],
            [(f"ISIC-2017_{split}_Part3_GroundTruth.csv", _melanoma_sk_csv)])
    for split in ("Training", "Validation", "Test"):
        add(f"isic2018/{split}", [f"ISIC2018_Task1-2_{split}_Input", f"ISIC2018_Task3_{split}_Input"],
            [f"ISIC2018_Task1_{split}_GroundTruth"],
            [(f"ISIC2018_Task3_{split}_GroundTruth.csv", _isic2018_task3_csv)])
    add("ham10000", ["HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images"],
        ["HAM10000_segmentations_lesion_tschandl", "HAM10000_segmentations"],
        [("HAM10000_metadata.csv", _ham10000_csv), ("HAM10000_metadata", _ham10000_csv)])
    if (root / "metadata.csv").is_file() and "isic_id" in (root / "metadata.csv").read_text(
            encoding="utf-8-sig", errors="replace").split("\n", 1)[0]:
        add("isic-cli", ["."], ["masks"], [("metadata.csv", _isic_cli_csv)])
    add("simple", ["images"], ["masks"], [("labels.csv", _melanoma_sk_csv)])
    return parts


def detect_layouts(data_dir: Path | str) -> list[str]:
    """Names of the layout parts found in `data_dir`, e.g. ["isic2017/Training", "ham10000"]."""
    return [p.source for p in _layout_parts(Path(data_dir))]


def _image_files(directory: Path) -> Iterable[Path]:
    for p in sorted(directory.iterdir()):
        # A broken link is kept, so that it is reported as unreadable rather than passed over.
        if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES \
                and not _SKIP_IMAGE.search(p.stem):
            yield p


def _mask_files(directories: list[Path]) -> dict[str, Path]:
    masks = {}
    for d in directories:
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _MASK_SUFFIX.search(p.stem):
                masks.setdefault(_MASK_SUFFIX.sub("", p.stem), p)
    return masks


def read_dataset(data_dir: Path | str, include_other: bool = False
                 ) -> tuple[list[LesionItem], list[Problem]]:
    """Every labelled image of `data_dir`, sorted by id, and every problem found on the way.

    Labels from all label files of the download are pooled, so a 2018 image listed in the
    HAM10000 metadata gets its label even though it sits in another layout's folder.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data directory does not exist")
    parts = _layout_parts(root)
    if not any(p.image_dirs for p in parts):
        raise ValueError(
            f"{root}: no known ISIC layout found (expected e.g. images/ + labels.csv, "
            "ISIC-2017_Training_Data/, ISIC2018_Task1-2_Training_Input/, HAM10000_metadata.csv, "
            "or an isic-cli metadata.csv)")

    labels: dict[str, tuple[str, str | None]] = {}
    listed_in: dict[str, Path] = {}
    for part in parts:
        for path, reader in part.label_files:
            try:
                for image_id, value in reader(path).items():
                    labels.setdefault(image_id, value)
                    listed_in.setdefault(image_id, path)
            except (KeyError, csv.Error, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a valid label file ({e!r})") from e

    items: dict[str, LesionItem] = {}
    problems: list[Problem] = []
    for part in parts:
        masks = _mask_files(part.mask_dirs)
        for directory in part.image_dirs:
            for path in _image_files(directory):
                image_id = path.stem
                if image_id in items:
                    problems.append(Problem(str(path), f"duplicate image id {image_id} "
                                            f"(already read from {items[image_id].image_path})", image_id))
                    continue
                if image_id not in labels:
                    problems.append(Problem(str(path), "image without label", image_id))
                    continue
                label, lesion_id = labels[image_id]
                if label == OTHER and not include_other:
                    continue
                items[image_id] = LesionItem(image_id, path, label, part.source,
                                             masks.get(image_id), lesion_id)
    seen = {p.image_id for p in problems} | set(items)
    for image_id in sorted(set(labels) - seen):
        label, _ = labels[image_id]
        if label != OTHER or include_other:
            problems.append(Problem(str(listed_in[image_id]), f"{image_id} is labelled but has no image file",
                                    image_id))
    return [items[k] for k in sorted(items)], problems


def read_downloads(dirs: Sequence[Path | str], include_other: bool = False
                   ) -> tuple[list[LesionItem], list[int], list[Problem]]:
    """Every labelled image of the folders, with the index of the folder it came from. An image id
    found again in a later folder is one problem row (naming both files) and is kept from the first."""
    items, download, problems = [], [], []
    first: dict[str, Path] = {}
    for index, directory in enumerate(dirs):
        found, found_problems = read_dataset(directory, include_other=include_other)
        problems += found_problems
        for it in found:
            if it.image_id in first:
                problems.append(Problem(str(it.image_path), f"duplicate image id {it.image_id} in two "
                                        f"downloads; kept from {first[it.image_id]}", it.image_id))
                continue
            first[it.image_id] = it.image_path
            items.append(it)
            download.append(index)
    return items, download, problems
