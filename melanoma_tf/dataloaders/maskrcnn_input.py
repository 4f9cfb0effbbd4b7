"""Model Garden's Mask R-CNN parser with dermoscopy augmentation and full-resolution eval masks."""

from __future__ import annotations

import tensorflow as tf
from official.vision.dataloaders import maskrcnn_input


def rot90_boxes(boxes: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """Normalised [ymin, xmin, ymax, xmax] boxes after `tf.image.rot90(image, k)`.

    One counter-clockwise quarter turn maps a point (y, x) to (1 - x, y).
    """
    for i in range(1, 4):
        turned = tf.stack([1.0 - boxes[:, 3], boxes[:, 0], 1.0 - boxes[:, 1], boxes[:, 2]], axis=-1)
        boxes = tf.where(i <= k, turned, boxes)
    return boxes


def color_jitter(image: tf.Tensor, strength: float) -> tf.Tensor:
    """Random brightness, contrast and saturation change of up to `strength`, on uint8 pixels."""
    x = tf.cast(image, tf.float32) / 255.0
    x = tf.image.random_brightness(x, strength)
    x = tf.image.random_contrast(x, 1.0 - strength, 1.0 + strength)
    x = tf.image.random_saturation(x, 1.0 - strength, 1.0 + strength)
    return tf.cast(tf.clip_by_value(x, 0.0, 1.0) * 255.0 + 0.5, tf.uint8)


class Parser(maskrcnn_input.Parser):
    """Adds random 90-degree rotations and colour jitter in training, and hands the encoded
    ground-truth mask to evaluation so lesion metrics are computed at full resolution."""

    def __init__(self, *, aug_rand_rot90: bool = False, aug_color_jitter: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self._aug_rand_rot90 = aug_rand_rot90
        self._aug_color_jitter = aug_color_jitter

    def _parse_train_data(self, data):
        data = dict(data)
        if self._aug_rand_rot90:
            k = tf.random.uniform([], 0, 4, dtype=tf.int32)
            data["image"] = tf.image.rot90(data["image"], k)
            data["groundtruth_boxes"] = rot90_boxes(data["groundtruth_boxes"], k)
            if self._include_mask:
                masks = data["groundtruth_instance_masks"][..., None]
                data["groundtruth_instance_masks"] = tf.image.rot90(masks, k)[..., 0]
        if self._aug_color_jitter > 0:
            data["image"] = color_jitter(data["image"], self._aug_color_jitter)
        return super()._parse_train_data(data)

    def _parse_eval_data(self, data):
        image, labels = super()._parse_eval_data(data)
        if self._include_mask:
            pngs = data["groundtruth_instance_masks_png"]
            labels["groundtruths"]["lesion_mask_png"] = tf.cond(
                tf.size(pngs) > 0, lambda: pngs[0], lambda: tf.constant(""))
        return image, labels
