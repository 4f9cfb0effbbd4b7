"""The real exported models (tiny, trained on synthetic lesions) behind the embedded server:
what the client gets over gRPC equals the two SavedModels chained in-process."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from melanoma_tf import masking
from melanoma_tf.client import MelanomaClient
from melanoma_tf.serving.server import start_server

import serving_fakes as fakes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_exports):
    handle = start_server(tiny_exports, poll_seconds=0)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    with MelanomaClient(server.target, timeout=60) as melanoma:
        yield melanoma


@pytest.fixture(scope="module")
def local(tiny_exports):
    return tuple(tf.saved_model.load(str(tiny_exports[name] / "1"))
                 for name in ("lesion_segmenter", "melanoma_classifier"))


def test_grpc_chain_equals_the_savedmodels_in_process(client, local, synthetic_dir: Path) -> None:
    paths = sorted((synthetic_dir / "images").iterdir())[:3]
    results = {r.image_id: r for r in client.predict_many(paths, concurrency=3)}
    assert sorted(results) == [p.stem for p in paths]
    for path in paths:
        got, want = results[path.stem], fakes.chain_in_process(*local, path.read_bytes())
        assert got.error is None
        assert got.lesion_mask.shape == want["mask"].shape
        np.testing.assert_array_equal(got.lesion_mask, want["mask"])
        np.testing.assert_allclose(got.lesion_box, want["box"], atol=1e-4)
        assert got.segmentation_score == pytest.approx(want["score"], abs=1e-5)
        if want["status"] == 0:  # a lesion was found, so the classifier ran
            assert got.model_versions == {"lesion_segmenter": 1, "melanoma_classifier": 1}
            assert got.status == "ok"
            assert got.melanoma_probability == pytest.approx(want["probability"], abs=1e-5)
        else:
            assert got.model_versions == {"lesion_segmenter": 1}
            assert got.status == "no_lesion" and np.isnan(got.melanoma_probability)


def test_classifier_over_grpc_equals_in_process(server, local, synthetic_dir: Path) -> None:
    """The 4-step segmenter may find no lesion, and then the chain skips the classifier: call
    it directly too, with lesions masked by their ground-truth masks."""
    masks = sorted((synthetic_dir / "masks").iterdir())[:4]
    batch = []
    for mask_path in masks:
        image_path = synthetic_dir / "images" / (mask_path.name.replace("_segmentation", "").replace(".png", ".jpg"))
        image = tf.io.decode_image(image_path.read_bytes(), channels=3)
        mask = tf.io.decode_png(mask_path.read_bytes(), channels=1)[..., 0]
        batch.append(masking.mask_lesion(image, mask, 227))
    batch = tf.stack(batch)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "melanoma_classifier"
    request.inputs["masked_image"].CopyFrom(tf.make_tensor_proto(batch.numpy()))
    with grpc.insecure_channel(server.target) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    want = local[1].signatures["serving_default"](masked_image=batch)
    assert reply.model_spec.version.value == 1
    np.testing.assert_allclose(tf.make_ndarray(reply.outputs["melanoma_probability"]),
                               want["melanoma_probability"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(tf.make_ndarray(reply.outputs["class_id"]), want["class_id"].numpy())
