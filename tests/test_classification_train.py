"""Classifier training: folds are disjoint, a short run learns, a killed run resumes.

The training runs use `cls_tiny_test.yaml` (99x99 input, batch norm, global pooling, a 32-unit
head, 4 epochs): the paper's 227x227 network needs far more epochs than a test can afford before
it learns anything, and these tests check the training machinery, not the paper's numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from melanoma_tf import build_tfrecords
from melanoma_tf.configs import classification as configs
from melanoma_tf.data import synthetic
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.tasks import melanoma_classification as task

pytestmark = pytest.mark.slow
EPOCHS = 4
KILL_AT = 1  # 0-based epoch of fold 1 after which the first run is "killed"
RUN = dict(config_files=["cls_tiny_test.yaml"], epochs=EPOCHS,
           params_override={"evaluation": {"target_sensitivity": 0.9}})


class SimulatedKill(Exception):
    pass


class Kill(keras.callbacks.Callback):
    """Raises after epoch KILL_AT of the second fit (fold 1), as a kill would stop the run."""

    def __init__(self):
        super().__init__()
        self.fits = 0

    def on_train_begin(self, logs=None):
        self.fits += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.fits == 2 and epoch == KILL_AT:
            raise SimulatedKill()


class Epochs(keras.callbacks.Callback):
    """Records the epochs each fit actually runs."""

    def __init__(self):
        super().__init__()
        self.fits: list[list[int]] = []

    def on_train_begin(self, logs=None):
        self.fits.append([])

    def on_epoch_begin(self, epoch, logs=None):
        self.fits[-1].append(epoch)


@pytest.fixture(scope="module")
def records_2fold(tmp_path_factory) -> Path:
    """120 synthetic lesions, all masked, in 2 folds: enough held-out images (about 48) for an AUC
    that means something; the shared 40-image fixture leaves about 5 per fold."""
    root = tmp_path_factory.mktemp("cls")
    data = synthetic.generate_dataset(root / "data", num_images=120, seed=5, image_size=(96, 128))
    build_tfrecords.build(data, root / "records", folds=2, seed=0, progress=False)
    return root / "records"


@pytest.fixture(scope="module")
def resumed_run(records_2fold, tmp_path_factory):
    """A 2-fold run killed in fold 1, then run again to the end (final model and test split)."""
    model_dir = tmp_path_factory.mktemp("run")
    args = dict(data_dir=records_2fold, model_dir=model_dir, **RUN)
    with pytest.raises(SimulatedKill):
        task.train(**args, callbacks=[Kill()])
    fold0_mtime = (model_dir / "fold_0" / "result.json").stat().st_mtime_ns
    epochs = Epochs()
    out = task.train(**args, callbacks=[epochs])
    return model_dir, out, epochs.fits, fold0_mtime


def test_folds_never_share_an_image(synthetic_records):
    params = task.resolve_params(config_files=["cls_tiny_test.yaml"],
                                 params_override={"data": {"include_unmasked": True}})
    data = inputs.read_lesions(synthetic_records, "train", params.data)
    manifest = json.loads((synthetic_records / "manifest.json").read_text())
    for num_folds in (5, 2):
        held_sets = []
        for k in range(num_folds):
            train_idx, held_idx = inputs.fold_indices(data.folds, k, num_folds)
            assert not set(data.image_ids[train_idx]) & set(data.image_ids[held_idx])
            held_sets.append(set(data.image_ids[held_idx]))
        assert sum(len(s) for s in held_sets) == len(set().union(*held_sets)) == len(data)
    for k in range(5):  # fold k of 5 is exactly the records' stored fold k
        held = set(data.image_ids[inputs.fold_indices(data.folds, k, 5)[1]])
        assert held == set(manifest["folds"][str(k)]) & set(data.image_ids)
    with pytest.raises(ValueError, match="cannot make 6 folds"):
        inputs.fold_indices(data.folds, 0, 6)


def test_resume_continues_the_killed_fold_from_its_last_finished_epoch(resumed_run):
    model_dir, _, fits, _ = resumed_run
    assert fits[0] == list(range(KILL_AT + 1, EPOCHS)), "fold 1 restarted instead of resuming"
    with (model_dir / "fold_1" / "history.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(EPOCHS))
    assert not (model_dir / "fold_1" / "backup").exists()


def test_finished_folds_are_skipped_on_rerun(resumed_run):
    model_dir, _, fits, fold0_mtime = resumed_run
    assert len(fits) == 2, "expected only the resumed fold 1 and the final model to train"
    assert (model_dir / "fold_0" / "result.json").stat().st_mtime_ns == fold0_mtime


def test_short_training_beats_chance_on_held_out_images(resumed_run):
    _, out, _, _ = resumed_run
    # last-epoch predictions: the best epoch is chosen on the held-out images themselves
    per_fold = [f["metrics_last_epoch"]["roc_auc"] for f in out["cv"]["per_fold"]]
    pooled = out["cv"]["pooled_last_epoch"]["metrics"]["roc_auc"]
    assert min(per_fold) > 0.55 and np.mean(per_fold) > 0.65, per_fold
    assert pooled["ci95"][0] > 0.5, pooled


def test_writes_results_people_can_look_at(resumed_run):
    model_dir, out, _, _ = resumed_run
    for name in ("cv_metrics.json", "test_metrics.json", "roc_cv.png", "roc_test.png", "confusion_cv.png",
                 "confusion_test.png", "predictions.csv", "final_model.keras", "params.yaml"):
        assert (model_dir / name).is_file(), name
    with (model_dir / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"train", "test"}
    assert len(rows) == out["cv"]["pooled"]["n"] + out["test"]["n"]
    table = out["test"]["table_ii"]
    assert sum(sum(row.values()) for row in table.values()) == out["test"]["n"]
    assert configs.load_config(model_dir / "params.yaml").data.input_size == 99


def test_rerun_of_a_finished_run_trains_nothing(resumed_run, records_2fold):
    model_dir, out, _, _ = resumed_run
    epochs = Epochs()
    again = task.train(records_2fold, model_dir, **RUN, callbacks=[epochs])
    assert epochs.fits == []
    assert again["test"]["metrics"]["roc_auc"] == out["test"]["metrics"]["roc_auc"]


def test_operating_point_reaches_the_target_sensitivity_out_of_fold_and_is_used_on_test(resumed_run):
    model_dir, out, _, _ = resumed_run
    point = json.loads((model_dir / "operating_point.json").read_text())
    with (model_dir / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    oof = [r for r in rows if r["split"] == "train"]
    melanoma = np.array([float(r["melanoma_probability_last_epoch"]) for r in oof if r["label"] == "1"])
    rounding = 1e-6  # predictions.csv has 6 decimals
    sensitivity = np.mean(melanoma >= point["threshold"] - rounding)
    assert sensitivity >= 0.9 and sensitivity == pytest.approx(point["sensitivity"])
    # the highest such threshold: the next melanoma score above it would lose the target
    assert np.sum(melanoma > point["threshold"] + rounding) < 0.9 * len(melanoma)
    assert out["test"]["threshold"] == point["threshold"]
    test = [r for r in rows if r["split"] == "test"]
    assert all(int(r["predicted"]) == (float(r["melanoma_probability"]) >= point["threshold"]) for r in test)
    calibration = out["test"]["calibration"]
    brier = np.mean([(float(r["melanoma_probability"]) - int(r["label"])) ** 2 for r in test])
    assert calibration["brier_score"] == pytest.approx(brier) and sum(calibration["images_per_bin"]) == len(test)
    assert (model_dir / "reliability_test.png").is_file()


def test_trained_run_exports_for_serving_at_the_segmenters_size(resumed_run, tmp_path):
    """The tiny run computes at 99x99; its export takes the 227x227 masked image the segmenter
    sends, resizes it in the graph, and calls melanoma at the run's operating point."""
    from melanoma_tf.serving import export_classifier

    model_dir, _, _, _ = resumed_run
    export_dir = export_classifier.export(model_dir, tmp_path / "melanoma_classifier" / "1")
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    images = np.random.default_rng(3).integers(0, 256, (2, 227, 227, 3), dtype=np.uint8)
    out = {k: v.numpy() for k, v in serve(masked_image=tf.constant(images)).items()}
    trained = keras.models.load_model(model_dir / "final_model.keras", compile=False)
    resized = tf.cast(tf.round(tf.image.resize(images, [99, 99], antialias=True)), tf.uint8).numpy()
    np.testing.assert_allclose(out["probabilities"], trained.predict(resized, verbose=0), atol=1e-5)
    threshold = json.loads((model_dir / "operating_point.json").read_text())["threshold"]
    np.testing.assert_array_equal(out["class_id"], out["melanoma_probability"] >= threshold)
    assert (export_dir / "assets.extra" / "operating_point.json").is_file()


