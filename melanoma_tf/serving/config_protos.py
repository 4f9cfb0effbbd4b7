"""TF Serving's `BatchingParameters` and `MonitoringConfig` message classes.

The `tensorflow-serving-api` wheel ships only the API and model-server config protos,
not `session_bundle_config.proto` (BatchingParameters) nor `monitoring_config.proto`.
When the real generated modules are importable they are used; otherwise the same
messages (same package, names, field numbers and wrapper types as upstream
tensorflow_serving 2.x) are built in a private descriptor pool, so the files passed
to `--batching_parameters_file` / `--monitoring_config_file` parse exactly as the
model server parses them, without clashing with a later import of the real protos.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_PACKAGE = "tensorflow.serving"
_T = descriptor_pb2.FieldDescriptorProto


def _field(msg: descriptor_pb2.DescriptorProto, name: str, number: int, ftype: int,
           type_name: str = "", repeated: bool = False) -> None:
    field = msg.field.add(name=name, number=number, type=ftype)
    field.label = _T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL
    if type_name:
        field.type_name = type_name


def _build_private_classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)

    batching = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package=_PACKAGE, syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    msg = batching.message_type.add(name="BatchingParameters")
    int64 = ".google.protobuf.Int64Value"
    _field(msg, "max_batch_size", 1, _T.TYPE_MESSAGE, int64)
    _field(msg, "batch_timeout_micros", 2, _T.TYPE_MESSAGE, int64)
    _field(msg, "max_enqueued_batches", 3, _T.TYPE_MESSAGE, int64)
    _field(msg, "num_batch_threads", 4, _T.TYPE_MESSAGE, int64)
    _field(msg, "thread_pool_name", 5, _T.TYPE_MESSAGE, ".google.protobuf.StringValue")
    _field(msg, "allowed_batch_sizes", 6, _T.TYPE_INT64, repeated=True)
    _field(msg, "pad_variable_length_inputs", 7, _T.TYPE_BOOL)
    _field(msg, "enable_large_batch_splitting", 8, _T.TYPE_MESSAGE, ".google.protobuf.BoolValue")
    _field(msg, "max_execution_batch_size", 9, _T.TYPE_MESSAGE, int64)
    pool.Add(batching)

    monitoring = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/monitoring_config.proto", package=_PACKAGE,
        syntax="proto3")
    prometheus = monitoring.message_type.add(name="PrometheusConfig")
    _field(prometheus, "enable", 1, _T.TYPE_BOOL)
    _field(prometheus, "path", 2, _T.TYPE_STRING)
    config = monitoring.message_type.add(name="MonitoringConfig")
    _field(config, "prometheus_config", 1, _T.TYPE_MESSAGE, f".{_PACKAGE}.PrometheusConfig")
    pool.Add(monitoring)

    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in ("BatchingParameters", "MonitoringConfig", "PrometheusConfig")
    }


def _load() -> dict[str, Any]:
    classes: dict[str, Any] = {}
    try:
        from tensorflow_serving.servables.tensorflow import session_bundle_config_pb2

        classes["BatchingParameters"] = session_bundle_config_pb2.BatchingParameters
    except ImportError:
        pass
    try:
        from tensorflow_serving.config import monitoring_config_pb2

        classes["MonitoringConfig"] = monitoring_config_pb2.MonitoringConfig
        classes["PrometheusConfig"] = monitoring_config_pb2.PrometheusConfig
    except ImportError:
        pass
    if len(classes) < 3:
        for name, cls in _build_private_classes().items():
            classes.setdefault(name, cls)
    return classes


_CLASSES = _load()
BatchingParameters = _CLASSES["BatchingParameters"]
MonitoringConfig = _CLASSES["MonitoringConfig"]
PrometheusConfig = _CLASSES["PrometheusConfig"]
