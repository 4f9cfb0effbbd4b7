"""One loaded SavedModel version: request validation, execution, warm-up.

Validation follows TF Serving's predict_util: a missing signature is
FAILED_PRECONDITION ('Serving signature key "x" not found.'), a wrong input key, dtype
or shape is INVALID_ARGUMENT.  The SignatureDefs returned by GetModelMetadata are read
from `saved_model.pb` itself, exactly what TF Serving returns.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from melanoma_tf.serving import warmup
from melanoma_tf.serving.batching import BatchQueue, SharedBatchScheduler
from melanoma_tf.serving.errors import failed_precondition, invalid_argument, reply_too_large

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = str(warmup.WARMUP_FILE)
MAX_WARMUP_RECORDS = 1000


def read_signature_defs(path: str) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of the `serve` MetaGraph, as stored in saved_model.pb."""
    saved_model = saved_model_pb2.SavedModel()
    binary = os.path.join(path, "saved_model.pb")
    if tf.io.gfile.exists(binary):  # tf.io.gfile: a folder or a bucket, as TF Serving reads
        with tf.io.gfile.GFile(binary, "rb") as handle:
            saved_model.ParseFromString(handle.read())
    else:
        with tf.io.gfile.GFile(os.path.join(path, "saved_model.pbtxt")) as handle:
            text_format.Parse(handle.read(), saved_model)
    graphs = list(saved_model.meta_graphs)
    serve = [g for g in graphs if "serve" in g.meta_info_def.tags] or graphs
    if not serve:
        return {}
    return {key: value for key, value in serve[0].signature_def.items()}


def _dtype_name(enum_value: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum_value).name
    except TypeError:
        return f"dtype enum {enum_value}"


def _sorted_keys(keys: Any) -> str:
    return ",".join(sorted(keys))


