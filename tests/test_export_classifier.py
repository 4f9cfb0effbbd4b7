"""The exported classifier keeps the serving contract the gRPC client is built against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from melanoma_tf.configs import classification as configs
from melanoma_tf.serving import export_classifier
from melanoma_tf.serving.servable import Servable
from melanoma_tf.tasks import melanoma_classification as task

pytestmark = pytest.mark.slow


RUNS = {
    "paper": ("melanoma_alexnet_paper", {"model": {"dense_units": [8]}}),
    "descriptors": ("melanoma_alexnet_paper", {"model": {"dense_units": [8], "descriptors": True}}),
    "efficientnet_lite0": ("melanoma_efficientnet_lite0", {}),
}
THRESHOLD = 0.42  # an operating point as training would choose it


@pytest.fixture(scope="module", params=list(RUNS))
def run_and_export(request, tmp_path_factory) -> tuple[Path, Path]:
    """A run folder as `train` leaves it (params.yaml, final_model.keras, operating_point.json),
    untrained: the paper's 227x227 network with an 8-unit head, so that saving and exporting
    take seconds; the same with the lesion descriptors, whose graph ops the SavedModel must
    carry too; and the pretrained EfficientNet-Lite0 with a random (not zero) softmax layer."""
    model_dir = tmp_path_factory.mktemp("cls_run")
    experiment, override = RUNS[request.param]
    params = task.resolve_params(experiment, params_override=override)
    configs.save_config(params, model_dir / "params.yaml")
    model = task.build_model(params, training=True)
    task.adapt_normalization(model, np.random.default_rng(0).integers(0, 256, (4, 227, 227, 3), dtype=np.uint8))
    head = model.get_layer("probabilities")
    head.set_weights([np.random.default_rng(2).normal(0, 0.05, w.shape) for w in head.get_weights()])
    model.save(model_dir / "final_model.keras")
    (model_dir / "operating_point.json").write_text(json.dumps({"threshold": THRESHOLD}))
    export_dir = tmp_path_factory.mktemp("exports") / "melanoma_classifier" / "1"
    export_classifier.export(model_dir, export_dir)
    return model_dir, export_dir


@pytest.fixture(scope="module")
def serving_fn(run_and_export):
    return tf.saved_model.load(str(run_and_export[1])).signatures["serving_default"]


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 227, 227, 3), dtype=np.uint8)


def test_signature_has_the_agreed_names_shapes_and_dtypes(serving_fn):
    (spec,) = serving_fn.structured_input_signature[1].values()
    assert list(serving_fn.structured_input_signature[1]) == ["masked_image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 227, 227, 3]
    outputs = serving_fn.structured_outputs
    assert {k: (v.dtype, v.shape.as_list()) for k, v in outputs.items()} == {
        "melanoma_probability": (tf.float32, [None]),
        "probabilities": (tf.float32, [None, 2]),
        "class_id": (tf.int32, [None]),
        "threshold": (tf.float32, [None]),
    }


def test_outputs_are_consistent_and_match_the_trained_model(serving_fn, run_and_export):
    images = _images()
    out = {k: v.numpy() for k, v in serving_fn(masked_image=tf.constant(images)).items()}
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["melanoma_probability"], out["probabilities"][:, 1])
    np.testing.assert_array_equal(out["class_id"], (out["melanoma_probability"] >= THRESHOLD).astype(np.int32))
    np.testing.assert_array_equal(out["threshold"], np.float32(THRESHOLD))
    _, trained = export_classifier.load_trained(run_and_export[0])
    np.testing.assert_allclose(out["probabilities"], trained.predict(images, verbose=0), atol=1e-5)


def test_explain_signature_gives_the_training_time_heat_map(run_and_export):
    """`explain` answers as serving_default does, plus the Grad-CAM map of `modeling.grad_cam`
    (the one function) at the input's size."""
    from melanoma_tf.modeling import grad_cam

    model = tf.saved_model.load(str(run_and_export[1]))
    images = _images(2)
    explained = {k: v.numpy() for k, v in model.signatures["explain"](masked_image=tf.constant(images)).items()}
    served = {k: v.numpy() for k, v in model.signatures["serving_default"](masked_image=tf.constant(images)).items()}
    for key, value in served.items():
        np.testing.assert_allclose(explained[key], value, atol=1e-6)
    heat = explained["heat_map"]
    assert heat.shape == (2, 227, 227) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    params, trained = export_classifier.load_trained(run_and_export[0])
    size = params.data.input_size
    assert size == 227  # the exports above take the served size as it is
    np.testing.assert_allclose(heat, grad_cam.heat_map(trained, tf.constant(images)).numpy(), atol=1e-4)


