"""Colour and shape descriptors of a masked lesion, computed inside the Keras graph.

The dermatologist's ABCD rule in numbers: Asymmetry, Border (compactness), Colour (mean and
spread in three colour spaces) and Diameter (area, elongation). A logistic regression on these
few numbers beats every network trained from scratch on a few hundred ISIC images
(benchmarks/classification.py), so the `hybrid` classifier feeds them to its head beside the
learned features. Computing them in the graph keeps the served model's input raw pixels.

The lesion is where the masked image is not black, as everywhere in the classifier.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers

COLOUR_SPACES = ("rgb", "hsv", "lab")
SHAPE_NAMES = ("area", "compactness", "elongation", "asymmetry_major", "asymmetry_minor")
NUM_DESCRIPTORS = 2 * 3 * len(COLOUR_SPACES) + len(SHAPE_NAMES)

_RGB_TO_XYZ = tf.constant([[0.412453, 0.357580, 0.180423],
                           [0.212671, 0.715160, 0.072169],
                           [0.019334, 0.119193, 0.950227]])
_D65_WHITE = tf.constant([0.950456, 1.0, 1.088754])


def _srgb_to_linear(value: float) -> float:
    return ((value + 0.055) / 1.055) ** 2.4 if value > 0.04045 else value / 12.92


# Inverse sRGB gamma of every 8-bit value: a lookup instead of tf.pow, the slowest op here.
_LINEAR_RGB = tf.constant([_srgb_to_linear(v / 255) for v in range(256)], tf.float32)


def rgb_to_lab(image: tf.Tensor) -> tf.Tensor:
    """CIE L*a*b* (D65) of 8-bit sRGB values (any dtype), as OpenCV's COLOR_RGB2LAB: L in [0, 100]."""
    linear = tf.gather(_LINEAR_RGB, tf.cast(tf.round(image), tf.int32))
    xyz = tf.einsum("...c,dc->...d", linear, _RGB_TO_XYZ) / _D65_WHITE
    f = tf.where(xyz > 0.008856, tf.pow(tf.maximum(xyz, 0.008856), 1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = tf.unstack(f, axis=-1)
    return tf.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def _mirror(mask: tf.Tensor, centre: tf.Tensor, axis: tf.Tensor) -> tf.Tensor:
    """mask [B, H, W, 1] reflected about the line through centre [B, 2] (x, y) along the unit
    vector axis [B, 2]: p -> c + (2 a a^T - I)(p - c), its own inverse."""
    (cx, cy), (ax, ay) = tf.unstack(centre, axis=-1), tf.unstack(axis, axis=-1)
    r00, r01, r11 = 2 * ax * ax - 1, 2 * ax * ay, 2 * ay * ay - 1
    offset_x = cx - r00 * cx - r01 * cy
    offset_y = cy - r01 * cx - r11 * cy
    zeros = tf.zeros_like(cx)
    transform = tf.stack([r00, r01, offset_x, r01, r11, offset_y, zeros, zeros], axis=-1)
    return keras.ops.image.affine_transform(mask, transform, interpolation="nearest", fill_mode="constant")


def shape_descriptors(mask: tf.Tensor) -> tf.Tensor:
    """[B, 5] of a 0/1 mask [B, H, W, 1]: area fraction, compactness (perimeter^2 / 4 pi area,
    smallest for a disc, larger for a ragged border), elongation (ratio of the principal axes'
    lengths) and the asymmetry about the major and the minor axis (area the mirrored mask does
    not cover / twice the area)."""
    size = tf.cast(tf.shape(mask)[1:3], tf.float32)
    area = tf.reduce_sum(mask, axis=[1, 2, 3]) + 1e-6
    # Border pixels: lesion pixels with a background pixel among their 8 neighbours.
    eroded = -tf.nn.max_pool2d(-tf.pad(mask, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 1, "VALID")
    perimeter = tf.reduce_sum(mask - eroded, axis=[1, 2, 3])
    ys, xs = tf.meshgrid(tf.range(size[0]), tf.range(size[1]), indexing="ij")
    m = mask[..., 0]
    cx = tf.reduce_sum(m * xs, axis=[1, 2]) / area
    cy = tf.reduce_sum(m * ys, axis=[1, 2]) / area
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    mu20, mu02, mu11 = (tf.reduce_sum(m * v, axis=[1, 2]) / area for v in (dx * dx, dy * dy, dx * dy))
    half_gap = tf.sqrt(tf.square((mu20 - mu02) / 2) + tf.square(mu11))
    major, minor = (mu20 + mu02) / 2 + half_gap, (mu20 + mu02) / 2 - half_gap
    angle = 0.5 * tf.atan2(2 * mu11, mu20 - mu02)  # of the major axis
    centre = tf.stack([cx, cy], axis=-1)
    major_axis = tf.stack([tf.cos(angle), tf.sin(angle)], axis=-1)
    minor_axis = tf.stack([-tf.sin(angle), tf.cos(angle)], axis=-1)
    asymmetry = [tf.reduce_sum(tf.abs(mask - _mirror(mask, centre, a)), axis=[1, 2, 3]) / (2 * area)
                 for a in (major_axis, minor_axis)]
    return tf.stack([area / (size[0] * size[1]), tf.square(perimeter) / (4 * math.pi * area),
                     tf.sqrt(major / tf.maximum(minor, 1e-6)), *asymmetry], axis=-1)


def colour_descriptors(image: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """[B, 18]: mean and standard deviation over the lesion of each channel of RGB, HSV and
    L*a*b* (image [B, H, W, 3] in [0, 255], mask [B, H, W, 1])."""
    channels = tf.concat([image, tf.image.rgb_to_hsv(image / 255.0), rgb_to_lab(image)], axis=-1)
    area = tf.reduce_sum(mask, axis=[1, 2]) + 1e-6
    mean = tf.reduce_sum(channels * mask, axis=[1, 2]) / area
    var = tf.reduce_sum(mask * tf.square(channels - mean[:, None, None, :]), axis=[1, 2]) / area
    return tf.concat([mean, tf.sqrt(var + 1e-6)], axis=-1)


@keras.saving.register_keras_serializable(package="melanoma_tf")
class LesionDescriptors(layers.Layer):
    """Masked images [B, H, W, 3] in [0, 255] -> [B, 23] colour and shape descriptors."""

    def call(self, images):
        # Every other row and column: a quarter of the cost, the same statistics.
        images = tf.cast(images[:, ::2, ::2], tf.float32)
        mask = tf.cast(tf.reduce_max(images, axis=-1, keepdims=True) > 1.0, tf.float32)
        return tf.concat([colour_descriptors(images, mask), shape_descriptors(mask)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], NUM_DESCRIPTORS)


def standardised_descriptors(images: keras.KerasTensor, scale: float = 1.0) -> keras.KerasTensor:
    """The lesion's descriptors of uint8 images, standardised by a `Normalization` layer (to
    `adapt` on the training images, layer 'descriptors_normalization') and multiplied by scale:
    under SGD their weights then learn scale^2 times faster, which a linear model on them needs."""
    described = LesionDescriptors(name="lesion_descriptors")(images)
    # Not batch norm: with its batch statistics a linear model on these lost 0.08 AUC.
    described = layers.Normalization(axis=-1, name="descriptors_normalization")(described)
    if scale != 1.0:
        described = layers.Rescaling(scale, name="descriptors_scale")(described)
    return described
