"""Stage 2: the masked-lesion melanoma classifier, trained with k-fold cross-validation.

The task runs fits; its parts live where Model Garden puts them: inputs in
`dataloaders.classification_input`, the network in `modeling.factory`, the optimizer in
`modeling.optimization`, the cross-validation summaries in `evaluation.cross_validation`.

Protocol: fold k of the train split (the folds stored in the records, so the same images as in
every other experiment) is held out while a model trains on the others; then a final model
trains on the whole train split and is evaluated once on the test split.

Every fit runs in its own folder (`fold_<k>/`, `final/`) with a per-epoch backup (Keras
`BackupAndRestore`), the best weights by validation AUC, a CSV history and TensorBoard logs. A
rerun after a kill continues the unfinished fit from its last finished epoch, with the early
stopping count and best-so-far carried over, and skips fits whose `result.json` exists.

The fits are independent, so a cluster runs them as parallel processes (`train --stage cls
--fold K`, `--fold final`) and then one summary (`--summarize`); `train` without them runs the
same three pieces in turn, in one process.

Class imbalance: class weights by default (`data.imbalance`), balanced sampling as an option.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from melanoma_tf import atomic, storage
from melanoma_tf.configs import classification as configs
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.evaluation import cross_validation
from melanoma_tf.evaluation import tta as tta_lib
from melanoma_tf.modeling import factory, input_guard, optimization, pretrained

TIMING_FILE = "timing.json"
FINAL, FINAL_MODEL = "final", "final_model.keras"


def build_model(params: configs.ClassificationExperiment, training: bool = True) -> keras.Model:
    """The configured classifier; with the training-only augmentation when `training`."""
    return factory.build_classifier(params, training)


def adapt_normalization(model: keras.Model, images: np.ndarray | tf.data.Dataset) -> None:
    """Sets the model's Normalization layers to the mean and variance of the training images'
    pixels (uint8 images, or a dataset of their batches) and, with model.descriptors, of their
    lesion descriptors."""
    if isinstance(images, np.ndarray):
        images = tf.data.Dataset.from_tensor_slices(images).batch(64)
    pixels = images.map(lambda x: tf.cast(x, tf.float32))
    names = {layer.name for layer in model.layers}
    if "normalization" in names and isinstance(model.get_layer("normalization"), keras.layers.Normalization):
        model.get_layer("normalization").adapt(pixels)
    if "descriptors_normalization" in names:
        model.get_layer("descriptors_normalization").adapt(pixels.map(model.get_layer("lesion_descriptors")))


class CSVLogger(keras.callbacks.CSVLogger):
    """Keras's CSVLogger; its on_train_end reads `file.closed`, which the GFile it opens for a
    bucket path lacks (Keras 3.15), so a fit into gs:// would fail after its last epoch."""

    def on_train_end(self, logs=None):
        if self.csv_file:
            self.csv_file.close()
        self.csv_file, self.writer = None, None


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that carries on the count of a killed fit: Keras resets it in
    on_train_begin, so the finished epochs' values are replayed through on_epoch_end."""

    def __init__(self, past_values: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.past_values = list(past_values)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for epoch, value in enumerate(self.past_values):
            self.on_epoch_end(epoch, {self.monitor: value})


def _resume_state(run_dir: Path) -> list[dict]:
    """History rows of the epochs the backup holds; a fit without a backup starts over."""
    backup_meta = run_dir / "backup" / "training_metadata.json"
    history = run_dir / "history.csv"
    if not backup_meta.exists():
        for stale in ("history.csv", "best.weights.h5", "logs", "backup", TIMING_FILE):
            storage.remove(run_dir / stale)
        return []
    done = json.loads(backup_meta.read_text())["epoch"]
    rows = list(csv.DictReader(history.open())) if history.exists() else []
    rows = [r for r in rows if int(r["epoch"]) < done]
    if rows:
        with history.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        history.unlink(missing_ok=True)
    return rows


@contextlib.contextmanager
def _timed(path: Path):
    """Adds the block's wall and CPU seconds (all threads of the process) to the totals in the
    JSON file at path, so that a resumed fit reports its whole cost."""
    totals = json.loads(path.read_text()) if path.is_file() else {"wall_seconds": 0.0, "cpu_seconds": 0.0}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        totals["wall_seconds"] += time.perf_counter() - wall
        totals["cpu_seconds"] += time.process_time() - cpu
        atomic.write_json(path, totals)


def fit(train: inputs.LesionSet, val: inputs.LesionSet | None, params: configs.ClassificationExperiment,
        run_dir: Path, epochs: int, callbacks: Sequence[keras.callbacks.Callback] = ()) -> tuple[keras.Model, int]:
    """Trains (or resumes) one model in run_dir; returns it with its last epoch's weights and the
    epoch (1-based) with the best validation AUC, whose weights are in run_dir/best.weights.h5
    (without validation: the last epoch)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    past = _resume_state(run_dir)
    keras.utils.set_random_seed(params.training.seed)
    model = build_model(params, training=True)
    if params.model.init_checkpoint:
        loaded = pretrained.load(model, params.model.init_checkpoint, params.model.init_checkpoint_layers)
        print(f"initialised {', '.join(loaded)} from {params.model.init_checkpoint}")
    if params.data.balance_downloads:
        train = inputs.balance_downloads(train)
    adapt_normalization(model, inputs.images(train, params.data, in_order=False))
    ds, steps, class_weight = inputs.training_dataset(train, params)
    model.compile(
        optimizer=optimization.build_optimizer(
            params.optimizer, steps or math.ceil(len(train) / params.data.batch_size), epochs),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc", multi_label=True, num_labels=2, label_weights=[0.0, 1.0]),
                 keras.metrics.CategoricalAccuracy(name="accuracy")])
    best_path = run_dir / "best.weights.h5"
    cbs: list[keras.callbacks.Callback] = [CSVLogger(str(run_dir / "history.csv"), append=True)]
    val_ds = None
    if val is not None:
        val_ds = inputs.validation_dataset(val, params.data)
        best_so_far = max((float(r["val_auc"]) for r in past), default=None)
        cbs.append(keras.callbacks.ModelCheckpoint(
            str(best_path), monitor="val_auc", mode="max", save_best_only=True, save_weights_only=True,
            initial_value_threshold=best_so_far))
        if params.training.early_stopping_patience:
            cbs.append(ResumableEarlyStopping([float(r["val_auc"]) for r in past], monitor="val_auc", mode="max",
                                              patience=params.training.early_stopping_patience))
    cbs += [keras.callbacks.BackupAndRestore(str(run_dir / "backup"), double_checkpoint=True),
            keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False),
            *callbacks]
    with _timed(run_dir / TIMING_FILE):
        model.fit(ds, validation_data=val_ds, epochs=epochs, steps_per_epoch=steps, class_weight=class_weight,
                  callbacks=cbs, verbose=params.training.verbose, shuffle=False)  # tf.data shuffles
    if val is None:
        return model, epochs
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    best = max(rows, key=lambda r: float(r["val_auc"]))
    return model, int(best["epoch"]) + 1


def predict(model: keras.Model, images: np.ndarray | tf.data.Dataset, tta: bool = False,
            batch_size: int = 64) -> np.ndarray:
    """Melanoma probabilities [N] of uint8 images, or of a dataset of uint8 batches
    (`inputs.images`); with tta, the mean over the 8 flips/rotations of each image."""
    def melanoma(x: np.ndarray) -> np.ndarray:
        return model.predict_on_batch(x)[:, inputs.MELANOMA]

    if isinstance(images, np.ndarray):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = (batch.numpy() for batch in images)
    scores = [tta_lib.average(melanoma, x) if tta else melanoma(x) for x in batches]
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def params_digest(params: configs.ClassificationExperiment) -> str:
    """Fingerprint of a run's config, stored with each fit's result: a summary pools only fits
    trained under the same one."""
    return hashlib.sha256(json.dumps(params.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_fold(data: inputs.LesionSet, params: configs.ClassificationExperiment, model_dir: Path, k: int,
               callbacks: Sequence[keras.callbacks.Callback] = (),
               negatives: inputs.LesionSet | None = None) -> dict:
    """Trains (or resumes, or skips when its result.json exists) cross-validation fold k in
    model_dir/fold_<k>/, the only folder it writes; returns its result. `negatives` (other
    lesions as not melanoma) join the fold's training images, never its held-out ones."""
    num_folds = params.training.folds
    run_dir = model_dir / f"fold_{k}"
    done = run_dir / "result.json"
    if done.exists():
        print(f"fold {k + 1}/{num_folds}: done before, skipped")
        return json.loads(done.read_text())
    train_idx, held_idx = inputs.fold_indices(data.folds, k, num_folds)
    train, held = data.subset(train_idx), data.subset(held_idx)
    if negatives is not None:
        train = train.concat(negatives.subset(inputs.fold_indices(negatives.folds, k, num_folds)[0]))
    print(f"fold {k + 1}/{num_folds}: {len(train)} training images ({train.labels.sum()} melanoma), "
          f"{len(held)} held out ({held.labels.sum()} melanoma)")
    model, best_epoch = fit(train, held, params, run_dir, params.training.epochs, callbacks)
    ev = params.evaluation
    last = predict(model, inputs.images(held, params.data), ev.tta)
    served_like = (predict(model, inputs.images(held, params.data, box_jitter=ev.operating_point_box_jitter), ev.tta)
                   if ev.operating_point_box_jitter else None)
    model.load_weights(str(run_dir / "best.weights.h5"))
    best = predict(model, inputs.images(held, params.data), ev.tta)
    result = cross_validation.fold_result(k, train, held, best, last, best_epoch, ev.threshold, served_like)
    result["params_digest"] = params_digest(params)
    atomic.write_json(done, result)
    auc = result["metrics"]["roc_auc"] if result["metrics"] else float("nan")
    print(f"fold {k + 1}/{num_folds}: AUC {auc:.3f}, best epoch {best_epoch}")
    keras.backend.clear_session()
    return result


def cross_validate(data: inputs.LesionSet, params: configs.ClassificationExperiment, model_dir: Path,
                   callbacks: Sequence[keras.callbacks.Callback] = (),
                   negatives: inputs.LesionSet | None = None) -> dict:
    """Runs (or resumes) every fold in turn; returns per-fold results and out-of-fold predictions."""
    for k in range(params.training.folds):
        train_fold(data, params, model_dir, k, callbacks, negatives)
    return finished_folds(params, model_dir)


class MissingFits(ValueError):
    """A summary (or a final model that takes its epochs from the folds) found fits absent or
    trained under another config."""


def finished_folds(params: configs.ClassificationExperiment, model_dir: Path) -> dict:
    """Every fold's result from disk and the pooled out-of-fold predictions; raises MissingFits
    naming each fold that is absent or was trained with other params."""
    results, missing, other = [], [], []
    for k in range(params.training.folds):
        done = model_dir / f"fold_{k}" / "result.json"
        if not done.exists():
            missing.append(k)
            continue
        result = json.loads(done.read_text())
        (results if result.get("params_digest") == params_digest(params) else other).append(result)
    if missing or other:
        problems = ([f"fold {', '.join(map(str, missing))} not trained yet (--fold K)"] if missing else []) + (
            [f"fold {', '.join(str(r['fold']) for r in other)} trained with other params"] if other else [])
        raise MissingFits(f"{model_dir}: {'; '.join(problems)}")
    return {"folds": results, "oof": [p | {"fold": r["fold"]} for r in results for p in r["predictions"]]}


def final_epochs(params: configs.ClassificationExperiment, model_dir: Path) -> int:
    """training.final_epochs, else the folds' median best epoch with early stopping (so the folds
    must be done first), else training.epochs."""
    t = params.training
    if t.final_epochs:
        return t.final_epochs
    if t.folds and t.early_stopping_patience:
        try:
            best = [r["best_epoch"] for r in finished_folds(params, model_dir)["folds"]]
        except MissingFits as e:
            raise MissingFits(f"{e}: with early stopping the final model trains for the folds' median best "
                              "epoch, so it comes after them (or set training.final_epochs)") from None
        return int(math.ceil(np.median(best)))
    return t.epochs


def train_final(data: inputs.LesionSet, params: configs.ClassificationExperiment, model_dir: Path,
                callbacks: Sequence[keras.callbacks.Callback] = (),
                negatives: inputs.LesionSet | None = None) -> keras.Model:
    """Trains (or resumes, or loads when done) the final model on the whole train split into
    model_dir/final/ and final_model.keras."""
    final_path = model_dir / FINAL_MODEL
    if final_path.exists():
        print("final model: done before, loaded")
        return keras.models.load_model(str(final_path), compile=False)  # see export_classifier.load_trained
    epochs = final_epochs(params, model_dir)
    final_data = data if negatives is None else data.concat(negatives)
    print(f"final model: {len(final_data)} training images, {epochs} epochs")
    model, _ = fit(final_data, None, params, model_dir / "final", epochs, callbacks)
    with atomic.atomic_path(final_path) as tmp:
        model.save(str(tmp))
    return model


def prepare_model_dir(params: configs.ClassificationExperiment, model_dir: Path) -> None:
    """Writes params.yaml, or checks that a run being resumed used the same params."""
    model_dir.mkdir(parents=True, exist_ok=True)
    saved = model_dir / "params.yaml"
    if saved.exists():
        if configs.load_config(saved).as_dict() != params.as_dict():
            raise ValueError(f"{model_dir} holds a run with other params ({saved}); "
                             "use another --model-dir or delete it")
        return
    with atomic.atomic_path(saved) as tmp:
        configs.save_config(params, str(tmp))


def resolve_params(experiment: str | None = None, config_files: Sequence[str] = (), params_override: str | dict = "",
                   folds: int | None = None, epochs: int | None = None,
                   extra: dict | None = None) -> configs.ClassificationExperiment:
    """The run's config: profile, YAML files, override string, the --folds/--epochs flags, then
    `extra` (what a caller such as the skin-bias study fixes)."""
    params = configs.build_config(experiment, config_files, params_override, lock=False)
    flags = {k: v for k, v in (("folds", folds), ("epochs", epochs)) if v is not None}
    if flags:
        params.override({"training": flags})
    if extra:
        params.override(extra)
    params.validate()
    params.lock()
    return params


def _read_train_split(data_dir: str | Path, params: configs.ClassificationExperiment
                      ) -> tuple[inputs.LesionSet, inputs.LesionSet | None]:
    data = inputs.read_index(data_dir, "train", params.data)
    print(f"train split: {len(data)} images ({data.labels.sum()} melanoma), view {params.data.view!r}")
    negatives = None
    if params.data.other_as_negative:
        negatives = inputs.read_other_negatives(data_dir, "train", params.data)
        print(f"            and {len(negatives)} other lesions, trained on as not melanoma")
    return data, negatives


def fit_input_guard(model: keras.Model, data_dir: str | Path, params: configs.ClassificationExperiment,
                    model_dir: Path, refusal_rate: float | None = None) -> None:
    """The input guard of the final model (`modeling.input_guard`): its Gaussian fitted on the
    training views of folds 1..K-1, its thresholds on fold 0's, refusing `refusal_rate` of them
    (default evaluation.input_guard_refusal_rate); saved for the export."""
    train = inputs.read_index(data_dir, "train", params.data)
    features, statistics = input_guard.describe(inputs.images(train, params.data), factory.inference_model(
        model, params))
    guard = input_guard.fit(features, statistics, train.folds == 0,
                            refusal_rate or params.evaluation.input_guard_refusal_rate)
    guard.save(model_dir / input_guard.GUARD_FILE)
    print(f"input guard: distance threshold {guard.max_distance:.1f}, fitted on {int((train.folds != 0).sum())} "
          f"training views, thresholds on fold 0's {int((train.folds == 0).sum())}")


def summarize(data_dir: str | Path, params: configs.ClassificationExperiment, model_dir: Path) -> dict:
    """Pools the folds' out-of-fold predictions (cv_metrics.json, the operating point the export
    reads) and evaluates the final model on the test split; refuses (MissingFits) when a fold or
    the final model is absent, or was trained with other params. Returns {"cv", "test"}."""
    t = params.training
    final_path = model_dir / FINAL_MODEL
    cv = finished_folds(params, model_dir) if t.folds else None  # checked before anything is written
    if t.final_model and not final_path.exists():
        raise MissingFits(f"{model_dir}: the final model is not trained yet (--fold final)")
    out: dict = {"cv": None, "test": None}
    rows: list[dict] = []
    threshold = params.evaluation.threshold
    if cv:
        out["cv"] = cross_validation.summarize_cv(cv, params, model_dir)
        rows += [p | {"split": "train"} for p in cv["oof"]]
        point = cross_validation.operating_point(cv, params, model_dir)
        threshold = point["threshold"] if point else threshold
    elif params.evaluation.target_sensitivity:
        print("evaluation.target_sensitivity needs cross-validation (training.folds > 0): "
              f"using evaluation.threshold {threshold}")
    if t.final_model:
        model = keras.models.load_model(str(final_path), compile=False)  # see export_classifier.load_trained
        if params.evaluation.input_guard_refusal_rate and t.folds:
            fit_input_guard(model, data_dir, params, model_dir)
        try:
            test = inputs.read_index(data_dir, "test", params.data)
        except (FileNotFoundError, ValueError) as e:
            print(f"no test evaluation: {e}")
        else:
            score = predict(model, inputs.images(test, params.data), params.evaluation.tta)
            out["test"] = cross_validation.evaluate(test.labels, score, params, threshold)
            out["test"]["calibration"] = metrics.calibration(test.labels, score)
            atomic.write_json(model_dir / "test_metrics.json", out["test"])
            metrics.plot_roc({"test": (test.labels, score)}, model_dir / "roc_test.png", "Test split ROC")
            metrics.plot_confusion(test.labels, score, model_dir / "confusion_test.png", threshold, "Test split")
            metrics.plot_reliability(test.labels, score, model_dir / "reliability_test.png", "Test split calibration")
            rows += [{"image_id": i, "split": "test", "fold": -1, "label": int(y), "melanoma_probability": float(s)}
                     for i, y, s in zip(test.image_ids, test.labels, score)]
    cross_validation.write_predictions(model_dir / "predictions.csv", rows, threshold)
    for name, result in (("cross-validation", out["cv"] and out["cv"]["pooled"]), ("test", out["test"])):
        if result:
            print(f"{name} ({result['n']} images): " + ", ".join(
                f"{k} {metrics.format_ci(result['metrics'][k])}" for k in ("roc_auc", "sensitivity", "specificity")))
    return out


def train(data_dir: str | Path, model_dir: str | Path, experiment: str | None = None,
          config_files: Sequence[str] = (), params_override: str | dict = "", folds: int | None = None,
          epochs: int | None = None, callbacks: Sequence[keras.callbacks.Callback] = (),
          fit_only: int | str | None = None, summarize_only: bool = False) -> dict | None:
    """Cross-validates, trains the final model and evaluates it on the test split; or one piece.

    The three pieces are the ones a cluster runs in separate processes, and this runs them in
    turn: every fold (`train_fold`), the final model (`train_final`), then `summarize`.
    fit_only: K trains fold K only, 'final' the final model only (returns None);
    summarize_only: only the summary, from fits already on disk.

    Returns {"cv": cv_metrics or None, "test": test_metrics or None}; writes cv_metrics.json,
    test_metrics.json (with calibration), roc_*.png, confusion_*.png, reliability_test.png,
    predictions.csv, operating_point.json (with evaluation.target_sensitivity), final_model.keras and
    params.yaml into model_dir. `callbacks` are added to every fit (tests, profiling).
    """
    params = resolve_params(experiment, config_files, params_override, folds, epochs)
    model_dir = storage.path(model_dir)
    prepare_model_dir(params, model_dir)
    t = params.training
    if not t.folds and not t.final_model:
        raise ValueError("nothing to do: training.folds is 0 and training.final_model is false")
    if fit_only is not None and str(fit_only) != FINAL and not 0 <= int(fit_only) < t.folds:
        raise ValueError(f"fold {fit_only}: the run has folds 0..{t.folds - 1} (training.folds={t.folds})")
    if fit_only == FINAL and not t.final_model:
        raise ValueError("--fold final: training.final_model is false")
    if summarize_only:
        return summarize(data_dir, params, model_dir)
    data, negatives = _read_train_split(data_dir, params)
    unknown = set(params.evaluation.operating_point_downloads) - set(data.downloads)
    if unknown:  # before hours of training, not at the summary
        raise ValueError(f"evaluation.operating_point_downloads: no training image comes from {sorted(unknown)}; "
                         f"the records' download folders are {sorted(set(data.downloads))}")
    if fit_only is None or str(fit_only) != FINAL:
        for k in range(t.folds) if fit_only is None else [int(fit_only)]:
            train_fold(data, params, model_dir, k, callbacks, negatives)
    if t.final_model and fit_only in (None, FINAL):
        train_final(data, params, model_dir, callbacks, negatives)
        keras.backend.clear_session()
    return summarize(data_dir, params, model_dir) if fit_only is None else None
