"""Shared fixtures: a small synthetic dataset (always) and the real ISIC sample (when present)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from melanoma_tf.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
ISIC_SAMPLE = Path(os.environ.get("MELANOMA_TF_ISIC_SAMPLE", ROOT.parent / "shared/data/isic-sample"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """40 synthetic images, 80% with masks: the project's own fixture."""
    return synthetic.generate_dataset(tmp_path_factory.mktemp("syn") / "data", num_images=40,
                                      seed=3, mask_fraction=0.8, image_size=(96, 128))


@pytest.fixture(scope="session")
def synthetic_records(synthetic_dir, tmp_path_factory) -> Path:
    from melanoma_tf import build_tfrecords

    out = tmp_path_factory.mktemp("rec") / "synthetic"
    build_tfrecords.build(synthetic_dir, out, folds=5, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def isic_sample() -> Path:
    if not (ISIC_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"real ISIC sample not found at {ISIC_SAMPLE} (set MELANOMA_TF_ISIC_SAMPLE)")
    return ISIC_SAMPLE
