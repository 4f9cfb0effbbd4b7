"""The servers under abuse (issue 36): hostile or careless clients against the embedded server's
REST and gRPC ports, each answered as TF Serving answers it or bounded where it is not; and
`score` through a server outage."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from melanoma_tf import score
from melanoma_tf.serving import rest
from melanoma_tf.serving.errors import from_exception
from melanoma_tf.serving.server import start_server

import serving_fakes as fakes

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "serving" / "monitoring.config"
METRICS_PATH = "/monitoring/prometheus/metrics"
LIMIT = 8 << 20  # the servers' message, body and reply limit here
PREDICT = f"/v1/models/{fakes.SEGMENTER}:predict"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    return fakes.copy_exports(tmp_path_factory.mktemp("abuse") / "exports")


@pytest.fixture(scope="module")
def server(exports):
    handle = start_server({name: exports / name for name in (fakes.SEGMENTER, fakes.CLASSIFIER)}, rest_port=0,
                          monitoring_config=str(MONITORING), max_message_bytes=LIMIT, poll_seconds=0)
    yield handle
    handle.stop()


def _http(port: int, method: str, path: str, body: bytes | None = None,
          headers: dict | None = None) -> tuple[int, bytes, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    finally:
        connection.close()


def _post(port: int, path: str, document) -> tuple[int, bytes, str]:
    return _http(port, "POST", path, json.dumps(document).encode())


def _b64(data: bytes) -> dict:
    import base64

    return {"b64": base64.b64encode(data).decode()}


def _request_counts(port: int) -> dict[tuple[str, str], float]:
    page = _http(port, "GET", METRICS_PATH)[1].decode()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    return {(s.labels["model_name"], s.labels["status"]): s.value
            for s in families[":tensorflow:serving:request_count"].samples if s.name.endswith("_total")}


def test_one_byte_instances_cannot_ask_for_gigabytes(server):
    """Defect 1: 10,000 one-byte instances would be answered with 10,000 227x227x3 images (1.5 GB
    before JSON). Refused before the model runs, on both ports; a real request still works."""
    started = time.perf_counter()
    status, body, _ = _post(server.rest_port, PREDICT, {"instances": ["x"] * 10_000})
    assert status == 400 and b"over this server's limit" in body and len(body) < 1000
    assert time.perf_counter() - started < 10
    request = predict_pb2.PredictRequest()
    request.model_spec.name = fakes.SEGMENTER
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([b"x"] * 10_000, dtype=tf.string))
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    image = fakes.encode_png(fakes.lesion_image(64, 64))
    status, body, _ = _post(server.rest_port, PREDICT, {"instances": [_b64(image)] * 5})
    assert status == 200
    assert b"\n" not in body and b", " not in body, "replies are compact JSON"
    assert len(json.loads(body)["predictions"]) == 5


def test_a_small_png_of_a_large_frame_is_bounded_and_output_filter_keeps_it_small(server):
    """Defect 2: a 3000x3000 flat PNG of a few KB makes a 9 MB mask: over the 8 MiB reply limit
    it is refused; asking only for the outputs a client needs answers it."""
    frame = fakes.encode_png(np.full((3000, 3000, 3), 40, np.uint8))
    assert len(frame) < 100_000
    status, body, _ = _post(server.rest_port, PREDICT, {"instances": [_b64(frame)]})
    assert status == 400 and b"output_filter" in body
    wanted = ["lesion_box", "masked_image", "status"]
    status, body, _ = _post(server.rest_port, PREDICT, {"instances": [_b64(frame)], "output_filter": wanted})
    assert status == 200 and len(body) < 1_000_000
    assert sorted(json.loads(body)["predictions"][0]) == wanted
    status, body, _ = _post(server.rest_port, PREDICT, {"instances": [_b64(frame)], "output_filter": "status"})
    assert status == 400 and b"output_filter" in body


def test_an_empty_reload_config_changes_nothing(server):
    """Defect 3: TF Serving takes no action for an empty config; it must not unload every model."""
    with grpc.insecure_channel(server.target) as channel:
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(), timeout=30)
    status, body, _ = _http(server.rest_port, "GET", f"/v1/models/{fakes.CLASSIFIER}")
    assert status == 200 and b"AVAILABLE" in body


def test_idle_connections_do_not_take_the_rest_port_offline(server):
    """Defect 4: waitress's default of 100 connections let 110 idle sockets block every probe."""
    idle = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(150)]
    try:
        time.sleep(0.5)
        for _ in range(3):
            connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=5)
            connection.request("GET", METRICS_PATH)
            assert connection.getresponse().status == 200
            connection.close()
    finally:
        for sock in idle:
            sock.close()