def test_rerun_with_other_params_is_refused(resumed_run, records_2fold):
    model_dir, _, _, _ = resumed_run
    with pytest.raises(ValueError, match="other params"):
        task.train(records_2fold, model_dir, **{**RUN, "epochs": EPOCHS + 1})


def test_early_stopping_count_survives_a_restart():
    stopper = task.ResumableEarlyStopping([0.5, 0.7, 0.6, 0.65], monitor="val_auc", mode="max", patience=3)
    stopper.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    stopper.on_train_begin()
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (0.7, 1, 2)
    stopper.on_epoch_end(4, {"val_auc": 0.6})
    assert stopper.model.stop_training


def test_class_weights_balance_the_classes():
    data = inputs.LesionSet(np.zeros((8, 4, 4, 3), np.uint8), np.array([0] * 6 + [1] * 2), np.zeros(8, int),
                          np.array([str(i) for i in range(8)]))
    params = task.resolve_params(params_override={"data": {"batch_size": 4}})
    _, steps, weights = inputs.training_dataset(data, params)
    assert steps is None and weights[1] / weights[0] == pytest.approx(3.0)
    balanced = task.resolve_params(params_override={"data": {"batch_size": 400, "imbalance": "balanced_sampling"}})
    ds, steps, weights = inputs.training_dataset(data, balanced)
    labels = next(iter(ds))[1].numpy().argmax(1)
    assert weights is None and steps == 1 and abs(labels.mean() - 0.5) < 0.1


