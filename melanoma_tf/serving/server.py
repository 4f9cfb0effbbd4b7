"""The embedded server: TF Serving's PredictionService and ModelService over gRPC, and with
`rest_port` its REST API and Prometheus metrics (`serving.rest`), one registry behind both.

Any TF Serving client (including `melanoma_tf.client`) talks to it unchanged.  Use
`start_server` for an in-process server (tests, the pipeline, benchmarks) or
`python -m melanoma_tf.serve` for a standalone one.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from typing import Any, Callable, TypeVar

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from melanoma_tf import storage
from melanoma_tf.serving.batching import SharedBatchScheduler
from melanoma_tf.serving.config import (
    BatchingOptions,
    ModelsSpec,
    PathMap,
    batching_options_from,
    model_server_config_from,
    monitoring_config_from,
)
from melanoma_tf.serving.errors import ServingError, code_number, from_exception
from melanoma_tf.serving.metrics import ServingMetrics
from melanoma_tf.serving.model_registry import ModelRegistry
from melanoma_tf.serving.rest import RestApi, RestServer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's default
Response = TypeVar("Response")


def _answer(context: grpc.ServicerContext, call: Callable[[], Response],
            empty: Callable[[], Response]) -> Response:
    """Run a handler; any failure becomes a gRPC status instead of an exception."""
    try:
        return call()
    except ServingError as exc:
        error = exc
    except Exception as exc:
        log.exception("request failed")
        error = from_exception(exc)
    context.set_code(error.code)
    context.set_details(error.message)
    return empty()


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata (Classify/Regress stay UNIMPLEMENTED)."""

    def __init__(self, registry: ModelRegistry, metrics: ServingMetrics, max_reply_bytes: int) -> None:
        self._registry = registry
        self._metrics = metrics
        self._max_reply_bytes = max_reply_bytes

    def Predict(self, request: predict_pb2.PredictRequest,
                context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        def predict() -> predict_pb2.PredictResponse:
            with self._metrics.request(request.model_spec.name, "predict", "GRPC"):
                servable = self._registry.resolve(request.model_spec)
                return servable.predict(request, max_reply_bytes=self._max_reply_bytes)

        return _answer(context, predict, predict_pb2.PredictResponse)

    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                         context: grpc.ServicerContext
                         ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return _answer(context, lambda: self._registry.model_metadata(request),
                       get_model_metadata_pb2.GetModelMetadataResponse)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                       context: grpc.ServicerContext
                       ) -> get_model_status_pb2.GetModelStatusResponse:
        return _answer(context, lambda: self._registry.model_status(request),
                       get_model_status_pb2.GetModelStatusResponse)

    def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest,
                                  context: grpc.ServicerContext
                                  ) -> model_management_pb2.ReloadConfigResponse:
        response = model_management_pb2.ReloadConfigResponse()
        if request.config.WhichOneof("config") is None:
            log.info("Taking no action for empty config")  # TF Serving's answer, not an unload
            return response
        try:
            self._registry.reload_config(request.config)
            return response
        except Exception as exc:
            error = from_exception(exc)
        log.error("ReloadConfig failed: %s", error.message)
        response.status.error_code = code_number(error.code)
        response.status.error_message = error.message
        context.set_code(error.code)
        context.set_details(error.message)
        return response


class ServerHandle:
    """A running server: `.port`, `.target`, `.rest_port` (None without REST), `.registry`,
    `.metrics`, `.stats()`, `.stop()`."""

    def __init__(self, server: grpc.Server, registry: ModelRegistry,
                 scheduler: SharedBatchScheduler | None, host: str, port: int,
                 metrics: ServingMetrics, rest: RestServer | None = None) -> None:
        self.server = server
        self.registry = registry
        self.metrics = metrics
        self.host = host
        self.port = port
        self.rest_port = rest.port if rest else None
        self._rest = rest
        self._scheduler = scheduler
        self._stopped = False

    @property
    def target(self) -> str:
        """Address for a client channel, e.g. '127.0.0.1:8500'."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """Per model version: warm-up requests replayed and batching counters."""
        return self.registry.stats()

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting RPCs, let in-flight ones finish for `grace` s, unload models."""
        if self._stopped:
            return
        self._stopped = True
        if self._rest is not None:
            self._rest.stop()
        self.server.stop(grace).wait()
        if self._scheduler is not None:
            self._scheduler.stop()
        self.registry.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server terminates."""
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """TF Serving's --grpc_channel_arguments "k=v,k=v" as gRPC server options, numbers as ints."""
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("grpc."):
            raise ValueError(f"grpc channel argument {item!r}: expected grpc.NAME=VALUE")
        arguments.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return arguments


