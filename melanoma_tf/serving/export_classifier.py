"""Exports the trained classifier as a TF Serving SavedModel version folder.

The serving contract (the gRPC client is built against exactly these names):

    signature 'serving_default'
      input   masked_image          uint8   [None, 227, 227, 3]
      outputs melanoma_probability  float32 [None]
              probabilities         float32 [None, 2]          (nevus, melanoma)
              class_id              int32   [None]             (1 = melanoma, at probability >= threshold)
              threshold             float32 [None]             (the decision threshold class_id used)

    signature 'explain': the same input and outputs, and
              heat_map              float32 [None, 227, 227]   (Grad-CAM of the melanoma probability, 0-1)

    a run with an input guard (`input_guard.npz`, `modeling.input_guard`) adds to both
              input_distance        float32 [None]             (> 1: not like the training views)
              input_status          int32   [None]             (contract.INPUT_OK / _NOT_DERMOSCOPY / _UNUSABLE)

The input is the masked lesion as the segmenter's export produces it
(`contract.CLASSIFIER_INPUT_SIZE`), whatever size the classifier trained at (`data.input_size`):
another size is resized in the graph, so any classifier export chains with any segmenter
export. The threshold is the run's operating point (`operating_point.json`, chosen for a target
sensitivity on out-of-fold predictions) when it has one, else `evaluation.threshold`; both
files go into assets.extra beside the run's params.yaml. The export module follows Model
Garden's `export_base.ExportModule`; the exported network is the trained one without its
augmentation layers (identities at inference anyway).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf
from official.core import export_base

from melanoma_tf import contract, storage
from melanoma_tf.configs import classification as configs
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.evaluation import cross_validation
from melanoma_tf.modeling import factory, grad_cam, input_guard
from melanoma_tf.serving import versions, warmup

SIGNATURE = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
INPUT_SIZE = contract.CLASSIFIER_INPUT_SIZE


def _inference_step(masked_image: tf.Tensor, model: keras.Model) -> tf.Tensor:
    return model(masked_image, training=False)


class ClassifierModule(export_base.ExportModule):
    """uint8 masked lesions in; melanoma probability, both class probabilities and class id out."""

    def __init__(self, params: configs.ClassificationExperiment, model: keras.Model, threshold: float,
                 guard: input_guard.Guard | None = None):
        super().__init__(params, model, inference_step=_inference_step)
        self.model_size, self.threshold, self.guard = params.data.input_size, threshold, guard
        self.with_features = input_guard.with_features(model) if guard is not None else None
        # The SavedModel must reach every variable the graph captures; TF's object graph does
        # not see the seed generators of dropout layers inside a nested Keras 3 model (the
        # pretrained backbone), which the traced call captures even at inference.
        self.model_variables = [v.value for v in model.variables]

    def _model_input(self, masked_image: tf.Tensor) -> tf.Tensor:
        # A loaded signature checks the dtype but not the shape; say which input is wrong.
        masked_image = tf.ensure_shape(masked_image, [None, INPUT_SIZE, INPUT_SIZE, 3], name=contract.MASKED_IMAGE)
        if self.model_size != INPUT_SIZE:  # as masking would have made it at the training size
            masked_image = tf.cast(tf.round(tf.image.resize(masked_image, [self.model_size] * 2, antialias=True)),
                                   tf.uint8)
        return masked_image

    def serve(self, masked_image: tf.Tensor) -> Mapping[str, tf.Tensor]:
        image = self._model_input(masked_image)
        if self.guard is None:
            probabilities = self.inference_step(image)
        else:
            probabilities, features = self.with_features(image, training=False)
        probabilities = tf.cast(probabilities, tf.float32)
        melanoma = probabilities[:, contract.CLASS_NAMES.index("melanoma")]
        out = {"melanoma_probability": melanoma, "probabilities": probabilities,
               "class_id": tf.cast(melanoma >= self.threshold, tf.int32),
               "threshold": tf.fill(tf.shape(melanoma), tf.constant(self.threshold, tf.float32))}
        if self.guard is not None:
            out[contract.INPUT_DISTANCE], out[contract.INPUT_STATUS] = input_guard.check(image, features, self.guard)
        return out

    def explain(self, masked_image: tf.Tensor) -> Mapping[str, tf.Tensor]:
        """`serve`'s outputs and the Grad-CAM heat map of the melanoma probability
        (`modeling.grad_cam`) at the input's size: for reports and audits, not for every call."""
        heat = grad_cam.heat_map(self.model, self._model_input(masked_image))
        return {**self.serve(masked_image),
                contract.HEAT_MAP: tf.image.resize(heat[..., None], [INPUT_SIZE, INPUT_SIZE])[..., 0]}

    def get_inference_signatures(self, function_keys: Mapping[str, str]) -> dict:
        spec = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.uint8, name=contract.MASKED_IMAGE)
        fns = {SIGNATURE: self.serve, contract.EXPLAIN_SIGNATURE: self.explain}
        return {key: tf.function(fns[key], input_signature=[spec]).get_concrete_function()
                for key in function_keys.values()}


