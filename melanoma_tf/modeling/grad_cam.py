"""Where the classifier looks: Grad-CAM heat maps of the melanoma probability.

Grad-CAM (Selvaraju et al., ICCV 2017): the last spatial feature map of the network, each
channel weighted by the mean gradient of the melanoma probability over it, summed, rectified
and scaled to [0, 1] per image, then resized to the input. A user reads it beside the lesion
mask: a score that came from a ruler, an ink mark or the dark rim of the dermoscope lights up
there and not on the lesion. One function serves training-time checks, the export's `explain`
signature and the report, so they cannot disagree.

A fold ensemble (`export_classifier.load_fold_ensemble`) has no spatial map of its own: its
heat map is the mean of its members' maps.
"""

from __future__ import annotations

import keras
import tensorflow as tf

MELANOMA = 1  # the probabilities column


def _output(layer: keras.layers.Layer) -> keras.KerasTensor:
    """The layer's output in the graph of the model that holds it: a nested model's `output` is
    the one inside its own graph."""
    return layer._inbound_nodes[0].output_tensors[0]


def feature_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The model's last layer (a nested backbone counts as one) whose output is a spatial map."""
    spatial = [layer for layer in model.layers
               if not isinstance(layer, keras.layers.InputLayer) and len(_output(layer).shape) == 4]
    return spatial[-1] if spatial else None


def _members(model: keras.Model) -> list[keras.Model]:
    if feature_layer(model) is not None:
        return [model]
    members = [layer for layer in model.layers if isinstance(layer, keras.Model) and feature_layer(layer)]
    if not members:
        raise ValueError(f"{model.name}: no spatial feature map to explain")
    return members


def _one(model: keras.Model, images: tf.Tensor) -> tf.Tensor:
    layer = feature_layer(model)
    features = keras.Model(model.inputs[0], _output(layer))(images, training=False)
    # The rest of the network from the feature map (and the image, which a lesion-descriptor
    # branch reads): the map is then a watched input, whichever layers are frozen.
    head = keras.Model([model.inputs[0], _output(layer)], model.outputs[0])
    with tf.GradientTape() as tape:
        tape.watch(features)
        melanoma = head([images, features], training=False)[:, MELANOMA]
    gradients = tape.gradient(melanoma, features)
    weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    return cam / (tf.reduce_max(cam, axis=[1, 2], keepdims=True) + 1e-8)


def heat_map(model: keras.Model, images: tf.Tensor) -> tf.Tensor:
    """float32 [N, H, W] in [0, 1]: Grad-CAM of the melanoma probability for images [N, H, W, 3]
    (what the model takes), at the images' own size."""
    size = tf.shape(images)[1:3]
    maps = [tf.image.resize(_one(member, images)[..., None], size, "bilinear")[..., 0]
            for member in _members(model)]
    return tf.clip_by_value(tf.add_n(maps) / len(maps), 0.0, 1.0)
