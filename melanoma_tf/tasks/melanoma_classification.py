"""Stage 2: the masked-lesion melanoma classifier, trained with k-fold cross-validation.

    records --parse_lesion--> image, mask --masking.view_fn--> uint8 [S, S, 3] --> AlexNet

Protocol: fold k of the train split (the folds stored in the records, so the same images as in
every other experiment) is held out while a model trains on the others; then a final model
trains on the whole train split and is evaluated once on the test split.

Every fit runs in its own folder (`fold_<k>/`, `final/`) with a per-epoch backup (Keras
`BackupAndRestore`), the best weights by validation AUC, a CSV history and TensorBoard logs. A
rerun after a kill continues the unfinished fit from its last finished epoch, with the early
stopping count and best-so-far carried over, and skips fits whose `result.json` exists.

Class imbalance: class weights by default (`data.imbalance`), balanced sampling as an option.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from melanoma_tf import atomic, masking, tfrecords
from melanoma_tf.configs import classification as configs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.evaluation import tta as tta_lib
from melanoma_tf.modeling import factory, pretrained

NEVUS, MELANOMA = 0, 1
TIMING_FILE = "timing.json"


@dataclasses.dataclass
class LesionSet:
    """Classifier inputs of one split, in memory: a few thousand 227^2 images fit easily, and
    masking each image once (not every epoch) is most of the input pipeline's cost."""
    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int [N], 0 nevus, 1 melanoma
    folds: np.ndarray  # int [N], -1 in the test split
    image_ids: np.ndarray  # str [N]

    def subset(self, index: np.ndarray) -> "LesionSet":
        return LesionSet(self.images[index], self.labels[index], self.folds[index], self.image_ids[index])

    def __len__(self) -> int:
        return len(self.labels)


def read_lesions(data_dir: str | Path, split: str, data: configs.DataConfig,
                 view: str | None = None, classes: Sequence[int] = (NEVUS, MELANOMA)) -> LesionSet:
    """Images of a split whose class is one of `classes` (record label ids; 2 is seborrheic
    keratosis or another benign lesion) and whose mask the config accepts, as the classifier
    sees them (`view` overrides data.view)."""
    files = sorted(tf.io.gfile.glob(tfrecords.split_pattern(data_dir, split)))
    if not files:
        raise FileNotFoundError(f"no {tfrecords.split_pattern(data_dir, split)} records")
    to_view = masking.view_fn(view or data.view)
    sources = tf.constant(list(data.mask_sources) or [""])

    def usable(r):
        wanted = tf.reduce_any(tf.equal(r["label"], tf.constant(list(classes), tf.int64)))
        accepted = tf.logical_and(r["has_mask"] == 1, tf.reduce_any(tf.equal(r["mask_source"], sources)))
        return tf.logical_and(wanted, tf.logical_or(accepted, data.include_unmasked))

    def prepare(r):
        return (to_view(r["image"], r["mask"], data.input_size, data.margin), r["label"], r["fold"],
                r["image_id"])

    ds = (tf.data.TFRecordDataset(files).map(tfrecords.parse_lesion, tf.data.AUTOTUNE)
          .filter(usable).map(prepare, tf.data.AUTOTUNE).batch(64).prefetch(1))
    parts = [[t.numpy() for t in batch] for batch in ds]
    if not parts:
        raise ValueError(f"{data_dir}: no usable {split} image (mask sources {list(data.mask_sources)}, "
                         f"include_unmasked={data.include_unmasked})")
    images, labels, folds, ids = (np.concatenate(p) for p in zip(*parts))
    return LesionSet(images, labels.astype(int), folds.astype(int), ids.astype(str))


