"""The paper's AlexNet as a Keras 3 functional model, with its modern variants behind switches.

Defaults are the paper's network: five conv layers (96 11x11/4, 256 5x5, 384 3x3, 384 3x3,
256 3x3, ReLU, 3x3/2 max-pools after the 1st, 2nd and 5th), flatten, dense 1000-1000-500 with
ReLU and dropout 0.6 after each, and a 2-way softmax (nevus, melanoma). It is trained with
binary cross-entropy on one-hot targets, which for a 2-way softmax equals categorical
cross-entropy. Conv 2-5 use 'same' padding and no channel groups (single-GPU AlexNet), so a
227x227 input gives a 6x6x256 map and 14,466,702 trainable parameters.

The model takes raw uint8 pixels: the cast, the training-only augmentation and the input
normalisation are layers of the model, so training and serving cannot preprocess differently.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
from keras import layers

from melanoma_tf import contract
from melanoma_tf.modeling import lesion_descriptors, pretrained

CLASS_NAMES = contract.CLASS_NAMES
INPUT_NAME = contract.MASKED_IMAGE
CONV_LAYERS = ((96, 11, 4), (256, 5, 1), (384, 3, 1), (384, 3, 1), (256, 3, 1))  # filters, kernel, stride
POOL_AFTER = (0, 1, 4)
POOLINGS = ("flatten", "average", "lesion_stats")
LESION_STATS_LAYERS = (0, 1, 4)  # conv1, conv2, conv5: colour, fine texture, structure


@keras.saving.register_keras_serializable(package="melanoma_tf")
class RandomRot90(layers.Layer):
    """Rotates each image of a square batch by a random multiple of 90 degrees, in training only.

    With horizontal and vertical flips this covers all 8 symmetries of the square: a dermoscopy
    image has no canonical orientation, and unlike `RandomRotation` nothing is interpolated.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        batch = tf.shape(images)[0]
        k = keras.random.randint([batch], 0, 4, seed=self.seed_generator)
        rotations = tf.stack([keras.ops.rot90(images, i, axes=(1, 2)) for i in range(4)])
        return tf.gather_nd(rotations, tf.stack([k, tf.range(batch)], axis=1))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}


def lesion_moments(features: tf.Tensor, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and standard deviation [B, C] of each channel of features [B, h, w, C] over the
    lesion of images [B, H, W, 3] (its non-black pixels, area-resized to h x w): the black
    surround of a masked lesion neither dilutes nor shifts them, whatever the lesion's size."""
    lesion = tf.cast(tf.reduce_max(images, axis=-1, keepdims=True) > 1.0, features.dtype)
    weight = tf.image.resize(lesion, tf.shape(features)[1:3], method="area")
    total = tf.reduce_sum(weight, axis=[1, 2]) + 1e-3
    mean = tf.reduce_sum(features * weight, axis=[1, 2]) / total
    var = tf.reduce_sum(weight * tf.square(features - mean[:, None, None, :]), axis=[1, 2]) / total
    return mean, tf.sqrt(var + 1e-6)


@keras.saving.register_keras_serializable(package="melanoma_tf")
class LesionStatistics(layers.Layer):
    """[features, images] -> per-channel mean and standard deviation over the lesion [B, 2C]."""

    def call(self, inputs):
        return tf.concat(lesion_moments(*inputs), axis=-1)

    def compute_output_shape(self, input_shape):
        features_shape = input_shape[0]
        return (features_shape[0], 2 * features_shape[-1])


def augmentation(flip: bool = True, rot90: bool = True, brightness: float = 0.0,
                 contrast: float = 0.0, rotation: bool = False, zoom: float = 0.0,
                 seed: int | None = None) -> keras.Sequential:
    """Training-only augmentation of [0, 255] float images (Keras preprocessing layers are
    identities at inference). Brightness and contrast are off in the paper's setting because
    lesion colour is the strongest melanoma cue. rotation (any angle) and zoom (a fraction of
    the side, in and out) fill with black, which is what surrounds a masked lesion anyway."""
    steps: list[layers.Layer] = []
    if flip:
        steps.append(layers.RandomFlip("horizontal_and_vertical", seed=seed))
    if rot90:
        steps.append(RandomRot90(seed=seed))
    if rotation:
        steps.append(layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, seed=seed))
    if zoom:
        steps.append(layers.RandomZoom(zoom, fill_mode="constant", fill_value=0.0, seed=seed))
    if brightness:
        steps.append(layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed))
    if contrast:
        steps.append(layers.RandomContrast(contrast, value_range=(0, 255), seed=seed))
    return keras.Sequential(steps, name="augmentation")