def start_server(models: ModelsSpec, port: int = 0, host: str = "127.0.0.1",
                 batching_parameters: Any = None, path_map: PathMap | None = None,
                 poll_seconds: float = 1.0, model_config_poll_seconds: float = 0.0,
                 enable_warmup: bool = True,
                 allow_version_labels_for_unavailable_models: bool = False,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_workers: int | None = None, rest_port: int | None = None,
                 monitoring_config: Any = None, grpc_channel_arguments: str = "") -> ServerHandle:
    """Load the configured models and serve them over gRPC; port 0 picks a free port.

    `rest_port` also serves TF Serving's REST API there (0 picks a free port; None: no REST),
    with bodies up to `max_message_bytes`, like gRPC messages; replies are capped at the same
    size on both ports, refused (400, INVALID_ARGUMENT) before they are built. `monitoring_config` (a
    monitoring.config path or a parsed `MonitoringConfig`) with Prometheus enabled adds the
    metrics page at its path on the REST port. `grpc_channel_arguments` is TF Serving's
    --grpc_channel_arguments, e.g. "grpc.max_connection_age_ms=60000" (`channel_arguments`).

    `models` is a models.config path, a `ModelServerConfig`, or a dict name -> base path
    (latest version policy).  `batching_parameters` is None (no batching, like TF
    Serving without --enable_batching), a batching_parameters.txt path, a parsed
    `BatchingParameters` or a dict of its fields.  `path_map` rewrites base-path
    prefixes, e.g. {"/models": "exports"}.
    """
    config = model_server_config_from(models)
    prometheus = monitoring_config_from(monitoring_config).prometheus_config
    options: BatchingOptions | None = batching_options_from(batching_parameters)
    metrics = ServingMetrics()
    scheduler = SharedBatchScheduler(options, metrics.batch) if options is not None else None
    mapped = {src: storage.absolute(dst) for src, dst in (path_map or {}).items()}
    registry = ModelRegistry(scheduler, mapped, enable_warmup,
                             allow_version_labels_for_unavailable_models, metrics)
    metrics.served = registry.serves
    try:
        registry.reload_config(config)
    except BaseException:
        registry.stop()
        if scheduler is not None:
            scheduler.stop()
        raise
    if max_workers is None:
        max_workers = min(256, max(32, 2 * (options.max_batch_size if options else 8) + 8))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.so_reuseport", 0), *channel_arguments(grpc_channel_arguments)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(registry, metrics, max_message_bytes), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry), server)
    bind_host = f"[{host}]" if ":" in host else host
    try:
        bound = server.add_insecure_port(f"{bind_host}:{port}")
    except RuntimeError as exc:
        bound = 0
        bind_error = str(exc)
    else:
        bind_error = "port in use or not allowed"
    if not bound:
        registry.stop()
        if scheduler is not None:
            scheduler.stop()
        raise OSError(f"cannot bind {bind_host}:{port}: {bind_error}")
    rest = None
    if rest_port is not None:
        app = RestApi(registry, max_message_bytes, metrics,
                      (prometheus.path or DEFAULT_PROMETHEUS_PATH) if prometheus.enable else None)
        try:
            rest = RestServer(app, host, rest_port, threads=max_workers)
        except OSError as exc:
            registry.stop()
            if scheduler is not None:
                scheduler.stop()
            raise OSError(f"cannot bind the REST port {bind_host}:{rest_port}: {exc}") from exc
    server.start()
    registry.start_polling(poll_seconds)
    if isinstance(models, (str, os.PathLike)):
        registry.watch_config_file(str(models), model_config_poll_seconds)
    return ServerHandle(server, registry, scheduler, host, bound, metrics, rest)
