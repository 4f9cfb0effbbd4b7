"""The classifier's streamed input: the same images as the in-memory reader, balanced draws
included, fresh box jitter every epoch, and the views the task predicts on in row order."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from melanoma_tf import build_tfrecords
from melanoma_tf.configs import classification as configs
from melanoma_tf.data import synthetic
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.tasks import melanoma_classification as task

CONTEXT = configs.DataConfig(input_size=48, view="context", margin=0.5)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> str:
    """Records of an ISIC-layout folder (24 images) beside a HAM10000-layout one (32 images)."""
    root = tmp_path_factory.mktemp("two_folders")
    large = synthetic.generate_dataset(root / "isic", num_images=24, seed=6, image_size=(96, 128))
    small = synthetic.generate_dataset(root / "ham", num_images=32, seed=7, image_size=(75, 100), layout="ham10000")
    build_tfrecords.build([large, small], root / "records", folds=2, seed=0, progress=False)
    return str(root / "records")


def _epoch(ds: tf.data.Dataset) -> tuple[collections.Counter, dict, list]:
    """Counts of each id, each id's label, and the pixels in stream order, of one pass."""
    counts, labels, pixels = collections.Counter(), {}, []
    for image, label, image_id in ds:
        key = image_id.numpy().decode()
        counts[key] += 1
        labels[key] = int(label)
        pixels.append(image.numpy())
    return counts, labels, pixels


@pytest.mark.parametrize("balance", [False, True])
def test_streamed_epoch_yields_every_image_the_in_memory_reader_yields(two_folders, balance):
    memory = inputs.read_lesions(two_folders, "train", CONTEXT)
    index = inputs.read_index(two_folders, "train", CONTEXT)
    assert index.images is None and list(index.image_ids) == list(memory.image_ids)
    fold_train = inputs.fold_indices(index.folds, 0, 2)[0]
    streamed, in_memory = index.subset(fold_train), memory.subset(fold_train)
    if balance:
        streamed, in_memory = inputs.balance_downloads(streamed), inputs.balance_downloads(in_memory)
        assert len(in_memory) > len(fold_train)  # the small folder's images repeated
    counts, labels, pixels = _epoch(inputs.stream(streamed, CONTEXT, training=True, seed=1))
    assert counts == collections.Counter(in_memory.image_ids.tolist())
    assert labels == dict(zip(in_memory.image_ids, in_memory.labels.tolist()))
    by_id = dict(zip(in_memory.image_ids, in_memory.images))
    ids = [i.numpy().decode() for _, _, i in inputs.stream(streamed, CONTEXT, training=True, seed=1)]
    for image_id, image in zip(ids, pixels):  # the same seed draws the same order
        np.testing.assert_array_equal(image, by_id[image_id])
    assert ids != sorted(ids, key=list(in_memory.image_ids).index), "the training stream is shuffled"


def test_box_jitter_cuts_fresh_views_every_epoch_of_the_same_images(two_folders):
    jittered = CONTEXT.replace(box_jitter=0.2)
    index = inputs.read_index(two_folders, "train", jittered)
    ds = inputs.stream(index, jittered, training=True, seed=0)
    first, second = (dict(zip((i.numpy() for _, _, i in ds), pixels)) for pixels in
                     (_epoch(ds)[2], _epoch(ds)[2]))
    assert set(first) == set(second) == set(index.image_ids.astype(bytes))
    changed = sum(not np.array_equal(first[k], second[k]) for k in first)
    assert changed >= 0.9 * len(first)
    # Evaluation views are never jittered: they are what the segmenter's export computes.
    plain = np.concatenate([b.numpy() for b in inputs.images(index, jittered)])
    np.testing.assert_array_equal(plain, inputs.read_lesions(two_folders, "train", CONTEXT).images)


def test_in_memory_views_cannot_be_jittered_and_rows_out_of_order_are_refused(two_folders):
    memory = inputs.read_lesions(two_folders, "train", CONTEXT)
    params = task.resolve_params(params_override={"data": CONTEXT.replace(box_jitter=0.1).as_dict()})
    with pytest.raises(ValueError, match="box_jitter"):
        inputs.training_dataset(memory, params)
    index = inputs.read_index(two_folders, "train", CONTEXT)
    backwards = index.subset(np.arange(len(index))[::-1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of row order"):
        list(inputs.images(backwards, CONTEXT))
    assert sum(len(b) for b in inputs.images(backwards, CONTEXT, in_order=False)) == len(index)


def test_downloads_choose_the_folders_that_train(two_folders):
    everything = inputs.read_index(two_folders, "train", CONTEXT)
    isic = inputs.read_index(two_folders, "train", CONTEXT.replace(downloads=["isic"]))
    assert set(everything.downloads) == {"isic", "ham"} and set(isic.downloads) == {"isic"}
    assert list(isic.image_ids) == [i for i, d in zip(everything.image_ids, everything.downloads) if d == "isic"]
    with pytest.raises(ValueError, match=r"downloads \['elsewhere'\]"):
        inputs.read_index(two_folders, "train", CONTEXT.replace(downloads=["elsewhere"]))
