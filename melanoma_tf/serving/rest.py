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
from typing import Any, Callable, Iterable

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from melanoma_tf.serving.errors import ServingError, from_exception, invalid_argument, reply_too_large
from melanoma_tf.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from melanoma_tf.serving.metrics import UNKNOWN_MODEL, ServingMetrics
from melanoma_tf.serving.model_registry import SIGNATURE_DEF_FIELD, ModelRegistry
from melanoma_tf.serving.servable import DEFAULT_SIGNATURE

log = logging.getLogger(__name__)

# TF Serving's own patterns (http_rest_api_util.cc).
PREDICT_PATH = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
STATUS_PATH = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
# Tensors of higher rank are refused before numpy or TensorFlow see them (numpy stops at 64).
MAX_RANK = 32
# Bodies larger than this are parsed one at a time (their Python lists cost ~20x the text).
LARGE_BODY_BYTES = 4 << 20
# Idle keep-alive connections: waitress's defaults (100 connections, closed after 120 s idle)
# let 100 idle sockets take the port offline. Polled with poll(), not select()'s 1024 limit.
CONNECTION_LIMIT, IDLE_SECONDS = 1000, 30
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
    """The ModelSpec of a path's parts, as they are: the WSGI server has already percent-decoded
    the path once, and decoding it again would let `%256c` reach the registry as `l`."""
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    if version:
        number = int(version)
        if number >= 2 ** 63:
            raise invalid_argument(f"Failed to convert version: {version[:40]} to numeric.")
        spec.version.value = number
    if label:
        spec.version_label = label
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


def _depth(value: Any) -> int:
    """How deep the first elements of a JSON value nest (a tensor's rank, if it is one)."""
    depth = 0
    while isinstance(value, list) and value and depth <= MAX_RANK:
        value, depth = value[0], depth + 1
    return depth


def _has_bool(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool):
            return True
    return False


def _to_array(value: Any, name: str, dtype: tf.DType, may_hold_bools: bool = True) -> np.ndarray:
    """A JSON value as the signature input's dtype; ragged lists, wrong types and numbers the
    dtype cannot hold exactly (1.7 or true for an integer, 300 for uint8) are 400s, as TF Serving
    answers them. `may_hold_bools`: whether to look for a `true` among numbers (numpy reads it
    as 1); the caller knows when the body has none."""
    if _depth(value) > MAX_RANK:
        raise invalid_argument(f'"{name}": lists nested deeper than {MAX_RANK} levels')
    try:
        if dtype == tf.string:
            array = np.array(_decode_strings(value, name), dtype=object)
            if any(not isinstance(v, bytes) for v in array.flat):
                raise ValueError("the lists of a tensor must all have the same length")
            return array
        array = np.asarray(value)
        target = np.dtype(dtype.as_numpy_dtype)
        allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}.get(target.kind, "iuf")
        if array.dtype.kind in "iu" and target.kind != "b" and may_hold_bools and _has_bool(value):
            raise ValueError(f"booleans where {dtype.name} is expected")
        if array.size and array.dtype.kind not in allowed:
            kind = {"b": "booleans", "f": "non-integer numbers", "U": "strings", "O": "lists of unequal length"}
            raise ValueError(f"{kind.get(array.dtype.kind, array.dtype.name)} where {dtype.name} is expected")
        if array.size and target.kind in "iu":
            limits = np.iinfo(target)
            if array.min() < limits.min or array.max() > limits.max:
                raise ValueError(f"a value outside {dtype.name}'s range [{limits.min}, {limits.max}]")
        return array.astype(target)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise invalid_argument(f'"{name}": cannot be read as a {dtype.name} tensor ({exc})') from None