def decision_threshold(model_dir: str | Path, params: configs.ClassificationExperiment) -> float:
    """The run's operating point if it chose one, else evaluation.threshold."""
    point = storage.path(model_dir) / metrics.OPERATING_POINT_FILE
    return float(json.loads(point.read_text())["threshold"]) if point.is_file() else params.evaluation.threshold


def load_trained(model_dir: str | Path, checkpoint: str | Path | None = None
                 ) -> tuple[configs.ClassificationExperiment, keras.Model]:
    """The run's params and its inference network (no augmentation).

    checkpoint: default `final_model.keras`; also any `.keras` model or `.weights.h5` file of the
    run (e.g. `fold_0/best.weights.h5`).
    """
    model_dir = storage.path(model_dir)
    params = configs.load_config(model_dir / "params.yaml")
    path = storage.path(checkpoint) if checkpoint else model_dir / "final_model.keras"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained classifier (train it first, or pass --checkpoint)")
    if path.name.endswith(".weights.h5"):
        trained = factory.build_classifier(params, training=True)
        trained.load_weights(str(path))
    else:
        # compile=False: Keras 3.15 cannot rebuild the saved AUC(label_weights) metric, and
        # inference needs no optimizer or metrics anyway.
        trained = keras.models.load_model(str(path), compile=False)
    return params, factory.inference_model(trained, params)


def _mean_of(members: list[keras.Model], name: str) -> keras.Model:
    """One network averaging the members' probabilities (their Grad-CAM: the mean of theirs)."""
    image = keras.Input(members[0].inputs[0].shape[1:], dtype=members[0].inputs[0].dtype, name="image")
    mean = keras.layers.Average(name=f"{name}_mean")([member(image) for member in members])
    return keras.Model(image, mean, name=name)


def load_fold_ensemble(model_dir: str | Path) -> tuple[configs.ClassificationExperiment, keras.Model]:
    """The run's params and one network that averages the probabilities of its cross-validation
    folds' models (each fold's `best.weights.h5`): the five models cross-validation trained
    anyway, served as one."""
    model_dir = storage.path(model_dir)
    params = configs.load_config(model_dir / "params.yaml")
    if params.training.folds < 2:
        raise ValueError(f"{model_dir}: a fold ensemble needs a cross-validated run "
                         f"(training.folds={params.training.folds})")
    members = []
    for k in range(params.training.folds):
        network = load_trained(model_dir, model_dir / f"fold_{k}" / "best.weights.h5")[1]
        members.append(keras.Model(network.inputs[0], network.outputs[0], name=f"fold_{k}"))
    return params, _mean_of(members, "fold_ensemble")


def load_run_ensemble(model_dirs: list[str | Path]) -> tuple[configs.ClassificationExperiment, keras.Model, float]:
    """The first run's params, one network averaging the final models of several runs (e.g.
    ImageNet's and a dermoscopy backbone's), and its operating point: the threshold reaching the
    runs' target sensitivity on the mean of their out-of-fold predictions (`predictions.csv`),
    so that one probability and one threshold are served."""
    dirs = [storage.path(d) for d in model_dirs]
    loaded = [load_trained(d) for d in dirs]
    params = loaded[0][0]
    # The segmenter's export cuts one view for them all: the members must have trained on it.
    inputs = {(p.data.input_size, p.data.view, p.data.margin) for p, _ in loaded}
    if len(inputs) > 1:
        raise ValueError(f"runs {[str(d) for d in dirs]} take different inputs (size, view, margin) "
                         f"{sorted(inputs)}")
    out_of_fold = [cross_validation.read_predictions(d, "train") for d in dirs]
    ids = sorted(set.intersection(*(set(p) for p in out_of_fold)))
    if not ids:
        raise ValueError(f"runs {[str(d) for d in dirs]}: no out-of-fold predictions in common")
    labels = np.array([out_of_fold[0][i][0] for i in ids])
    mean = np.mean([[p[i][1] for i in ids] for p in out_of_fold], axis=0)
    threshold = metrics.threshold_for_sensitivity(labels, mean, params.evaluation.target_sensitivity)
    members = [keras.Model(m.inputs[0], m.outputs[0], name=f"run_{k}") for k, (_, m) in enumerate(loaded)]
    return params, _mean_of(members, "run_ensemble"), float(threshold)