class Servable:
    """A SavedModel version loaded with `tf.saved_model.load`, ready to serve."""

    def __init__(self, name: str, version: int, path: str,
                 scheduler: SharedBatchScheduler | None = None) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.signature_defs = read_signature_defs(path)
        self._model = tf.saved_model.load(path)
        self._functions = dict(self._model.signatures)
        self._input_specs = {key: fn.structured_input_signature[1]
                             for key, fn in self._functions.items()}
        self._output_keys = {key: set(fn.structured_outputs) for key, fn in self._functions.items()}
        # The least bytes each output takes per instance: its known dimensions (unknown: 1).
        self._bytes_per_instance = {
            key: {alias: int(np.prod([d or 1 for d in spec.shape.as_list()[1:]] if spec.shape.rank else []))
                  * (spec.dtype.size if spec.dtype != tf.string else 1)
                  for alias, spec in fn.structured_outputs.items()}
            for key, fn in self._functions.items()}
        self._scheduler = scheduler
        self._queues: dict[str, BatchQueue] = {}
        self._queues_lock = threading.Lock()

    def predict(self, request: predict_pb2.PredictRequest, batched: bool = True,
                max_reply_bytes: int | None = None) -> predict_pb2.PredictResponse:
        """Validate and run one PredictRequest (through the batcher when enabled). A reply
        over `max_reply_bytes` is refused: before running when the outputs' fixed shapes already
        exceed it (one byte per instance can ask for a 227x227x3 image), else before it is copied
        into the response."""
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature not in self._functions:
            raise failed_precondition(f'Serving signature key "{signature}" not found.')
        inputs = self._parse_inputs(signature, request)
        wanted = self._output_aliases(signature, request)
        if max_reply_bytes is not None:
            instances = max((a.shape[0] for a in inputs.values() if a.ndim), default=1)
            least = instances * sum(self._bytes_per_instance[signature][alias] for alias in wanted)
            if least > max_reply_bytes:
                raise reply_too_large(least, max_reply_bytes)
        if batched and self._scheduler is not None:
            outputs = self._queue(signature).run(inputs)
        else:
            outputs = self.run(signature, inputs)
        if max_reply_bytes is not None:
            size = sum(outputs[alias].nbytes for alias in wanted)
            if size > max_reply_bytes:
                raise reply_too_large(size, max_reply_bytes)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature
        for alias in wanted:
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias]))
        return response

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call the concrete signature function with keyword tensors."""
        specs = self._input_specs[signature]
        tensors = {name: tf.constant(arr, dtype=specs[name].dtype) for name, arr in inputs.items()}
        outputs = self._functions[signature](**tensors)
        return {name: value.numpy() for name, value in outputs.items()}

    def warmup(self) -> int:
        """Replay assets.extra/tf_serving_warmup_requests like `--enable_model_warmup`."""
        path = os.path.join(self.path, WARMUP_FILE)
        if not tf.io.gfile.exists(path):
            return 0
        replayed = 0
        for record in tf.data.TFRecordDataset(path):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if entry.WhichOneof("log_type") != "predict_log":
                log.warning("%s v%d: skipping unsupported warm-up record %s", self.name,
                            self.version, entry.WhichOneof("log_type"))
                continue
            self.predict(entry.predict_log.request, batched=False)
            replayed += 1
            if replayed >= MAX_WARMUP_RECORDS:
                break
        return replayed

    def close(self) -> None:
        """Let queued batches finish; later requests holding this servable run unbatched."""
        with self._queues_lock:
            for batch_queue in self._queues.values():
                batch_queue.close()

    def batching_stats(self) -> dict[str, dict[str, Any]]:
        with self._queues_lock:
            return {signature: q.stats() for signature, q in self._queues.items()}

    def _queue(self, signature: str) -> BatchQueue:
        with self._queues_lock:
            if signature not in self._queues:
                assert self._scheduler is not None
                self._queues[signature] = self._scheduler.queue(
                    f"{self.name}/{self.version}/{signature}",
                    lambda inputs, sig=signature: self.run(sig, inputs))
            return self._queues[signature]

    def _parse_inputs(self, signature: str,
                      request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
        specs = self._input_specs[signature]
        sent, expected = set(request.inputs), set(specs)
        if len(sent) != len(expected):
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{_sorted_keys(sent)}}}) != len({{{_sorted_keys(expected)}}}). "
                f"Sent extra: {{{_sorted_keys(sent - expected)}}}. "
                f"Missing but required: {{{_sorted_keys(expected - sent)}}}.")
        arrays = {}
        for alias, proto in request.inputs.items():
            if alias not in specs:
                raise invalid_argument(
                    f"input tensor alias not found in signature: {alias}. "
                    f"Inputs expected to be in the set {{{_sorted_keys(expected)}}}.")
            spec = specs[alias]
            if proto.dtype != spec.dtype.as_datatype_enum:
                raise invalid_argument(
                    f'input "{alias}" of signature "{signature}" must be {spec.dtype.name} '
                    f"but {_dtype_name(proto.dtype)} was provided")
            try:
                arr = tf.make_ndarray(proto)
            except Exception as exc:
                raise invalid_argument(f"tensor parsing error: {alias} ({exc})") from exc
            if not spec.shape.is_compatible_with(arr.shape):
                expected_shape = spec.shape.as_list() if spec.shape.rank is not None else "any"
                raise invalid_argument(
                    f'input "{alias}" of signature "{signature}" has shape {list(arr.shape)} '
                    f"but the signature expects {expected_shape} (None = any size)")
            arrays[alias] = arr
        return arrays

    def _output_aliases(self, signature: str, request: predict_pb2.PredictRequest) -> list[str]:
        available = self._output_keys[signature]
        if not request.output_filter:
            return sorted(available)
        seen: list[str] = []
        for alias in request.output_filter:
            if alias not in available:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {alias} Outputs expected "
                    f"to be in the set {{{_sorted_keys(available)}}}.")
            if alias in seen:
                raise invalid_argument(f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return seen
