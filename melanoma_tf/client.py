"""Client for the two-stage melanoma service over TF Serving's gRPC API.

`MelanomaClient("localhost:8500").predict(image)` chains `lesion_segmenter` ->
masked image -> `melanoma_classifier`.  It uses only `tensorflow_serving.apis`
messages, so it runs unchanged against a real TF Serving or the embedded server.

Decisions:

* Paths and encoded bytes go to the segmenter's `serving_default` (`image_bytes`).
  numpy arrays go to `serving_image_tensor` (`images`, uint8 [1,H,W,3]): exact pixels,
  no encode/decode round trip.  Grayscale (HxW, HxWx1) arrays are repeated to 3
  channels and RGBA drops alpha, as decoding with channels=3 does for files.
* The segmenter's masked image is forwarded to the classifier as the same TensorProto
  (no decode/re-encode), and the mask is cropped to the returned `image_size`.
* `is_melanoma` is decided at the classifier's served `threshold` (its operating point,
  chosen in training for a target sensitivity) unless the client is given a `threshold`.
* Segmenter status 1 (no lesion): no classification; the result has status
  "no_lesion", `melanoma_probability` NaN and `is_melanoma` None.
* A classifier exported with an input guard answers `input_status`: an input it refuses
  gets status "not_dermoscopy" or "unusable", `melanoma_probability` NaN and `is_melanoma`
  None (its `input_distance` says how far it was from the training views: > 1 refused).
* Segmenter status 2 (undecodable/empty image): `predict` raises `ImageDecodeError`;
  status 3 (a valid image over `contract.MAX_IMAGE_PIXELS`, refused before decoding):
  `ImageTooLargeError`, naming its pixel count and the limit. `predict_many` yields a
  result with status "error" and the message in `error` instead of stopping the stream.
  So does any other per-image failure.
* Servers: one address, a DNS name that resolves to several (a Kubernetes headless
  Service), or a list of addresses; requests spread over them with gRPC's `round_robin`
  load balancing (`channel_target`).
* Retries are gRPC's own retry policy (`service_config`): UNAVAILABLE (no server) and
  CANCELLED (what a server shutting down answers its in-flight calls) are retried with
  exponential backoff and jitter, on the next replica (Predict is idempotent), up to
  `retries` more attempts (gRPC allows 4).  `timeout` is the deadline of a call with its
  retries.  With `server_wait`, a call finding no ready server waits up to that many
  seconds for one (gRPC `wait_for_ready`), e.g. while a server restarts.
* `connect_timeout`: the constructor checks that the servers answer; none answering is a
  `ConnectionError` naming the addresses, some not answering a logged warning.
* `explain`: the classifier is called through its `explain` signature, and each result also
  carries the classifier's input as the segmenter cut it (`classifier_input`) and where the
  classifier looked (`heat_map`, Grad-CAM, 0-1): for reports and audits; it costs a backward
  pass and 200 KB more of reply per image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from concurrent import futures
from typing import Any, Iterable, Iterator, Sequence, Union

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

from melanoma_tf import storage
from melanoma_tf.contract import (
    ARRAY_SIGNATURE,
    BYTES_SIGNATURE,
    CLASSIFIER,
    EXPLAIN_SIGNATURE,
    HEAT_MAP,
    INPUT_DISTANCE,
    INPUT_OK,
    INPUT_STATUS,
    INPUT_STATUS_NAMES,
    MASKED_IMAGE,
    MAX_IMAGE_PIXELS,
    SEGMENTER,
    STATUS_BAD_IMAGE,
    STATUS_NO_LESION,
    STATUS_OK,
    STATUS_TOO_LARGE,
)

ImageInput = Union[str, os.PathLike, storage.GfilePath, bytes, bytearray, memoryview, np.ndarray]

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MAX_ATTEMPTS = 5  # gRPC caps a retry policy's maxAttempts here

log = logging.getLogger("melanoma_tf.client")


class PredictionError(Exception):
    """One image could not be scored; `code` is the gRPC status when the server refused."""

    def __init__(self, message: str, image_id: str | None = None,
                 code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.image_id = image_id
        self.code = code


class ImageDecodeError(PredictionError):
    """The segmenter could not decode the image (status 2)."""


class ImageTooLargeError(PredictionError):
    """A valid image with more pixels than the segmenter takes (status 3); not decoded."""


@dataclasses.dataclass(frozen=True, eq=False)
class LesionPrediction:
    """The result for one image (see the module docstring for the status rules)."""

    image_id: str | None
    melanoma_probability: float
    is_melanoma: bool | None
    lesion_mask: np.ndarray | None
    lesion_box: tuple[float, float, float, float] | None
    segmentation_score: float
    status: str
    latency_ms: dict[str, float]
    index: int | None = None
    error: str | None = None
    model_versions: dict[str, int] = dataclasses.field(default_factory=dict)
    threshold: float = math.nan  # the one is_melanoma used: the served operating point or the client's
    classifier_input: np.ndarray | None = None  # uint8 [227, 227, 3], with `explain`
    heat_map: np.ndarray | None = None  # float32 [227, 227] in [0, 1], with `explain`
    error_code: str | None = None  # the gRPC status name when a server call failed
    input_distance: float = math.nan  # the classifier's input guard: > 1 refused (NaN: no guard)

    @property
    def ok(self) -> bool:
        """True when the image was scored (a lesion found or confidently absent)."""
        return self.error is None


def _model_spec(spec: model_pb2.ModelSpec, name: str, signature: str, version: int | None,
                label: str | None) -> None:
    if version is not None and label is not None:
        raise ValueError(f"{name}: give a version or a label, not both")
    spec.name = name
    spec.signature_name = signature
    if version is not None:
        spec.version.value = int(version)
    elif label is not None:
        spec.version_label = label


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image array {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return np.ascontiguousarray(image)


def default_image_id(image: ImageInput) -> str | None:
    """A path's file stem (ISIC ids are file stems); None for bytes and arrays."""
    if isinstance(image, (str, os.PathLike, storage.GfilePath)):
        return storage.path(image).stem
    return None


