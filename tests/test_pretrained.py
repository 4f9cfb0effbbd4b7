"""Pretrained initialisation: conv layers come from a checkpoint by name, grouped kernels fit."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.modeling import alexnet as alexnet_lib
from melanoma_tf.modeling import pretrained
from melanoma_tf.tasks import melanoma_classification as task

SMALL = dict(input_shape=(67, 67, 3), kernel_initializer="he_normal")


def _conv_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {n: model.get_layer(n).get_weights() for n in pretrained.CONV_LAYERS}


def test_grouped_kernel_expands_to_the_same_convolution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 9, 8)).astype("float32")
    grouped = keras.layers.Conv2D(6, 3, padding="same", groups=2)
    grouped.build(x.shape)
    plain = keras.layers.Conv2D(6, 3, padding="same")
    plain.build(x.shape)
    kernel, bias = grouped.get_weights()
    assert kernel.shape == (3, 3, 4, 6)
    plain.set_weights([pretrained.ungroup_kernel(kernel, 8), bias])
    np.testing.assert_allclose(plain(x), grouped(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["keras", "npz"])
def test_conv_layers_come_from_the_checkpoint_and_the_head_does_not(tmp_path, fmt):
    keras.utils.set_random_seed(1)
    source = alexnet_lib.alexnet(**SMALL, dense_units=(8,), num_classes=5)  # another task's head
    path = tmp_path / f"source.{fmt}"
    if fmt == "keras":
        source.save(path)
    else:
        np.savez(path, **{f"{n}/{v}": w for n, (k, b) in _conv_weights(source).items()
                          for v, w in (("kernel", k), ("bias", b))})
    keras.utils.set_random_seed(2)
    target = alexnet_lib.alexnet(**SMALL, dense_units=(16,))
    fc1_before = target.get_layer("fc1").get_weights()[0].copy()

    assert pretrained.load(target, path) == list(pretrained.CONV_LAYERS)
    for name, weights in _conv_weights(source).items():
        for theirs, ours in zip(weights, target.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(target.get_layer("fc1").get_weights()[0], fc1_before)


def test_bad_checkpoints_name_the_file_and_the_layer(tmp_path):
    model = alexnet_lib.alexnet(**SMALL, dense_units=(8,))
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        pretrained.load(model, tmp_path / "nowhere.npz")
    partial = tmp_path / "partial.npz"
    np.savez(partial, **{"conv1/kernel": model.get_layer("conv1").get_weights()[0]})
    with pytest.raises(ValueError, match=r"partial.npz: no weights for layer\(s\) \['conv2'"):
        pretrained.load(model, partial)
    with pytest.raises(ValueError, match=r"partial.npz: layer 'conv1' has weights of shapes \[\(11, 11, 3, 96\)\]"):
        pretrained.load(model, partial, ["conv1"])  # kernel without its bias
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"conv1/kernel": np.zeros((5, 5, 3, 96), "float32"), "conv1/bias": np.zeros(96, "float32")})
    with pytest.raises(ValueError, match=r"wrong.npz: layer 'conv1' has weights of shapes \[\(5, 5, 3, 96\)"):
        pretrained.load(model, wrong, ["conv1"])
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.h5: init_checkpoint must be a .keras model or an .npz"):
        pretrained.load(model, tmp_path / "weights.h5")


def test_training_starts_from_the_checkpoint(tmp_path):
    """`model.init_checkpoint` reaches `fit`: the weights at the first step are the checkpoint's."""
    params = task.resolve_params(config_files=["cls_tiny_test.yaml"])
    keras.utils.set_random_seed(123)  # not fit's seed, so conv2 (not loaded) differs
    source = task.build_model(params, training=False)
    source.save(tmp_path / "source.keras")
    params = task.resolve_params(config_files=["cls_tiny_test.yaml"], params_override={
        "model": {"init_checkpoint": str(tmp_path / "source.keras"), "init_checkpoint_layers": ["conv1", "conv3"]}})

    class FirstWeights(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seen = {n: self.model.get_layer(n).get_weights()[0].copy() for n in ("conv1", "conv2", "conv3")}

    rng = np.random.default_rng(0)
    size = params.data.input_size
    data = inputs.LesionSet(rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8), np.arange(16) % 2,
                            np.zeros(16, int), np.array([f"img{i}" for i in range(16)]))
    first = FirstWeights()
    task.fit(data, None, params, tmp_path / "run", epochs=1, callbacks=[first])
    for name in ("conv1", "conv3"):
        np.testing.assert_array_equal(first.seen[name], source.get_layer(name).get_weights()[0])
    assert not np.array_equal(first.seen["conv2"], source.get_layer("conv2").get_weights()[0])