@pytest.mark.parametrize("bad", [np.zeros((1, 200, 200, 3), np.uint8), np.zeros((1, 227, 227, 3), np.float32),
                                 np.zeros((227, 227, 3), np.uint8)], ids=["shape", "dtype", "unbatched"])
def test_bad_inputs_give_a_clear_error(serving_fn, bad):
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)) as error:
        serving_fn(masked_image=tf.constant(bad))
    message = str(error.value)
    assert "227" in message or "uint8" in message or "dtype" in message, message


def test_warmup_requests_parse_and_replay(run_and_export):
    export_dir = run_and_export[1]
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(str(export_dir / "assets.extra" / "tf_serving_warmup_requests"))]
    assert len(records) == 1
    request = records[0].predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    batch = tf.make_ndarray(request.inputs["masked_image"])
    assert batch.dtype == np.uint8 and batch.shape[1:] == (227, 227, 3) and 1 < len(batch) <= 8
    assert Servable("melanoma_classifier", 1, str(export_dir)).warmup() == 1


def test_export_is_atomic_and_never_overwrites_a_version(run_and_export):
    model_dir, export_dir = run_and_export
    with pytest.raises(FileExistsError):
        export_classifier.export(model_dir, export_dir)
    assert sorted(p.name for p in export_dir.parent.iterdir()) == ["1"]
    assert (export_dir / "saved_model.pb").is_file() and (export_dir / "assets.extra" / "params.yaml").is_file()


def test_fold_ensemble_serves_the_mean_of_its_members(tmp_path):
    """Two folds with different weights: the ensemble export's probabilities are the mean of the
    two members' (each the fold's best.weights.h5), under the same signature and threshold."""
    params = task.resolve_params("melanoma_alexnet_paper", params_override={
        "model": {"dense_units": [8]}, "training": {"folds": 2}})
    configs.save_config(params, tmp_path / "params.yaml")
    (tmp_path / "operating_point.json").write_text(json.dumps({"threshold": THRESHOLD}))
    images = _images(4)
    members = []
    for k in range(2):
        model = task.build_model(params, training=True)
        task.adapt_normalization(model, images)
        head = model.get_layer("probabilities")
        head.set_weights([np.random.default_rng(10 + k).normal(0, 0.05, w.shape) for w in head.get_weights()])
        (tmp_path / f"fold_{k}").mkdir()
        model.save_weights(tmp_path / f"fold_{k}" / "best.weights.h5")
        members.append(model.predict(images, verbose=0))
    assert not np.allclose(members[0], members[1], atol=1e-3)
    export_dir = export_classifier.export(tmp_path, tmp_path / "exports" / "melanoma_classifier" / "1",
                                          fold_ensemble=True)
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    out = {k: v.numpy() for k, v in serve(masked_image=tf.constant(images)).items()}
    np.testing.assert_allclose(out["probabilities"], np.mean(members, axis=0), atol=1e-5)
    np.testing.assert_array_equal(out["threshold"], np.float32(THRESHOLD))
    with pytest.raises(FileNotFoundError, match="fold_1"):  # a fold not trained yet
        (tmp_path / "fold_1" / "best.weights.h5").unlink()
        export_classifier.export(tmp_path, tmp_path / "exports" / "melanoma_classifier" / "2", fold_ensemble=True)
