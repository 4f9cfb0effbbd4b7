"""MelanomaClient against the embedded server over real gRPC on loopback."""

from __future__ import annotations

import io
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.config import model_server_config_pb2

from melanoma_tf.client import ImageDecodeError, MelanomaClient, PredictionError
from melanoma_tf.serving.server import start_server

import serving_fakes as fakes


def _config(exports: Path) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    for name in (fakes.SEGMENTER, fakes.CLASSIFIER):
        model = config.model_config_list.config.add(
            name=name, base_path=str(exports / name), model_platform="tensorflow")
        model.model_version_policy.all.SetInParent()
    config.model_config_list.config[1].version_labels["stable"] = 1
    config.model_config_list.config[1].version_labels["canary"] = 2
    return config


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = fakes.copy_exports(tmp_path_factory.mktemp("client") / "exports")
    fakes.build_classifier(base / fakes.CLASSIFIER / "2", bias=0.5, warmup=False, threshold=0.97)
    return base


@pytest.fixture(scope="module")
def server(exports: Path):
    handle = start_server(_config(exports), poll_seconds=0,
                          batching_parameters={"max_batch_size": 8, "batch_timeout_micros": 2000,
                                               "num_batch_threads": 2})
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    with MelanomaClient(server.target, classifier_label="stable", timeout=30) as melanoma:
        yield melanoma


@pytest.fixture(scope="module")
def local(exports: Path):
    segmenter = tf.saved_model.load(str(exports / fakes.SEGMENTER / "1"))
    classifier = tf.saved_model.load(str(exports / fakes.CLASSIFIER / "1"))
    return segmenter, classifier


def _png(image: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode=mode).save(buffer, format="PNG") if mode else \
        Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_path_bytes_and_array_match_in_process(client, local, tmp_path: Path) -> None:
    image = fakes.lesion_image(37, 45, seed=5)
    data = fakes.encode_png(image)
    path = tmp_path / "ISIC_0000001.png"
    path.write_bytes(data)
    expected = fakes.chain_in_process(*local, data)
    for source, image_id in ((path, "ISIC_0000001"), (data, None), (image, None)):
        result = client.predict(source)
        assert result.image_id == image_id
        assert result.status == "ok" and result.error is None
        assert result.melanoma_probability == pytest.approx(expected["probability"], abs=1e-6)
        assert result.is_melanoma == (expected["probability"] >= 0.5)
        np.testing.assert_array_equal(result.lesion_mask, expected["mask"])
        assert result.lesion_mask.shape == (37, 45) and result.lesion_mask.dtype == np.uint8
        np.testing.assert_allclose(result.lesion_box, expected["box"])
        assert result.segmentation_score == pytest.approx(expected["score"], abs=1e-6)
        assert set(result.latency_ms) == {"segment", "classify", "total"}
        assert result.latency_ms["total"] >= result.latency_ms["segment"] > 0
        assert result.model_versions == {fakes.SEGMENTER: 1, fakes.CLASSIFIER: 1}


def test_grayscale_and_rgba_images(client) -> None:
    rgb = fakes.lesion_image(32, 32, seed=8)
    gray = rgb.mean(axis=-1).astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 77, np.uint8)])
    reference = client.predict(rgb)
    for source in (_png(gray, "L"), gray, gray[..., None]):
        result = client.predict(source)
        assert result.status == "ok" and result.lesion_mask.shape == (32, 32)
    gray_reference = client.predict(np.repeat(gray[..., None], 3, axis=-1))
    assert client.predict(gray).melanoma_probability == pytest.approx(
        gray_reference.melanoma_probability)
    for source in (_png(rgba, "RGBA"), rgba):
        result = client.predict(source)
        assert result.melanoma_probability == pytest.approx(reference.melanoma_probability, abs=1e-6)
        np.testing.assert_array_equal(result.lesion_mask, reference.lesion_mask)


def test_no_lesion_is_not_classified(client) -> None:
    result = client.predict(fakes.encode_jpeg(fakes.lesion_image(24, 24, lesion=False)))
    assert result.status == "no_lesion"
    assert math.isnan(result.melanoma_probability) and result.is_melanoma is None
    assert result.lesion_mask.sum() == 0 and result.latency_ms["classify"] == 0.0


