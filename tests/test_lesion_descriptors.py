"""Colour and shape descriptors computed in the graph agree with OpenCV and with geometry."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest

from melanoma_tf.modeling import alexnet as alexnet_lib
from melanoma_tf.modeling import lesion_descriptors as ld
from melanoma_tf.tasks import melanoma_classification as task

SIZE = 200


def _ellipse(axes: tuple[int, int], angle: float = 0.0, centre: tuple[int, int] = (100, 100)) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, thickness=-1)
    return mask


def _shape(mask: np.ndarray) -> dict[str, float]:
    out = np.asarray(ld.shape_descriptors(mask[None, :, :, None].astype(np.float32)))[0]
    return dict(zip(ld.SHAPE_NAMES, out))


def test_lab_matches_opencv():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)  # tabulated curves: ±0.3
    np.testing.assert_allclose(np.asarray(ld.rgb_to_lab(rgb.astype(np.float32))), expected, atol=0.5)


def test_colour_descriptors_are_over_the_lesion_only():
    rng = np.random.default_rng(1)
    image = np.zeros((60, 60, 3), np.uint8)
    image[10:40, 15:50] = rng.integers(30, 250, (30, 35, 3))
    mask = (image.max(-1) > 0).astype(np.float32)
    out = np.asarray(ld.colour_descriptors(image[None].astype(np.float32), mask[None, ..., None]))[0]
    lesion = image[mask > 0].astype(np.float64)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)[mask > 0] / 255.0
    np.testing.assert_allclose(out[:3], lesion.mean(0), rtol=1e-4)
    np.testing.assert_allclose(out[9:12], lesion.std(0), rtol=1e-3)
    np.testing.assert_allclose(out[4:6], hsv[:, 1:].mean(0), atol=0.01)  # saturation, value


def test_shape_of_a_disc_and_an_ellipse():
    disc, ellipse = _shape(_ellipse((50, 50))), _shape(_ellipse((80, 20), angle=30))
    assert disc["area"] == pytest.approx(np.pi * 50 ** 2 / SIZE ** 2, rel=0.02)
    assert disc["elongation"] == pytest.approx(1.0, abs=0.02)
    assert ellipse["elongation"] == pytest.approx(4.0, rel=0.05)
    assert disc["compactness"] < ellipse["compactness"]
    for name in ("asymmetry_major", "asymmetry_minor"):  # symmetric about both axes, at any angle
        assert disc[name] < 0.02 and ellipse[name] < 0.03


def test_asymmetry_and_border_of_an_irregular_lesion():
    blob = _ellipse((50, 30), angle=20)
    cv2.circle(blob, (100, 140), 20, 1, thickness=-1)  # a bulge off both axes
    jagged = _ellipse((50, 50)).copy()
    jagged[::6] = 0  # a ragged border
    lopsided, regular = _shape(blob), _shape(_ellipse((50, 30), angle=20))
    for name in ("asymmetry_major", "asymmetry_minor"):
        assert lopsided[name] > regular[name] + 0.1
    assert _shape(jagged)["compactness"] > 2 * _shape(_ellipse((50, 50)))["compactness"]


def test_descriptors_do_not_change_with_the_lesions_orientation():
    image = np.zeros((1, 120, 120, 3), np.uint8)
    blob = _ellipse((40, 18), angle=25, centre=(55, 62))[:120, :120]
    cv2.circle(blob, (80, 60), 12, 1, thickness=-1)
    ys, xs = np.mgrid[:120, :120]
    shading = np.stack([60 + xs, 200 - ys, 90 + (xs + ys) // 2], axis=-1)  # smooth, like skin
    image[0][blob > 0] = shading[blob > 0]
    layer = ld.LesionDescriptors()
    reference = np.asarray(layer(image))
    for view in (np.rot90(image, 1, axes=(1, 2)), image[:, ::-1], np.rot90(image, 3, axes=(1, 2))[:, :, ::-1]):
        np.testing.assert_allclose(np.asarray(layer(np.ascontiguousarray(view))), reference, rtol=0.03, atol=0.01)


def test_descriptor_switch_feeds_standardised_descriptors_to_the_softmax():
    images = np.zeros((6, 99, 99, 3), np.uint8)
    for i, image in enumerate(images):
        image[20:60 + 5 * i, 30:70] = 60 + 25 * i
    kwargs = dict(input_shape=(99, 99, 3), dense_units=(8,), batch_norm=True, pooling="average", descriptors=True,
                  descriptors_scale=3.0)
    model = alexnet_lib.alexnet(**kwargs)
    assert model.get_layer("probabilities").input.shape[-1] == 8 + ld.NUM_DESCRIPTORS
    task.adapt_normalization(model, images)
    standardised, scaled = keras.Model(model.input, [model.get_layer("descriptors_normalization").output,
                                                     model.get_layer("descriptors_scale").output])(images)
    np.testing.assert_allclose(np.asarray(standardised)[:, :3].mean(0), 0.0, atol=1e-4)  # RGB means
    np.testing.assert_allclose(np.asarray(standardised)[:, :3].std(0), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(scaled), 3.0 * np.asarray(standardised), rtol=1e-6)
    copy = alexnet_lib.inference_copy(model, **kwargs)
    np.testing.assert_allclose(copy.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