def _to_json(array: np.ndarray, name: str) -> Any:
    if array.dtype == object or array.dtype.kind == "S":
        def encode(v: bytes) -> Any:
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(v).decode()}
            return v.decode("utf-8", errors="replace")
        return np.vectorize(encode, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def predict_request(body: dict, spec: model_pb2.ModelSpec, input_dtypes: dict[str, tf.DType],
                    may_hold_bools: bool = True) -> tuple[predict_pb2.PredictRequest, str]:
    """The PredictRequest of a JSON body, and its format ('row' or 'columnar'). An
    "output_filter" list (gRPC's PredictRequest field; this server's extension of the REST body)
    limits the reply to those outputs. may_hold_bools=False: the body's text has no `true` or
    `false`, so numbers need not be searched for them."""
    if not isinstance(body, dict):
        raise invalid_argument("JSON Value: not an object")
    output_filter = body.get("output_filter", [])
    if not isinstance(output_filter, list) or not all(isinstance(v, str) for v in output_filter):
        raise invalid_argument('"output_filter" must be a list of output names')
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
    request = predict_pb2.PredictRequest(model_spec=spec, output_filter=output_filter)
    for name, value in columns.items():
        dtype = input_dtypes.get(name)
        if dtype is None:
            raise invalid_argument(f"input tensor alias not found in signature: {name}. "
                                   f"Inputs expected to be in the set {{{','.join(names)}}}.")
        try:
            array = _to_array(value, name, dtype, may_hold_bools)
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=dtype))
        except (ValueError, TypeError) as exc:
            raise invalid_argument(f'"{name}": cannot be read as a {dtype.name} tensor ({exc})') from None
    return request, fmt


def json_size_bound(array: np.ndarray) -> int:
    """The most characters `array` can take in the compact JSON reply, without building it."""
    if array.dtype == object or array.dtype.kind == "S":
        # base64 (4/3) or text whose escapes (\u00XX) take up to 6 characters per byte
        return sum(6 * len(v) + 12 for v in array.flat)
    if array.dtype.kind in "iu":
        limits = np.iinfo(array.dtype)
        return array.size * (max(len(str(limits.min)), len(str(limits.max))) + 1)
    return array.size * 25  # a float's repr, the comma, or "false,"