def test_undecodable_images_raise_per_image(client) -> None:
    for data in (b"definitely not an image", b""):
        with pytest.raises(ImageDecodeError):
            client.predict(data)
    with pytest.raises(ValueError):
        client.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(FileNotFoundError):
        client.predict(Path("/nonexistent/ISIC_x.png"))


def test_huge_image(client) -> None:
    image = np.random.default_rng(2).integers(150, 255, size=(1500, 1300, 3), dtype=np.uint8)
    image[600:800, 500:700] = 30
    data = fakes.encode_png(image)
    assert len(data) > 4 * 1024 * 1024
    result = client.predict(data)
    assert result.status == "ok" and result.lesion_mask.shape == (1500, 1300)
    assert result.lesion_box == (600.0, 500.0, 800.0, 700.0)


def test_predict_many_streams_every_item_once(client, tmp_path: Path) -> None:
    paths = fakes.write_images(tmp_path / "images", 7, size=28)
    items = [*paths, ("bad-one", b"garbage"), (
        "array-one", fakes.lesion_image(20, 20, seed=1)), tmp_path / "missing.png"]
    results = list(client.predict_many(items, concurrency=4))
    assert sorted(r.index for r in results) == list(range(len(items)))
    by_index = {r.index: r for r in results}
    for index, path in enumerate(paths):
        assert by_index[index].image_id == path.stem and by_index[index].ok
    assert by_index[7].image_id == "bad-one" and by_index[7].status == "error"
    assert "decode" in by_index[7].error
    assert by_index[8].image_id == "array-one" and by_index[8].ok
    assert by_index[9].image_id == "missing" and "cannot read image" in by_index[9].error


def test_decisions_use_the_served_operating_point_unless_a_threshold_is_given(server) -> None:
    data = fakes.encode_png(fakes.lesion_image(30, 30, seed=3))
    with MelanomaClient(server.target, classifier_label="canary") as canary:
        served = canary.predict(data)
    assert 0.5 <= served.melanoma_probability < 0.97  # between the two thresholds
    assert served.threshold == pytest.approx(0.97) and served.is_melanoma is False
    with MelanomaClient(server.target, classifier_label="canary", threshold=0.5) as overridden:
        given = overridden.predict(data)
    assert given.threshold == 0.5 and given.is_melanoma is True


def test_versions_and_labels(server) -> None:
    data = fakes.encode_png(fakes.lesion_image(30, 30, seed=3))
    with MelanomaClient(server.target, classifier_label="canary") as canary:
        result = canary.predict(data)
    assert result.model_versions[fakes.CLASSIFIER] == 2
    with MelanomaClient(server.target, classifier_version=1, segmenter_version=1) as pinned:
        assert pinned.predict(data).model_versions == {fakes.SEGMENTER: 1, fakes.CLASSIFIER: 1}
    with MelanomaClient(server.target, classifier_label="beta", retries=5) as unknown:
        started = time.monotonic()
        with pytest.raises(PredictionError) as info:
            unknown.predict(data)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - started < 2, "non-retryable errors must not be retried"
    with pytest.raises(ValueError):
        MelanomaClient(server.target, classifier_version=1, classifier_label="stable")


def test_retries_unavailable_until_the_server_comes_up(exports) -> None:
    port = fakes.free_port()
    with MelanomaClient(f"127.0.0.1:{port}", retries=1, backoff=0.05) as impatient:
        with pytest.raises(PredictionError) as info:
            impatient.predict(fakes.encode_png(fakes.lesion_image(16, 16)))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    outcome: dict = {}
    with MelanomaClient(f"127.0.0.1:{port}", server_wait=30, max_backoff=0.5) as patient:
        def call() -> None:
            try:
                outcome["result"] = patient.predict(fakes.encode_png(fakes.lesion_image(16, 16)))
            except Exception as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(1.0)
        handle = start_server({name: exports / name for name in (fakes.SEGMENTER, fakes.CLASSIFIER)},
                              port=port, poll_seconds=0, enable_warmup=False)
        try:
            thread.join(30)
        finally:
            handle.stop()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].status == "ok"
