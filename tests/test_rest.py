"""TF Serving's REST API and Prometheus page on the embedded server, over real HTTP on loopback,
answering with the same numbers as its gRPC port."""

from __future__ import annotations

import base64
import http.client
import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from melanoma_tf import contract
from melanoma_tf.serving.server import start_server

import serving_fakes as fakes

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "serving" / "monitoring.config"
METRICS_PATH = "/monitoring/prometheus/metrics"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exports = fakes.copy_exports(tmp_path_factory.mktemp("rest") / "exports")
    fakes.build_classifier(exports / fakes.CLASSIFIER / "2", bias=0.25)
    handle = start_server(fakes.labelled_config(exports), rest_port=0, monitoring_config=str(MONITORING),
                          max_message_bytes=8 << 20, poll_seconds=0)
    yield handle
    handle.stop()


def _http(port: int, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict | str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text
    finally:
        connection.close()


def _grpc_predict(target: str, name: str, inputs: dict[str, np.ndarray], version: int | None = None,
                  signature: str = "") -> dict[str, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = name, signature
    if version:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def test_model_status_by_name_version_and_label(server):
    code, status = _http(server.rest_port, "GET", f"/v1/models/{fakes.CLASSIFIER}")
    assert code == 200
    assert [(s["version"], s["state"], s["status"]["error_code"]) for s in status["model_version_status"]] == [
        ("2", "AVAILABLE", "OK"), ("1", "AVAILABLE", "OK")]
    assert status["model_version_status"][0]["status"]["error_message"] == ""
    for suffix, version in (("/versions/1", "1"), ("/labels/canary", "2"), ("/labels/stable", "1")):
        code, status = _http(server.rest_port, "GET", f"/v1/models/{fakes.CLASSIFIER}{suffix}")
        assert code == 200 and [s["version"] for s in status["model_version_status"]] == [version], suffix


def test_metadata_is_the_grpc_answer_in_json(server):
    code, metadata = _http(server.rest_port, "GET", f"/v1/models/{fakes.SEGMENTER}/metadata")
    assert code == 200
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = fakes.SEGMENTER
    with grpc.insecure_channel(server.target) as channel:
        answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    answer.metadata["signature_def"].Unpack(signatures)
    assert metadata["model_spec"] == {"name": fakes.SEGMENTER, "signature_name": "", "version": "1"}
    assert metadata["metadata"]["signature_def"] == json_format.MessageToDict(
        signatures, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    inputs = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["image_bytes"]["dtype"] == "DT_STRING"
    code, labelled = _http(server.rest_port, "GET", f"/v1/models/{fakes.CLASSIFIER}/labels/canary/metadata")
    assert code == 200 and labelled["model_spec"]["version"] == "2"


def test_predict_row_and_columnar_give_the_grpc_numbers(server):
    rng = np.random.default_rng(0)
    masked = rng.integers(0, 256, (2, fakes.MASKED_SIZE, fakes.MASKED_SIZE, 3), dtype=np.uint8)
    for suffix, version in (("", 2), ("/versions/1", 1), ("/labels/canary", 2)):
        expected = _grpc_predict(server.target, fakes.CLASSIFIER, {"masked_image": masked}, version)
        path = f"/v1/models/{fakes.CLASSIFIER}{suffix}:predict"
        code, rows = _http(server.rest_port, "POST", path, {"instances": masked.tolist()})
        assert code == 200 and len(rows["predictions"]) == 2
        for i, row in enumerate(rows["predictions"]):
            assert set(row) == set(expected)
            np.testing.assert_array_equal(np.float32(row["melanoma_probability"]), expected["melanoma_probability"][i])
            np.testing.assert_array_equal(np.float32(row["probabilities"]), expected["probabilities"][i])
            assert row["class_id"] == expected["class_id"][i]
        code, columns = _http(server.rest_port, "POST", path, {"signature_name": "serving_default",
                                                                "inputs": {"masked_image": masked.tolist()}})
        assert code == 200
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(columns["outputs"][key], value.dtype), value)


def test_b64_images_through_the_segmenter_then_its_masked_image_through_the_classifier(server):
    images = [fakes.encode_png(fakes.lesion_image(40, 56, seed=s)) for s in (1, 2)]
    expected = _grpc_predict(server.target, fakes.SEGMENTER, {"image_bytes": np.array(images, object)})
    instances = [{"b64": base64.b64encode(b).decode()} for b in images]
    code, answer = _http(server.rest_port, "POST", f"/v1/models/{fakes.SEGMENTER}:predict", {"instances": instances})
    assert code == 200
    for i, row in enumerate(answer["predictions"]):
        for key in fakes.SEGMENTER_OUTPUTS:
            np.testing.assert_array_equal(np.asarray(row[key], expected[key].dtype), expected[key][i], err_msg=key)
    masked = [row["masked_image"] for row in answer["predictions"]]
    code, scores = _http(server.rest_port, "POST", f"/v1/models/{fakes.CLASSIFIER}/versions/1:predict",
                         {"inputs": masked})
    by_grpc = _grpc_predict(server.target, fakes.CLASSIFIER, {"masked_image": expected["masked_image"]}, 1)
    assert code == 200
    np.testing.assert_array_equal(np.float32(scores["outputs"]["melanoma_probability"]),
                                  by_grpc["melanoma_probability"])


@pytest.mark.slow
def test_the_real_tiny_exports_answer_rest_as_grpc(tiny_exports):
    """The trained tiny Mask R-CNN and classifier exports (not stand-ins): an encoded image in,
    the segmenter's masked image on to the classifier, both ports the same numbers."""
    with start_server({name: str(path) for name, path in tiny_exports.items()}, rest_port=0) as handle:
        image = fakes.encode_jpeg(fakes.lesion_image(96, 128, seed=3))
        expected = _grpc_predict(handle.target, contract.SEGMENTER, {"image_bytes": np.array([image], object)})
        code, answer = _http(handle.rest_port, "POST", f"/v1/models/{contract.SEGMENTER}:predict",
                             {"instances": [{"b64": base64.b64encode(image).decode()}]})
        assert code == 200
        (row,) = answer["predictions"]
        for key, value in expected.items():
            np.testing.assert_allclose(np.asarray(row[key], value.dtype), value[0], err_msg=key)
        code, scored = _http(handle.rest_port, "POST", f"/v1/models/{contract.CLASSIFIER}:predict",
                             {"instances": [row["masked_image"]]})
        by_grpc = _grpc_predict(handle.target, contract.CLASSIFIER, {"masked_image": expected["masked_image"]})
        assert code == 200
        np.testing.assert_allclose(scored["predictions"][0]["melanoma_probability"],
                                   by_grpc["melanoma_probability"][0], rtol=1e-6)


@pytest.mark.parametrize("method, path, body, status, words", [
    ("GET", "/v1/models/no_such_model", None, 404, "no_such_model"),
    ("GET", f"/v1/models/{fakes.CLASSIFIER}/versions/7", None, 404, "version 7"),
    ("POST", f"/v1/models/{fakes.CLASSIFIER}/versions/7:predict", {"instances": [[0]]}, 404, "Servable not found"),
    ("POST", f"/v1/models/{fakes.CLASSIFIER}:predict", b"{not json", 400, "JSON Parse error"),
    ("POST", f"/v1/models/{fakes.CLASSIFIER}:predict", {"instances": [[1, 2], [3]]}, 400, "masked_image"),
    ("POST", f"/v1/models/{fakes.CLASSIFIER}:predict", {"instances": [[[[0, 0, 0]]]]}, 400, "shape"),
    ("POST", f"/v1/models/{fakes.CLASSIFIER}:predict", {"rows": []}, 400, "instances"),
    ("POST", f"/v1/models/{fakes.CLASSIFIER}:predict", {"signature_name": "nope", "inputs": [0]}, 400, "nope"),
    ("GET", "/v1/models/a/b/c", None, 400, "Malformed request"),
])
def test_errors_are_json_with_tf_servings_status(server, method, path, body, status, words):
    code, answer = _http(server.rest_port, method, path, body)
    assert code == status and set(answer) == {"error"} and words in answer["error"], answer


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """The 8 MiB limit (max_message_bytes, as gRPC's) answers 413 on the header alone: the client
    has sent 1 KiB of the 9 MiB it announced."""
    import socket

    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(f"POST /v1/models/{fakes.CLASSIFIER}:predict HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {9 << 20}\r\n\r\n".encode() + b"[" * 1024)
        status_line = sock.makefile("rb").readline().decode()
    assert status_line.split()[1] == "413", status_line
    assert _http(server.rest_port, "GET", f"/v1/models/{fakes.CLASSIFIER}")[0] == 200  # still serving


def test_the_kubernetes_probe_paths_answer_200_once_the_models_are_available(server):
    deployment = next(d for d in yaml.safe_load_all((ROOT / "serving/kubernetes/serving.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    probes = [container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe")]
    assert probes
    for path in probes:
        code, answer = _http(server.rest_port, "GET", path)
        assert code == 200 and answer["model_spec"]["name"] in (contract.SEGMENTER, contract.CLASSIFIER)


def _request_count(port: int, model: str) -> float:
    code, page = _http(port, "GET", METRICS_PATH)
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(page)}
    return sum(s.value for s in families[":tensorflow:serving:request_count"].samples
               if s.name.endswith("_total") and s.labels == {"model_name": model, "status": "OK"})


def test_metrics_page_parses_and_counts_requests_from_both_ports(server):
    before = _request_count(server.rest_port, fakes.CLASSIFIER)
    masked = np.zeros((1, fakes.MASKED_SIZE, fakes.MASKED_SIZE, 3), np.uint8)
    for _ in range(3):
        assert _http(server.rest_port, "POST", f"/v1/models/{fakes.CLASSIFIER}:predict",
                     {"instances": masked.tolist()})[0] == 200
    _grpc_predict(server.target, fakes.CLASSIFIER, {"masked_image": masked})
    assert _request_count(server.rest_port, fakes.CLASSIFIER) == before + 4
    code, page = _http(server.rest_port, "GET", METRICS_PATH)
    families = {f.name: f for f in text_string_to_metric_families(page)}
    latency = families[":tensorflow:serving:request_latency"]
    assert {s.labels.get("entrypoint") for s in latency.samples if "entrypoint" in s.labels} >= {"REST", "GRPC"}
    loads = families[":tensorflow:cc:saved_model:load_attempt_count"]
    assert sum(s.value for s in loads.samples if s.labels.get("status") == "success") >= 3  # 3 versions loaded


def test_no_metrics_page_without_a_monitoring_config(tmp_path):
    with start_server({fakes.CLASSIFIER: str(fakes.stand_in_exports() / fakes.CLASSIFIER)}, rest_port=0,
                      poll_seconds=0) as handle:
        code, answer = _http(handle.rest_port, "GET", METRICS_PATH)
        assert code == 404 and "error" in answer


def test_stopping_leaves_no_exception_in_the_serving_thread(monkeypatch):
    """Closing waitress's sockets from the stopping thread raced the loop's select() (EBADF in
    the rest-api thread, about 1 stop in 200); they are closed from the loop's thread now."""
    from melanoma_tf.serving.rest import RestServer

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(repr(args.exc_value)))

    def app(environ, start_response):
        start_response("200 OK", [])
        return [b""]

    app.max_body_bytes = 1000
    for _ in range(400):
        server = RestServer(app, "127.0.0.1", 0, threads=1)
        server.stop()
        assert not server._thread.is_alive()
    assert errors == []