def test_made_up_model_names_do_not_become_metric_series(server):
    """Defect 6: each unknown name was a series of its own, 100 KB each, for good."""
    def unknown(i: int) -> int:
        return _post(server.rest_port, f"/v1/models/{'m' * 10_000}{i}:predict", {"instances": [1]})[0]

    assert unknown(-1) == 404  # the unknown-model series exist from here on
    before = len(_http(server.rest_port, "GET", METRICS_PATH)[1])
    counts = _request_counts(server.rest_port)
    assert [unknown(i) for i in range(20)] == [404] * 20
    after = _http(server.rest_port, "GET", METRICS_PATH)[1]
    assert b"mmmmmmmmmm" not in after and len(after) - before < 500
    assert _request_counts(server.rest_port)[("", "NOT_FOUND")] == counts.get(("", "NOT_FOUND"), 0) + 20


def test_large_bodies_are_parsed_one_at_a_time(server):
    """Defect 7: JSON numbers cost ~20x their text as Python lists; two large bodies must not
    be read and parsed at once (a small one is not held up)."""
    inside, release, order = threading.Event(), threading.Event(), []

    class Body:
        def __init__(self, name: str, block: bool) -> None:
            self.name, self.block = name, block

        def read(self) -> bytes:
            order.append(self.name)
            if self.block:
                inside.set()
                release.wait(10)
            return b"{}"

    app = rest.RestApi(server.registry, LIMIT)

    def read(name: str, size: int, block: bool) -> None:
        app._read({"CONTENT_LENGTH": str(size), "wsgi.input": Body(name, block)})

    first = threading.Thread(target=read, args=("large 1", 50 << 20, True))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=read, args=("large 2", 50 << 20, False))
    second.start()
    read("small", 1000, False)
    time.sleep(0.3)
    assert order == ["large 1", "small"], "the second large body was read while the first was"
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["large 1", "small", "large 2"]


@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,  # a RecursionError in the JSON parser
    json.dumps({"signature_name": 1, "instances": ["x"]}).encode(),
    b'{"instances": [' + b"[" * 60 + b'"x"' + b"]" * 60 + b"]}",  # a 60-deep list to the segmenter
    b'{"instances": [' + b"[" * 900 + b'"x"' + b"]" * 900 + b"]}",  # 900 nested lists in 2 KB
])
def test_client_errors_are_400_without_a_traceback(server, body, caplog):
    """Defect 8: deep JSON, a non-string signature name and deeply nested lists were 500s with
    tracebacks in the log (174 KB of log for a 2 KB request)."""
    with caplog.at_level(logging.ERROR, logger="melanoma_tf"):
        status, answer, kind = _http(server.rest_port, "POST", PREDICT, body)
    assert status == 400 and kind == "application/json" and "error" in json.loads(answer)
    assert not caplog.records


def test_a_version_past_int64_is_a_400(server):
    status, answer, _ = _post(server.rest_port, f"/v1/models/{fakes.CLASSIFIER}/versions/99999999999999999999:predict",
                              {"instances": [1]})
    assert status == 400 and b"Failed to convert version" in answer


def test_every_rest_error_is_counted(server):
    """Defect 9: parse errors, malformed paths, 413 and unsupported verbs were not counted."""
    before = sum(_request_counts(server.rest_port).values())
    answers = [
        _http(server.rest_port, "POST", PREDICT, b"{not json")[0],
        _http(server.rest_port, "POST", "/v1/models/x/versions/y:predict", b"{}")[0],
        _http(server.rest_port, "POST", f"/v1/models/{fakes.SEGMENTER}:classify", b"{}")[0],
        _http(server.rest_port, "POST", PREDICT, b"x", headers={"Content-Length": str(LIMIT + 1)})[0],
    ]
    assert answers == [400, 400, 501, 413]
    assert sum(_request_counts(server.rest_port).values()) == before + 4


def test_model_names_are_decoded_once(server):
    """Defect 10: `%256c` decoded twice reached the registry as `l`."""
    status, _, _ = _http(server.rest_port, "GET", "/v1/models/%256cesion_segmenter")
    assert status == 404
    assert _http(server.rest_port, "GET", "/v1/models/%6cesion_segmenter")[0] == 200