def server_addresses(servers: str | Sequence[str]) -> list[str]:
    """The addresses in `servers`: one string (comma-separated allowed) or a sequence."""
    items = [servers] if isinstance(servers, str) else list(servers)
    addresses = [a.strip() for item in items for a in str(item).split(",") if a.strip()]
    if not addresses:
        raise ValueError("no server address given")
    return addresses


def channel_target(servers: str | Sequence[str]) -> str:
    """The gRPC target for `servers`.

    One address (host:port, or a gRPC URI such as dns:///serving.ns.svc:8500) goes to gRPC's
    resolver as it is, so a name with several addresses gives one subchannel each. Several
    addresses become gRPC's static `ipv4:` (else `ipv6:`) address list, host names resolved here.
    """
    addresses = server_addresses(servers)
    if len(addresses) == 1:
        return addresses[0]
    hosts = []
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"server address {address!r}: expected host:port")
        hosts.append((host.strip("[]"), int(port)))
    for family, scheme, form in ((socket.AF_INET, "ipv4", "{}:{}"), (socket.AF_INET6, "ipv6", "[{}]:{}")):
        try:
            resolved = [form.format(info[4][0], port) for host, port in hosts
                        for info in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)]
        except socket.gaierror:
            continue
        return f"{scheme}:" + ",".join(dict.fromkeys(resolved))
    raise ValueError(f"servers {addresses}: cannot resolve them all to IPv4, nor all to IPv6 addresses")


