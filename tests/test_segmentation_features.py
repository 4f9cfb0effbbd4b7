"""Features of masked lesions from a trained segmenter's frozen ResNet (the tiny test run)."""

from __future__ import annotations

import numpy as np
import pytest

from melanoma_tf.data import synthetic
from melanoma_tf.experiments.segmentation_features import SegmentationFeatures
from melanoma_tf.masking import mask_lesion

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extractor(tiny_seg_run) -> SegmentationFeatures:
    return SegmentationFeatures(tiny_seg_run)


@pytest.fixture(scope="module")
def lesions() -> np.ndarray:
    rng = np.random.default_rng(1)
    out = []
    for i in range(3):
        rgb, mask = synthetic.render_lesion(rng, melanoma=bool(i % 2), height=120, width=150)
        out.append(np.asarray(mask_lesion(rgb, mask, 99)))
    return np.stack(out)


def test_one_vector_per_image_from_the_restored_backbone(extractor, tiny_seg_run, lesions):
    assert extractor.checkpoint.endswith("ckpt-4")
    features = extractor.extract(lesions, batch_size=2)
    assert features.shape == (3, extractor.dim) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])
    np.testing.assert_allclose(extractor.extract(lesions[:1]), features[:1], rtol=1e-4, atol=1e-5)


def test_tta_features_do_not_depend_on_orientation(extractor, lesions):
    plain = extractor.extract(lesions, tta=True)
    turned = extractor.extract(np.rot90(lesions, 1, axes=(1, 2)).copy(), tta=True)
    flipped = extractor.extract(lesions[:, :, ::-1].copy(), tta=True)
    np.testing.assert_allclose(turned, plain, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(flipped, plain, rtol=1e-3, atol=1e-4)
    assert not np.allclose(extractor.extract(lesions), plain, rtol=1e-3, atol=1e-4)


def test_a_folder_without_checkpoint_is_a_clear_error(tiny_seg_run, tmp_path):
    (tmp_path / "params.yaml").write_text((tiny_seg_run / "params.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="no segmentation checkpoint"):
        SegmentationFeatures(tmp_path)
