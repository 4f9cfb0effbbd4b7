"""The one record format both stages read, and the sharded writer that produces it.

A record is Model Garden's detection `tf.Example` (so `TfExampleDecoder(include_mask=True)` and
the Mask R-CNN input pipeline read it unchanged) plus a few `image/lesion/*` features for the
classifier and for splits:

    image/encoded, image/format, image/height, image/width
    image/source_id           numeric string (Model Garden's COCO evaluation parses it as int64)
    image/object/bbox/{xmin,xmax,ymin,ymax}   normalised [0, 1], one box, from the mask
    image/object/class/label  1 (lesion)          image/object/is_crowd  0
    image/object/area         mask pixel count    image/object/mask      PNG, values 0/1
    image/lesion/image_id     e.g. "ISIC_0000017"
    image/lesion/label        0 nevus, 1 melanoma, 2 other    image/lesion/label_text
    image/lesion/fold         0..K-1 in the train split, -1 in the test split
    image/lesion/has_mask     1 when a mask is stored          image/lesion/mask_source
    image/lesion/source       which part of the download it came from
    image/lesion/download     which download folder it came from (builds of several folders)

Masks are stored as 0/1, not ISIC's 0/255: Model Garden's decoder uses the PNG values as the
mask training target. Images without a mask go to `<split>_nomask-*` shards, which only the
classifier reads (`<split>*.tfrecord`), never to the `<split>-*` shards Mask R-CNN trains on.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from melanoma_tf import storage
from melanoma_tf.data import isic

FORMAT_VERSION = 1
LABEL_IDS = {"nevus": 0, "melanoma": 1, "other": 2}
SPLITS = ("train", "test")


def _bytes(values: Iterable[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Iterable[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _floats(values: Iterable[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def make_example(*, image_id: str, source_id: int, encoded: bytes, image_format: str,
                 height: int, width: int, label: str, source: str, fold: int,
                 mask_png: bytes | None = None, box: tuple[int, int, int, int] | None = None,
                 area: int = 0, mask_source: str = "ground_truth", download: str = "") -> tf.train.Example:
    """Builds one record. `box` is (ymin, xmin, ymax, xmax) in pixels, max exclusive."""
    f = {
        "image/encoded": _bytes([encoded]),
        "image/format": _bytes([image_format.encode()]),
        "image/height": _ints([height]),
        "image/width": _ints([width]),
        "image/source_id": _bytes([str(source_id).encode()]),
        "image/lesion/image_id": _bytes([image_id.encode()]),
        "image/lesion/label": _ints([LABEL_IDS[label]]),
        "image/lesion/label_text": _bytes([label.encode()]),
        "image/lesion/fold": _ints([fold]),
        "image/lesion/source": _bytes([source.encode()]),
        "image/lesion/download": _bytes([download.encode()]),
        "image/lesion/has_mask": _ints([int(mask_png is not None)]),
        "image/lesion/mask_source": _bytes([(mask_source if mask_png is not None else "none").encode()]),
    }
    if mask_png is not None:
        f.update(_mask_features(mask_png, box, area, height, width))
    return tf.train.Example(features=tf.train.Features(feature=f))


def _mask_features(mask_png: bytes, box: tuple[int, int, int, int], area: int, height: int,
                   width: int) -> dict[str, tf.train.Feature]:
    ymin, xmin, ymax, xmax = box
    return {
        "image/object/bbox/ymin": _floats([ymin / height]),
        "image/object/bbox/xmin": _floats([xmin / width]),
        "image/object/bbox/ymax": _floats([ymax / height]),
        "image/object/bbox/xmax": _floats([xmax / width]),
        "image/object/class/label": _ints([1]),
        "image/object/is_crowd": _ints([0]),
        "image/object/area": _floats([float(area)]),
        "image/object/mask": _bytes([mask_png]),
    }


def add_mask(example: tf.train.Example, mask_png: bytes, box: tuple[int, int, int, int], area: int,
             mask_source: str) -> tf.train.Example:
    """A copy of a mask-less record with a mask (e.g. one the segmenter predicted) filled in."""
    out = tf.train.Example()
    out.CopyFrom(example)
    feature = out.features.feature
    height = feature["image/height"].int64_list.value[0]
    width = feature["image/width"].int64_list.value[0]
    for key, value in _mask_features(mask_png, box, area, height, width).items():
        feature[key].CopyFrom(value)
    feature["image/lesion/has_mask"].CopyFrom(_ints([1]))
    feature["image/lesion/mask_source"].CopyFrom(_bytes([mask_source.encode()]))
    return out


_LESION_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature((), tf.string),
    "image/lesion/image_id": tf.io.FixedLenFeature((), tf.string),
    "image/lesion/label": tf.io.FixedLenFeature((), tf.int64),
    "image/lesion/fold": tf.io.FixedLenFeature((), tf.int64, -1),
    "image/lesion/has_mask": tf.io.FixedLenFeature((), tf.int64, 0),
    "image/lesion/mask_source": tf.io.FixedLenFeature((), tf.string, ""),
    "image/lesion/download": tf.io.FixedLenFeature((), tf.string, ""),
    "image/object/mask": tf.io.VarLenFeature(tf.string),
}


def parse_lesion(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Decodes a record for the classifier: uint8 image [H, W, 3], 0/1 uint8 mask [H, W]
    (all ones when the record has no mask), label, fold, image id, download folder."""
    p = tf.io.parse_single_example(serialized, _LESION_FEATURES)
    image = tf.io.decode_image(p["image/encoded"], channels=3, expand_animations=False)
    masks = tf.sparse.to_dense(p["image/object/mask"], default_value="")
    mask = tf.cond(
        tf.size(masks) > 0,
        lambda: tf.io.decode_png(masks[0], channels=1)[..., 0],
        lambda: tf.ones(tf.shape(image)[:2], tf.uint8))
    return {
        "image": image,
        "mask": mask,
        "label": p["image/lesion/label"],
        "fold": p["image/lesion/fold"],
        "has_mask": p["image/lesion/has_mask"],
        "mask_source": p["image/lesion/mask_source"],
        "image_id": p["image/lesion/image_id"],
        "download": p["image/lesion/download"],
    }


