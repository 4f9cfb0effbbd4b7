"""The embedded server over real gRPC on loopback, against stand-in SavedModels."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from melanoma_tf.serving.servable import read_signature_defs
from melanoma_tf.serving.server import start_server

import serving_fakes as fakes

State = get_model_status_pb2.ModelVersionStatus.State
BATCHING = {"max_batch_size": 8, "batch_timeout_micros": 100_000, "num_batch_threads": 2,
            "max_enqueued_batches": 16}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = fakes.copy_exports(tmp_path_factory.mktemp("server") / "exports")
    fakes.build_classifier(base / fakes.CLASSIFIER / "2", bias=0.25)
    return base


@pytest.fixture(scope="module")
def server(exports: Path):
    handle = start_server(fakes.labelled_config(exports), batching_parameters=BATCHING, poll_seconds=0.3)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target, options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)]) as chan:
        yield chan


@pytest.fixture(scope="module")
def predict(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict


@pytest.fixture(scope="module")
def model_service(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def local_models(exports: Path):
    """The same SavedModels called in-process, for comparison."""
    return {name: tf.saved_model.load(str(exports / name / "1"))
            for name in (fakes.SEGMENTER, fakes.CLASSIFIER)}


def _request(model: str, inputs: dict, signature: str = "", version: int | None = None,
             label: str | None = None) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto)
                                     else tf.make_tensor_proto(value))
    return request


def _bytes_input(*images: bytes):
    return {"image_bytes": tf.make_tensor_proto(list(images), dtype=tf.string, shape=[len(images)])}


def _outputs(response) -> dict[str, np.ndarray]:
    return {key: tf.make_ndarray(value) for key, value in response.outputs.items()}


def _assert_same(served: dict, local: dict) -> None:
    assert set(served) == set(local)
    for key, value in local.items():
        value = value.numpy()
        assert served[key].dtype == value.dtype, key
        if value.dtype.kind == "f":
            np.testing.assert_allclose(served[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(served[key], value, err_msg=key)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_predict_equals_in_process(predict, local_models) -> None:
    images = [fakes.encode_png(fakes.lesion_image(30, 41, seed=3)),
              fakes.encode_jpeg(fakes.lesion_image(52, 37, seed=4)),
              fakes.encode_png(fakes.lesion_image(20, 20, lesion=False))]
    segmenter = local_models[fakes.SEGMENTER].signatures["serving_default"]
    classifier = local_models[fakes.CLASSIFIER].signatures["serving_default"]
    for data in images:
        response = predict(_request(fakes.SEGMENTER, _bytes_input(data)), timeout=30)
        assert response.model_spec.name == fakes.SEGMENTER
        assert response.model_spec.version.value == 1
        assert response.model_spec.signature_name == "serving_default"
        served = _outputs(response)
        _assert_same(served, segmenter(image_bytes=tf.constant([data])))
        classified = predict(_request(fakes.CLASSIFIER, {"masked_image": response.outputs["masked_image"]},
                                      version=1), timeout=30)
        _assert_same(_outputs(classified), classifier(masked_image=tf.constant(served["masked_image"])))
    array = fakes.lesion_image(25, 33, seed=9)[None]
    response = predict(_request(fakes.SEGMENTER, {"images": array}, "serving_image_tensor"), timeout=30)
    _assert_same(_outputs(response),
                 local_models[fakes.SEGMENTER].signatures["serving_image_tensor"](images=tf.constant(array)))


def test_model_metadata_is_the_saved_model_signature_defs(predict, channel, exports) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = fakes.SEGMENTER
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.name == fakes.SEGMENTER
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    expected = read_signature_defs(str(exports / fakes.SEGMENTER / "1"))
    assert dict(signature_map.signature_def) == expected
    default = signature_map.signature_def["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    assert set(default.inputs) == {"image_bytes"}
    assert default.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert set(default.outputs) == set(fakes.SEGMENTER_OUTPUTS)
    assert set(signature_map.signature_def["serving_image_tensor"].inputs) == {"images"}

    request.metadata_field[:] = ["bogus"]
    assert _code(lambda: stub.GetModelMetadata(request, timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT
    request.metadata_field[:] = ["signature_def"]
    request.model_spec.name = "nope"
    assert _code(lambda: stub.GetModelMetadata(request, timeout=10))[0] == grpc.StatusCode.NOT_FOUND


def test_model_status(model_service) -> None:
    def status(name: str, version: int | None = None, label: str | None = None):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        if label is not None:
            request.model_spec.version_label = label
        return model_service.GetModelStatus(request, timeout=10)

    segmenter = status(fakes.SEGMENTER)
    assert [(s.version, s.state, s.status.error_code) for s in segmenter.model_version_status] == [
        (1, State.AVAILABLE, 0)]
    classifier = status(fakes.CLASSIFIER)
    assert [(s.version, s.state) for s in classifier.model_version_status] == [
        (2, State.AVAILABLE), (1, State.AVAILABLE)]
    assert [s.version for s in status(fakes.CLASSIFIER, label="canary").model_version_status] == [2]
    assert _code(lambda: status("nope"))[0] == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: status(fakes.SEGMENTER, version=7))[0] == grpc.StatusCode.NOT_FOUND


def test_unknown_model_version_and_label(predict) -> None:
    masked = {"masked_image": np.zeros([1, 227, 227, 3], np.uint8)}
    code, details = _code(lambda: predict(_request("nope", masked), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "Servable not found" in details
    code, details = _code(lambda: predict(_request(fakes.CLASSIFIER, masked, version=9), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "Specific(melanoma_classifier, 9)" in details
    # TF Serving answers an unknown label with INVALID_ARGUMENT, not NOT_FOUND.
    code, details = _code(lambda: predict(_request(fakes.CLASSIFIER, masked, label="beta"), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Unrecognized servable version label" in details
    stable = predict(_request(fakes.CLASSIFIER, masked, label="stable"), timeout=10)
    canary = predict(_request(fakes.CLASSIFIER, masked, label="canary"), timeout=10)
    latest = predict(_request(fakes.CLASSIFIER, masked), timeout=10)
    assert (stable.model_spec.version.value, canary.model_spec.version.value,
            latest.model_spec.version.value) == (1, 2, 2)
    assert tf.make_ndarray(canary.outputs["melanoma_probability"])[0] == pytest.approx(0.25)


def test_bad_requests_are_rejected_and_server_keeps_serving(predict) -> None:
    good = _request(fakes.CLASSIFIER, {"masked_image": np.zeros([1, 227, 227, 3], np.uint8)})
    bad = [
        (_request(fakes.CLASSIFIER, {"image": np.zeros([1, 227, 227, 3], np.uint8)}),
         grpc.StatusCode.INVALID_ARGUMENT, "alias not found"),
        (_request(fakes.CLASSIFIER, {"masked_image": np.zeros([1, 227, 227, 3], np.float32)}),
         grpc.StatusCode.INVALID_ARGUMENT, "must be uint8 but float32"),
        (_request(fakes.CLASSIFIER, {"masked_image": np.zeros([1, 100, 100, 3], np.uint8)}),
         grpc.StatusCode.INVALID_ARGUMENT, "has shape [1, 100, 100, 3]"),
        (_request(fakes.CLASSIFIER, {"masked_image": np.zeros([227, 227, 3], np.uint8)}),
         grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (_request(fakes.CLASSIFIER, {"masked_image": np.zeros([1, 227, 227, 3], np.uint8),
                                     "extra": np.zeros([1], np.uint8)}),
         grpc.StatusCode.INVALID_ARGUMENT, "input size does not match signature"),
        (_request(fakes.CLASSIFIER, {"masked_image": np.zeros([1, 227, 227, 3], np.uint8)},
                  signature="nope"),
         grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found'),
        (_request(fakes.SEGMENTER, {"image_bytes": np.zeros([1], np.int32)}),
         grpc.StatusCode.INVALID_ARGUMENT, "must be string"),
        (_request("", {}), grpc.StatusCode.INVALID_ARGUMENT, "no name"),
    ]
    filtered = predict_pb2.PredictRequest()
    filtered.CopyFrom(good)
    filtered.output_filter.append("logits")
    bad.append((filtered, grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found"))
    for request, expected, fragment in bad:
        code, details = _code(lambda: predict(request, timeout=10))
        assert code == expected, details
        assert fragment in details
        assert predict(good, timeout=10).model_spec.version.value == 2


def test_undecodable_image_does_not_fail_the_batch(predict) -> None:
    images = [fakes.encode_png(fakes.lesion_image(20, 20, seed=1)), b"not an image", b""]
    response = predict(_request(fakes.SEGMENTER, _bytes_input(*images)), timeout=30)
    out = _outputs(response)
    assert out["status"].tolist() == [0, 2, 2]
    assert out["image_size"].tolist() == [[20, 20], [0, 0], [0, 0]]


def test_concurrent_requests_are_batched(server, predict, local_models) -> None:
    classifier = local_models[fakes.CLASSIFIER].signatures["serving_default"]
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 255, size=[1, 227, 227, 3], dtype=np.uint8) for _ in range(6)]
    before = server.stats()[f"{fakes.CLASSIFIER}/1"]["batching"].get("serving_default", {})
    barrier = threading.Barrier(len(inputs))

    def call(array):
        barrier.wait()
        return predict(_request(fakes.CLASSIFIER, {"masked_image": array}, version=1), timeout=30)

    with futures.ThreadPoolExecutor(len(inputs)) as pool:
        responses = list(pool.map(call, inputs))
    for array, response in zip(inputs, responses):
        _assert_same(_outputs(response), classifier(masked_image=tf.constant(array)))
    after = server.stats()[f"{fakes.CLASSIFIER}/1"]["batching"]["serving_default"]
    tasks = after["tasks"] - before.get("tasks", 0)
    batches = after["batches"] - before.get("batches", 0)
    assert tasks == len(inputs)
    assert batches < tasks, after
    assert after["max_batch_tasks"] > 1


def test_requests_with_different_shapes_are_not_merged(predict, local_models) -> None:
    segment = local_models[fakes.SEGMENTER].signatures["serving_image_tensor"]
    arrays = [fakes.lesion_image(18 + i, 22, seed=i)[None] for i in range(4)]
    with futures.ThreadPoolExecutor(len(arrays)) as pool:
        responses = list(pool.map(lambda a: predict(
            _request(fakes.SEGMENTER, {"images": a}, "serving_image_tensor"), timeout=30), arrays))
    for array, response in zip(arrays, responses):
        _assert_same(_outputs(response), segment(images=tf.constant(array)))


def test_warmup_requests_were_replayed(server) -> None:
    stats = server.stats()
    assert stats[f"{fakes.SEGMENTER}/1"]["warmup_requests"] == 1
    assert stats[f"{fakes.CLASSIFIER}/2"]["warmup_requests"] == 1


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_new_version_is_served_without_restart(server, predict, model_service, exports) -> None:
    masked = {"masked_image": np.zeros([1, 227, 227, 3], np.uint8)}
    staging = exports / ".staging-3"
    fakes.build_classifier(staging, bias=0.75)
    failures: list[Exception] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                predict(_request(fakes.CLASSIFIER, masked), timeout=30)
            except grpc.RpcError as exc:
                failures.append(exc)

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        os.rename(staging, exports / fakes.CLASSIFIER / "3")
        _wait_for(lambda: predict(_request(fakes.CLASSIFIER, masked), timeout=30)
                  .model_spec.version.value == 3)
        response = predict(_request(fakes.CLASSIFIER, masked), timeout=30)
        assert tf.make_ndarray(response.outputs["melanoma_probability"])[0] == pytest.approx(0.75)
        shutil.rmtree(exports / fakes.CLASSIFIER / "3")

        def unloaded() -> bool:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = fakes.CLASSIFIER
            request.model_spec.version.value = 3
            return model_service.GetModelStatus(request, timeout=10).model_version_status[0].state == State.END

        _wait_for(unloaded)
        assert predict(_request(fakes.CLASSIFIER, masked), timeout=30).model_spec.version.value == 2
    finally:
        stop.set()
        caller.join()
    assert not failures, failures[:3]


def test_reload_config(server, model_service, exports) -> None:
    config = fakes.labelled_config(exports)
    config.model_config_list.config[1].version_labels["canary"] = 5
    request = model_management_pb2.ReloadConfigRequest(config=config)
    with pytest.raises(grpc.RpcError) as info:
        model_service.HandleReloadConfigRequest(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not currently available for inference" in info.value.details()

    config.model_config_list.config[1].version_labels["canary"] = 1
    response = model_service.HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=config), timeout=30)
    assert response.status.error_code == 0
    assert server.registry.describe()[1]["labels"] == {"stable": 1, "canary": 1}
    model_service.HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=fakes.labelled_config(exports)), timeout=30)
    assert server.registry.describe()[1]["labels"] == {"stable": 1, "canary": 2}


def test_graceful_stop_finishes_in_flight_requests(exports) -> None:
    slow = dict(BATCHING, batch_timeout_micros=600_000)
    handle = start_server({fakes.CLASSIFIER: exports / fakes.CLASSIFIER},
                          batching_parameters=slow, poll_seconds=0)
    with grpc.insecure_channel(handle.target) as chan:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(chan)
        request = _request(fakes.CLASSIFIER, {"masked_image": np.zeros([1, 227, 227, 3], np.uint8)})
        in_flight = stub.Predict.future(request, timeout=30)
        time.sleep(0.2)
        started = time.monotonic()
        handle.stop(grace=10)
        assert in_flight.result().model_spec.version.value == 2
        assert time.monotonic() - started < 5
        code, _ = _code(lambda: stub.Predict(request, timeout=2))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_large_messages_are_accepted(predict) -> None:
    noise = np.random.default_rng(1).integers(0, 255, size=(1400, 1400, 3), dtype=np.uint8)
    data = fakes.encode_png(noise)
    assert len(data) > 4 * 1024 * 1024  # over gRPC's default limit
    response = predict(_request(fakes.SEGMENTER, _bytes_input(data)), timeout=60)
    out = _outputs(response)
    assert out["image_size"].tolist() == [[1400, 1400]]
    assert out["lesion_mask"].shape == (1, 1400, 1400)


def test_version_policies() -> None:
    from melanoma_tf.serving.model_registry import _aspired

    model = model_server_config_pb2.ModelConfig(name="m")
    assert _aspired(model, {1, 2, 3}) == {3}
    model.model_version_policy.latest.num_versions = 2
    assert _aspired(model, {1, 2, 3}) == {2, 3}
    model.model_version_policy.all.SetInParent()
    assert _aspired(model, {1, 2, 3}) == {1, 2, 3}
    model.model_version_policy.specific.versions[:] = [1, 4]
    assert _aspired(model, {1, 2, 3}) == {1}

def test_newest_and_next_version_count_only_saved_models(tmp_path: Path) -> None:
    from melanoma_tf.serving.versions import newest_version, next_version

    base = tmp_path / "model"
    with pytest.raises(FileNotFoundError, match="no integer-named version folder"):
        newest_version(str(base))
    assert next_version(str(base)) == str(base / "1")
    for version in (2, 10):
        (base / str(version)).mkdir(parents=True)
        (base / str(version) / "saved_model.pb").write_bytes(b"")
    (base / "11").mkdir()  # a failed copy, no saved_model.pb: never served, never overwritten
    (base / "tmp-20").mkdir()
    assert newest_version(str(base)) == str(base / "10")  # numeric order, not "2" > "10"
    assert next_version(str(base)) == str(base / "12")



def test_batcher_isolates_failures_and_bounds_its_queue() -> None:
    from melanoma_tf.serving.batching import SharedBatchScheduler
    from melanoma_tf.serving.config import BatchingOptions
    from melanoma_tf.serving.errors import ServingError

    calls: list[int] = []
    gate = threading.Event()
    gate.set()

    def runner(inputs):
        calls.append(len(inputs["x"]))
        gate.wait(10)
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": inputs["x"] * 2}

    scheduler = SharedBatchScheduler(BatchingOptions(
        max_batch_size=4, batch_timeout_micros=200_000, num_batch_threads=1, max_enqueued_batches=1))
    queue = scheduler.queue("test", runner)
    try:
        with futures.ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda v: _outcome(queue, v), [1, 2, -3, 4]))
        assert outcomes[:2] == [2, 4] and outcomes[3] == 8
        assert isinstance(outcomes[2], ValueError)
        assert calls[0] == 4, "the four requests were merged first"

        gate.clear()
        started = len(calls)
        with futures.ThreadPoolExecutor(6) as pool:
            busy = pool.submit(_outcome, queue, 100)
            _wait_for(lambda: len(calls) == started + 1, timeout=5)
            queued = [pool.submit(_outcome, queue, v) for v in range(4)]
            time.sleep(0.1)
            rejected = _outcome(queue, 9)
            gate.set()
            assert busy.result() == 200 and [f.result() for f in queued] == [0, 2, 4, 6]
        assert isinstance(rejected, ServingError) and rejected.code == grpc.StatusCode.UNAVAILABLE
        assert "queue" in rejected.message
    finally:
        gate.set()
        scheduler.stop()


def _outcome(queue, value: int):
    try:
        return int(queue.run({"x": np.array([value])})["y"][0])
    except Exception as exc:
        return exc