def test_two_servers_on_one_host_need_only_their_grpc_ports(tmp_path, exports):
    """Defect 11: --rest-api-port defaulted to 8501, so a second server died at start."""
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "{fakes.CLASSIFIER}" '
                      f'base_path: "{exports / fakes.CLASSIFIER}" model_platform: "tensorflow" }} }}\n')
    command = [sys.executable, "-m", "melanoma_tf.serve", "--model-config", str(config), "--port", "0",
               "--poll-seconds", "0", "--log-level", "WARNING"]
    servers = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for _ in range(2)]
    try:
        banners = [process.stdout.readline() for process in servers]
        assert all(b.startswith("Serving TF Serving gRPC API") for b in banners), banners
        assert all(process.poll() is None for process in servers)
    finally:
        for process in servers:
            process.terminate()
            process.wait(30)
    assert all("REST" not in process.stdout.read() for process in servers)


def test_tf_serving_answers_for_malformed_requests(server):
    """Defect 12: TF Serving's 400 "Malformed request" for an unknown verb, JSON for 413/431,
    no silent truncation into uint8, the alias error for an unknown input key."""
    status, body, _ = _post(server.rest_port, f"/v1/models/{fakes.SEGMENTER}:PREDICT", {"instances": ["x"]})
    assert status == 400 and b"Malformed request" in body
    status, body, kind = _http(server.rest_port, "POST", PREDICT, b"x", headers={"Content-Length": str(LIMIT + 1)})
    assert status == 413 and kind == "application/json" and "error" in json.loads(body)
    status, body, kind = _http(server.rest_port, "GET", "/v1/models/x", headers={"X-Big": "y" * 300_000})
    assert status == 431 and kind == "application/json" and "error" in json.loads(body)
    classify = f"/v1/models/{fakes.CLASSIFIER}:predict"
    image = np.zeros((1, 227, 227, 3), np.int64).tolist()
    for bad, why in ((1.7, b"non-integer"), (True, b"booleans"), (300, b"range")):
        document = json.loads(json.dumps(image))
        document[0][0][0][0] = bad
        status, body, _ = _post(server.rest_port, classify, {"inputs": {"masked_image": document}})
        assert status == 400 and why in body, body
    status, body, _ = _post(server.rest_port, classify, {"inputs": {"masked_image": image, "extra": [1]}})
    assert status == 400 and b"input tensor alias not found in signature: extra" in body


def test_errors_do_not_leak_graph_node_names():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def reshape(x):
        return tf.reshape(x, [3, 5])

    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        reshape(tf.zeros([4]))
    assert "node" in caught.value.message
    message = from_exception(caught.value).message
    assert message == "Input to reshape is a tensor with 4 values, but the requested shape has 15"


def test_score_stops_on_an_outage_and_never_writes_it_as_image_errors(exports, tmp_path):
    """Defect 5: with the server gone, every later image was written as a DEADLINE_EXCEEDED error
    row (exit 0 with --allow-image-errors) and a restarted run skipped them. Now the run stops
    with exit 3, the unscored images have no row, and the next run scores exactly those."""
    models = {name: exports / name for name in (fakes.SEGMENTER, fakes.CLASSIFIER)}
    batching = {"max_batch_size": 4, "batch_timeout_micros": 100_000, "num_batch_threads": 1}
    images = fakes.write_images(tmp_path / "in", 40, size=24)
    output = tmp_path / "scores.csv"
    handle = start_server(models, poll_seconds=0, batching_parameters=batching)
    port = handle.port
    outcome: dict = {}
    args = ["--server", f"127.0.0.1:{port}", "--input", str(tmp_path / "in"), "--output", str(output),
            "--concurrency", "2", "--timeout", "1", "--server-wait", "1", "--allow-image-errors", "--no-progress"]
    runner = threading.Thread(target=lambda: outcome.setdefault("code", score.main(args)))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not output.exists() or len(output.read_text().splitlines()) < 5:
            assert time.monotonic() < deadline and runner.is_alive(), "scoring did not start"
            time.sleep(0.02)
        handle.stop(grace=0)
        runner.join(60)
        assert not runner.is_alive()
    finally:
        handle.stop(grace=0)
    assert outcome["code"] == score.EXIT_NO_SERVER
    rows = score.load_existing(output)
    assert 0 < len(rows) < len(images) and not any(row["error"] for row in rows.values())
    handle = start_server(models, port=port, poll_seconds=0)
    try:
        assert score.main(args) == score.EXIT_OK
    finally:
        handle.stop()
    rows = score.load_existing(output)
    assert sorted(rows) == sorted(p.stem for p in images) and not any(row["error"] for row in rows.values())
    assert len(output.read_text().splitlines()) == len(images) + 1, "an image scored twice"
