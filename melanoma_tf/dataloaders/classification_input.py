"""The classifier's inputs: masked lesions of a records split held in memory, its
cross-validation folds and the shuffled, class-balanced training stream.

    records --parse_lesion--> image, mask --masking.view_fn--> uint8 [S, S, 3]
"""

from __future__ import annotations

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


@dataclasses.dataclass
class LesionSet:
    """Classifier inputs of one split, in memory: a few thousand 227^2 images fit easily, and
    masking each image once (not every epoch) is most of the input pipeline's cost."""
    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int [N], 0 nevus, 1 melanoma
    folds: np.ndarray  # int [N], -1 in the test split
    image_ids: np.ndarray  # str [N]
    downloads: np.ndarray | None = None  # str [N]: the download folder of each image ("" when unknown)

    def __post_init__(self):
        if self.downloads is None:
            self.downloads = np.full(len(self.labels), "")

    def subset(self, index: np.ndarray) -> "LesionSet":
        return LesionSet(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return len(self.labels)

    def concat(self, other: "LesionSet") -> "LesionSet":
        return LesionSet(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                           for f in dataclasses.fields(self)))


def read_lesions(data_dir: str | Path, split: str, data: configs.DataConfig,
                 view: str | None = None, classes: Sequence[int] = (NEVUS, MELANOMA)) -> LesionSet:
    """Images of a split whose class is one of `classes` (record label ids; 2 is seborrheic
    keratosis or another benign lesion) and whose mask the config accepts, as the classifier
    sees them (`view` overrides data.view)."""
    files = sorted(tf.io.gfile.glob(tfrecords.split_pattern(data_dir, split)))
    if not files:
        raise FileNotFoundError(f"no {tfrecords.split_pattern(data_dir, split)} records")
    to_view = masking.view_fn(view or data.view)
    sources = tf.constant(list(data.mask_sources) or [""])

    def usable(r):
        wanted = tf.reduce_any(tf.equal(r["label"], tf.constant(list(classes), tf.int64)))
        accepted = tf.logical_and(r["has_mask"] == 1, tf.reduce_any(tf.equal(r["mask_source"], sources)))
        return tf.logical_and(wanted, tf.logical_or(accepted, data.include_unmasked))

    def prepare(r):
        return (to_view(r["image"], r["mask"], data.input_size, data.margin), r["label"], r["fold"],
                r["image_id"], r["download"])

    ds = (tf.data.TFRecordDataset(files).map(tfrecords.parse_lesion, tf.data.AUTOTUNE)
          .filter(usable).map(prepare, tf.data.AUTOTUNE).batch(64).prefetch(1))
    parts = [[t.numpy() for t in batch] for batch in ds]
    if not parts:
        raise ValueError(f"{data_dir}: no usable {split} image (mask sources {list(data.mask_sources)}, "
                         f"include_unmasked={data.include_unmasked})")
    images, labels, folds, ids, downloads = (np.concatenate(p) for p in zip(*parts))
    return LesionSet(images, labels.astype(int), folds.astype(int), ids.astype(str), downloads.astype(str))


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
        others = read_lesions(data_dir, split, data, classes=(OTHER,))
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


def one_hot(labels: np.ndarray) -> np.ndarray:
    """[N, 2] float targets of the two-unit softmax."""
    return np.eye(2, dtype=np.float32)[labels]


def training_dataset(data: LesionSet, params: configs.ClassificationExperiment):
    """(dataset, steps_per_epoch, class_weight) for fit; steps_per_epoch is None when an epoch is
    one pass over `data` (the dataset then ends each epoch)."""
    cfg, seed = params.data, params.training.seed
    steps = math.ceil(cfg.epoch_images / cfg.batch_size) if cfg.epoch_images else None
    if cfg.imbalance == "balanced_sampling":
        per_class = []
        for c in (NEVUS, MELANOMA):
            rows = data.labels == c
            per_class.append(tf.data.Dataset.from_tensor_slices((data.images[rows], one_hot(data.labels[rows])))
                             .shuffle(len(data), seed=seed).repeat())
        ds = tf.data.Dataset.sample_from_datasets(per_class, [0.5, 0.5], seed=seed)
        return ds.batch(cfg.batch_size).prefetch(2), steps or math.ceil(len(data) / cfg.batch_size), None
    ds = (tf.data.Dataset.from_tensor_slices((data.images, one_hot(data.labels)))
          .shuffle(len(data), seed=seed, reshuffle_each_iteration=True))
    if steps:
        ds = ds.repeat()
    class_weight = None
    if cfg.imbalance == "class_weight":
        weights = compute_class_weight("balanced", classes=np.array([NEVUS, MELANOMA]), y=data.labels)
        class_weight = {NEVUS: float(weights[0]), MELANOMA: float(weights[1])}
    return ds.batch(cfg.batch_size).prefetch(2), steps, class_weight


def validation_dataset(data: LesionSet, batch_size: int) -> tf.data.Dataset:
    """Held-out (images, one-hot labels) in order, for fit's validation_data."""
    return tf.data.Dataset.from_tensor_slices((data.images, one_hot(data.labels))).batch(batch_size)