def test_test_time_augmentation_is_invariant_to_the_symmetries_it_averages():
    # The paper's network at init on mid-grey noise: outputs not saturated at 0 or 1, so
    # averaging over the symmetries visibly changes them.
    params = task.resolve_params(params_override={"data": {"input_size": 99}})
    keras.utils.set_random_seed(0)
    model = task.build_model(params, training=False)
    head = [layer for layer in model.layers if layer.get_weights()][-1]  # zeros at init: give it weights
    kernel, bias = head.get_weights()
    head.set_weights([np.random.default_rng(1).normal(0, 1e-3, kernel.shape).astype(np.float32), bias])
    images = np.random.default_rng(0).integers(110, 146, (4, 99, 99, 3), dtype=np.uint8)
    plain = task.predict(model, images, tta=True)
    np.testing.assert_allclose(task.predict(model, np.rot90(images, 1, axes=(1, 2)).copy(), tta=True), plain, atol=1e-5)
    np.testing.assert_allclose(task.predict(model, images[:, ::-1].copy(), tta=True), plain, atol=1e-5)
    assert not np.allclose(task.predict(model, images), plain, atol=1e-5)


def test_other_lesions_keep_every_melanoma_and_nevus_in_place_and_train_as_not_melanoma(tmp_path):
    data = synthetic.generate_dataset(tmp_path / "data", num_images=60, seed=4, image_size=(96, 128),
                                      include_other=12)
    with_other, without = tmp_path / "with_other", tmp_path / "without"
    build_tfrecords.build(data, with_other, folds=2, seed=0, include_other=True, progress=False)
    build_tfrecords.build(data, without, folds=2, seed=0, progress=False)
    placed = {name: {i: (r["split"], r["fold"], r["label"]) for i, r in
                     json.loads((d / "manifest.json").read_text())["images"].items()}
              for name, d in (("with", with_other), ("without", without))}
    others = {i for i, v in placed["with"].items() if v[2] == "other"}
    assert len(others) == 12 and {v[0] for i, v in placed["with"].items() if i in others} == {"train", "test"}
    assert {i: v for i, v in placed["with"].items() if i not in others} == placed["without"]

    run = dict(config_files=["cls_tiny_test.yaml"], epochs=1,
               params_override={"data": {"other_as_negative": True}, "training": {"folds": 2, "final_model": False}})
    task.train(with_other, tmp_path / "run", **run)
    train_others = {i for i in others if placed["with"][i][0] == "train"}
    for k in range(2):
        result = json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())
        held = {p["image_id"] for p in result["predictions"]}
        melanoma_nevus = {i for i, v in placed["without"].items() if v[0] == "train"}
        assert held == {i for i in melanoma_nevus if placed["without"][i][1] == k}  # no other lesion held out
        assert result["n_train"] == (len(melanoma_nevus) - len(held)
                                     + sum(placed["with"][i][1] != k for i in train_others))
    with pytest.raises(ValueError, match="--include-other"):
        task.train(without, tmp_path / "run_without", **run)


