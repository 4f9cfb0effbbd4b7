"""The paper's AlexNet: layer sizes, parameter count, preprocessing inside, augmentation in training only."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from melanoma_tf.modeling import alexnet as alexnet_lib

PAPER_PARAMS = 14_466_702  # stack notes: AlexNet, dense 1000-1000-500-2, 227x227 input


@pytest.fixture(scope="module")
def paper_model() -> keras.Model:
    return alexnet_lib.alexnet()


def test_paper_layer_sizes(paper_model):
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in paper_model.layers}
    assert paper_model.input.dtype == "uint8" and shapes["masked_image"] == (227, 227, 3)
    assert shapes["conv1"] == (55, 55, 96) and shapes["pool1"] == (27, 27, 96)
    assert shapes["conv2"] == (27, 27, 256) and shapes["pool2"] == (13, 13, 256)
    assert (shapes["conv3"], shapes["conv4"], shapes["conv5"]) == ((13, 13, 384), (13, 13, 384), (13, 13, 256))
    assert shapes["pool5"] == (6, 6, 256) and shapes["flatten"] == (9216,)
    assert [shapes[f"fc{i}"] for i in (1, 2, 3)] == [(1000,), (1000,), (500,)]
    assert shapes["probabilities"] == (2,)
    assert [paper_model.get_layer(f"fc{i}_dropout").rate for i in (1, 2, 3)] == [0.6] * 3
    assert paper_model.get_layer("probabilities").activation.__name__ == "softmax"


def test_paper_parameter_count(paper_model):
    """14,466,702 trainable weights, as in the stack notes: conv 2-5 without AlexNet's two-GPU
    channel groups (grouping would halve conv2, conv4 and conv5). The only other weights are the
    7 statistics of the input Normalization layer (mean, variance per channel, count)."""
    trainable = sum(int(np.prod(w.shape)) for w in paper_model.trainable_weights)
    assert trainable == PAPER_PARAMS
    assert paper_model.count_params() - trainable == 7


def test_modern_switches_change_the_network():
    modern = alexnet_lib.alexnet(batch_norm=True, pooling="average", dense_units=(256,), dropout=0.3,
                                 kernel_initializer="he_normal")
    names = [layer.name for layer in modern.layers]
    assert "conv1_bn" in names and "avg_pool" in names and "flatten" not in names
    assert modern.get_layer("fc1").kernel.shape == (256, 256)
    assert sum(int(np.prod(w.shape)) for w in modern.trainable_weights) < 4_000_000


def test_working_size_keeps_the_input_contract_and_computes_smaller():
    model = alexnet_lib.alexnet(working_size=131, kernel_initializer="he_normal")
    assert tuple(model.input.shape[1:]) == (227, 227, 3)
    assert tuple(model.get_layer("pool5").output.shape[1:]) == (3, 3, 256)
    assert model.get_layer("fc1").kernel.shape == (2304, 1000)


def test_normalisation_is_inside_the_model_and_outputs_are_probabilities():
    model = alexnet_lib.alexnet((99, 99, 3), dense_units=(8,), normalization="scale")
    images = np.random.default_rng(0).integers(0, 256, (3, 99, 99, 3), dtype=np.uint8)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-6)


def test_augmentation_acts_in_training_only_and_is_a_symmetry_of_the_square():
    augment = alexnet_lib.augmentation(seed=3)
    images = np.random.default_rng(1).integers(0, 256, (16, 9, 9, 3)).astype(np.float32)
    np.testing.assert_array_equal(augment(images, training=False), images)
    out = np.asarray(augment(images, training=True))
    for before, after in zip(images, out):
        symmetries = [np.rot90(v, k) for v in (before, before[:, ::-1]) for k in range(4)]
        assert any(np.array_equal(after, s) for s in symmetries)
    assert not np.array_equal(out, images)


def test_inference_copy_drops_augmentation_and_keeps_the_weights():
    model = alexnet_lib.alexnet((99, 99, 3), dense_units=(8,), augment=alexnet_lib.augmentation(seed=0))
    images = np.random.default_rng(2).integers(0, 256, (2, 99, 99, 3), dtype=np.uint8)
    copy = alexnet_lib.inference_copy(model, input_shape=(99, 99, 3), dense_units=(8,))
    assert "augmentation" not in [layer.name for layer in copy.layers]
    np.testing.assert_allclose(copy.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def test_rotation_and_zoom_fill_with_the_masked_background():
    augment = alexnet_lib.augmentation(flip=False, rot90=False, rotation=True, zoom=0.2, seed=4)
    yy, xx = np.mgrid[:33, :33]
    disc = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 36)[..., None] * np.array([200.0, 120.0, 60.0])
    images = np.repeat(disc[None].astype(np.float32), 8, axis=0)
    np.testing.assert_array_equal(augment(images, training=False), images)
    out = np.asarray(augment(images, training=True))
    assert not np.allclose(out, images)
    corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    np.testing.assert_array_equal(corners, 0.0)  # no lesion colour smeared into the background


def test_inference_copy_keeps_an_adapted_normalization():
    model = alexnet_lib.alexnet((99, 99, 3), dense_units=(8,), augment=alexnet_lib.augmentation(seed=0))
    model.get_layer("normalization").adapt(np.random.default_rng(5).uniform(100, 140, (4, 99, 99, 3)))
    images = np.random.default_rng(6).integers(100, 140, (2, 99, 99, 3), dtype=np.uint8)
    copy = alexnet_lib.inference_copy(model, input_shape=(99, 99, 3), dense_units=(8,))
    np.testing.assert_allclose(copy.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def test_lesion_statistics_are_over_the_lesion_pixels_only():
    rng = np.random.default_rng(7)
    images = np.zeros((2, 40, 40, 3), np.float32)
    images[0, 5:25, 8:30] = rng.uniform(20, 250, (20, 22, 3))
    images[1, 10:14, 10:14] = rng.uniform(20, 250, (4, 4, 3))  # a small lesion: size must not matter
    out = np.asarray(alexnet_lib.LesionStatistics()([images, images]))
    for image, row in zip(images, out):
        lesion = image[image.max(-1) > 0]
        np.testing.assert_allclose(row[:3], lesion.mean(0), rtol=1e-3)
        np.testing.assert_allclose(row[3:], lesion.std(0), rtol=1e-3, atol=1e-2)


def test_lesion_stats_pooling_feeds_the_head_from_conv1_conv2_and_conv5():
    model = alexnet_lib.alexnet((99, 99, 3), dense_units=(16,), batch_norm=True, pooling="lesion_stats")
    assert model.get_layer("lesion_stats").output.shape[-1] == 2 * (96 + 256 + 256)
    with pytest.raises(ValueError, match="pooling"):
        alexnet_lib.alexnet((99, 99, 3), pooling="max")
