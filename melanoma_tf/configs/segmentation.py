"""Lesion segmentation experiments: Model Garden's `maskrcnn_resnetfpn_coco`, made ours.

Registered experiments (all derive from the COCO Mask R-CNN and change only what a lesion needs):

- `lesion_maskrcnn_r101_fpn`, the paper's: ResNet-101 + FPN, 2 classes (background, lesion),
  512x512 input, dermoscopy augmentation (flips both ways, 90-degree rotations, scale and
  colour jitter), SGD with momentum, linear warm-up then cosine decay.
- `lesion_maskrcnn_cpu`: the same model family tuned to converge within a CPU budget (see that
  function's docstring).

YAML files in `configs/experiments/` adjust them for a GPU run or a tiny test run; data paths
are filled in from `--data-dir` by `tasks.lesion_segmentation.build_experiment`.
"""

from __future__ import annotations

import dataclasses

from official.core import config_definitions as cfg
from official.core import exp_factory
from official.modeling import optimization
from official.vision.configs import backbones
from official.vision.configs import maskrcnn

PAPER_EXPERIMENT = "lesion_maskrcnn_r101_fpn"
CPU_EXPERIMENT = "lesion_maskrcnn_cpu"
NUM_CLASSES = 2  # background, lesion
LESION_CLASS_ID = 1


@dataclasses.dataclass
class LesionParser(maskrcnn.Parser):
    """Model Garden's parser plus the augmentations dermoscopy calls for.

    A lesion has no up or down, so all eight flips/rotations are equally real images, and
    lighting and skin tone vary between dermatoscopes.
    """

    aug_rand_rot90: bool = True
    aug_color_jitter: float = 0.1  # max relative change of brightness, contrast, saturation


@dataclasses.dataclass
class LesionDataConfig(maskrcnn.DataConfig):
    parser: LesionParser = dataclasses.field(default_factory=LesionParser)
    dtype: str = "float32"


@dataclasses.dataclass
class LesionSegmentationTask(maskrcnn.MaskRCNNTask):
    """Mask R-CNN task config with lesion data and per-image lesion metrics at evaluation."""

    train_data: LesionDataConfig = dataclasses.field(
        default_factory=lambda: LesionDataConfig(is_training=True))
    validation_data: LesionDataConfig = dataclasses.field(
        default_factory=lambda: LesionDataConfig(is_training=False, drop_remainder=False))
    # ISIC 2018 scores a Jaccard below this as 0.
    jaccard_threshold: float = 0.65
    # Output size of the masked image the segmenter hands the classifier.
    classifier_input_size: int = 227


def _optimizer(lr: float, steps: int, warmup_steps: int) -> optimization.OptimizationConfig:
    return optimization.OptimizationConfig({
        "optimizer": {"type": "sgd", "sgd": {"momentum": 0.9}},
        "learning_rate": {"type": "cosine", "cosine": {
            "initial_learning_rate": lr, "decay_steps": steps, "alpha": 0.0}},
        "warmup": {"type": "linear", "linear": {"warmup_steps": warmup_steps,
                                                 "warmup_learning_rate": lr * 0.05}},
    })


@exp_factory.register_config_factory(PAPER_EXPERIMENT)
def lesion_maskrcnn_r101_fpn() -> cfg.ExperimentConfig:
    """The paper's segmenter: Mask R-CNN, ResNet-101 + FPN, on dermoscopy images."""
    base = exp_factory.get_exp_config("maskrcnn_resnetfpn_coco")
    batch_size, steps = 8, 12_000
    model = base.task.model
    model.num_classes = NUM_CLASSES
    model.input_size = [512, 512, 3]
    model.backbone = backbones.Backbone(type="resnet", resnet=backbones.ResNet(model_id=101))
    model.detection_generator.max_num_detections = 10  # one lesion per image; keep a few
    task = LesionSegmentationTask(
        model=model,
        losses=base.task.losses,
        init_checkpoint=None,  # users with an ImageNet ResNet-101 checkpoint set it
        init_checkpoint_modules="backbone",
        train_data=LesionDataConfig(
            is_training=True, global_batch_size=batch_size, shuffle_buffer_size=1000,
            parser=LesionParser(aug_rand_hflip=True, aug_rand_vflip=True,
                                aug_scale_min=0.8, aug_scale_max=1.25)),
        validation_data=LesionDataConfig(is_training=False, global_batch_size=4,
                                         drop_remainder=False),
    )
    return cfg.ExperimentConfig(
        runtime=cfg.RuntimeConfig(mixed_precision_dtype="float32", enable_xla=False),
        task=task,
        trainer=cfg.TrainerConfig(
            train_steps=steps, validation_steps=-1, validation_interval=1000,
            steps_per_loop=100, summary_interval=100, checkpoint_interval=500,
            max_to_keep=3, best_checkpoint_export_subdir="best_ckpt",
            best_checkpoint_eval_metric="lesion_jaccard", best_checkpoint_metric_comp="higher",
            optimizer_config=_optimizer(lr=0.01, steps=steps, warmup_steps=500)),
        restrictions=["task.train_data.is_training != None",
                      "task.validation_data.is_training != None"],
    )
