"""Builds the configured classifier: the one place that turns a `ClassificationExperiment` into
a Keras model, for training (the task), and for inference (the exporter, the benchmarks)."""

from __future__ import annotations

import keras

from melanoma_tf.configs import classification as configs
from melanoma_tf.modeling import alexnet, backbone_classifier, pretrained


def build_classifier(params: configs.ClassificationExperiment, training: bool = True) -> keras.Model:
    """The configured network; with the training-only augmentation (and the backbone's
    pretrained weights) when `training`, else without either (see `inference_model`)."""
    m, size = params.model, params.data.input_size
    a = m.augmentation
    augment = alexnet.augmentation(a.flip, a.rot90, a.brightness, a.contrast, a.rotation, a.zoom,
                                   seed=params.training.seed) if training else None
    if m.backbone == "alexnet":
        return alexnet.alexnet(
            input_shape=(size, size, 3), num_classes=m.num_classes, dense_units=tuple(m.dense_units),
            dropout=m.dropout, batch_norm=m.batch_norm, pooling=m.pooling, kernel_initializer=m.kernel_initializer,
            output_initializer=m.output_initializer, normalization=m.normalization,
            working_size=m.working_size or None, descriptors=m.descriptors, descriptors_scale=m.descriptors_scale,
            augment=augment)
    return backbone_classifier.classifier(
        input_size=size, backbone_name=m.backbone, backbone_weights=m.backbone_weights if training else "",
        working_size=m.working_size or size, trainable_from=m.trainable_from, dropout=m.dropout,
        descriptors=m.descriptors, descriptors_scale=m.descriptors_scale, num_classes=m.num_classes,
        augment=augment)


def inference_model(trained: keras.Model, params: configs.ClassificationExperiment) -> keras.Model:
    """The trained network without its augmentation layers (identities at inference anyway), its
    weights copied layer by layer."""
    return pretrained.copy_weights(trained, build_classifier(params, training=False))
