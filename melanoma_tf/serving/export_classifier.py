"""Exports the trained classifier as a TF Serving SavedModel version folder.

The serving contract (the gRPC client is built against exactly these names):

    signature 'serving_default'
      input   masked_image          uint8   [None, S, S, 3]   (S = data.input_size, 227 for the paper)
      outputs melanoma_probability  float32 [None]
              probabilities         float32 [None, 2]          (nevus, melanoma)
              class_id              int32   [None]             (1 = melanoma, at probability >= 0.5)

Input must already be masked the training way (`melanoma_tf.masking.mask_lesion`); the
segmentation exporter does that in graph. The signature's TensorSpec rejects other shapes and
dtypes. The export module follows Model Garden's `export_base.ExportModule`; the exported network
is the trained one without its augmentation layers (identities at inference anyway).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf
from official.core import export_base
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from melanoma_tf.configs import classification as configs
from melanoma_tf.modeling import alexnet as alexnet_lib
from melanoma_tf.serving import model_registry
from melanoma_tf.tasks import melanoma_classification as task

SIGNATURE = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
DECISION_THRESHOLD = 0.5


def _inference_step(masked_image: tf.Tensor, model: keras.Model) -> tf.Tensor:
    return model(masked_image, training=False)


class ClassifierModule(export_base.ExportModule):
    """uint8 masked lesions in; melanoma probability, both class probabilities and class id out."""

    def __init__(self, params: configs.ClassificationExperiment, model: keras.Model):
        super().__init__(params, model, inference_step=_inference_step)
        self.input_size = params.data.input_size

    def serve(self, masked_image: tf.Tensor) -> Mapping[str, tf.Tensor]:
        # A loaded signature checks the dtype but not the shape; say which input is wrong.
        masked_image = tf.ensure_shape(masked_image, [None, self.input_size, self.input_size, 3],
                                       name=alexnet_lib.INPUT_NAME)
        probabilities = tf.cast(self.inference_step(masked_image), tf.float32)
        melanoma = probabilities[:, alexnet_lib.CLASS_NAMES.index("melanoma")]
        return {"melanoma_probability": melanoma, "probabilities": probabilities,
                "class_id": tf.cast(melanoma >= DECISION_THRESHOLD, tf.int32)}

    def get_inference_signatures(self, function_keys: Mapping[str, str]) -> dict:
        spec = tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.uint8,
                             name=alexnet_lib.INPUT_NAME)
        serve = tf.function(self.serve, input_signature=[spec])
        return {key: serve.get_concrete_function() for key in function_keys.values()}


def load_trained(model_dir: str | Path, checkpoint: str | Path | None = None
                 ) -> tuple[configs.ClassificationExperiment, keras.Model]:
    """The run's params and its inference network (no augmentation).

    checkpoint: default `final_model.keras`; also any `.keras` model or `.weights.h5` file of the
    run (e.g. `fold_0/best.weights.h5`).
    """
    model_dir = Path(model_dir)
    params = configs.load_config(model_dir / "params.yaml")
    path = Path(checkpoint) if checkpoint else model_dir / "final_model.keras"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained classifier (train it first, or pass --checkpoint)")
    if path.name.endswith(".weights.h5"):
        trained = task.build_model(params, training=True)
        trained.load_weights(str(path))
    else:
        # compile=False: Keras 3.15 cannot rebuild the saved AUC(label_weights) metric, and
        # inference needs no optimizer or metrics anyway.
        trained = keras.models.load_model(path, compile=False)
    return params, alexnet_lib.inference_copy(trained, **task.model_kwargs(params))


def warmup_requests(model_name: str, input_size: int, batch: int = 2) -> list[prediction_log_pb2.PredictionLog]:
    """TF Serving warm-up: one Predict request with a small batch (black and mid-grey images)."""
    images = np.stack([np.full((input_size, input_size, 3), v, np.uint8) for v in np.linspace(0, 128, batch)])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = SIGNATURE
    request.inputs[alexnet_lib.INPUT_NAME].CopyFrom(tf.make_tensor_proto(images))
    return [prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))]


def export(model_dir: str | Path, export_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Writes the SavedModel (+ warm-up requests and the run's params.yaml in assets.extra) into a
    temporary sibling folder and renames it to export_dir, so TF Serving never sees half a version."""
    export_dir = Path(export_dir)
    with model_registry.writing_version(export_dir) as tmp:
        params, model = load_trained(model_dir, checkpoint)
        module = ClassifierModule(params, model)
        export_base.export(module, [SIGNATURE], str(tmp), timestamped=False)
        (tmp / "assets.extra").mkdir(exist_ok=True)
        with tf.io.TFRecordWriter(str(tmp / WARMUP_FILE)) as writer:
            for log in warmup_requests(export_dir.parent.name or "melanoma_classifier", params.data.input_size):
                writer.write(log.SerializeToString())
        shutil.copy(Path(model_dir) / "params.yaml", tmp / "assets.extra" / "params.yaml")
    return export_dir