def fold_indices(folds: np.ndarray, k: int, num_folds: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices of cross-validation fold k of num_folds.

    Stored fold f belongs to fold f % num_folds, so fewer folds than were stored merge whole
    stored folds, and images of one lesion still never straddle training and held-out rows.
    """
    stored = np.unique(folds)
    if stored.min() < 0 or num_folds > len(stored):
        raise ValueError(f"the records hold folds {stored.tolist()}; cannot make {num_folds} folds "
                         "(rebuild them with build_tfrecords --folds)")
    held = folds % num_folds == k
    return np.flatnonzero(~held), np.flatnonzero(held)


def build_model(params: configs.ClassificationExperiment, training: bool = True) -> keras.Model:
    """The configured classifier; with the training-only augmentation when `training`."""
    return factory.build_classifier(params, training)


def adapt_normalization(model: keras.Model, images: np.ndarray) -> None:
    """Sets the model's Normalization layers to the mean and variance of the training images'
    pixels and, with model.descriptors, of their lesion descriptors."""
    pixels = tf.data.Dataset.from_tensor_slices(images).batch(64).map(lambda x: tf.cast(x, tf.float32))
    names = {layer.name for layer in model.layers}
    if "normalization" in names and isinstance(model.get_layer("normalization"), keras.layers.Normalization):
        model.get_layer("normalization").adapt(pixels)
    if "descriptors_normalization" in names:
        model.get_layer("descriptors_normalization").adapt(pixels.map(model.get_layer("lesion_descriptors")))


def learning_rate_schedule(opt: configs.OptimizerConfig, steps_per_epoch: int,
                           epochs: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warmup, then constant or cosine decay reaching 0 exactly after the last epoch."""
    warmup = round(opt.warmup_epochs * steps_per_epoch)
    decay = max(epochs * steps_per_epoch - warmup, 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else opt.learning_rate, decay_steps=decay,
        alpha=1.0 if opt.schedule == "constant" else 0.0,
        warmup_target=opt.learning_rate if warmup else None, warmup_steps=warmup)


def build_optimizer(opt: configs.OptimizerConfig, steps_per_epoch: int, epochs: int) -> keras.optimizers.Optimizer:
    """SGD with momentum or AdamW on `learning_rate_schedule`."""
    common = dict(learning_rate=learning_rate_schedule(opt, steps_per_epoch, epochs),
                  weight_decay=opt.weight_decay or None, clipnorm=opt.clipnorm)
    if opt.type == "sgd":
        optimizer = keras.optimizers.SGD(momentum=opt.momentum, nesterov=opt.nesterov, **common)
    else:
        optimizer = keras.optimizers.AdamW(**common)
    if opt.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])  # not BN scales/offsets
    return optimizer


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(2, dtype=np.float32)[labels]


def _training_data(data: LesionSet, params: configs.ClassificationExperiment):
    """(dataset, steps_per_epoch, class_weight) for fit."""
    cfg, seed = params.data, params.training.seed
    steps = math.ceil(len(data) / cfg.batch_size)
    if cfg.imbalance == "balanced_sampling":
        per_class = []
        for c in (NEVUS, MELANOMA):
            rows = data.labels == c
            per_class.append(tf.data.Dataset.from_tensor_slices((data.images[rows], _one_hot(data.labels[rows])))
                             .shuffle(len(data), seed=seed).repeat())
        ds = tf.data.Dataset.sample_from_datasets(per_class, [0.5, 0.5], seed=seed)
        return ds.batch(cfg.batch_size).prefetch(2), steps, None
    ds = (tf.data.Dataset.from_tensor_slices((data.images, _one_hot(data.labels)))
          .shuffle(len(data), seed=seed, reshuffle_each_iteration=True).batch(cfg.batch_size).prefetch(2))
    class_weight = None
    if cfg.imbalance == "class_weight":
        weights = compute_class_weight("balanced", classes=np.array([NEVUS, MELANOMA]), y=data.labels)
        class_weight = {NEVUS: float(weights[0]), MELANOMA: float(weights[1])}
    return ds, None, class_weight


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that carries on the count of a killed fit: Keras resets it in
    on_train_begin, so the finished epochs' values are replayed there."""

    def __init__(self, past_values: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.past_values = list(past_values)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._set_monitor_op()
        for epoch, value in enumerate(self.past_values):
            self.wait += 1
            if self._is_improvement(value, self.best):
                self.best, self.best_epoch, self.wait = value, epoch, 0


def _resume_state(run_dir: Path) -> list[dict]:
    """History rows of the epochs the backup holds; a fit without a backup starts over."""
    backup_meta = run_dir / "backup" / "training_metadata.json"
    history = run_dir / "history.csv"
    if not backup_meta.exists():
        for stale in ("history.csv", "best.weights.h5", "logs", "backup", TIMING_FILE):
            path = run_dir / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
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


def fit(train: LesionSet, val: LesionSet | None, params: configs.ClassificationExperiment,
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
    adapt_normalization(model, train.images)
    ds, steps, class_weight = _training_data(train, params)
    model.compile(
        optimizer=build_optimizer(params.optimizer, steps or math.ceil(len(train) / params.data.batch_size), epochs),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc", multi_label=True, num_labels=2, label_weights=[0.0, 1.0]),
                 keras.metrics.CategoricalAccuracy(name="accuracy")])
    best_path = run_dir / "best.weights.h5"
    cbs: list[keras.callbacks.Callback] = [keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True)]
    val_ds = None
    if val is not None:
        val_ds = tf.data.Dataset.from_tensor_slices((val.images, _one_hot(val.labels))).batch(params.data.batch_size)
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


