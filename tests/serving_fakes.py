"""Stand-in SavedModels with exactly the serving signatures of the real exports.

The serving tests must not depend on trained models, so these tiny `tf.Module`s
implement the contract with simple image arithmetic:

* segmenter: decode (JPEG/PNG, else status 2), lesion = pixels darker than
  `DARK_THRESHOLD`, box/score from the mask, masked image = lesion pixels resized to
  227x227 (status 1 and all-black when nothing is dark); masks are zero-padded to the
  largest image of the batch, top-left aligned.
* classifier: melanoma probability = mean intensity of the masked image / 255 (plus an
  optional `bias`, used to tell versions apart).

Both write `assets.extra/tf_serving_warmup_requests` like the real exporters.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from melanoma_tf import contract
from melanoma_tf.serving import image_header

SEGMENTER = "lesion_segmenter"
CLASSIFIER = "melanoma_classifier"
MASKED_SIZE = 227
DARK_THRESHOLD = 100.0
STATUS_OK, STATUS_NO_LESION, STATUS_BAD_IMAGE = 0, 1, 2
SEGMENTER_OUTPUTS = ("lesion_mask", "image_size", "lesion_box", "lesion_score", "masked_image",
                     "status")

_ONE_MASK = (tf.TensorSpec([None, None], tf.uint8), tf.TensorSpec([4], tf.float32),
             tf.TensorSpec([], tf.float32), tf.TensorSpec([MASKED_SIZE, MASKED_SIZE, 3], tf.uint8),
             tf.TensorSpec([], tf.int32))


def _segment_image(image: tf.Tensor):
    """Mask, box, score, 227x227 masked image and status for one HxWx3 uint8 image."""
    gray = tf.reduce_mean(tf.cast(image, tf.float32), axis=-1)
    lesion = gray < DARK_THRESHOLD
    mask = tf.cast(lesion, tf.uint8)
    found = tf.reduce_any(lesion)
    rows = tf.cast(tf.where(tf.reduce_any(lesion, axis=1))[:, 0], tf.float32)
    cols = tf.cast(tf.where(tf.reduce_any(lesion, axis=0))[:, 0], tf.float32)
    box = tf.cond(
        found,
        lambda: tf.stack([tf.reduce_min(rows), tf.reduce_min(cols),
                          tf.reduce_max(rows) + 1.0, tf.reduce_max(cols) + 1.0]),
        lambda: tf.zeros([4], tf.float32))
    lesion_f = tf.cast(lesion, tf.float32)
    score = tf.reduce_sum((1.0 - gray / 255.0) * lesion_f) / tf.maximum(tf.reduce_sum(lesion_f), 1.0)
    kept = tf.cast(image, tf.float32) * lesion_f[..., None]
    masked = tf.image.resize(kept, [MASKED_SIZE, MASKED_SIZE], method="bilinear")
    masked = tf.cast(tf.clip_by_value(tf.round(masked), 0.0, 255.0), tf.uint8)
    status = tf.where(found, STATUS_OK, STATUS_NO_LESION)
    return mask, box, score, masked, tf.cast(status, tf.int32)


def _empty_result(height: tf.Tensor, width: tf.Tensor):
    return (tf.zeros([height, width], tf.uint8), tf.zeros([4], tf.float32), tf.constant(0.0),
            tf.zeros([MASKED_SIZE, MASKED_SIZE, 3], tf.uint8), tf.constant(STATUS_BAD_IMAGE))


def _decode(data: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _outputs(masks, sizes, boxes, scores, masked, status) -> dict[str, tf.Tensor]:
    return {"lesion_mask": masks, "image_size": sizes, "lesion_box": boxes,
            "lesion_score": scores, "masked_image": masked, "status": status}


class StandInSegmenter(tf.Module):
    """The lesion_segmenter contract: `serving_default` and `serving_image_tensor`."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        is_jpeg = tf.strings.substr(image_bytes, 0, 3) == b"\xff\xd8\xff"
        is_png = tf.strings.substr(image_bytes, 0, 8) == b"\x89PNG\r\n\x1a\n"
        header = tf.cast(image_header.header_sizes(image_bytes), tf.int32)  # as the real export
        too_large = tf.reduce_prod(tf.cast(header, tf.int64), axis=-1) > contract.MAX_IMAGE_PIXELS
        has_size = tf.reduce_min(header, axis=-1) > 0  # a file cut before its size cannot decode
        valid = tf.logical_or(is_jpeg, is_png) & has_size & tf.logical_not(too_large)

        def size_of(args):
            data, ok = args
            return tf.cond(ok, lambda: tf.shape(_decode(data))[:2], lambda: tf.zeros([2], tf.int32))

        decoded_sizes = tf.map_fn(size_of, (image_bytes, valid), fn_output_signature=tf.int32)
        sizes = tf.where(too_large[:, None], header, decoded_sizes)
        # Masks pad to the decoded images only: a too-large image's header size must not size them.
        max_hw = tf.reduce_max(tf.concat([decoded_sizes, tf.zeros([1, 2], tf.int32)], axis=0), axis=0)

        def segment(args):
            data, ok = args

            def good():
                image = _decode(data)
                mask, box, score, masked, status = _segment_image(image)
                hw = tf.shape(mask)
                mask = tf.pad(mask, [[0, max_hw[0] - hw[0]], [0, max_hw[1] - hw[1]]])
                return mask, box, score, masked, status

            return tf.cond(ok, good, lambda: _empty_result(max_hw[0], max_hw[1]))

        masks, boxes, scores, masked, status = tf.map_fn(
            segment, (image_bytes, valid), fn_output_signature=_ONE_MASK)
        status = tf.where(too_large, contract.STATUS_TOO_LARGE, status)
        return _outputs(masks, sizes, boxes, scores, masked, status)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        shape = tf.shape(images)
        empty = tf.logical_or(tf.equal(shape[1], 0), tf.equal(shape[2], 0))

        def segment(image):
            return tf.cond(empty, lambda: _empty_result(shape[1], shape[2]),
                           lambda: _segment_image(image))

        masks, boxes, scores, masked, status = tf.map_fn(
            segment, images, fn_output_signature=_ONE_MASK)
        size = tf.where(empty, tf.zeros([2], tf.int32), shape[1:3])
        sizes = tf.tile(size[None, :], [shape[0], 1])
        return _outputs(masks, sizes, boxes, scores, masked, status)


