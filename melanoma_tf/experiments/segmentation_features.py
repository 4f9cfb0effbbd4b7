"""Lesion features from the trained segmenter's own ResNet, for a small classifier head.

The segmentation stage trains a ResNet (+ FPN) on every masked image of the train split; its
backbone has learned what lesion texture and borders look like. Here it is frozen and turned
into a fixed-length descriptor of a masked lesion: the classifier's uint8 [S, S, 3] input is
resized to the segmenter's input size, normalised as Model Garden's parser does, and each
backbone level's feature map is averaged over the lesion (the non-black pixels), so the black
surround adds nothing. Levels C3-C5 of a ResNet-101 give 512 + 1024 + 2048 = 3584 features.

Computing the features once and training only a head on them is what makes this cheap: a
ResNet-101 forward pass over a few hundred images takes minutes on a CPU, the head seconds.
Measured on the ISIC sample (`benchmarks/classification.py --segmentation-features`): a
logistic-regression head on the 60-minute segmenter's features scores at chance. Lesion against
skin is not melanoma against nevus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from official.core import task_factory
from official.vision.ops import preprocess_ops
from tqdm import tqdm

from melanoma_tf.evaluation import tta as tta_lib
from melanoma_tf.modeling import alexnet
from melanoma_tf.serving import export_segmenter
from melanoma_tf.tasks import lesion_segmentation  # noqa: F401  (registers the task)

DEFAULT_LEVELS = ("3", "4", "5")


class SegmentationFeatures(tf.Module):
    """The frozen backbone of a segmentation run, mapping masked lesions to feature vectors."""

    def __init__(self, seg_model_dir: str | Path, checkpoint: str | None = None,
                 levels: Sequence[str] = DEFAULT_LEVELS):
        super().__init__(name="segmentation_features")
        seg_model_dir = Path(seg_model_dir)
        params = export_segmenter.read_params(seg_model_dir)
        checkpoint = checkpoint or tf.train.latest_checkpoint(str(seg_model_dir))
        if checkpoint is None:
            raise FileNotFoundError(f"{seg_model_dir}: no segmentation checkpoint "
                                    "(train one with `python -m melanoma_tf.train --stage seg`)")
        model = task_factory.get_task(params.task).build_model()
        tf.train.Checkpoint(model=model).read(checkpoint).expect_partial()
        self.backbone = model.backbone
        self.levels = tuple(str(level) for level in levels)
        self.input_size = int(params.task.model.input_size[0])
        self.checkpoint = checkpoint
        missing = set(self.levels) - set(self.backbone.output_specs)
        if missing:
            raise ValueError(f"levels {sorted(missing)} not in the backbone's {sorted(self.backbone.output_specs)}")

    @property
    def dim(self) -> int:
        return sum(int(self.backbone.output_specs[level][-1]) for level in self.levels)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """float32 [N, dim]: per level, the mean feature over the lesion's pixels."""
        resized = tf.image.resize(images, [self.input_size, self.input_size], antialias=True)
        maps = self.backbone(preprocess_ops.normalize_image(resized / 255.0), training=False)
        return tf.concat([alexnet.lesion_moments(maps[level], resized)[0] for level in self.levels], axis=-1)

    def extract(self, images: np.ndarray, batch_size: int = 16, tta: bool = False,
                progress: str | None = None) -> np.ndarray:
        """Features [N, dim] of uint8 images [N, S, S, 3]; with tta, averaged over the 8
        flips/rotations of each image (features that do not depend on orientation)."""
        out = np.zeros((len(images), self.dim), np.float32)
        bar = tqdm(total=len(images) * (8 if tta else 1), desc=progress, unit="img", disable=progress is None)

        def features(batch: np.ndarray) -> np.ndarray:
            bar.update(len(batch))
            return self(batch).numpy()

        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            out[start:start + len(batch)] = tta_lib.average(features, batch) if tta else features(batch)
        bar.close()
        return out
