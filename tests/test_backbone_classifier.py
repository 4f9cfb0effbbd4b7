"""Pretrained-backbone classifiers: what trains, what stays frozen, and other backbones by name."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from melanoma_tf.modeling import backbone_classifier, factory
from melanoma_tf.tasks import melanoma_classification as task


def _backbone(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers
                if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential))  # not augmentation


def test_layers_before_trainable_from_and_every_batch_norm_stay_frozen():
    params = task.resolve_params("melanoma_efficientnet_lite0", params_override={"model": {"backbone_weights": ""}})
    backbone = _backbone(factory.build_classifier(params))
    names = [layer.name for layer in backbone.layers]
    first = names.index("block9_expand_conv")
    for i, layer in enumerate(backbone.layers):
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
        elif layer.weights:
            assert layer.trainable == (i >= first), layer.name
    assert backbone.get_layer("head_conv").trainable and not backbone.get_layer("stem_conv").trainable


def test_a_keras_applications_backbone_builds_trains_and_copies_without_downloading():
    params = task.resolve_params("melanoma_efficientnet_lite0", params_override={"model": {
        "backbone": "EfficientNetB0", "backbone_weights": "", "trainable_from": "block6a", "working_size": 64}})
    keras.utils.set_random_seed(0)
    model = factory.build_classifier(params, training=True)
    assert _backbone(model).name == "efficientnetb0"
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    images = np.random.default_rng(0).integers(0, 256, (4, 227, 227, 3), dtype=np.uint8)
    labels = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    for _ in range(2):
        model.train_on_batch(images, labels)
    inference = factory.inference_model(model, params)
    np.testing.assert_allclose(inference.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ({"backbone": "ResNet50"}, "preprocesses its own input"),
    ({"backbone": "NoSuchNet"}, "model.backbone='NoSuchNet'"),
    ({"trainable_from": "block99"}, "trainable_from='block99': no such layer"),
])
def test_bad_backbone_settings_are_named(override, message):
    params = task.resolve_params("melanoma_efficientnet_lite0",
                                 params_override={"model": {"backbone_weights": "", **override}})
    with pytest.raises(ValueError, match=message):
        factory.build_classifier(params)


def test_a_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        backbone_classifier.backbone("efficientnet_lite0", str(tmp_path / "missing.pth"), 64)
