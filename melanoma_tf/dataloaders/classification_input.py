"""The classifier's inputs: a records split's lesions, its cross-validation folds and the
shuffled, class-balanced training stream.

    records --parse_lesion_index--> LesionSet (labels, folds, ids, downloads; no pixels)
    records --parse_lesion--> image, mask --masking.view_fn--> uint8 [S, S, 3], streamed

Training streams its images from the records every epoch (`stream`): memory does not grow with
the number of training images (the two-folder `cpu` pipeline held 18.5 GB of masked images in
memory before), and each epoch cuts its view afresh, so the lesion box can be jittered
(data.box_jitter). `read_lesions` materialises a split's views as arrays, for the benchmarks and
studies that compute on them; it reads them through the same stream.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from melanoma_tf import masking, tfrecords
from melanoma_tf.configs import classification as configs

NEVUS, MELANOMA, OTHER = 0, 1, 2  # record label ids
ROWS = ("images", "labels", "folds", "image_ids", "downloads")  # LesionSet's per-image arrays
# Serialized records held for shuffling: about 65 MB of 600-px ISIC images, whatever the split's size.
SHUFFLE_RECORDS = 1024


@dataclasses.dataclass
class LesionSet:
    """Classifier inputs of one split: per-image arrays, and either the views in memory
    (`images`) or the records they stream from (`files`, `images` None)."""
    images: np.ndarray | None  # uint8 [N, S, S, 3], or None: streamed from `files`
    labels: np.ndarray  # int [N], 0 nevus, 1 melanoma
    folds: np.ndarray  # int [N], -1 in the test split
    image_ids: np.ndarray  # str [N]
    downloads: np.ndarray | None = None  # str [N]: the download folder of each image ("" when unknown)
    files: tuple[str, ...] = ()  # the records the rows were read from

    def __post_init__(self):
        if self.downloads is None:
            self.downloads = np.full(len(self.labels), "")

    def _rows(self) -> dict:
        return {f: getattr(self, f) for f in ROWS if getattr(self, f) is not None}

    def subset(self, index: np.ndarray) -> "LesionSet":
        return dataclasses.replace(self, **{f: v[index] for f, v in self._rows().items()})

    def __len__(self) -> int:
        return len(self.labels)

    def concat(self, other: "LesionSet") -> "LesionSet":
        if self.files != other.files or (self.images is None) != (other.images is None):
            raise ValueError("cannot join lesions read from different records, or streamed with in-memory ones")
        return dataclasses.replace(self, **{f: np.concatenate([v, getattr(other, f)]) for f, v in self._rows().items()})


def read_index(data_dir: str | Path, split: str, data: configs.DataConfig,
               classes: Sequence[int] = (NEVUS, MELANOMA)) -> LesionSet:
    """The images of a split whose class is one of `classes` (record label ids; 2 is seborrheic
    keratosis or another benign lesion) and whose mask the config accepts, without their pixels
    (`stream` reads those), from the folders data.downloads names (all when empty). Reads only
    each record's small fields."""
    files = sorted(tf.io.gfile.glob(tfrecords.split_pattern(data_dir, split)))
    if not files:
        raise FileNotFoundError(f"no {tfrecords.split_pattern(data_dir, split)} records")
    sources = tf.constant(list(data.mask_sources) or [""])
    downloads = tf.constant(list(data.downloads), tf.string)

    def usable(r):
        wanted = tf.reduce_any(tf.equal(r["label"], tf.constant(list(classes), tf.int64)))
        accepted = tf.logical_and(r["has_mask"] == 1, tf.reduce_any(tf.equal(r["mask_source"], sources)))
        chosen = tf.logical_or(tf.size(downloads) == 0, tf.reduce_any(tf.equal(r["download"], downloads)))
        return wanted & chosen & (accepted | data.include_unmasked)

    ds = (tf.data.TFRecordDataset(files).map(tfrecords.parse_lesion_index, tf.data.AUTOTUNE).filter(usable)
          .map(lambda r: (r["label"], r["fold"], r["image_id"], r["download"])).batch(4096))
    parts = [[t.numpy() for t in batch] for batch in ds]
    if not parts:
        raise ValueError(f"{data_dir}: no usable {split} image (mask sources {list(data.mask_sources)}, "
                         f"include_unmasked={data.include_unmasked}, downloads {list(data.downloads) or 'all'})")
    labels, folds, ids, downloads = (np.concatenate(p) for p in zip(*parts))
    return LesionSet(None, labels.astype(int), folds.astype(int), ids.astype(str), downloads.astype(str),
                     tuple(files))