_INDEX_FEATURES = {k: v for k, v in _LESION_FEATURES.items() if k.startswith("image/lesion/")}


def parse_lesion_index(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """A record's label, fold, mask flags, image id and download folder, without decoding its
    image or mask: what choosing the classifier's images needs."""
    p = tf.io.parse_single_example(serialized, _INDEX_FEATURES)
    return {key.rsplit("/", 1)[1]: value for key, value in p.items()}


def from_downloads(records: tf.data.Dataset, downloads) -> tf.data.Dataset:
    """The serialized records of the listed download folders only (parses nothing else)."""
    wanted = tf.constant(list(downloads), tf.string)
    feature = {"image/lesion/download": _LESION_FEATURES["image/lesion/download"]}
    return records.filter(lambda r: tf.reduce_any(tf.equal(
        tf.io.parse_single_example(r, feature)["image/lesion/download"], wanted)))


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def split_pattern(output_dir: Path | str, split: str, with_nomask: bool = True) -> str:
    """Glob of a split's shards: Mask R-CNN reads `train-*`, the classifier `train*`."""
    return str(storage.path(output_dir) / (f"{split}*.tfrecord" if with_nomask else f"{split}-*.tfrecord"))


class ShardedWriter:
    """Writes records round-robin into `count` shards, so shards stay equal in size.

    The builder writes into a temporary folder that it renames into place when the build is
    complete; `close()` deletes the files again when nothing was written.
    """

    def __init__(self, output_dir: Path | storage.GfilePath, split: str, count: int):
        self.paths = [output_dir / shard_name(split, i, count) for i in range(count)]
        self._writers = [tf.io.TFRecordWriter(str(p)) for p in self.paths]
        self._next = 0
        self.count = 0

    def write(self, serialized: bytes) -> None:
        self._writers[self._next].write(serialized)
        self._next = (self._next + 1) % len(self._writers)
        self.count += 1

    def close(self) -> list[Path]:
        for w in self._writers:
            w.close()
        if not self.count:
            for p in self.paths:
                p.unlink()
            return []
        return self.paths


def _stratified_splits(k: int, seed: int, strata: np.ndarray, groups: np.ndarray, what: str) -> list[np.ndarray]:
    """Held-out indices of each of k stratified group folds; scikit-learn's own error for too few
    images becomes one that says how many each class has and what to change."""
    from sklearn.model_selection import StratifiedGroupKFold

    counts = collections.Counter(strata.tolist())
    if not counts or all(c < k for c in counts.values()):
        have = ", ".join(f"{v} {s.replace('/1', ' with mask').replace('/0', ' without mask')}"
                         for s, v in sorted(counts.items()))
        raise ValueError(f"too few images for {what}: some class needs at least {k} images, there are "
                         f"{have or 'none'}; use fewer folds, another or no test fraction, or more images")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only N members": a class rarer than k (e.g. the few
        # melanomas without a mask) is spread over fewer folds, which is what we want; not news.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [held for _, held in splitter.split(np.zeros(len(strata)), strata, groups)]


def assign_splits(labels: list[str], has_mask: list[bool], groups: list[str],
                  test_fraction: float, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split and fold assignment.

    Strata are (label, has mask), so both the classifier's classes and the segmentation images
    are spread evenly; images of one lesion (same group) never straddle train/test or two folds.
    Returns (is_test bool array, fold array with -1 for test images).
    """
    n = len(labels)
    strata = np.array([f"{lab}/{int(m)}" for lab, m in zip(labels, has_mask)])
    groups_arr = np.array(groups)
    is_test = np.zeros(n, bool)
    if test_fraction > 0:
        k = max(2, round(1 / test_fraction))
        splits = _stratified_splits(k, seed, strata, groups_arr,
                                    f"a test fraction of {test_fraction:g} ({k}-way split; --test-fraction)")
        is_test[splits[0]] = True
    fold = np.full(n, -1)
    train_idx = np.flatnonzero(~is_test)
    if folds > 1:
        splits = _stratified_splits(folds, seed, strata[train_idx], groups_arr[train_idx],
                                    f"{folds} cross-validation folds of the training images (--folds)")
        for k, held in enumerate(splits):
            fold[train_idx[held]] = k
    else:
        fold[train_idx] = 0
    return is_test, fold


SPLIT_RULES = ("auto", "official", "stratified")


def split_items(items: Sequence[isic.LesionItem], rule: str, test_fraction: float, folds: int, seed: int,
                from_test_dir: Sequence[bool] | None = None, downloads: Sequence[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """(is_test, fold, the rule applied) of reader items. Rules: 'official' holds out the
    challenge's labelled official test set (validation images join the training folds),
    'stratified' a stratified `test_fraction` of the first download (`assign_splits`), 'auto' is
    'official' when there is such a test set. Images from a separate test folder
    (`from_test_dir`) are the test split whatever the rule ('test_data_dir').

    `downloads` (the folder index of each item) keeps each folder's split and folds what a build
    of it alone makes: downloads after the first only train (or hold out their official test
    set); then an image whose lesion was already placed from an earlier folder follows it."""
    if rule not in SPLIT_RULES:
        raise ValueError(f"split must be one of {SPLIT_RULES}, got {rule!r}")
    held_out = np.array([it.source in isic.OFFICIAL_TEST_SOURCES for it in items])
    if from_test_dir is not None:
        rule, held_out = "test_data_dir", np.asarray(from_test_dir, bool)
    elif rule == "auto":
        rule = "official" if held_out.any() else "stratified"
    if rule == "official" and not held_out.any():
        raise ValueError(f"split 'official': no labelled official test set ({', '.join(isic.OFFICIAL_TEST_SOURCES)}) "
                         "in the download; use the stratified split")
    if rule != "stratified" and held_out.all():
        raise ValueError(f"split {rule!r}: every image is a test image, none is left to train on")
    downloads = np.zeros(len(items), int) if downloads is None else np.asarray(downloads)
    is_test, fold = np.zeros(len(items), bool), np.full(len(items), -1)
    for d in np.unique(downloads):
        index = np.flatnonzero(downloads == d)
        if rule == "stratified" and d == downloads.min():
            is_test[index], fold[index] = _assign_by_kind(items, index, test_fraction, folds, seed)
            continue
        is_test[index] = held_out[index]
        train = index[~held_out[index]]
        if len(train):
            fold[train] = _assign_by_kind(items, train, 0.0, folds, seed)[1]
    _keep_lesions_together(items, downloads, is_test, fold)
    return is_test, fold, rule


def _keep_lesions_together(items: Sequence[isic.LesionItem], downloads: np.ndarray, is_test: np.ndarray,
                           fold: np.ndarray) -> None:
    """Across downloads (in place): a lesion with an image in the test split is test everywhere,
    and otherwise its images take the fold of the first download that placed it."""
    groups = [it.lesion_id or it.image_id for it in items]
    test_groups = {g for g, t in zip(groups, is_test) if t}
    placed: dict[str, tuple[int, int]] = {}
    for i in np.argsort(downloads, kind="stable"):
        if groups[i] in test_groups:
            is_test[i], fold[i] = True, -1
        elif placed.setdefault(groups[i], (downloads[i], fold[i]))[0] != downloads[i]:
            fold[i] = placed[groups[i]][1]


def _assign_by_kind(items: Sequence[isic.LesionItem], index: np.ndarray, test_fraction: float, folds: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`assign_splits` of items[index], melanomas and nevi apart from other lesions: records built
    with --include-other then hold every melanoma and nevus in the same split and fold as records
    built without, so runs with and without the other lesions compare image for image. Too few
    other lesions for a stratified split all go to the training folds, in turn."""
    is_test, fold = np.zeros(len(index), bool), np.full(len(index), -1)
    other = np.array([items[i].label == isic.OTHER for i in index], bool)
    for is_other in (False, True):
        part = np.flatnonzero(other == is_other)
        if not len(part):
            continue
        chosen = [items[i] for i in index[part]]
        args = ([it.label for it in chosen], [it.mask_path is not None for it in chosen],
                [it.lesion_id or it.image_id for it in chosen], test_fraction, folds, seed)
        try:
            is_test[part], fold[part] = assign_splits(*args)
        except ValueError:
            if not is_other:
                raise
            fold[part] = np.arange(len(part)) % max(folds, 1)
    return is_test, fold