class Batches(keras.callbacks.Callback):
    """Counts the training batches of each epoch."""

    def __init__(self):
        super().__init__()
        self.per_epoch: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.per_epoch.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.per_epoch[-1] += 1


def test_two_resolutions_train_together_in_epochs_of_drawn_images(tmp_path):
    """Sample v2's full images beside HAM10000's 200x150 ones: one set of records, one model;
    data.epoch_images makes an epoch a fixed number of drawn images whatever the set's size."""
    large = synthetic.generate_dataset(tmp_path / "large", num_images=24, seed=6, image_size=(192, 256))
    small = synthetic.generate_dataset(tmp_path / "small", num_images=24, seed=7, image_size=(75, 100),
                                       layout="ham10000")
    manifest = build_tfrecords.build([large, small], tmp_path / "records", folds=2, seed=0, progress=False)
    widths = {d: [r["width"] for r in manifest["images"].values() if r["download"] == d and r["split"] == "train"]
              for d in ("large", "small")}
    assert min(widths["large"]) > 2 * max(widths["small"]) and widths["small"]
    batches = Batches()
    out = task.train(tmp_path / "records", tmp_path / "run", config_files=["cls_tiny_test.yaml"], callbacks=[batches],
                     params_override={"data": {"epoch_images": 20}, "training": {"folds": 0, "final_epochs": 2}})
    assert batches.per_epoch == [3, 3]  # ceil(20 / batch 8), though the train split holds more images
    assert out["test"]["n"] == len(manifest["splits"]["test"])
    history = list(csv.DictReader((tmp_path / "run" / "final" / "history.csv").open()))
    assert len(history) == 2 and np.isfinite([float(r["loss"]) for r in history]).all()


