"""The classifier's input guard (issue 37): fitted on training views only, it refuses a natural
photo and a flat frame and accepts the synthetic test views; the export computes what the
training-time function computes; refusals reach `score`'s CSV and the report."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from matplotlib import cbook
from PIL import Image

from melanoma_tf import contract, report, score
from melanoma_tf.configs import classification as configs
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.modeling import input_guard
from melanoma_tf.serving import export_classifier
from melanoma_tf.serving.server import start_server
from melanoma_tf.tasks import melanoma_classification as task

import serving_fakes as fakes

pytestmark = pytest.mark.slow


def _natural() -> np.ndarray:
    """A well-exposed photo of a face that an installed package ships (matplotlib's sample data)."""
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def _view(image: np.ndarray) -> np.ndarray:
    return tf.cast(tf.image.resize(image, [227, 227], antialias=True), tf.uint8).numpy()


@pytest.fixture(scope="module")
def guarded_run(synthetic_records, tmp_path_factory) -> tuple[Path, configs.ClassificationExperiment]:
    """A run folder as training leaves it: the ImageNet EfficientNet-Lite0 classifier (its head
    untrained) and the guard `train` fits on the synthetic training views."""
    model_dir = tmp_path_factory.mktemp("guarded")
    params = task.resolve_params("melanoma_efficientnet_lite0", params_override={"training": {"folds": 2}})
    configs.save_config(params, model_dir / "params.yaml")
    model = task.build_model(params, training=True)
    model.save(model_dir / task.FINAL_MODEL)
    task.fit_input_guard(model, synthetic_records, params, model_dir)
    return model_dir, params


def test_the_guard_refuses_a_photo_and_a_flat_frame_and_accepts_the_test_views(guarded_run, synthetic_records):
    model_dir, params = guarded_run
    guard = input_guard.Guard.load(model_dir / input_guard.GUARD_FILE)
    trained = export_classifier.load_trained(model_dir)[1]
    classifier = input_guard.with_features(trained)
    test = inputs.read_index(synthetic_records, "test", params.data)
    views = np.concatenate(list(inputs.images(test, params.data).as_numpy_iterator()))
    odd = np.stack([_view(_natural()), np.full((227, 227, 3), 128, np.uint8), np.zeros((227, 227, 3), np.uint8)])
    distances, status = input_guard.check(tf.constant(np.concatenate([views, odd])),
                                          classifier(np.concatenate([views, odd]), training=False)[1], guard)
    status = status.numpy()
    assert (status[:len(views)] == contract.INPUT_OK).all(), distances.numpy()[:len(views)]
    assert status[-3] == contract.INPUT_NOT_DERMOSCOPY and distances.numpy()[-3] > 1
    assert list(status[-2:]) == [contract.INPUT_UNUSABLE] * 2


def test_the_export_computes_what_the_training_time_function_computes(guarded_run):
    model_dir, _ = guarded_run
    export_dir = export_classifier.export(model_dir, model_dir / "exports" / contract.CLASSIFIER / "1")
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    images = np.stack([_view(_natural()), fakes.lesion_image(227, 227, seed=1)])
    out = serve(masked_image=tf.constant(images))
    trained = export_classifier.load_trained(model_dir)[1]
    guard = input_guard.Guard.load(model_dir / input_guard.GUARD_FILE)
    features = input_guard.with_features(trained)(images, training=False)[1]
    distances, status = input_guard.check(tf.constant(images), features, guard)
    np.testing.assert_allclose(out[contract.INPUT_DISTANCE].numpy(), distances.numpy(), rtol=1e-4)
    np.testing.assert_array_equal(out[contract.INPUT_STATUS].numpy(), status.numpy())
    plain = export_classifier.export(model_dir, model_dir / "exports" / contract.CLASSIFIER / "2",
                                     checkpoint=model_dir / task.FINAL_MODEL)
    outputs = tf.saved_model.load(str(plain)).signatures["serving_default"].structured_outputs
    assert contract.INPUT_STATUS not in outputs, "a checkpoint other than the final model goes without a guard"


def test_refusals_reach_the_score_csv_and_the_report(guarded_run, tmp_path):
    model_dir, _ = guarded_run
    exports = fakes.copy_exports(tmp_path / "exports")
    classifier = exports / contract.CLASSIFIER
    for version in classifier.iterdir():
        shutil.rmtree(version)
    export_classifier.export(model_dir, classifier / "1")
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(_natural()).save(images / "photo.jpg")
    Image.fromarray(np.full((120, 160, 3), 30, np.uint8)).save(images / "dark_frame.png")
    with start_server({name: exports / name for name in (contract.SEGMENTER, contract.CLASSIFIER)},
                      poll_seconds=0) as server:
        code = score.main(["--server", server.target, "--input", str(images), "--output", str(tmp_path / "s.csv"),
                           "--no-progress"])
    assert code == score.EXIT_OK
    with (tmp_path / "s.csv").open(newline="") as handle:
        rows = {r["image_id"]: r for r in csv.DictReader(handle)}
    assert rows["photo"]["status"] == "not_dermoscopy" and rows["photo"]["melanoma_probability"] == ""
    assert rows["dark_frame"]["status"] == "unusable"
    metrics = {"threshold": 0.5, "counts": {"images": 2, "melanoma": 1, "nevus": 1, "with_mask": 0,
                                            "no_lesion": 0, "refused": 2, "errors": 0},
               "bootstrap": {"samples": 10}, "created": "now", "data_dir": str(images)}
    page = report.render(metrics, [], tmp_path)
    assert "input guard refused 2 image(s)" in page
