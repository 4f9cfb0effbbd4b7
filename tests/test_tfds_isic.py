"""The TFDS builder serves the same images, masks, labels and split as the TFRecord builder."""

import json

import numpy as np
import tensorflow_datasets as tfds

from melanoma_tf.data import images, isic, tfds_isic


def test_tfds_builder_matches_records(synthetic_dir, synthetic_records, tmp_path):
    builder = tfds_isic.IsicLesions(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(synthetic_dir)))
    manifest = json.loads((synthetic_records / "manifest.json").read_text())
    items = {it.image_id: it for it in isic.read_dataset(synthetic_dir)[0]}
    for split in ("train", "test"):
        seen = {}
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            image_id = ex["image_id"].decode()
            seen[image_id] = ex
            item = items[image_id]
            assert ex["label"] == ["nevus", "melanoma", "other"].index(item.label)
            assert bool(ex["has_mask"]) == (item.mask_path is not None)
            if item.mask_path:
                want = images.load_mask(item.mask_path, *ex["image"].shape[:2])
                np.testing.assert_array_equal(ex["mask"][..., 0], want)
        assert sorted(seen) == sorted(manifest["splits"][split])