def test_balance_downloads_repeats_the_smaller_folders_images():
    downloads = np.array(["isic"] * 3 + ["ham"] * 12)
    data = inputs.LesionSet(np.zeros((15, 2, 2, 3), np.uint8), np.arange(15) % 2, np.zeros(15, int),
                            np.array([f"id{i}" for i in range(15)]), downloads)
    balanced = inputs.balance_downloads(data)
    assert (balanced.downloads == "isic").sum() == 12 and (balanced.downloads == "ham").sum() == 12
    assert set(balanced.image_ids) == set(data.image_ids)  # nothing dropped, ISIC images four times
    one_folder = inputs.LesionSet(data.images, data.labels, data.folds, data.image_ids)
    assert inputs.balance_downloads(one_folder) is one_folder


def test_several_folders_balanced_with_the_threshold_chosen_on_the_first(tmp_path):
    """The `cpu` pipeline's recipe for ISIC beside HAM10000: every record keeps its folder, the
    threshold comes from the first folder's out-of-fold images and the CV reports each folder."""
    large = synthetic.generate_dataset(tmp_path / "large", num_images=24, seed=6, image_size=(96, 128))
    small = synthetic.generate_dataset(tmp_path / "small", num_images=32, seed=7, image_size=(75, 100),
                                       layout="ham10000")
    manifest = build_tfrecords.build([large, small], tmp_path / "records", folds=2, seed=0, progress=False)
    train = inputs.read_lesions(tmp_path / "records", "train", configs.DataConfig())
    assert {i: d for i, d in zip(train.image_ids, train.downloads)} == {
        i: manifest["images"][i]["download"] for i in train.image_ids}
    out = task.train(tmp_path / "records", tmp_path / "run", config_files=["cls_tiny_test.yaml"], params_override={
        "data": {"balance_downloads": True, "epoch_images": 16},
        "training": {"folds": 2, "epochs": 1, "final_epochs": 1},
        "evaluation": {"target_sensitivity": 0.9, "operating_point_downloads": ["large"]}})
    point = json.loads((tmp_path / "run" / "operating_point.json").read_text())
    first = int((train.downloads == "large").sum())
    assert point["chosen_on"].endswith(f"of {first} training images from large")
    assert out["test"]["threshold"] == point["threshold"]
    by_download = out["cv"]["pooled_last_epoch_by_download"]
    assert {d: v["n"] for d, v in by_download.items()} == {"large": first, "small": len(train) - first}
    with pytest.raises(ValueError, match=r"no training image comes from \['elsewhere'\]"):
        task.train(tmp_path / "records", tmp_path / "run2", config_files=["cls_tiny_test.yaml"], params_override={
            "training": {"folds": 2, "epochs": 1, "final_model": False},
            "evaluation": {"target_sensitivity": 0.9, "operating_point_downloads": ["elsewhere"]}})


def test_context_view_trains_on_jittered_boxes_with_a_served_like_operating_point(tmp_path):
    """The `cpu` input end to end on records: the context view, boxes jittered in training, and
    the screening threshold chosen on held-out views cut around jittered boxes."""
    data = synthetic.generate_dataset(tmp_path / "data", num_images=28, seed=3, image_size=(96, 128))
    build_tfrecords.build(data, tmp_path / "records", folds=2, seed=0, progress=False)
    out = task.train(tmp_path / "records", tmp_path / "run", config_files=["cls_tiny_test.yaml"], params_override={
        "data": {"view": "context", "margin": 0.5, "box_jitter": 0.1},
        "training": {"folds": 2, "epochs": 1, "final_epochs": 1},
        "evaluation": {"target_sensitivity": 0.9, "operating_point_box_jitter": 0.15}})
    point = json.loads((tmp_path / "run" / "operating_point.json").read_text())
    assert point["chosen_on"].endswith("their boxes jittered by 0.15")
    assert out["test"]["threshold"] == point["threshold"]
    predictions = [p for k in range(2) for p in
                   json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())["predictions"]]
    served = np.array([p["melanoma_probability_served_like"] for p in predictions])
    plain = np.array([p["melanoma_probability_last_epoch"] for p in predictions])
    assert len(served) == len(plain) and not np.allclose(served, plain, atol=1e-6)