def predict(model: keras.Model, images: np.ndarray, tta: bool = False, batch_size: int = 64) -> np.ndarray:
    """Melanoma probabilities [N]; with tta, the mean over the 8 flips/rotations of each image."""
    def melanoma(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=batch_size, verbose=0)[:, MELANOMA]

    return tta_lib.average(melanoma, images) if tta else melanoma(images)


def _fold_metrics(labels: np.ndarray, score: np.ndarray, threshold: float) -> dict | None:
    try:
        return metrics.classification_metrics(labels, score, threshold)
    except ValueError:  # a held-out fold with one class only (tiny datasets)
        return None


def _fold_result(k: int, train: LesionSet, held: LesionSet, best: np.ndarray, last: np.ndarray,
                 best_epoch: int, threshold: float) -> dict:
    return {"fold": k, "n_train": len(train), "n_val": len(held), "n_val_melanoma": int(held.labels.sum()),
            "best_epoch": best_epoch, "metrics": _fold_metrics(held.labels, best, threshold),
            "metrics_last_epoch": _fold_metrics(held.labels, last, threshold),
            "predictions": [{"image_id": i, "label": int(y), "melanoma_probability": float(b),
                             "melanoma_probability_last_epoch": float(s)}
                            for i, y, b, s in zip(held.image_ids, held.labels, best, last)]}