def stream(data: LesionSet, cfg: configs.DataConfig, training: bool = False, seed: int = 0,
           box_jitter: float | None = None) -> tf.data.Dataset:
    """(uint8 view [S, S, 3], 0/1 label, image id) of every row of `data`, repeated rows as often
    as they repeat, in the records' order; with `training`, shuffled (shards, then a buffer of
    SHUFFLE_RECORDS records) and with the lesion box jittered by cfg.box_jitter (box_jitter
    overrides: e.g. served-like views of held-out images). A record's label 2 (other lesions as
    negatives) becomes 0."""
    jitter = box_jitter if box_jitter is not None else cfg.box_jitter if training else 0.0
    if data.images is not None:
        if jitter:
            raise ValueError("box jitter (data.box_jitter) cuts each epoch's views afresh: it needs lesions "
                             "streamed from records (read_index), not views held in memory")
        ds = tf.data.Dataset.from_tensor_slices((data.images, data.labels, data.image_ids))
        return ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True) if training else ds
    counts = collections.Counter(data.image_ids.tolist())
    copies = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(counts), tf.string), tf.constant(list(counts.values()), tf.int64)), default_value=0)
    files = tf.data.Dataset.from_tensor_slices(list(data.files))
    if training:
        files = files.shuffle(len(data.files), seed=seed, reshuffle_each_iteration=True)
    records = files.interleave(tf.data.TFRecordDataset, cycle_length=len(data.files) if training else 1)

    # Each record's id is parsed once: how often it streams (0: not one of data's rows).
    records = (records.map(lambda r: (r, copies.lookup(tfrecords.parse_lesion_index(r)["image_id"])))
               .filter(lambda record, count: count > 0)  # distinct names: AutoGraph tells lambdas apart by them
               .flat_map(lambda r, n: tf.data.Dataset.from_tensors(r).repeat(n)))
    if training:
        records = records.shuffle(SHUFFLE_RECORDS, seed=seed, reshuffle_each_iteration=True)
    to_view = masking.view_fn(cfg.view)

    def view(serialized):
        r = tfrecords.parse_lesion(serialized)
        image = to_view(r["image"], r["mask"], cfg.input_size, cfg.margin, jitter)
        return image, tf.cast(r["label"] == MELANOMA, tf.int64), r["image_id"]

    return records.map(view, tf.data.AUTOTUNE)


def read_lesions(data_dir: str | Path, split: str, data: configs.DataConfig,
                 view: str | None = None, classes: Sequence[int] = (NEVUS, MELANOMA)) -> LesionSet:
    """`read_index` with the views in memory, as the classifier sees them (`view` overrides
    data.view): for the benchmarks and studies that compute on the pixels."""
    index = read_index(data_dir, split, data, classes)
    cfg = data.replace(view=view or data.view)
    images = np.concatenate([batch[0].numpy() for batch in stream(index, cfg).batch(256)])
    return dataclasses.replace(index, images=images)


def balance_downloads(data: LesionSet) -> LesionSet:
    """Repeats the images of each smaller download folder so that every folder gives about as
    many training images as the largest (data.balance_downloads): with sample v2 beside HAM10000
    the ISIC images keep half of each epoch instead of a sixth (variant HB, benchmarks/README.md)."""
    names, counts = np.unique(data.downloads, return_counts=True)
    if len(names) < 2:
        return data
    copies = {n: max(1, round(counts.max() / c)) for n, c in zip(names, counts)}
    return data.subset(np.concatenate([np.tile(np.flatnonzero(data.downloads == n), copies[n]) for n in names]))


