"""Experiment configs, registered with Model Garden's `exp_factory` on import."""

from pathlib import Path

from melanoma_tf.configs import segmentation  # noqa: F401  (registers the experiments)

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
