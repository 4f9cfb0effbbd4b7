"""TFDS builder for ISIC lesions, for users who read data with `tfds.load`.

ISIC data sit behind a licence page, so, as TFDS does for such data sets, the builder reads a
manual download: put any layout `melanoma_tf.data.isic` knows in `~/tensorflow_datasets/
downloads/manual/` (or pass `manual_dir`). Splits and folds are the same as the TFRecord builder
gives with the same seed and test fraction.

    import melanoma_tf.data.tfds_isic  # registers "isic_lesions"
    ds = tfds.load("isic_lesions", split="train",
                   download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir=D)})
"""

from __future__ import annotations

import io
import logging

import numpy as np
import tensorflow_datasets as tfds

from melanoma_tf import tfrecords
from melanoma_tf.data import images, isic

TEST_FRACTION, FOLDS, SEED = 0.2, 5, 0


class IsicLesions(tfds.core.GeneratorBasedBuilder):
    """ISIC dermoscopy images with lesion masks and melanoma / nevus / other labels."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release: record format 1 of melanoma_tf.",
                     "1.1.0": "Other diagnoses are split apart from melanomas and nevi, which keep the "
                              "split and fold they get without them."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download an ISIC challenge data set (2016, 2017, 2018 / HAM10000, or an `isic image
    download` folder) from the ISIC archive after accepting its licence, and place it, unpacked,
    in `manual_dir`. Any layout melanoma_tf's reader detects works, also several side by side.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "mask": tfds.features.Image(shape=(None, None, 1), use_colormap=False),
                "has_mask": np.bool_,
                "label": tfds.features.ClassLabel(names=list(tfrecords.LABEL_IDS)),
                "fold": np.int64,
                "image_id": tfds.features.Text(),
                "source": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://www.isic-archive.com",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        items, problems = isic.read_dataset(dl_manager.manual_dir, include_other=True)
        for p in problems:
            logging.warning("skipped %s: %s", p.path, p.reason)
        is_test, fold, _ = tfrecords.split_items(items, "auto", TEST_FRACTION, FOLDS, SEED)
        rows = list(zip(items, is_test, fold))
        return {
            "train": self._generate_examples([(it, f) for it, t, f in rows if not t]),
            "test": self._generate_examples([(it, f) for it, t, f in rows if t]),
        }

    def _generate_examples(self, rows):
        for item, fold in rows:
            try:
                lesion = images.load_lesion(item.image_path, item.mask_path)
            except images.BadInput as e:
                logging.warning("skipped %s: %s", e.path, e.reason)
                continue
            h, w = lesion.image.height, lesion.image.width
            mask = (images.decode_mask_png(lesion.mask_png) if lesion.mask_png
                    else np.zeros((h, w), np.uint8))
            yield item.image_id, {
                "image": io.BytesIO(lesion.image.encoded),
                "mask": mask[..., None],
                "has_mask": lesion.mask_png is not None,
                "label": item.label,
                "fold": int(fold),
                "image_id": item.image_id,
                "source": item.source,
            }
