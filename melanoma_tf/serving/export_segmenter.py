"""Exports the lesion segmenter: Model Garden's detection export module, finished in graph.

`serving_default` takes a batch of encoded images (JPEG/PNG/BMP/GIF bytes, any sizes) and returns
what the classifier and a client need, so a client does no image processing of its own:

    lesion_mask   uint8 [N, Hmax, Wmax]  0/1 at full image resolution, zero-padded to the largest
                                         image of the batch (crop each to its image_size)
    image_size    int32 [N, 2]           (height, width); (0, 0) when the image was not decodable
    lesion_box    float32 [N, 4]         (ymin, xmin, ymax, xmax) in image pixels
    lesion_score  float32 [N]
    masked_image  uint8 [N, S, S, 3]     the classifier's input: the view of the image and its mask
                                         that the classifier trained on (`masking.view_fn`; the
                                         paper's masked lesion, or the lesion in its context)
    status        int32 [N]              0 ok, 1 no lesion found, 2 not a decodable image,
                                         3 larger than contract.MAX_IMAGE_PIXELS (not decoded)

A bad image (not an image, empty bytes, zero size) gets status 2 and zeros; the rest of the batch
is served. An image whose header says it has more than MAX_IMAGE_PIXELS pixels is never decoded:
status 3, its header's size in `image_size`, zeros elsewhere (`serving.image_header`).
 `serving_image_tensor` takes uint8 [N, H, W, 3] and returns the same. The final mask
is the highest-scoring instance pasted at full resolution (no merging: one lesion per image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from official.core import config_definitions as cfg
from official.core import exp_factory, export_base
from official.modeling import hyperparams
from official.vision.ops import spatial_transform_ops
from official.vision.serving import detection

from melanoma_tf import atomic, contract, masking, storage
from melanoma_tf.configs import segmentation as seg_cfg  # noqa: F401  (registers configs)
from melanoma_tf.serving import image_header, versions, warmup

MODEL_NAME = contract.SEGMENTER
MASK_THRESHOLD = 0.5


class LesionSegmenterModule(detection.DetectionModule):
    """Detection module whose signatures return the final lesion mask and the masked image."""

    def __init__(self, params: cfg.ExperimentConfig, **kwargs):
        kwargs.setdefault("input_image_size", params.task.model.input_size[:2])
        super().__init__(params, batch_size=None, **kwargs)
        self._classifier_size = params.task.classifier_input_size
        self._view = masking.view_fn(params.task.classifier_view)
        self._margin = params.task.classifier_margin

    def _run_model(self, images: tf.Tensor, sizes: tf.Tensor) -> dict[str, tf.Tensor]:
        """Detections for k decoded images, zero-padded to [k, Hmax, Wmax, 3] with true `sizes`."""
        def prepare(args):
            image, size = args
            model_input, _, image_info = self._build_inputs(image[:size[0], :size[1]])
            return model_input, image_info

        model_inputs, image_info = tf.map_fn(
            prepare, (images, sizes),
            fn_output_signature=(tf.TensorSpec(self._padded_size + [3], tf.float32),
                                 tf.TensorSpec([4, 2], tf.float32)))
        k = tf.shape(images)[0]
        anchors = {level: tf.tile(boxes[None], [k, 1, 1, 1])
                   for level, boxes in self._build_anchor_boxes().items()}
        detections = self.model.call(images=model_inputs, image_shape=image_info[:, 1, :],
                                     anchor_boxes=anchors, training=False)
        # Boxes come in the resized input's pixels; bring them back to the image's.
        detections["detection_boxes"] /= tf.tile(image_info[:, 2:3, :], [1, 1, 2])
        return detections

    def _finish(self, images: tf.Tensor, sizes: tf.Tensor) -> dict[str, tf.Tensor]:
        """Final mask, box, score and masked image of each image (k >= 1 decoded images)."""
        det = self._run_model(images, sizes)
        canvas = tf.shape(images)[1:3]

        def one(args):
            image, size, boxes, scores, masks, n = args
            found = n > 0
            best = tf.argmax(tf.where(tf.range(tf.shape(scores)[0]) < n, scores, -1.0), output_type=tf.int32)
            box = tf.where(found, boxes[best], tf.zeros([4]))
            pasted = spatial_transform_ops.bilinear_resize_to_bbox(
                masks[best][None, :, :, None], box[None], canvas)[0, :, :, 0]
            inside = (tf.range(canvas[0])[:, None] < size[0]) & (tf.range(canvas[1])[None, :] < size[1])
            mask = tf.cast((pasted > MASK_THRESHOLD) & inside & found, tf.uint8)
            masked = self._view(image[:size[0], :size[1]], mask[:size[0], :size[1]], self._classifier_size,
                                self._margin)
            status = tf.where(tf.reduce_any(mask > 0), contract.STATUS_OK, contract.STATUS_NO_LESION)
            score = tf.where(found, scores[best], 0.0)
            return mask, box, score, masked, status

        s = self._classifier_size
        mask, box, score, masked, status = tf.map_fn(
            one, (images, sizes, det["detection_boxes"], det["detection_scores"],
                  det["detection_masks"], tf.cast(det["num_detections"], tf.int32)),
            fn_output_signature=(tf.TensorSpec([None, None], tf.uint8), tf.TensorSpec([4], tf.float32),
                                 tf.TensorSpec([], tf.float32), tf.TensorSpec([s, s, 3], tf.uint8),
                                 tf.TensorSpec([], tf.int32)))
        return {"lesion_mask": mask, "image_size": sizes, "lesion_box": box, "lesion_score": score,
                "masked_image": masked, "status": status}

    def _serve_decoded(self, index: tf.Tensor, images: tf.Tensor, sizes: tf.Tensor,
                       n: tf.Tensor) -> dict[str, tf.Tensor]:
        """Runs the k decoded images and scatters their outputs to their places among n."""
        k = tf.shape(index)[0]
        s = self._classifier_size
        empty = {"lesion_mask": tf.zeros([0, 1, 1], tf.uint8), "image_size": tf.zeros([0, 2], tf.int32),
                 "lesion_box": tf.zeros([0, 4]), "lesion_score": tf.zeros([0]),
                 "masked_image": tf.zeros([0, s, s, 3], tf.uint8), "status": tf.zeros([0], tf.int32)}
        out = tf.cond(k > 0, lambda: self._finish(images, sizes), lambda: empty)
        where = index[:, None]
        result = {key: tf.scatter_nd(where, value, tf.concat([[n], tf.shape(value)[1:]], 0))
                  for key, value in out.items()}
        failed = tf.scatter_nd(where, tf.ones([k], tf.int32), [n]) == 0
        result["status"] = tf.where(failed, contract.STATUS_BAD_IMAGE, result["status"])
        return result

    @tf.function
    def inference_from_image_bytes(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        n = tf.shape(inputs)[0]
        header = image_header.header_sizes(inputs)
        too_large = tf.reduce_prod(header, axis=-1) > contract.MAX_IMAGE_PIXELS

        def decode(i, data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            size = tf.shape(image)[:2]
            tf.debugging.assert_positive(tf.reduce_min(size), "image has zero size")
            return i, image, size

        # tf.data's ignore_errors is the graph's try/except: an undecodable image drops out.
        decoded = (tf.data.Dataset.from_tensor_slices((tf.range(n), inputs))
                   .filter(lambda i, data: tf.logical_not(too_large[i])).map(decode).ignore_errors()
                   .padded_batch(tf.cast(tf.maximum(n, 1), tf.int64)))
        nothing = tf.data.Dataset.from_tensors(
            (tf.zeros([0], tf.int32), tf.zeros([0, 1, 1, 3], tf.uint8), tf.zeros([0, 2], tf.int32)))
        index, images, sizes = decoded.concatenate(nothing).take(1).get_single_element()
        result = self._serve_decoded(index, images, sizes, n)
        result["status"] = tf.where(too_large, contract.STATUS_TOO_LARGE, result["status"])
        result["image_size"] = tf.where(too_large[:, None], tf.cast(header, tf.int32), result["image_size"])
        return result

    @tf.function
    def inference_from_image_tensors(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        n = tf.shape(inputs)[0]
        sizes = tf.tile(tf.shape(inputs)[1:3][None], [n, 1])
        return self._serve_decoded(tf.range(n), inputs, sizes, n)

    def get_inference_signatures(self, function_keys: dict[str, str]):
        specs = {"image_bytes": tf.TensorSpec([None], tf.string, name="image_bytes"),
                 "image_tensor": tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")}
        fns = {"image_bytes": self.inference_from_image_bytes,
               "image_tensor": self.inference_from_image_tensors}
        return {name: fns[key].get_concrete_function(specs[key]) for key, name in function_keys.items()}


SIGNATURES = {"image_bytes": contract.BYTES_SIGNATURE, "image_tensor": contract.ARRAY_SIGNATURE}


def _warmup_image(size: int = 128) -> bytes:
    from melanoma_tf.data import synthetic

    rgb, _ = synthetic.render_lesion(np.random.default_rng(0), melanoma=False, height=size, width=size)
    return tf.io.encode_jpeg(rgb).numpy()


CLASSIFIER_INPUT_FILE = "assets.extra/classifier_input.json"


def export(model_dir: Path | str, export_dir: Path | str, checkpoint: str | None = None,
           classifier_dir: Path | str | None = None) -> Path:
    """Writes a SavedModel of the checkpoint (default: latest in model_dir) to `export_dir`
    (a numeric version folder), atomically, with TF Serving warm-up requests. classifier_dir: a
    classifier run whose view and margin `masked_image` then computes (default: the segmenter
    config's `classifier_view` and `classifier_margin`); assets.extra/classifier_input.json
    says which."""
    model_dir, export_dir = storage.path(model_dir), storage.path(export_dir)
    with versions.writing_version(export_dir) as tmp:
        params = read_params(model_dir)
        if classifier_dir is not None:
            params = with_classifier_input(params, classifier_dir)
        checkpoint = checkpoint or tf.train.latest_checkpoint(str(model_dir))
        if checkpoint is None:
            raise FileNotFoundError(f"{model_dir}: no checkpoint to export")
        export_base.export(LesionSegmenterModule(params), function_keys=SIGNATURES,
                           export_savedmodel_dir=str(tmp), checkpoint_path=checkpoint, timestamped=False)
        warmup.write_warmup_requests(tmp, MODEL_NAME, {"image_bytes": np.array([_warmup_image()])})
        t = params.task
        atomic.write_json(tmp / CLASSIFIER_INPUT_FILE, {
            "view": t.classifier_view, "margin": t.classifier_margin, "size": t.classifier_input_size})
    return export_dir


def with_classifier_input(params: cfg.ExperimentConfig, classifier_dir: Path | str) -> cfg.ExperimentConfig:
    """The segmenter params with the view and margin of the classifier run in classifier_dir."""
    from melanoma_tf.configs import classification as cls_cfg

    data = cls_cfg.load_config(storage.path(classifier_dir) / "params.yaml").data
    return params.replace(task={"classifier_view": data.view, "classifier_margin": data.margin})


def read_params(model_dir: Path) -> cfg.ExperimentConfig:
    params_file = model_dir / "params.yaml"
    if not params_file.is_file():
        raise FileNotFoundError(f"{params_file}: missing; was {model_dir} made by `train --stage seg`?")
    params = exp_factory.get_exp_config(seg_cfg.PAPER_EXPERIMENT)
    return hyperparams.override_params_dict(params, str(params_file), is_strict=True)
