"""An encoded image's size read from its header, in graph, before any pixel is decoded.

The segmenter refuses an image over `contract.MAX_IMAGE_PIXELS` on this size alone, so a valid
but huge image (a 25000x25000 PNG is 625 megapixels: 1.9 GB as RGB) never reaches the decoder.
Without the check TensorFlow's PNG decoder itself refuses it ("PNG size too large for int"),
indistinguishable for the client from a corrupt file, and a JPEG of 20000x20000 would decode.
"""

from __future__ import annotations

import tensorflow as tf

_HEAD = 32  # bytes read: enough for the PNG, BMP and GIF size fields
_PNG_SIGNATURE = (137, 80, 78, 71, 13, 10, 26, 10)


def _unsigned(head: tf.Tensor, offset: int, width: int, big_endian: bool) -> tf.Tensor:
    digits = [head[offset + k] for k in range(width)]
    value = tf.constant(0, tf.int64)
    for digit in (digits if big_endian else digits[::-1]):
        value = value * 256 + digit
    return value


def encoded_image_size(data: tf.Tensor) -> tf.Tensor:
    """int64 (height, width) of a JPEG, PNG, BMP or GIF from its header; (0, 0) for anything
    else. A corrupt JPEG header raises (as decoding it would)."""
    padded = tf.strings.join([data, tf.constant(b"\0" * _HEAD)])
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, _HEAD), tf.uint8), tf.int64)

    def png():  # IHDR: width, height as big-endian 32-bit at 16 and 20
        return tf.stack([_unsigned(head, 20, 4, True), _unsigned(head, 16, 4, True)])

    def bmp():  # BITMAPINFOHEADER: width, height as little-endian signed 32-bit at 18 and 22
        height = _unsigned(head, 22, 4, False)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # negative: top-down rows
        return tf.stack([height, _unsigned(head, 18, 4, False)])

    def gif():  # logical screen: width, height as little-endian 16-bit at 6 and 8
        return tf.stack([_unsigned(head, 8, 2, False), _unsigned(head, 6, 2, False)])

    return tf.case([
        (tf.reduce_all(tf.equal(head[:8], tf.constant(_PNG_SIGNATURE, tf.int64))), png),
        (tf.io.is_jpeg(data), lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)),
        (tf.reduce_all(tf.equal(head[:2], tf.constant([66, 77], tf.int64))), bmp),
        (tf.reduce_all(tf.equal(head[:4], tf.constant([71, 73, 70, 56], tf.int64))), gif),
    ], default=lambda: tf.zeros([2], tf.int64))


def header_sizes(images: tf.Tensor) -> tf.Tensor:
    """int64 [N, 2] header sizes of a batch of encoded images; (0, 0) where the header is not
    readable (the decoder then reports the image as not decodable)."""
    n = tf.shape(images)[0]
    probed = (tf.data.Dataset.from_tensor_slices((tf.range(n), images))
              .map(lambda i, data: (i, encoded_image_size(data))).ignore_errors()
              .batch(tf.cast(tf.maximum(n, 1), tf.int64)))
    nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32), tf.zeros([0, 2], tf.int64)))
    index, sizes = probed.concatenate(nothing).take(1).get_single_element()
    return tf.scatter_nd(index[:, None], sizes, tf.stack([n, 2]))
