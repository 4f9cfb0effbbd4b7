"""Predicted masks for mask-less records: only the `_nomask` shards change, and the classifier
can then read those images with their predicted masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from melanoma_tf import predict_masks, tfrecords
from melanoma_tf.configs import classification as configs
from melanoma_tf.dataloaders import classification_input as inputs

import serving_fakes as fakes


@pytest.fixture(scope="module")
def filled(synthetic_records, tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    segmenter = fakes.build_segmenter(base / "lesion_segmenter" / "1", warmup=False)
    out = base / "records"
    return segmenter, out, predict_masks.fill(synthetic_records, segmenter, out, batch_size=3)


def _records(pattern: str) -> list[dict]:
    return [tfrecords.parse_lesion(raw) for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))]


def test_only_maskless_records_change_and_get_the_segmenters_mask(filled, synthetic_records):
    segmenter, out, result = filled
    manifest = json.loads((synthetic_records / "manifest.json").read_text())
    without = {s: c["total"] - c["with_mask"] for s, c in manifest["counts"].items()}
    assert {s: sum(c.values()) for s, c in result["counts"].items()} == {s: n for s, n in without.items() if n}
    for shard in synthetic_records.glob("*-*.tfrecord"):
        if "_nomask-" not in shard.name:
            assert (out / shard.name).read_bytes() == shard.read_bytes()
    segment = tf.saved_model.load(str(segmenter)).signatures["serving_default"]
    before = {r["image_id"].numpy(): r for r in _records(str(synthetic_records / "*_nomask-*.tfrecord"))}
    after = _records(str(out / "*_nomask-*.tfrecord"))
    assert len(after) == len(before) == sum(without.values())
    predicted = 0
    for record in after:
        original = before[record["image_id"].numpy()]
        np.testing.assert_array_equal(record["image"], original["image"])
        assert int(record["label"]) == int(original["label"]) and int(record["fold"]) == int(original["fold"])
        encoded = tf.io.encode_png(original["image"])
        expected = segment(image_bytes=tf.constant([encoded.numpy()]))
        if int(expected["status"][0]) == 0:
            predicted += 1
            assert record["mask_source"].numpy() == b"predicted" and int(record["has_mask"]) == 1
            np.testing.assert_array_equal(record["mask"], expected["lesion_mask"][0].numpy()[
                :record["image"].shape[0], :record["image"].shape[1]])
        else:
            assert int(record["has_mask"]) == 0
    assert predicted == sum(c["predicted"] for c in result["counts"].values()) > 0


def test_classifier_reads_predicted_masks_when_asked(filled, synthetic_records):
    _, out, result = filled
    truth_only = configs.DataConfig(input_size=67)
    both = configs.DataConfig(input_size=67, mask_sources=["ground_truth", "predicted"])
    assert len(inputs.read_lesions(out, "train", truth_only)) == len(inputs.read_lesions(synthetic_records, "train",
                                                                                      truth_only))
    assert len(inputs.read_lesions(out, "train", both)) == (len(inputs.read_lesions(out, "train", truth_only))
                                                          + result["counts"]["train"]["predicted"])


def test_refuses_an_existing_output_and_a_folder_without_manifest(filled, synthetic_records, tmp_path):
    segmenter, out, _ = filled
    with pytest.raises(FileExistsError, match=str(out)):
        predict_masks.fill(synthetic_records, segmenter, out)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        predict_masks.fill(tmp_path, segmenter, tmp_path / "new")
    assert not (tmp_path / "new").exists()