def warmup_images(batch: int = 2) -> np.ndarray:
    """TF Serving warm-up input: a small batch of black to mid-grey masked images."""
    return np.stack([np.full((INPUT_SIZE, INPUT_SIZE, 3), v, np.uint8) for v in np.linspace(0, 128, batch)])


def export(model_dir: str | Path, export_dir: str | Path, checkpoint: str | Path | None = None,
           fold_ensemble: bool = False, ensemble_with: list[str | Path] = ()) -> Path:
    """Writes the SavedModel (+ warm-up requests and the run's params.yaml in assets.extra) into a
    temporary sibling folder and renames it to export_dir, so TF Serving never sees half a version.
    fold_ensemble: serve the mean of the cross-validation folds' models (`load_fold_ensemble`)
    instead of the final model, under the same signature and the run's operating point (chosen
    on the folds' out-of-fold predictions). ensemble_with: other runs whose final models are
    averaged with this one's (`load_run_ensemble`), at the ensemble's own operating point. A
    model on weights with a licence of their own (`WEIGHTS_LICENCE_FILE`) says so in
    assets.extra."""
    export_dir, model_dir = storage.path(export_dir), storage.path(model_dir)
    if (fold_ensemble or ensemble_with) and checkpoint:
        raise ValueError("an ensemble is made of the folds' or runs' own weights: give no checkpoint")
    if fold_ensemble and ensemble_with:
        raise ValueError("a fold ensemble or an ensemble of runs, not both")
    with versions.writing_version(export_dir) as tmp:
        if ensemble_with:
            params, model, threshold = load_run_ensemble([model_dir, *ensemble_with])
        else:
            params, model = load_fold_ensemble(model_dir) if fold_ensemble else load_trained(model_dir, checkpoint)
            threshold = decision_threshold(model_dir, params)
        # The guard was fitted on the final model's features: ensembles and other checkpoints go without.
        guard_file = model_dir / input_guard.GUARD_FILE
        guard = (input_guard.Guard.load(guard_file) if guard_file.is_file() and not checkpoint
                 and not fold_ensemble and not ensemble_with else None)
        module = ClassifierModule(params, model, threshold, guard)
        export_base.export(module, {key: key for key in (SIGNATURE, contract.EXPLAIN_SIGNATURE)}, str(tmp),
                           timestamped=False)
        (tmp / "assets.extra").mkdir(exist_ok=True)
        warmup.write_warmup_requests(tmp, export_dir.parent.name or contract.CLASSIFIER,
                                     {contract.MASKED_IMAGE: warmup_images()}, SIGNATURE)
        for name in ("params.yaml", metrics.OPERATING_POINT_FILE):
            if (model_dir / name).is_file():
                tf.io.gfile.copy(str(model_dir / name), str(tmp / "assets.extra" / name))
        if ensemble_with:
            (tmp / "assets.extra" / metrics.OPERATING_POINT_FILE).write_text(json.dumps(
                {"threshold": threshold, "ensemble_of": [str(d) for d in (model_dir, *ensemble_with)]}, indent=1))
        notes = {weights_licence(configs.load_config(storage.path(d) / "params.yaml"))
                 for d in (model_dir, *ensemble_with)} - {""}
        if notes:
            (tmp / WEIGHTS_LICENCE_FILE).write_text("\n".join(sorted(notes)) + "\n")
    return export_dir


WEIGHTS_LICENCE_FILE = "assets.extra/weights_licence.txt"


def weights_licence(params: configs.ClassificationExperiment) -> str:
    """What the licence of a run's pretrained weights asks of its users ('' when nothing)."""
    if params.model.backbone == "sklesion_xception":
        from melanoma_tf.modeling import sklesion_xception

        return sklesion_xception.LICENCE_NOTE
    return ""