def service_config(retries: int, backoff: float, max_backoff: float) -> str:
    """gRPC service config: round_robin over the servers; Predict retried when a server is
    missing (UNAVAILABLE) or went away during the call (CANCELLED)."""
    method: dict[str, Any] = {"name": [{"service": PREDICTION_SERVICE}]}
    if retries > 0:
        method["retryPolicy"] = {
            "maxAttempts": min(retries + 1, MAX_ATTEMPTS), "initialBackoff": f"{backoff:g}s",
            "maxBackoff": f"{max_backoff:g}s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]})


def check_servers(servers: str | Sequence[str], timeout: float) -> None:
    """Raises ConnectionError naming the addresses when none of `servers` answers within
    `timeout` seconds; logs the ones that do not answer when others do."""
    addresses = server_addresses(servers)
    channels = {address: grpc.insecure_channel(address) for address in addresses}
    try:
        ready = {address: grpc.channel_ready_future(channel) for address, channel in channels.items()}
        deadline = time.monotonic() + timeout
        dead = []
        for address, future in ready.items():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                dead.append(address)
    finally:
        for channel in channels.values():
            channel.close()
    if len(dead) == len(addresses):
        raise ConnectionError(f"no gRPC server answered at {', '.join(dead)} within {timeout:g} s")
    if dead:
        log.warning("no gRPC server answered at %s within %g s; using the others", ", ".join(dead), timeout)


class MelanomaClient:
    """Chains lesion_segmenter -> melanoma_classifier over one gRPC channel to one or more
    servers (see the module docstring for targets, retries and waiting)."""

    def __init__(self, target: str | Sequence[str] = "localhost:8500", segmenter: str = SEGMENTER,
                 classifier: str = CLASSIFIER, segmenter_version: int | None = None,
                 segmenter_label: str | None = None, classifier_version: int | None = None,
                 classifier_label: str | None = None, threshold: float | None = None,
                 timeout: float = 30.0, retries: int = 3, *, server_wait: float | None = None,
                 backoff: float = 0.1, max_backoff: float = 2.0, connect_timeout: float | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 channel_options: Sequence[tuple[str, Any]] = (), explain: bool = False) -> None:
        self.target = channel_target(target)
        self.explain = explain
        self.threshold = threshold
        self.timeout = timeout
        self.server_wait = server_wait
        self._segmenter = (segmenter, segmenter_version, segmenter_label)
        self._classifier = (classifier, classifier_version, classifier_label)
        for name, version, label in (self._segmenter, self._classifier):
            _model_spec(model_pb2.ModelSpec(), name, BYTES_SIGNATURE, version, label)
        if connect_timeout is not None:
            check_servers(target, connect_timeout)
        self._channel = grpc.insecure_channel(self.target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            # gRPC retries only a call whose request fits this buffer (256 KiB by default, A6):
            # a full-size dermoscopy JPEG is larger, so size it to the largest request we send.
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.service_config", service_config(retries, backoff, max_backoff)),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
            *channel_options,  # any other gRPC channel argument
        ])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._closed = threading.Event()

    def predict(self, image: ImageInput, image_id: str | None = None) -> LesionPrediction:
        """Segment, mask and classify one image (path, encoded bytes or uint8 array)."""
        started = time.perf_counter()
        image_id = image_id if image_id is not None else default_image_id(image)
        request = self._segment_request(image, image_id)
        t0 = time.perf_counter()
        segmented = self._call(request, image_id)
        t1 = time.perf_counter()
        outputs = segmented.outputs
        status = int(tf.make_ndarray(outputs["status"])[0])
        versions = {self._segmenter[0]: segmented.model_spec.version.value}
        if status == STATUS_BAD_IMAGE:
            raise ImageDecodeError("the segmenter could not decode the image (status 2)", image_id)
        height, width = (int(v) for v in tf.make_ndarray(outputs["image_size"])[0])
        if status == STATUS_TOO_LARGE:
            raise ImageTooLargeError(f"the image is too large: {width}x{height} = {width * height:,} pixels, over "
                                     f"the segmenter's limit of {MAX_IMAGE_PIXELS:,} (status 3); downscale it",
                                     image_id)
        mask = tf.make_ndarray(outputs["lesion_mask"])[0, :height, :width]
        box = tuple(float(v) for v in tf.make_ndarray(outputs["lesion_box"])[0])
        score = float(tf.make_ndarray(outputs["lesion_score"])[0])
        latency = {"segment": (t1 - t0) * 1000.0, "classify": 0.0}
        probability, decision, label, threshold, input_distance = math.nan, None, "no_lesion", math.nan, math.nan
        classifier_input = heat_map = None
        if status == STATUS_OK:
            classify = predict_pb2.PredictRequest()
            name, version, version_label = self._classifier
            _model_spec(classify.model_spec, name, EXPLAIN_SIGNATURE if self.explain else BYTES_SIGNATURE,
                        version, version_label)
            classify.inputs[MASKED_IMAGE].CopyFrom(outputs["masked_image"])
            t2 = time.perf_counter()
            classified = self._call(classify, image_id)  # every output: a few numbers (and the heat map)
            latency["classify"] = (time.perf_counter() - t2) * 1000.0
            versions[name] = classified.model_spec.version.value
            probability = float(tf.make_ndarray(classified.outputs["melanoma_probability"])[0])
            served = float(tf.make_ndarray(classified.outputs["threshold"])[0])
            threshold = served if self.threshold is None else self.threshold
            decision = probability >= threshold
            label = "ok"
            if INPUT_STATUS in classified.outputs:  # a classifier exported with an input guard
                input_distance = float(tf.make_ndarray(classified.outputs[INPUT_DISTANCE])[0])
                refused = int(tf.make_ndarray(classified.outputs[INPUT_STATUS])[0])
                if refused != INPUT_OK:  # not an answer: no probability, no decision
                    label, probability, decision = INPUT_STATUS_NAMES[refused], math.nan, None
            if self.explain:
                classifier_input = tf.make_ndarray(outputs["masked_image"])[0]
                heat_map = tf.make_ndarray(classified.outputs[HEAT_MAP])[0]
        elif status != STATUS_NO_LESION:
            raise PredictionError(f"unexpected segmenter status {status}", image_id)
        latency["total"] = (time.perf_counter() - started) * 1000.0
        return LesionPrediction(
            image_id=image_id, melanoma_probability=probability, is_melanoma=decision,
            lesion_mask=mask, lesion_box=box, segmentation_score=score, status=label,
            latency_ms=latency, model_versions=versions, threshold=threshold,
            classifier_input=classifier_input, heat_map=heat_map, input_distance=input_distance)

    def predict_many(self, images: Iterable[Any], concurrency: int = 8) -> Iterator[LesionPrediction]:
        """Score many images concurrently, yielding results as they complete.

        Items are images or `(image_id, image)` pairs; every result carries `index`
        (position in `images`) and `image_id` (given, else the path stem, else the
        index as a string).  A failing image yields a result with `error` set.
        """
        pool = futures.ThreadPoolExecutor(max_workers=max(1, concurrency),
                                          thread_name_prefix="melanoma-client")
        pending: set[futures.Future] = set()
        try:
            for index, item in enumerate(images):
                if isinstance(item, tuple) and len(item) == 2:
                    image_id, image = item
                else:
                    image_id, image = None, item
                if image_id is None:
                    image_id = default_image_id(image) or str(index)
                pending.add(pool.submit(self._predict_safe, image, str(image_id), index))
                if len(pending) >= 2 * concurrency:
                    done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            while pending:
                done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                yield from (f.result() for f in done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Close the channel."""
        if not self._closed.is_set():
            self._closed.set()
            self._channel.close()

    def __enter__(self) -> "MelanomaClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _predict_safe(self, image: ImageInput, image_id: str, index: int) -> LesionPrediction:
        started = time.perf_counter()
        try:
            result = self.predict(image, image_id)
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            if isinstance(exc, OSError):
                message = f"cannot read image: {exc}"
            code = getattr(exc, "code", None)
            return LesionPrediction(
                image_id=image_id, melanoma_probability=math.nan, is_melanoma=None,
                lesion_mask=None, lesion_box=None, segmentation_score=math.nan, status="error",
                latency_ms={"total": (time.perf_counter() - started) * 1000.0}, index=index,
                error=" ".join(message.split()), error_code=code.name if code else None)
        return dataclasses.replace(result, index=index)

    def _segment_request(self, image: ImageInput, image_id: str | None) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        name, version, label = self._segmenter
        if isinstance(image, np.ndarray):
            _model_spec(request.model_spec, name, ARRAY_SIGNATURE, version, label)
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(_as_rgb(image)[None]))
            return request
        if isinstance(image, (str, os.PathLike, storage.GfilePath)):
            data = storage.path(image).read_bytes()
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}")
        _model_spec(request.model_spec, name, BYTES_SIGNATURE, version, label)
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([data], dtype=tf.string, shape=[1]))
        return request

    def _call(self, request: predict_pb2.PredictRequest, image_id: str | None
              ) -> predict_pb2.PredictResponse:
        try:
            return self._stub.Predict(request, timeout=self.timeout + (self.server_wait or 0.0),
                                      wait_for_ready=self.server_wait is not None)
        except grpc.RpcError as exc:
            raise PredictionError(f"{request.model_spec.name}: {exc.code().name}: {exc.details()}", image_id,
                                  exc.code()) from exc
