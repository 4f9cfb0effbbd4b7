"""Records round-trip through Model Garden's own decoder, pixel for pixel, with sound splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from official.vision.dataloaders.tf_example_decoder import TfExampleDecoder

from melanoma_tf import build_tfrecords, tfrecords
from melanoma_tf.data import images, isic


def _decoded_records(record_dir: Path) -> dict[str, dict]:
    decoder = TfExampleDecoder(include_mask=True)
    out = {}
    for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(str(record_dir / "*.tfrecord")))):
        d = decoder.decode(raw)
        lesion = tfrecords.parse_lesion(raw)
        ex = tf.train.Example.FromString(raw.numpy())
        image_id = lesion["image_id"].numpy().decode()
        out[image_id] = {"decoded": d, "lesion": lesion,
                         "encoded": ex.features.feature["image/encoded"].bytes_list.value[0]}
    return out


def _check_round_trip(data_dir: Path, record_dir: Path, limit: int | None = None) -> int:
    items, _ = isic.read_dataset(data_dir)
    by_id = {it.image_id: it for it in items}
    records = _decoded_records(record_dir)
    manifest = json.loads((record_dir / "manifest.json").read_text())
    assert set(records) == set(manifest["images"])
    checked = 0
    for image_id, rec in list(records.items())[:limit]:
        item = by_id[image_id]
        d = rec["decoded"]
        assert rec["encoded"] == item.image_path.read_bytes()  # same JPEG bytes, decoded identically
        assert int(d["source_id"].numpy()) == manifest["images"][image_id]["source_id"]
        assert tuple(d["image"].shape[:2]) == (int(d["height"]), int(d["width"]))
        if item.mask_path is None:
            assert d["groundtruth_instance_masks"].shape[0] == 0
            assert rec["lesion"]["has_mask"] == 0
            continue
        source_mask = images.load_mask(item.mask_path, int(d["height"]), int(d["width"]))
        record_mask = d["groundtruth_instance_masks"].numpy()
        assert record_mask.shape[0] == 1
        np.testing.assert_array_equal(record_mask[0], source_mask.astype(np.float32))
        ymin, xmin, ymax, xmax = images.mask_box(source_mask)
        h, w = source_mask.shape
        np.testing.assert_allclose(d["groundtruth_boxes"].numpy()[0],
                                   [ymin / h, xmin / w, ymax / h, xmax / w], atol=1e-6)
        assert float(d["groundtruth_area"][0]) == source_mask.sum()
        assert int(d["groundtruth_classes"][0]) == 1
        checked += 1
    return checked


def _check_splits(record_dir: Path, folds: int) -> dict:
    manifest = json.loads((record_dir / "manifest.json").read_text())
    rows = manifest["images"]
    for split in ("train", "test"):
        ids = [k for k, r in rows.items() if r["split"] == split]
        assert sorted(manifest["splits"][split]) == sorted(ids)
        assert manifest["counts"][split]["total"] == len(ids)
    assert not set(manifest["splits"]["train"]) & set(manifest["splits"]["test"])
    fold_ids = [set(v) for v in manifest["folds"].values()]
    assert len(fold_ids) == folds
    assert sum(map(len, fold_ids)) == len(set().union(*fold_ids)) == len(manifest["splits"]["train"])
    # Counts in the shards agree with the manifest.
    decoded = _decoded_records(record_dir)
    for image_id, rec in decoded.items():
        assert int(rec["lesion"]["fold"]) == rows[image_id]["fold"]
    seg_train = tf.io.gfile.glob(tfrecords.split_pattern(record_dir, "train", with_nomask=False))
    n_seg = sum(1 for _ in tf.data.TFRecordDataset(seg_train))
    assert n_seg == manifest["counts"]["train"]["with_mask"]
    return manifest


def test_synthetic_round_trip_and_splits(synthetic_dir, synthetic_records):
    assert _check_round_trip(synthetic_dir, synthetic_records) > 10
    manifest = _check_splits(synthetic_records, folds=5)
    assert manifest["counts"]["test"]["total"] == pytest.approx(8, abs=2)
    assert manifest["format_version"] == tfrecords.FORMAT_VERSION


def test_build_is_deterministic_and_parallel_equals_serial(synthetic_dir, synthetic_records, tmp_path):
    again = build_tfrecords.build(synthetic_dir, tmp_path / "again", num_workers=2, progress=False)
    first = json.loads((synthetic_records / "manifest.json").read_text())
    assert again["images"] == first["images"]
    for name in first["shards"]["train"]:
        assert (tmp_path / "again" / name).read_bytes() == (synthetic_records / name).read_bytes()


def test_rebuild_replaces_output_and_killed_build_leaves_no_shards(synthetic_dir, tmp_path, monkeypatch):
    out = tmp_path / "rec"
    build_tfrecords.build(synthetic_dir, out, folds=2, progress=False)
    before = sorted(p.name for p in out.iterdir())

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tfrecords, "make_example", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tfrecords.build(synthetic_dir, out, folds=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # the old build is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["rec"]  # no temporary folder left


def test_image_size_max_downscales_images_and_masks(synthetic_dir, tmp_path):
    manifest = build_tfrecords.build(synthetic_dir, tmp_path / "small", image_size_max=64, progress=False)
    assert all(max(r["height"], r["width"]) == 64 for r in manifest["images"].values())
    decoded = _decoded_records(tmp_path / "small")
    for rec in decoded.values():
        d = rec["decoded"]
        assert d["image"].shape[:2] == d["groundtruth_instance_masks"].shape[1:] or \
            d["groundtruth_instance_masks"].shape[0] == 0


@pytest.mark.real_data
def test_real_sample_round_trip_and_stratified_split(isic_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "isic"
    manifest = build_tfrecords.build(isic_sample, out, num_workers=2, progress=False)
    assert manifest["problems"] == 0
    assert _check_round_trip(isic_sample, out) > 300
    _check_splits(out, folds=5)
    rows = manifest["images"].values()
    overall = Counter(r["label"] for r in rows)
    rate = overall["melanoma"] / len(rows)
    test = Counter(r["label"] for r in rows if r["split"] == "test")
    assert test["melanoma"] / sum(test.values()) == pytest.approx(rate, abs=0.02)
    for k in range(5):
        fold = Counter(r["label"] for r in rows if r["fold"] == k)
        assert fold["melanoma"] / sum(fold.values()) == pytest.approx(rate, abs=0.03)
    masked = [r["has_mask"] for r in rows]
    test_masked = [r["has_mask"] for r in rows if r["split"] == "test"]
    assert np.mean(test_masked) == pytest.approx(np.mean(masked), abs=0.03)


def test_too_few_images_for_the_folds_says_how_many_each_class_has():
    """8 images, 2 melanomas: scikit-learn's own error names neither the classes nor the fix."""
    labels = ["melanoma"] * 2 + ["nevus"] * 3
    with pytest.raises(ValueError, match=r"5 cross-validation folds .*--folds.*2 melanoma with mask, 3 nevus with"):
        tfrecords.assign_splits(labels, [True] * 5, [str(i) for i in range(5)], test_fraction=0, folds=5, seed=0)
    with pytest.raises(ValueError, match=r"test fraction of 0.2 .*--test-fraction"):
        tfrecords.assign_splits(labels, [True] * 5, [str(i) for i in range(5)], test_fraction=0.2, folds=2, seed=0)
    is_test, fold = tfrecords.assign_splits(labels, [True] * 5, [str(i) for i in range(5)], test_fraction=0,
                                            folds=2, seed=0)
    assert not is_test.any() and sorted(set(fold)) == [0, 1]