def alexnet(input_shape: Sequence[int] = (227, 227, 3), num_classes: int = 2,
            dense_units: Sequence[int] = (1000, 1000, 500), dropout: float = 0.6,
            batch_norm: bool = False, pooling: str = "flatten",
            kernel_initializer: str = "glorot_uniform", normalization: str = "mean_std",
            output_initializer: str = "glorot_uniform", working_size: int | None = None,
            descriptors: bool = False, descriptors_scale: float = 1.0, augment: keras.Layer | None = None,
            name: str = "alexnet") -> keras.Model:
    """AlexNet on uint8 [H, W, 3] input returning softmax probabilities [B, num_classes].

    normalization: 'mean_std' is a per-channel `Normalization` layer (mean 0, variance 1 until
    `adapt`ed on the training images), 'scale' maps [0, 255] to [0, 1].

    Switches, all off by default (the paper's network):
    - kernel_initializer 'he_normal' suits ReLUs; Keras's default Glorot shrinks the signal so
      much over 8 layers that every image gets the same output. With He, the hidden outputs have
      a standard deviation of about 3, so output_initializer should be 'zeros' (every image
      starts at p = 0.5); otherwise the first steps see a loss of 5 and knock the ReLUs dead.
    - batch_norm adds BatchNormalization between each conv and its ReLU (moving-average
      momentum 0.9: runs here last a few hundred steps, too few for Keras's 0.99 to forget its
      initial statistics).
    - pooling 'average' replaces flatten by global average pooling (the 9216x1000 dense layer
      holds 64% of the paper network's weights). 'lesion_stats' takes the mean and standard
      deviation of every channel of conv1, conv2 and conv5 over the lesion's pixels only
      (`LesionStatistics`): a global average also counts the black surround, so it mixes lesion
      size into every feature, while colour statistics over the lesion are what separates
      melanoma best in a few hundred images (see the logistic-regression baseline).
    - working_size resizes the input (bilinear, antialiased) to that square size inside the
      model, so a network computing at a lower resolution still takes the agreed input size
      (at 131 the conv layers cost a third of 227's, and the last pool is 3x3, not 6x6).
    - descriptors feeds the softmax layer, beside the last hidden layer, the lesion's colour
      and shape descriptors (`lesion_descriptors.LesionDescriptors` of the un-augmented input,
      standardised by a `Normalization` layer to `adapt` on the training images): the network
      starts from what a logistic regression on them knows, and its conv layers add to it.
      descriptors_scale multiplies the standardised descriptors: under SGD their weights then
      learn scale^2 times faster than the rest of the network, which a linear model needs.
    augment: e.g. `augmentation()`, applied before normalisation; None for inference models.
    """
    inputs = keras.Input(tuple(input_shape), dtype="uint8", name=INPUT_NAME)
    x = layers.Rescaling(1.0, name="to_float")(inputs)
    if working_size and working_size != input_shape[0]:
        x = layers.Resizing(working_size, working_size, antialias=True, name="working_size")(x)
    if augment is not None:
        x = augment(x)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    image, statistics = x, []  # the lesion is where this (augmented, unnormalised) image is not black
    if normalization == "mean_std":
        x = layers.Normalization(axis=-1, name="normalization")(x)
    elif normalization == "scale":
        x = layers.Rescaling(1.0 / 255, name="normalization")(x)
    else:
        raise ValueError(f"normalization must be 'mean_std' or 'scale', got {normalization!r}")
    for i, (filters, kernel, stride) in enumerate(CONV_LAYERS):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="valid" if i == 0 else "same",
                          use_bias=not batch_norm, kernel_initializer=kernel_initializer,
                          name=f"conv{i + 1}")(x)
        if batch_norm:
            x = layers.BatchNormalization(momentum=0.9, name=f"conv{i + 1}_bn")(x)
        x = layers.ReLU(name=f"conv{i + 1}_relu")(x)
        if pooling == "lesion_stats" and i in LESION_STATS_LAYERS:
            statistics.append(LesionStatistics(name=f"conv{i + 1}_lesion_stats")([x, image]))
        if i in POOL_AFTER:
            x = layers.MaxPooling2D(3, strides=2, name=f"pool{i + 1}")(x)
    if pooling == "lesion_stats":
        x = layers.Concatenate(name="lesion_stats")(statistics)
    elif pooling == "average":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    else:
        x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense_units):
        x = layers.Dense(units, activation="relu", kernel_initializer=kernel_initializer,
                         name=f"fc{i + 1}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"fc{i + 1}_dropout")(x)
    if descriptors:
        described = lesion_descriptors.standardised_descriptors(inputs, descriptors_scale)
        x = layers.Concatenate(name="features_and_descriptors")([x, described])
    outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer=output_initializer,
                           name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def inference_copy(model: keras.Model, **kwargs) -> keras.Model:
    """The same network without augmentation, weights copied layer by layer (by name).

    kwargs are the `alexnet` arguments the model was built with (augment is dropped).
    """
    return pretrained.copy_weights(model, alexnet(**{**kwargs, "augment": None}))