class StandInClassifier(tf.Module):
    """The melanoma_classifier contract: probability = mean intensity / 255 (+ bias), called
    melanoma at `threshold` (the operating point a trained export carries)."""

    def __init__(self, bias: float = 0.0, threshold: float = 0.5) -> None:
        super().__init__()
        self.bias = tf.constant(bias, tf.float32)
        self.threshold = tf.constant(threshold, tf.float32)

    @tf.function(input_signature=[
        tf.TensorSpec([None, MASKED_SIZE, MASKED_SIZE, 3], tf.uint8, name="masked_image")])
    def serve(self, masked_image: tf.Tensor) -> dict[str, tf.Tensor]:
        mean = tf.reduce_mean(tf.cast(masked_image, tf.float32), axis=[1, 2, 3]) / 255.0
        probability = tf.clip_by_value(mean + self.bias, 0.0, 1.0)
        return {"melanoma_probability": probability,
                "probabilities": tf.stack([1.0 - probability, probability], axis=-1),
                "class_id": tf.cast(probability >= self.threshold, tf.int32),
                "threshold": tf.fill(tf.shape(probability), self.threshold)}


def write_warmup(path: Path, model_name: str, inputs: dict[str, tf.Tensor],
                 signature: str = "serving_default") -> None:
    """assets.extra/tf_serving_warmup_requests, as TF Serving's warm-up expects."""
    target = Path(path) / "assets.extra"
    target.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target / "tf_serving_warmup_requests")) as writer:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        entry = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request))
        writer.write(entry.SerializeToString())


def build_segmenter(path: str | os.PathLike, warmup: bool = True) -> Path:
    """Save the stand-in segmenter SavedModel at `path` (a version folder)."""
    path = Path(path)
    module = StandInSegmenter()
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.serve_bytes.get_concrete_function(),
        "serving_image_tensor": module.serve_images.get_concrete_function()})
    if warmup:
        write_warmup(path, SEGMENTER,
                     {"image_bytes": np.array([encode_png(lesion_image(16, 16, seed=0))], object)})
    return path


