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


@pytest.fixture(scope="session")
def tiny_seg_run(synthetic_records, tmp_path_factory) -> Path:
    """The tiny Mask R-CNN (seg_tiny_test.yaml, 4 steps) trained on the synthetic records."""
    from melanoma_tf.configs import EXPERIMENTS_DIR
    from melanoma_tf.configs import segmentation as seg_cfg
    from melanoma_tf.tasks import lesion_segmentation

    model_dir = tmp_path_factory.mktemp("seg") / "run"
    lesion_segmentation.train(synthetic_records, model_dir, seg_cfg.PAPER_EXPERIMENT,
                              [str(EXPERIMENTS_DIR / "seg_tiny_test.yaml")])
    return model_dir


@pytest.fixture(scope="session")
def seg_export(tiny_seg_run, tmp_path_factory) -> Path:
    """Version folder `exports/lesion_segmenter/1` of the tiny segmenter."""
    from melanoma_tf.serving import export_segmenter

    return export_segmenter.export(tiny_seg_run, tmp_path_factory.mktemp("exports") / "lesion_segmenter" / "1")


@pytest.fixture(scope="session")
def tiny_cls_run(synthetic_records, tmp_path_factory) -> Path:
    """cls_tiny_test.yaml at the segmenter's 227x227 masked-image size, final model only (one
    epoch): the exported signature must accept what the segmenter sends."""
    from melanoma_tf.tasks import melanoma_classification

    model_dir = tmp_path_factory.mktemp("cls") / "run"
    melanoma_classification.train(synthetic_records, model_dir, config_files=["cls_tiny_test.yaml"],
                                  params_override={"data": {"input_size": 227}, "training": {"folds": 0}})
    return model_dir


@pytest.fixture(scope="session")
def cls_export(tiny_cls_run, seg_export) -> Path:
    """Version folder `exports/melanoma_classifier/1`, beside the segmenter's."""
    from melanoma_tf.serving import export_classifier

    return export_classifier.export(tiny_cls_run, seg_export.parent.parent / "melanoma_classifier" / "1")


@pytest.fixture(scope="session")
def tiny_exports(seg_export, cls_export) -> dict[str, Path]:
    """{model name: TF Serving base path} of both tiny models, each with version `1/`."""
    return {"lesion_segmenter": seg_export.parent, "melanoma_classifier": cls_export.parent}
