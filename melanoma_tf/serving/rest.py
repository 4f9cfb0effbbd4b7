"""TF Serving's REST API (its port 8501) on the embedded server, and the Prometheus page.

    GET  /v1/models/NAME[/versions/N|/labels/L]             model status (GetModelStatusResponse)
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata    signature metadata (GetModelMetadataResponse)
    POST /v1/models/NAME[/versions/N|/labels/L]:predict     {"instances": [...]} or {"inputs": ...}
    GET  <prometheus path of the monitoring config>         metrics (`serving.metrics`)

Paths, JSON shapes and status codes follow TF Serving's `http_rest_api_handler` and
`http_server.cc`: a request becomes the same protobuf the gRPC port takes and runs through the
same registry, servables and batching, so both ports give the same numbers. Binary strings travel
as {"b64": "..."}, both ways for outputs whose name ends in `_bytes`; an error is {"error": "..."}
with the HTTP status TF Serving maps its status code to (404 unknown model or version, 400 bad
input or body).

The HTTP server is waitress: a maintained, pure-Python WSGI server whose fixed pool of worker
threads matches the gRPC server's thread pool, since a predict call blocks its thread in
TensorFlow or in the batching queue; an asyncio server would need a thread for each call anyway.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import urllib.parse
from typing import Any, Callable, Iterable

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from melanoma_tf.serving.errors import ServingError, from_exception, invalid_argument
from melanoma_tf.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from melanoma_tf.serving.metrics import ServingMetrics
from melanoma_tf.serving.model_registry import SIGNATURE_DEF_FIELD, ModelRegistry
from melanoma_tf.serving.servable import DEFAULT_SIGNATURE

log = logging.getLogger(__name__)

# TF Serving's own patterns (http_rest_api_util.cc).
PREDICT_PATH = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
STATUS_PATH = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
# TF Serving's ToHTTPStatusCode (http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           409: "Conflict", 413: "Payload Too Large", 429: "Too Many Requests", 499: "Client Closed Request",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
           504: "Gateway Timeout"}


def _model_spec(name: str, version: str | None, label: str | None,
                signature_name: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name), signature_name=signature_name)
    if version:
        spec.version.value = int(version)
    if label:
        spec.version_label = urllib.parse.unquote(label)
    return spec


# --- JSON <-> tensors (TF Serving's json_tensor) ------------------------------------------------

def _decode_strings(value: Any, name: str) -> Any:
    if isinstance(value, list):
        return [_decode_strings(v, name) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise invalid_argument(f'"{name}": a binary value must be an object with one key "b64"')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as exc:
            raise invalid_argument(f'"{name}": not valid base64 ({exc})') from None
    if isinstance(value, str):
        return value.encode()
    raise invalid_argument(f'"{name}": expected a string or {{"b64": ...}}, got {json.dumps(value)[:40]}')


def _to_array(value: Any, name: str, dtype: tf.DType) -> np.ndarray:
    """A JSON value as the signature input's dtype; ragged lists and wrong types are 400s."""
    try:
        if dtype == tf.string:
            array = np.array(_decode_strings(value, name), dtype=object)
        else:
            array = np.array(value, dtype=dtype.as_numpy_dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise invalid_argument(f'"{name}": cannot be read as a {dtype.name} tensor ({exc})') from None
    if array.dtype == object and dtype == tf.string and any(not isinstance(v, bytes) for v in array.flat):
        raise invalid_argument(f'"{name}": the lists of a tensor must all have the same length')
    return array


def _to_json(array: np.ndarray, name: str) -> Any:
    if array.dtype == object or array.dtype.kind == "S":
        def encode(v: bytes) -> Any:
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(v).decode()}
            return v.decode("utf-8", errors="replace")
        return np.vectorize(encode, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def predict_request(body: dict, spec: model_pb2.ModelSpec,
                    input_dtypes: dict[str, tf.DType]) -> tuple[predict_pb2.PredictRequest, str]:
    """The PredictRequest of a JSON body, and its format ('row' or 'columnar')."""
    if not isinstance(body, dict):
        raise invalid_argument("JSON Value: not an object")
    if ("instances" in body) == ("inputs" in body):
        raise invalid_argument('Missing \'inputs\' or \'instances\' key' if "instances" not in body
                               else "Not formatted correctly expecting only one of 'inputs' or 'instances' keys")
    names = sorted(input_dtypes)
    if "instances" in body:
        instances, fmt = body["instances"], "row"
        if not isinstance(instances, list) or not instances:
            raise invalid_argument("'instances' must be a non-empty list")
        named = all(isinstance(i, dict) and "b64" not in i for i in instances)
        if len(names) > 1 and not named:
            raise invalid_argument(f"each instance must be an object with the signature's inputs {names}")
        columns = ({n: [i.get(n) for i in instances] for n in names} if named else {names[0]: instances})
        missing = [n for n, values in columns.items() if any(v is None for v in values)]
        if missing:
            raise invalid_argument(f"instances lack input(s) {missing}; the signature takes {names}")
    else:
        inputs, fmt = body["inputs"], "columnar"
        columns = inputs if isinstance(inputs, dict) and "b64" not in inputs else {names[0]: inputs}
    request = predict_pb2.PredictRequest(model_spec=spec)
    for name, value in columns.items():
        dtype = input_dtypes.get(name)
        if dtype is None:  # the servable names the expected set, as gRPC answers it
            dtype = tf.string if isinstance(value, (str, dict)) else tf.float32
        request.inputs[name].CopyFrom(tf.make_tensor_proto(_to_array(value, name, dtype), dtype=dtype))
    return request, fmt


def predict_json(response: predict_pb2.PredictResponse, fmt: str) -> dict:
    """TF Serving's JSON answer: {"predictions": [...]} (row) or {"outputs": ...} (columnar)."""
    outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
    if fmt == "columnar":
        if len(outputs) == 1:
            (name, array), = outputs.items()
            return {"outputs": _to_json(array, name)}
        return {"outputs": {name: _to_json(a, name) for name, a in sorted(outputs.items())}}
    sizes = {name: a.shape[0] if a.ndim else None for name, a in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise invalid_argument(f"Tensors of the answer have different batch sizes {sizes}: ask in the "
                               "columnar format ('inputs')")
    if len(outputs) == 1:
        (name, array), = outputs.items()
        return {"predictions": _to_json(array, name)}
    per_output = {name: _to_json(a, name) for name, a in sorted(outputs.items())}
    return {"predictions": [{name: values[i] for name, values in per_output.items()}
                            for i in range(next(iter(sizes.values())))]}


# --- the WSGI application ------------------------------------------------------------------------

class RestApi:
    """WSGI application answering TF Serving's REST requests from a `ModelRegistry`."""

    def __init__(self, registry: ModelRegistry, max_body_bytes: int, metrics: ServingMetrics | None = None,
                 prometheus_path: str | None = None) -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.prometheus_path = prometheus_path

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if self.prometheus_path and path == self.prometheus_path and self.metrics is not None:
            return self._reply(start_response, 200, self.metrics.exposition(), METRICS_CONTENT_TYPE)
        if not re.fullmatch(r"(?i)/v1/.*", path):
            return self._error(start_response, 404, f"Not found: {method} {path}")
        try:
            body = environ["wsgi.input"].read()  # at most max_body_bytes: waitress refuses more
            answer = self._handle(method, path, body)
            status = 200
        except ServingError as exc:
            answer, status = {"error": exc.message}, HTTP_STATUS.get(exc.code, 500)
        except Exception as exc:  # a bug must not take the port down
            log.exception("REST request failed")
            error = from_exception(exc)
            answer, status = {"error": error.message}, HTTP_STATUS.get(error.code, 500)
        return self._reply(start_response, status, json.dumps(answer, indent=1).encode(), "application/json")

    def _handle(self, method: str, path: str, body: bytes) -> dict:
        if method == "POST" and (m := PREDICT_PATH.fullmatch(path)):
            name, version, label, verb = m.groups()
            if verb != "predict":
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{verb}: the embedded server answers predict only")
            return self._predict(name, version, label, body)
        if method == "GET" and (m := STATUS_PATH.fullmatch(path)):
            name, version, label, metadata = m.groups()
            if not name:
                raise invalid_argument("Missing model name in request.")
            if metadata:
                return self._metadata(_model_spec(name, version, label))
            request = get_model_status_pb2.GetModelStatusRequest(model_spec=_model_spec(name, version, label))
            return json_format.MessageToDict(self.registry.model_status(request),
                                             always_print_fields_with_no_presence=True)
        raise invalid_argument(f"Malformed request: {method} {path}")

    def _metadata(self, spec: model_pb2.ModelSpec) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=[SIGNATURE_DEF_FIELD])
        response = self.registry.model_metadata(request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signatures)
        options = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        return {"model_spec": json_format.MessageToDict(response.model_spec, **options),
                "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(signatures, **options)}}

    def _predict(self, name: str, version: str | None, label: str | None, body: bytes) -> dict:
        try:
            parsed = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_argument(f"JSON Parse error: {exc}") from None
        signature = parsed.get("signature_name", "") if isinstance(parsed, dict) else ""
        spec = _model_spec(name, version, label, signature)
        model_name = spec.name

        def run() -> dict:
            servable = self.registry.resolve(spec)
            key = signature or DEFAULT_SIGNATURE
            if key not in servable.signature_defs:
                raise invalid_argument(f'Serving signature name: "{key}" not found in signature def')
            dtypes = {alias: tf.as_dtype(info.dtype) for alias, info in servable.signature_defs[key].inputs.items()}
            request, fmt = predict_request(parsed, spec, dtypes)
            return predict_json(servable.predict(request), fmt)

        if self.metrics is None:
            return run()
        with self.metrics.request(model_name, "predict", "REST"):
            return run()

    @staticmethod
    def _reply(start_response: Callable, status: int, payload: bytes, content_type: str) -> list[bytes]:
        start_response(f"{status} {REASONS.get(status, '')}".strip(),
                       [("Content-Type", content_type), ("Content-Length", str(len(payload)))])
        return [payload]

    def _error(self, start_response: Callable, status: int, message: str) -> list[bytes]:
        return self._reply(start_response, status, json.dumps({"error": message}).encode(), "application/json")


class RestServer:
    """The REST port: waitress serving `RestApi` from a thread; `.port`, `.stop()`."""

    def __init__(self, app: RestApi, host: str, port: int, threads: int) -> None:
        from waitress.server import create_server

        # A body over the limit is refused with 413 on its Content-Length (or once a chunked one
        # passes it), before it is buffered or decoded.
        self._server = create_server(app, host=host, port=port, threads=threads, ident="melanoma_tf",
                                     max_request_body_size=app.max_body_bytes, clear_untrusted_proxy_headers=True)
        self.port = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._server.run, name="rest-api", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        from waitress import wasyncore

        self._server.task_dispatcher.shutdown()
        # Closed from the serving loop's own thread, which then ends: closing the sockets from
        # here raced its select() (EBADF in the loop thread).
        self._server.trigger.pull_trigger(lambda: wasyncore.close_all(self._server._map))
        self._thread.join(timeout)