def build_classifier(path: str | os.PathLike, bias: float = 0.0, warmup: bool = True,
                     threshold: float = 0.5) -> Path:
    """Save the stand-in classifier SavedModel at `path` (a version folder)."""
    path = Path(path)
    module = StandInClassifier(bias, threshold)
    tf.saved_model.save(module, str(path),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    if warmup:
        write_warmup(path, CLASSIFIER,
                     {"masked_image": np.zeros([1, MASKED_SIZE, MASKED_SIZE, 3], np.uint8)})
    return path


_BUILT: dict[str, Path] = {}


def stand_in_exports() -> Path:
    """A base dir with lesion_segmenter/1 and melanoma_classifier/1, built once per process.

    Treat it as read-only; use `copy_exports` for a tree a test may modify.
    """
    if "base" not in _BUILT:
        base = Path(tempfile.mkdtemp(prefix="melanoma_stand_in_"))
        atexit.register(shutil.rmtree, base, True)
        build_segmenter(base / SEGMENTER / "1")
        build_classifier(base / CLASSIFIER / "1")
        _BUILT["base"] = base
    return _BUILT["base"]


def copy_exports(destination: str | os.PathLike) -> Path:
    """A private, writable copy of the stand-in exports."""
    destination = Path(destination)
    shutil.copytree(stand_in_exports(), destination, dirs_exist_ok=True)
    return destination


def lesion_image(height: int = 64, width: int = 64, seed: int = 0, lesion: bool = True) -> np.ndarray:
    """Light 'skin' with (optionally) one dark elliptical 'lesion': uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    image = rng.integers(185, 235, size=(height, width, 3), dtype=np.uint8)
    if lesion:
        cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
        ry, rx = rng.uniform(0.12, 0.3) * height, rng.uniform(0.12, 0.3) * width
        yy, xx = np.mgrid[:height, :width]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        colour = rng.integers(20, 90, size=3)
        image[inside] = np.clip(colour + rng.integers(-10, 10, size=(inside.sum(), 3)), 0, 255)
    return image


def chain_in_process(segmenter, classifier, data: bytes) -> dict:
    """What the client should return for `data`: the two loaded SavedModels chained in-process
    (the classifier runs on the segmenter's masked image whatever its status)."""
    out = segmenter.signatures["serving_default"](image_bytes=tf.constant([data]))
    height, width = out["image_size"].numpy()[0]
    probability = classifier.signatures["serving_default"](
        masked_image=out["masked_image"])["melanoma_probability"].numpy()[0]
    return {"mask": out["lesion_mask"].numpy()[0, :height, :width],
            "box": out["lesion_box"].numpy()[0], "score": out["lesion_score"].numpy()[0],
            "probability": probability, "status": int(out["status"].numpy()[0])}


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_images(directory: str | os.PathLike, count: int, size: int = 48,
                 fmt: str = "png") -> list[Path]:
    """`count` synthetic lesion images named img_000.png, ... in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = lesion_image(size, size + index % 5, seed=index)
        path = directory / f"img_{index:03d}.{fmt}"
        path.write_bytes(encode_png(image) if fmt == "png" else encode_jpeg(image))
        paths.append(path)
    return paths


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def labelled_config(exports: Path):
    """A ModelServerConfig for `exports`: the segmenter's latest version, and every classifier
    version with labels stable -> 1 and canary -> 2."""
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    segmenter = config.model_config_list.config.add(
        name=SEGMENTER, base_path=str(exports / SEGMENTER), model_platform="tensorflow")
    segmenter.model_version_policy.latest.num_versions = 1
    classifier = config.model_config_list.config.add(
        name=CLASSIFIER, base_path=str(exports / CLASSIFIER), model_platform="tensorflow")
    classifier.model_version_policy.all.SetInParent()
    classifier.version_labels["stable"] = 1
    classifier.version_labels["canary"] = 2
    return config