def predict_json(response: predict_pb2.PredictResponse, fmt: str, max_bytes: int | None = None) -> dict:
    """TF Serving's JSON answer: {"predictions": [...]} (row) or {"outputs": ...} (columnar).
    A reply that could exceed `max_bytes` is refused before its JSON is built (400)."""
    outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
    bound = sum(json_size_bound(array) for array in outputs.values())
    if max_bytes is not None and bound > max_bytes:
        raise reply_too_large(bound, max_bytes)
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
    """WSGI application answering TF Serving's REST requests from a `ModelRegistry`.

    Every request under /v1/ is counted in the request-count metric (its model's series, or the
    unknown-model one), errors included; bodies over LARGE_BODY_BYTES are parsed one at a time,
    since JSON numbers cost about 20x their text as Python lists before they become a tensor."""

    def __init__(self, registry: ModelRegistry, max_body_bytes: int, metrics: ServingMetrics | None = None,
                 prometheus_path: str | None = None) -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or ServingMetrics(served=registry.serves)
        self.prometheus_path = prometheus_path
        self._large_bodies = threading.Semaphore(1)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if self.prometheus_path and path == self.prometheus_path:
            return self._reply(start_response, 200, self.metrics.exposition(), METRICS_CONTENT_TYPE)
        if not re.fullmatch(r"(?i)/v1/.*", path):
            return self._error(start_response, 404, f"Not found: {method} {path[:200]}")
        match = PREDICT_PATH.fullmatch(path) or STATUS_PATH.fullmatch(path)
        model_name = (match.group(1) or "") if match else ""
        if match and match.re is PREDICT_PATH:
            api = match.group(4).lower()
        else:
            api = "GetModelMetadata" if match and match.group(4) else "GetModelStatus"
        try:
            with self.metrics.request(model_name, api, "REST"):
                body = self._read(environ)  # at most max_body_bytes: waitress refuses more
                answer = self._handle(method, path, body)
            status = 200
        except ServingError as exc:
            answer, status = {"error": exc.message}, HTTP_STATUS.get(exc.code, 500)
        except Exception as exc:  # a bug must not take the port down
            log.exception("REST request failed")
            error = from_exception(exc)
            answer, status = {"error": error.message}, HTTP_STATUS.get(error.code, 500)
        return self._reply(start_response, status, _compact(answer), "application/json")

    def _read(self, environ: dict) -> bytes:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length <= LARGE_BODY_BYTES:
            return environ["wsgi.input"].read()
        with self._large_bodies:
            return environ["wsgi.input"].read()

    def _handle(self, method: str, path: str, body: bytes) -> dict:
        if method == "POST" and (m := PREDICT_PATH.fullmatch(path)):
            name, version, label, verb = m.groups()
            if verb in ("classify", "regress"):
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{verb}: the embedded server answers predict only")
            if verb == "predict":
                return self._predict(name, version, label, body)
        elif method == "GET" and (m := STATUS_PATH.fullmatch(path)):
            name, version, label, metadata = m.groups()
            if not name:
                raise invalid_argument("Missing model name in request.")
            if metadata:
                return self._metadata(_model_spec(name, version, label))
            request = get_model_status_pb2.GetModelStatusRequest(model_spec=_model_spec(name, version, label))
            return json_format.MessageToDict(self.registry.model_status(request),
                                             always_print_fields_with_no_presence=True)
        raise invalid_argument(f"Malformed request: {method} {path[:200]}")

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
        except RecursionError:
            raise invalid_argument("JSON Parse error: the document nests too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_argument(f"JSON Parse error: {exc}") from None
        signature = parsed.get("signature_name", "") if isinstance(parsed, dict) else ""
        if not isinstance(signature, str):
            raise invalid_argument('"signature_name" must be a string')
        spec = _model_spec(name, version, label, signature)
        servable = self.registry.resolve(spec)
        key = signature or DEFAULT_SIGNATURE
        if key not in servable.signature_defs:
            raise invalid_argument(f'Serving signature name: "{key}" not found in signature def')
        dtypes = {alias: tf.as_dtype(info.dtype) for alias, info in servable.signature_defs[key].inputs.items()}
        request, fmt = predict_request(parsed, spec, dtypes, b"true" in body or b"false" in body)
        return predict_json(servable.predict(request, max_reply_bytes=self.max_body_bytes), fmt, self.max_body_bytes)

    @staticmethod
    def _reply(start_response: Callable, status: int, payload: bytes, content_type: str) -> list[bytes]:
        start_response(f"{status} {REASONS.get(status, '')}".strip(),
                       [("Content-Type", content_type), ("Content-Length", str(len(payload)))])
        return [payload]

    def _error(self, start_response: Callable, status: int, message: str) -> list[bytes]:
        return self._reply(start_response, status, _compact({"error": message}), "application/json")


def _compact(answer: dict) -> bytes:
    """Compact JSON: a 227x227x3 image takes 0.6 MB of it, against 2 MB indented."""
    return json.dumps(answer, separators=(",", ":")).encode()


class _JsonErrorTask(ErrorTask):
    """waitress's own refusals (413 body too large, 431 headers too large, 400 unparsable HTTP)
    as {"error": ...} like every other answer, counted in the metrics."""

    def execute(self) -> None:
        error = self.request.error
        metrics = getattr(self.channel.server, "rest_metrics", None)
        if metrics is not None:
            code = {413: "RESOURCE_EXHAUSTED", 431: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED"}
            metrics.count(UNKNOWN_MODEL, code.get(error.code, "INVALID_ARGUMENT"))
        body = _compact({"error": f"{error.reason}: {error.body}"})
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _JsonErrorTask


class RestServer:
    """The REST port: waitress serving `RestApi` from a thread; `.port`, `.stop()`."""

    def __init__(self, app: RestApi, host: str, port: int, threads: int) -> None:
        from waitress.server import create_server

        # A body over the limit is refused with 413 on its Content-Length (or once a chunked one
        # passes it), before it is buffered or decoded.
        self._server = create_server(app, host=host, port=port, threads=threads, ident="melanoma_tf",
                                     max_request_body_size=app.max_body_bytes, clear_untrusted_proxy_headers=True,
                                     connection_limit=CONNECTION_LIMIT, channel_timeout=IDLE_SECONDS,
                                     asyncore_use_poll=True)
        self._server.channel_class = _Channel
        self._server.rest_metrics = getattr(app, "metrics", None)
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
