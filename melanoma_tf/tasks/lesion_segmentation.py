"""Lesion segmentation task: Model Garden's Mask R-CNN task with lesion data and lesion metrics.

Training, checkpointing, resuming, summaries and distribution all stay Model Garden's
(`train_lib.run_experiment` with Orbit). This task changes two things: its parser adds
dermoscopy augmentation, and evaluation adds per-image lesion metrics at full resolution
(`evaluation.segmentation`) to Model Garden's COCO metrics.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tensorflow as tf
from absl import logging
from official.common import dataset_fn as dataset_fn_lib
from official.common import distribute_utils
from official.core import config_definitions as cfg
from official.core import exp_factory, task_factory, train_lib, train_utils
from official.modeling import hyperparams, performance
from official.vision.dataloaders import input_reader, input_reader_factory, tf_example_decoder
from official.vision.tasks import maskrcnn

from melanoma_tf import atomic, storage, tfrecords
from melanoma_tf.configs import segmentation as seg_cfg
from melanoma_tf.dataloaders import maskrcnn_input
from melanoma_tf.evaluation import segmentation as seg_metrics

LESION_LOGS = "lesion_eval"  # validation_step output: what per-image lesion metrics need
EVAL_METRICS_FILE = "eval_metrics.json"
EVAL_PER_IMAGE_FILE = "eval_per_image.json"  # lesion metrics by record source_id, for paired comparisons


@task_factory.register_task_cls(seg_cfg.LesionSegmentationTask)
class LesionSegmentationTask(maskrcnn.MaskRCNNTask):
    """Mask R-CNN for one lesion per image."""

    def _build_coco_metrics(self):
        # Model Garden writes the COCO ground truth (annotation.json) into the model dir, and its
        # COCOEvaluator copies it to local disk for pycocotools from gs:// only: another bucket
        # (s3://, ram://) would be opened as a local path. Keep the file on local disk there.
        logging_dir = self._logging_dir
        if not (logging_dir and storage.is_url(logging_dir) and not str(logging_dir).startswith("gs://")):
            return super()._build_coco_metrics()
        self._logging_dir = tempfile.mkdtemp(prefix="melanoma-coco-")
        atexit.register(shutil.rmtree, self._logging_dir, ignore_errors=True)
        try:
            return super()._build_coco_metrics()
        finally:
            self._logging_dir = logging_dir

    def build_inputs(self, params: seg_cfg.LesionDataConfig, input_context=None, dataset_fn=None):
        model = self.task_config.model
        decoder = tf_example_decoder.TfExampleDecoder(include_mask=model.include_mask)
        p = params.parser
        parser = maskrcnn_input.Parser(
            output_size=model.input_size[:2], min_level=model.min_level, max_level=model.max_level,
            num_scales=model.anchor.num_scales, aspect_ratios=model.anchor.aspect_ratios,
            anchor_size=model.anchor.anchor_size, rpn_match_threshold=p.rpn_match_threshold,
            rpn_unmatched_threshold=p.rpn_unmatched_threshold,
            rpn_batch_size_per_im=p.rpn_batch_size_per_im, rpn_fg_fraction=p.rpn_fg_fraction,
            aug_rand_hflip=p.aug_rand_hflip, aug_rand_vflip=p.aug_rand_vflip,
            aug_scale_min=p.aug_scale_min, aug_scale_max=p.aug_scale_max, aug_type=p.aug_type,
            skip_crowd_during_training=p.skip_crowd_during_training,
            max_num_instances=p.max_num_instances, include_mask=model.include_mask,
            outer_boxes_scale=model.outer_boxes_scale, mask_crop_size=p.mask_crop_size,
            dtype=params.dtype, aug_rand_rot90=p.aug_rand_rot90, aug_color_jitter=p.aug_color_jitter)
        dataset_fn = dataset_fn or dataset_fn_lib.pick_dataset_fn(params.file_type)
        if params.downloads:
            read_files = dataset_fn

            def dataset_fn(*args, **kwargs):
                return tfrecords.from_downloads(read_files(*args, **kwargs), params.downloads)
        reader = input_reader_factory.input_reader_generator(
            params, dataset_fn=dataset_fn,
            decoder_fn=decoder.decode, combine_fn=input_reader.create_combine_fn(params),
            parser_fn=parser.parse_fn(params.is_training))
        return reader.read(input_context=input_context)

    def validation_step(self, inputs, model, metrics=None):
        images, labels = inputs
        outputs = model(images, anchor_boxes=labels["anchor_boxes"],
                        image_shape=labels["image_info"][:, 1, :], training=False)
        logs = {self.loss: 0}
        self._update_metrics(labels, outputs, logs)
        logs[LESION_LOGS] = {
            "source_id": labels["groundtruths"]["source_id"],
            "mask_png": labels["groundtruths"]["lesion_mask_png"],
            "image_info": labels["image_info"],
            "boxes": outputs["detection_boxes"],
            "scores": outputs["detection_scores"],
            "masks": outputs["detection_masks"],
            "num_detections": outputs["num_detections"],
        }
        return logs

    def aggregate_logs(self, state=None, step_outputs=None):
        if not state:
            self._lesion_per_image = []
        lesion = {k: _local_numpy(v) for k, v in step_outputs.pop(LESION_LOGS).items()}
        for i in range(len(lesion["mask_png"])):
            truth = cv2.imdecode(np.frombuffer(lesion["mask_png"][i], np.uint8), cv2.IMREAD_GRAYSCALE)
            n = int(lesion["num_detections"][i])
            scale = lesion["image_info"][i, 2]  # boxes come in the resized input's pixels
            boxes = lesion["boxes"][i, :n] / np.tile(scale, 2)
            pred, _, _ = seg_metrics.final_lesion_mask(boxes, lesion["scores"][i, :n],
                                                       lesion["masks"][i, :n], *truth.shape)
            self._lesion_per_image.append(
                {"source_id": int(lesion["source_id"][i]),
                 **seg_metrics.image_metrics(pred, truth, self.task_config.jaccard_threshold)})
        return super().aggregate_logs(state, step_outputs)

    def reduce_aggregated_logs(self, aggregated_logs, global_step=None):
        logs = super().reduce_aggregated_logs(aggregated_logs, global_step)
        logs.update({f"lesion_{k}": v for k, v in seg_metrics.summarize(self._lesion_per_image).items()})
        if self._logging_dir:  # the latest evaluation, for people and scripts to read
            scalars = {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}
            scalars["step"] = int(tf.convert_to_tensor(global_step)) if global_step is not None else -1
            atomic.write_json(storage.path(self._logging_dir) / EVAL_METRICS_FILE, scalars, sort_keys=True)
            atomic.write_json(storage.path(self._logging_dir) / EVAL_PER_IMAGE_FILE,
                              {"step": scalars["step"], "images": self._lesion_per_image})
        return logs


def _local_numpy(value: Any) -> np.ndarray:
    """Values of one step, concatenated over replicas when a strategy split the batch."""
    if isinstance(value, (tuple, list)):
        return np.concatenate([np.asarray(v) for v in value], axis=0)
    return np.asarray(value)


def build_experiment(experiment: str | None, data_dir: Path | str | None,
                     config_files: list[str] | tuple[str, ...] = (),
                     params_override: str = "", train_steps: int | None = None) -> cfg.ExperimentConfig:
    """The registered experiment, pointed at `data_dir`'s records, then YAML files, then overrides;
    with `train_steps`, a schedule that ends there (`configs.segmentation.with_train_steps`)."""
    params = exp_factory.get_exp_config(experiment or seg_cfg.PAPER_EXPERIMENT)
    if data_dir is not None:
        manifest = json.loads((storage.path(data_dir) / "manifest.json").read_text())
        params.task.train_data.input_path = tfrecords.split_pattern(data_dir, "train", with_nomask=False)
        params.task.validation_data.input_path = tfrecords.split_pattern(data_dir, "test", with_nomask=False)
        params.task.validation_data.num_examples = manifest["counts"]["test"]["with_mask"]
    for path in config_files:
        params = hyperparams.override_params_dict(params, str(path), is_strict=True)
    if params_override:
        params = hyperparams.override_params_dict(params, params_override, is_strict=True)
    if train_steps is not None:
        params = seg_cfg.with_train_steps(params, train_steps)
    params.validate()
    params.lock()
    return params


def distribution_strategy(params: cfg.ExperimentConfig) -> tf.distribute.Strategy:
    """Model Garden's strategy from the runtime config; `mirrored` with no GPU mirrors over the
    logical CPU devices when there are several (how multi-device code is tested without GPUs)."""
    runtime = params.runtime
    if runtime.distribution_strategy == "mirrored" and runtime.num_gpus == 0:
        cpus = tf.config.list_logical_devices("CPU")  # initialises TF: not before multi-worker strategies
        if len(cpus) > 1:
            return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return distribute_utils.get_distribution_strategy(
        distribution_strategy=runtime.distribution_strategy, all_reduce_alg=runtime.all_reduce_alg,
        num_gpus=runtime.num_gpus, tpu_address=runtime.tpu)


def copy_latest_checkpoint(source: str | Path, destination: str | Path) -> str | None:
    """Copies the latest checkpoint of `source` into `destination` (files already there are
    kept) with a checkpoint index naming only it; returns its name, None when `source` has none."""
    prefix = tf.train.latest_checkpoint(str(source))
    if prefix is None:
        return None
    name = os.path.basename(prefix)
    tf.io.gfile.makedirs(str(destination))
    for path in tf.io.gfile.glob(prefix + ".*"):
        target = os.path.join(str(destination), os.path.basename(path))
        if not tf.io.gfile.exists(target):
            tf.io.gfile.copy(path, target)
    with tf.io.gfile.GFile(os.path.join(str(destination), "checkpoint"), "w") as state:  # CheckpointState
        state.write(f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
    return name


class ExperimentRunner(train_lib.OrbitExperimentRunner):
    """Model Garden's runner, except that a worker other than the chief resumes from the chief's
    latest checkpoint. Model Garden gives such a worker an empty temporary checkpoint folder, so
    after a restart it would start from scratch while the chief restores, and the workers'
    collectives would stop matching (the run crashes)."""

    def _maybe_build_checkpoint_manager(self) -> tf.train.CheckpointManager | None:
        manager = super()._maybe_build_checkpoint_manager()
        if manager is None or self.strategy.extended.should_checkpoint:
            return manager
        # The chief cannot write a newer checkpoint meanwhile: its next step waits for this worker.
        if copy_latest_checkpoint(self.model_dir, manager.directory) is None:
            return manager
        return tf.train.CheckpointManager(
            manager.checkpoint, manager.directory, max_to_keep=1, step_counter=self.trainer.global_step,
            checkpoint_interval=self.params.trainer.checkpoint_interval, init_fn=self.trainer.initialize)


def run(params: cfg.ExperimentConfig, model_dir: Path | str, mode: str = "train_and_eval"):
    """Runs Model Garden's training driver; resumes from the latest checkpoint in `model_dir`.

    With several workers (`multi_worker_mirrored`, TF_CONFIG), every worker runs this with the
    same model_dir; only the chief writes there (Model Garden's rule: other workers checkpoint
    into a temporary folder).
    """
    model_dir = str(model_dir)
    strategy = distribution_strategy(params)
    chief = strategy.extended.should_checkpoint
    if "train" in mode and chief:
        train_utils.serialize_config(params, model_dir)
    if params.runtime.mixed_precision_dtype:
        performance.set_mixed_precision_policy(params.runtime.mixed_precision_dtype)
    with strategy.scope():
        task = task_factory.get_task(params.task, logging_dir=model_dir if chief else None)
    logging.info("training %s into %s on %s", type(task).__name__, model_dir, type(strategy).__name__)
    runner = ExperimentRunner(distribution_strategy=strategy, task=task, mode=mode, params=params,
                              model_dir=model_dir, save_summary=chief)
    return runner.run()  # what train_lib.run_experiment does with its own runner


def train(data_dir, model_dir, experiment=None, config_files=(), params_override="",
          mode="train_and_eval", train_steps: int | None = None):
    """`python -m melanoma_tf.train --stage seg` lands here (train_steps: see build_experiment)."""
    params = build_experiment(experiment, data_dir, config_files, params_override, train_steps)
    run(params, model_dir, mode)
    metrics_file = storage.path(model_dir) / EVAL_METRICS_FILE
    single_worker = params.runtime.distribution_strategy != "multi_worker_mirrored"
    if mode == "train_and_eval" and not metrics_file.is_file() and single_worker:
        # Orbit evaluates only inside its training loop, so a run restarted after its last
        # step (killed during the final evaluation) needs the evaluation on its own. Several
        # workers would not agree on it (only the chief writes the file): run --mode eval.
        run(params, model_dir, "eval")
    if "eval" in mode and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        print(json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("lesion_")}, indent=1))
        print(f"all metrics in {metrics_file}")
