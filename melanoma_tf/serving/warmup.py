"""TF Serving warm-up records, written by both exporters.

TF Serving with `--enable_model_warmup` replays `assets.extra/tf_serving_warmup_requests` (a
TFRecord of `PredictionLog`s) when it loads a version, so the first real request does not pay
for graph tracing and kernel set-up. The embedded server replays the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from melanoma_tf import contract, storage

WARMUP_FILE = Path(contract.WARMUP_FILE)


def write_warmup_requests(export_dir: Path | str, model_name: str, inputs: dict[str, np.ndarray],
                          signature: str = "serving_default", repeats: int = 1) -> Path:
    """Writes `repeats` Predict requests with `inputs` into the SavedModel's assets.extra."""
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    path = storage.path(export_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for _ in range(repeats):
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(export_dir: Path | str) -> list[predict_pb2.PredictRequest]:
    path = storage.path(export_dir) / WARMUP_FILE
    if not path.is_file():
        return []
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request
            for r in tf.data.TFRecordDataset(str(path))]