def read_other_negatives(data_dir: str | Path, split: str, data: configs.DataConfig) -> LesionSet:
    """The split's other lesions (label 2) labelled nevus: not-melanoma training images
    (data.other_as_negative)."""
    try:
        others = read_index(data_dir, split, data, classes=(OTHER,))
    except ValueError as e:
        raise ValueError(f"data.other_as_negative: {e}; build the records with --include-other") from None
    return dataclasses.replace(others, labels=np.full(len(others), NEVUS))


def fold_indices(folds: np.ndarray, k: int, num_folds: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices of cross-validation fold k of num_folds.

    Stored fold f belongs to fold f % num_folds, so fewer folds than were stored merge whole
    stored folds, and images of one lesion still never straddle training and held-out rows.
    """
    stored = np.unique(folds)
    if stored.min() < 0 or num_folds > len(stored):
        raise ValueError(f"the records hold folds {stored.tolist()}; cannot make {num_folds} folds "
                         "(rebuild them with build_tfrecords --folds)")
    held = folds % num_folds == k
    return np.flatnonzero(~held), np.flatnonzero(held)


def images(data: LesionSet, cfg: configs.DataConfig, batch_size: int = 64, in_order: bool = True,
           box_jitter: float = 0.0) -> tf.data.Dataset:
    """The views of `data` as uint8 batches. in_order: in its row order (rows taken in the
    records' order, as `read_index` and `subset` keep them; checked image by image), as
    predictions need; else in the records' order (normalisation statistics of any rows).
    box_jitter: views cut around jittered boxes, as a segmenter's would be."""
    views = stream(data, cfg, box_jitter=box_jitter)
    if not in_order:
        return views.map(lambda image, label, image_id: image).batch(batch_size)

    def checked(example, image_id):
        image, _, streamed_id = example
        with tf.control_dependencies([tf.debugging.assert_equal(
                streamed_id, image_id, "streamed images out of row order")]):
            return tf.identity(image)

    expected = tf.data.Dataset.from_tensor_slices(data.image_ids.astype(str))
    return tf.data.Dataset.zip(views, expected).map(checked, tf.data.AUTOTUNE).batch(batch_size)


def training_dataset(data: LesionSet, params: configs.ClassificationExperiment):
    """(dataset, steps_per_epoch, class_weight) for fit; steps_per_epoch is None when an epoch is
    one pass over `data` (the dataset then ends each epoch)."""
    cfg, seed = params.data, params.training.seed
    steps = math.ceil(cfg.epoch_images / cfg.batch_size) if cfg.epoch_images else None

    def examples(part: LesionSet) -> tf.data.Dataset:
        return stream(part, cfg, training=True, seed=seed).map(
            lambda image, label, image_id: (image, tf.one_hot(label, 2)))

    if cfg.imbalance == "balanced_sampling":
        per_class = [examples(data.subset(np.flatnonzero(data.labels == c))).repeat() for c in (NEVUS, MELANOMA)]
        ds = tf.data.Dataset.sample_from_datasets(per_class, [0.5, 0.5], seed=seed)
        return ds.batch(cfg.batch_size).prefetch(2), steps or math.ceil(len(data) / cfg.batch_size), None
    ds = examples(data)
    if steps:
        ds = ds.repeat()
    class_weight = None
    if cfg.imbalance == "class_weight":
        weights = compute_class_weight("balanced", classes=np.array([NEVUS, MELANOMA]), y=data.labels)
        class_weight = {NEVUS: float(weights[0]), MELANOMA: float(weights[1])}
    return ds.batch(cfg.batch_size).prefetch(2), steps, class_weight


def validation_dataset(data: LesionSet, cfg: configs.DataConfig) -> tf.data.Dataset:
    """Held-out (images, one-hot labels), for fit's validation_data."""
    return stream(data, cfg).map(lambda image, label, image_id: (image, tf.one_hot(label, 2))).batch(
        cfg.batch_size).prefetch(2)