def cross_validate(data: LesionSet, params: configs.ClassificationExperiment, model_dir: Path,
                   callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Runs (or resumes) every fold; returns per-fold results and out-of-fold predictions."""
    num_folds, results = params.training.folds, []
    for k in range(num_folds):
        run_dir = model_dir / f"fold_{k}"
        done = run_dir / "result.json"
        if done.exists():
            results.append(json.loads(done.read_text()))
            print(f"fold {k + 1}/{num_folds}: done before, skipped")
            continue
        train_idx, held_idx = fold_indices(data.folds, k, num_folds)
        train, held = data.subset(train_idx), data.subset(held_idx)
        print(f"fold {k + 1}/{num_folds}: {len(train)} training images ({train.labels.sum()} melanoma), "
              f"{len(held)} held out ({held.labels.sum()} melanoma)")
        model, best_epoch = fit(train, held, params, run_dir, params.training.epochs, callbacks)
        last = predict(model, held.images, params.evaluation.tta)
        model.load_weights(str(run_dir / "best.weights.h5"))
        best = predict(model, held.images, params.evaluation.tta)
        result = _fold_result(k, train, held, best, last, best_epoch, params.evaluation.threshold)
        atomic.write_json(done, result)
        results.append(result)
        auc = result["metrics"]["roc_auc"] if result["metrics"] else float("nan")
        print(f"fold {k + 1}/{num_folds}: AUC {auc:.3f}, best epoch {best_epoch}")
        keras.backend.clear_session()
    return {"folds": results,
            "oof": [p | {"fold": r["fold"]} for r in results for p in r["predictions"]]}


def _evaluate(labels: np.ndarray, score: np.ndarray, params: configs.ClassificationExperiment,
              threshold: float | None = None) -> dict:
    ev = params.evaluation
    threshold = ev.threshold if threshold is None else threshold
    return {"n": int(len(labels)), "n_melanoma": int(labels.sum()), "threshold": threshold,
            "metrics": metrics.metrics_with_ci(labels, score, threshold, ev.bootstrap_samples,
                                               params.training.seed),
            "table_ii": metrics.table_ii(labels, score, threshold), "paper": metrics.PAPER}


def operating_point(cv: dict, params: configs.ClassificationExperiment, model_dir: Path) -> dict | None:
    """With evaluation.target_sensitivity, the threshold that reaches it on the out-of-fold
    predictions (each fold's last epoch: not selected on them), written to operating_point.json
    for the exporter; None without a target."""
    target = params.evaluation.target_sensitivity
    if not target:
        return None
    labels = np.array([p["label"] for p in cv["oof"]])
    score = np.array([p["melanoma_probability_last_epoch"] for p in cv["oof"]])
    threshold = metrics.threshold_for_sensitivity(labels, score, target)
    chosen = metrics.classification_metrics(labels, score, threshold)
    point = {"threshold": threshold, "target_sensitivity": target,
             "chosen_on": f"out-of-fold predictions (last epoch) of {len(labels)} training images",
             "sensitivity": chosen["sensitivity"], "specificity": chosen["specificity"]}
    atomic.write_json(model_dir / metrics.OPERATING_POINT_FILE, point)
    print(f"operating point: threshold {threshold:.4f} gives sensitivity {point['sensitivity']:.3f}, "
          f"specificity {point['specificity']:.3f} out of fold")
    return point


def summarize_cv(cv: dict, params: configs.ClassificationExperiment, model_dir: Path, title: str = "") -> dict:
    """cv_metrics.json, roc_cv.png and confusion_cv.png from cross_validate's results.

    `pooled`/`mean_sd` use each fold's best epoch by held-out AUC, as early stopping restores it:
    that epoch is chosen on the images it is then scored on, so these are optimistic. The
    `*_last_epoch` entries use each fold's last epoch and carry no such selection.
    """
    labels = np.array([p["label"] for p in cv["oof"]])
    score = np.array([p["melanoma_probability"] for p in cv["oof"]])
    last = np.array([p["melanoma_probability_last_epoch"] for p in cv["oof"]])
    per_fold = [r["metrics"] for r in cv["folds"] if r["metrics"]]
    per_fold_last = [r["metrics_last_epoch"] for r in cv["folds"] if r["metrics_last_epoch"]]
    summary = {
        "protocol": f"{params.training.folds}-fold cross-validation over the train split, out-of-fold "
                    "predictions pooled; best epoch = highest held-out AUC (optimistic), last epoch = unselected",
        "per_fold": [{k: r[k] for k in ("fold", "n_train", "n_val", "n_val_melanoma", "best_epoch", "metrics",
                                        "metrics_last_epoch")} for r in cv["folds"]],
        "mean_sd": metrics.summarize_folds(per_fold) if per_fold else None,
        "pooled": _evaluate(labels, score, params),
        "mean_sd_last_epoch": metrics.summarize_folds(per_fold_last) if per_fold_last else None,
        "pooled_last_epoch": _evaluate(labels, last, params),
    }
    atomic.write_json(model_dir / "cv_metrics.json", summary)
    metrics.plot_roc({"out-of-fold": (labels, score)}, model_dir / "roc_cv.png", title or "Cross-validation ROC")
    metrics.plot_confusion(labels, score, model_dir / "confusion_cv.png", params.evaluation.threshold,
                           title or "Cross-validation (pooled)")
    return summary


def _write_predictions(path: Path, rows: list[dict], threshold: float) -> None:
    with atomic.atomic_file(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "split", "fold", "label", "melanoma_probability", "predicted",
                         "melanoma_probability_last_epoch"])
        for r in rows:
            last = r.get("melanoma_probability_last_epoch")
            writer.writerow([r["image_id"], r["split"], r["fold"], r["label"], f"{r['melanoma_probability']:.6f}",
                             int(r["melanoma_probability"] >= threshold), "" if last is None else f"{last:.6f}"])


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
        configs.save_config(params, tmp)


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


def train(data_dir: str | Path, model_dir: str | Path, experiment: str | None = None,
          config_files: Sequence[str] = (), params_override: str | dict = "", folds: int | None = None,
          epochs: int | None = None, callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Cross-validates, trains the final model and evaluates it on the test split.

    Returns {"cv": cv_metrics or None, "test": test_metrics or None}; writes cv_metrics.json,
    test_metrics.json (with calibration), roc_*.png, confusion_*.png, reliability_test.png,
    predictions.csv, operating_point.json (with evaluation.target_sensitivity), final_model.keras and
    params.yaml into model_dir. `callbacks` are added to every fit (tests, profiling).
    """
    params = resolve_params(experiment, config_files, params_override, folds, epochs)
    model_dir = Path(model_dir)
    prepare_model_dir(params, model_dir)
    t = params.training
    if not t.folds and not t.final_model:
        raise ValueError("nothing to do: training.folds is 0 and training.final_model is false")
    data = read_lesions(data_dir, "train", params.data)
    print(f"train split: {len(data)} images ({data.labels.sum()} melanoma), view {params.data.view!r}")
    out: dict = {"cv": None, "test": None}
    rows: list[dict] = []
    best_epochs: list[int] = []
    threshold = params.evaluation.threshold
    if t.folds:
        cv = cross_validate(data, params, model_dir, callbacks)
        out["cv"] = summarize_cv(cv, params, model_dir)
        rows += [p | {"split": "train"} for p in cv["oof"]]
        best_epochs = [r["best_epoch"] for r in cv["folds"]]
        point = operating_point(cv, params, model_dir)
        threshold = point["threshold"] if point else threshold
    elif params.evaluation.target_sensitivity:
        print("evaluation.target_sensitivity needs cross-validation (training.folds > 0): "
              f"using evaluation.threshold {threshold}")
    if t.final_model:
        final_path = model_dir / "final_model.keras"
        if final_path.exists():
            print("final model: done before, loaded")
            model = keras.models.load_model(final_path, compile=False)  # see export_classifier.load_trained
        else:
            stopped_early = best_epochs and t.early_stopping_patience
            epochs_final = t.final_epochs or (int(math.ceil(np.median(best_epochs))) if stopped_early else t.epochs)
            print(f"final model: {len(data)} training images, {epochs_final} epochs")
            model, _ = fit(data, None, params, model_dir / "final", epochs_final, callbacks)
            with atomic.atomic_path(final_path) as tmp:
                model.save(tmp)
        try:
            test = read_lesions(data_dir, "test", params.data)
        except (FileNotFoundError, ValueError) as e:
            print(f"no test evaluation: {e}")
        else:
            score = predict(model, test.images, params.evaluation.tta)
            out["test"] = _evaluate(test.labels, score, params, threshold)
            out["test"]["calibration"] = metrics.calibration(test.labels, score)
            atomic.write_json(model_dir / "test_metrics.json", out["test"])
            metrics.plot_roc({"test": (test.labels, score)}, model_dir / "roc_test.png", "Test split ROC")
            metrics.plot_confusion(test.labels, score, model_dir / "confusion_test.png", threshold, "Test split")
            metrics.plot_reliability(test.labels, score, model_dir / "reliability_test.png", "Test split calibration")
            rows += [{"image_id": i, "split": "test", "fold": -1, "label": int(y), "melanoma_probability": float(s)}
                     for i, y, s in zip(test.image_ids, test.labels, score)]
    _write_predictions(model_dir / "predictions.csv", rows, threshold)
    for name, result in (("cross-validation", out["cv"] and out["cv"]["pooled"]), ("test", out["test"])):
        if result:
            print(f"{name} ({result['n']} images): " + ", ".join(
                f"{k} {metrics.format_ci(result['metrics'][k])}" for k in ("roc_auc", "sensitivity", "specificity")))
    return out
