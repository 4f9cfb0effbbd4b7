"""The one place where a dermoscopy image becomes the classifier's input.

Training, evaluation, the skin-bias study and the segmentation exporter (in graph) all call
these functions, so what the classifier sees cannot drift between them. Pure TF ops: they run
eagerly, inside `tf.function` with unknown H and W, and per image of a batch via `tf.map_fn`.

Choices, and why:
- The context view (`context_view`) is the square around the lesion's box, enlarged by `margin`
  per side, with every pixel kept: the skin around the lesion (issue 34's measurements, on the
  ISIC 2017 test set: +0.056 AUC paired over the masked lesion). It never shows black padding:
  a first version padded the square where it left the image, and Grad-CAM showed the classifier
  reading the padding's extent (the lesion's size relative to the frame) rather than the skin
  (benchmarks/README.md, "the lesion in its context"). So the square is shifted inside the
  image and capped at its shorter side; only a lesion longer than the shorter side gets a
  rectangle (the whole short axis), stretched to the square input. The box comes from the
  mask, so the segmenter's export computes it from the mask it predicted, exactly as training
  computes it from the ground-truth mask.
- The lesion view (`mask_lesion`, the paper's input) zeroes every pixel outside the mask, then
  takes a square around the lesion's box enlarged by `margin` of its longer side on each side,
  so the lesion's aspect ratio is kept and it fills most of the input whatever its size. Where
  the square leaves the image it is padded with black.
- The raw square is resampled (bilinear, antialiased when shrinking) and then multiplied by the
  mask resampled with nearest neighbour on the same grid. So every output pixel outside the
  resampled mask is exactly 0, and every pixel inside is exactly the bilinear resample of the
  source: no skin colour leaks outside the mask, and along the border only the one output pixel
  that the interpolation kernel straddles can mix in skin.
- A mask is any dtype; non-zero means lesion. An all-zero mask gives an all-black image (no
  lesion, nothing to show); an all-ones mask (records without a mask) gives the whole frame.
- The skin-bias study's views are siblings here, not copies: `whole_frame` (no masking) and
  `skin_only`, which blacks out the lesion view's square (the lesion's box plus margin) rather
  than just the mask, because a mask-shaped hole would still show the lesion's outline, itself a
  melanoma cue (border irregularity). The square's position and size remain visible.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from melanoma_tf import contract

CLASSIFIER_INPUT_SIZE = contract.CLASSIFIER_INPUT_SIZE

VIEWS = ("lesion", "context", "whole", "skin")


def _resample(image: tf.Tensor, keep: tf.Tensor, top: tf.Tensor, left: tf.Tensor, height: tf.Tensor,
              width: tf.Tensor, output_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Crops the rectangle [top, top+height) x [left, left+width) (black outside the image),
    resizes it to output_size and zeroes the pixels where `keep` (nearest-resized) is 0."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    y0, x0 = tf.maximum(top, 0), tf.maximum(left, 0)
    y1, x1 = tf.minimum(top + height, h), tf.minimum(left + width, w)
    y1, x1 = tf.maximum(y1, y0), tf.maximum(x1, x0)
    paddings = [[y0 - top, top + height - y1], [x0 - left, left + width - x1], [0, 0]]
    crop = tf.pad(image[y0:y1, x0:x1], paddings)
    keep_crop = tf.pad(keep[y0:y1, x0:x1, None], paddings)
    size = [output_size, output_size]
    pixels = tf.image.resize(tf.cast(crop, tf.float32), size, "bilinear", antialias=True)
    keep_out = tf.image.resize(keep_crop, size, "nearest")
    out = tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8) * keep_out
    out = tf.ensure_shape(out, [output_size, output_size, 3])
    return out, tf.ensure_shape(keep_out[..., 0], [output_size, output_size])


def _binary(mask: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
    """0/1 uint8 [H, W] from a [H, W] or [H, W, 1] mask of any dtype."""
    mask = tf.reshape(mask, tf.shape(image)[:2])
    return tf.cast(tf.not_equal(mask, tf.zeros((), mask.dtype)), tf.uint8)


def lesion_box(mask: tf.Tensor) -> tf.Tensor:
    """(ymin, xmin, ymax, xmax) int32, max exclusive, of the non-zero pixels of a [H, W] mask;
    the whole frame when the mask is empty."""
    on = tf.not_equal(mask, tf.zeros((), mask.dtype))
    rows, cols = tf.reduce_any(on, axis=1), tf.reduce_any(on, axis=0)
    h, w = tf.shape(rows, tf.int32)[0], tf.shape(cols, tf.int32)[0]
    ymin = tf.argmax(tf.cast(rows, tf.int32), output_type=tf.int32)
    xmin = tf.argmax(tf.cast(cols, tf.int32), output_type=tf.int32)
    ymax = h - tf.argmax(tf.cast(tf.reverse(rows, [0]), tf.int32), output_type=tf.int32)
    xmax = w - tf.argmax(tf.cast(tf.reverse(cols, [0]), tf.int32), output_type=tf.int32)
    empty = tf.logical_not(tf.reduce_any(rows))
    return tf.where(empty, tf.stack([0, 0, h, w]), tf.stack([ymin, xmin, ymax, xmax]))


def jitter_box(box: tf.Tensor, jitter: float, seed: tf.Tensor | None = None) -> tf.Tensor:
    """The box (ymin, xmin, ymax, xmax) with each edge moved by up to `jitter` of the box's
    height or width, uniformly and independently: training boxes that err as a predicted box
    does (the served segmenter's mean Jaccard is about 0.8). `seed`: a stateless [2] seed
    (tf.data's `Dataset.random`), else TF's global random stream."""
    box = tf.cast(box, tf.float32)
    extent = tf.stack([box[2] - box[0], box[3] - box[1]] * 2)
    shape = [4]
    noise = (tf.random.stateless_uniform(shape, seed, -1.0, 1.0) if seed is not None
             else tf.random.uniform(shape, -1.0, 1.0))
    moved = box + noise * jitter * extent
    # Keep it a box of at least one pixel.
    low = tf.minimum(moved[:2], moved[2:] - 1.0)
    return tf.concat([low, tf.maximum(moved[2:], low + 1.0)], 0)


def _square_box(mask: tf.Tensor, margin: float, box_jitter: float,
                seed: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
    """The (jittered) lesion box as float32 and its square's side: the box's longer side
    enlarged by `margin` per side. box_jitter > 0 first moves the box's edges (`jitter_box`)."""
    box = tf.cast(lesion_box(mask), tf.float32)
    if box_jitter:
        box = jitter_box(box, box_jitter, seed)
    extent = tf.maximum(box[2] - box[0], box[3] - box[1])
    return box, tf.math.ceil(extent * (1.0 + 2.0 * margin))


def _lesion_square(mask: tf.Tensor, margin: float, box_jitter: float = 0.0,
                   seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(top, left, side) of the square around the lesion box, enlarged by `margin` per side,
    centred on the box (it may leave the image)."""
    box, side = _square_box(mask, margin, box_jitter, seed)
    top = tf.floor((box[0] + box[2] - side) / 2.0)
    left = tf.floor((box[1] + box[3] - side) / 2.0)
    return tf.cast(top, tf.int32), tf.cast(left, tf.int32), tf.cast(side, tf.int32)


def _in_frame(box: tf.Tensor, side: tf.Tensor, h: tf.Tensor, w: tf.Tensor) -> list[tf.Tensor]:
    """[top, left, height, width] int32: the square of `side` around the box, capped at the
    image's shorter side unless the box itself is longer, clipped to the image on each axis
    and shifted inside it."""
    h, w = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    extent = tf.maximum(box[2] - box[0], box[3] - box[1])
    side = tf.minimum(side, tf.maximum(tf.minimum(h, w), extent))
    height, width = tf.minimum(side, h), tf.minimum(side, w)
    top = tf.clip_by_value(tf.floor((box[0] + box[2] - height) / 2.0), 0.0, h - height)
    left = tf.clip_by_value(tf.floor((box[1] + box[3] - width) / 2.0), 0.0, w - width)
    return [tf.cast(v, tf.int32) for v in (top, left, height, width)]


def crop_lesion(image: tf.Tensor, mask: tf.Tensor, output_size: int = CLASSIFIER_INPUT_SIZE,
                margin: float = 0.1, box_jitter: float = 0.0,
                seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """The masked lesion view and the resampled 0/1 mask it was multiplied with
    ([S, S, 3] and [S, S] uint8); shape features of the baseline read the second."""
    keep = _binary(mask, image)
    top, left, side = _lesion_square(keep, margin, box_jitter, seed)
    return _resample(image, keep, top, left, side, side, output_size)


def mask_lesion(image: tf.Tensor, mask: tf.Tensor, output_size: int = CLASSIFIER_INPUT_SIZE,
                margin: float = 0.1, box_jitter: float = 0.0, seed: tf.Tensor | None = None) -> tf.Tensor:
    """uint8 [S, S, 3]: the lesion on black, centred in a square crop (see module docstring)."""
    return crop_lesion(image, mask, output_size, margin, box_jitter, seed)[0]


def context_view(image: tf.Tensor, mask: tf.Tensor, output_size: int = CLASSIFIER_INPUT_SIZE,
                 margin: float = 0.5, box_jitter: float = 0.0, seed: tf.Tensor | None = None) -> tf.Tensor:
    """uint8 [S, S, 3]: the lesion's square (box + margin per side) kept inside the image, every
    pixel kept, never black padding (see module docstring). No lesion: the whole frame."""
    keep = _binary(mask, image)
    box, side = _square_box(keep, margin, box_jitter, seed)
    shape = tf.shape(image)
    top, left, height, width = _in_frame(box, side, shape[0], shape[1])
    return _resample(image, tf.ones_like(keep), top, left, height, width, output_size)[0]


def whole_frame(image: tf.Tensor, mask: tf.Tensor | None = None, output_size: int = CLASSIFIER_INPUT_SIZE,
                margin: float = 0.1, box_jitter: float = 0.0, seed: tf.Tensor | None = None) -> tf.Tensor:
    """uint8 [S, S, 3]: the whole image, centred and padded black to a square; ignores the mask."""
    del mask, margin, box_jitter, seed
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.maximum(h, w)
    keep = tf.ones([h, w], tf.uint8)
    return _resample(image, keep, (h - side) // 2, (w - side) // 2, side, side, output_size)[0]


def skin_only(image: tf.Tensor, mask: tf.Tensor, output_size: int = CLASSIFIER_INPUT_SIZE,
              margin: float = 0.1, box_jitter: float = 0.0, seed: tf.Tensor | None = None) -> tf.Tensor:
    """uint8 [S, S, 3]: the whole frame with the lesion view's square blacked out."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    top, left, side = _lesion_square(_binary(mask, image), margin, box_jitter, seed)
    rows = tf.logical_and(tf.range(h) >= top, tf.range(h) < top + side)
    cols = tf.logical_and(tf.range(w) >= left, tf.range(w) < left + side)
    hidden = tf.logical_and(rows[:, None], cols[None, :])
    keep = tf.cast(tf.logical_not(hidden), tf.uint8)
    frame = tf.maximum(h, w)
    return _resample(image, keep, (h - frame) // 2, (w - frame) // 2, frame, frame, output_size)[0]


def view_fn(view: str) -> Callable[..., tf.Tensor]:
    """The function for a view name in VIEWS: (image, mask, output_size, margin, box_jitter=0,
    seed=None) -> uint8 image."""
    views = {"lesion": mask_lesion, "context": context_view, "whole": whole_frame, "skin": skin_only}
    if view not in views:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    return views[view]
