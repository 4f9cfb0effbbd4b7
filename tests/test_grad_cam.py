"""Grad-CAM heat maps: the input's shape, 0-1, and they follow the lesion when it moves."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from melanoma_tf.modeling import grad_cam

SIZE = 64


def _blob_detector() -> keras.Model:
    """Conv features that fire on bright pixels only (zero bias on a black background), pooled
    into a melanoma logit that grows with them: a model whose evidence sits where the blob is."""
    image = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255.0)(keras.ops.cast(image, "float32"))
    x = keras.layers.Conv2D(8, 5, padding="same", activation="relu", name="features",
                            kernel_initializer=keras.initializers.RandomUniform(0.0, 0.1))(x)
    x = keras.layers.MaxPooling2D(4, name="pool")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant([[-1.0, 1.0]] * 8))(pooled)
    return keras.Model(image, keras.layers.Softmax(name="probabilities")(logits))


def _blob(y: int, x: int) -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[y - 5:y + 5, x - 5:x + 5] = 220
    return image


def _peak(heat: np.ndarray) -> np.ndarray:
    return np.array(np.unravel_index(heat.argmax(), heat.shape))


def test_heat_map_has_the_input_shape_and_follows_the_lesion():
    model = _blob_detector()
    assert grad_cam.feature_layer(model).name == "pool"
    images = np.stack([_blob(16, 16), _blob(46, 40)])
    heat = grad_cam.heat_map(model, tf.constant(images)).numpy()
    assert heat.shape == (2, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0 and np.isclose(heat.max(axis=(1, 2)), 1.0, atol=0.05).all()
    assert np.abs(_peak(heat[0]) - [16, 16]).max() <= 6
    assert np.abs(_peak(heat[1]) - [46, 40]).max() <= 6
    far = heat[0][40:, 40:]
    assert far.max() < 0.2, "nothing lights up far from the lesion"


def test_an_ensemble_explains_with_the_mean_of_its_members_maps():
    members = [keras.Model(m.inputs[0], m.outputs[0], name=f"fold_{k}") for k, m in
               enumerate((_blob_detector(), _blob_detector()))]
    image = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    ensemble = keras.Model(image, keras.layers.Average()([m(image) for m in members]))
    assert grad_cam.feature_layer(ensemble) is None
    images = tf.constant(np.stack([_blob(20, 30)]))
    expected = np.mean([grad_cam.heat_map(m, images).numpy() for m in members], axis=0)
    np.testing.assert_allclose(grad_cam.heat_map(ensemble, images).numpy(), expected, atol=1e-6)
