"""The synthetic dataset is the default dataset and the fixture source for other tests, so its
layout, determinism and learnability (but not triviality) are pinned down here."""

from __future__ import annotations

import csv
import json
import pathlib

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from melanoma_tf.data import synthetic

SMALL = dict(num_images=8, melanoma_fraction=0.5, image_size=(96, 120), mask_fraction=0.5, include_other=2)


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: pathlib.Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _read(root: pathlib.Path, image_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    rgb = cv2.cvtColor(cv2.imread(str(root / "images" / f"{image_id}.jpg")), cv2.COLOR_BGR2RGB)
    mask_path = root / "masks" / f"{image_id}_segmentation.png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if mask_path.exists() else None
    return rgb, mask


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    return synthetic.generate_dataset(tmp_path_factory.mktemp("syn") / "ds", num_images=100, seed=3,
                                      melanoma_fraction=0.4, image_size=(128, 160), include_other=6)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _files(synthetic.generate_dataset(tmp_path / "a", seed=7, **SMALL))
    b = _files(synthetic.generate_dataset(tmp_path / "b", seed=7, **SMALL))
    c = _files(synthetic.generate_dataset(tmp_path / "c", seed=8, **SMALL))
    assert a == b
    assert a["images/SYN_0000000.jpg"] != c["images/SYN_0000000.jpg"]
    assert "synthetic|seed:7" in a["labels.csv"].decode() and "synthetic|seed:8" in c["labels.csv"].decode()


def test_render_lesion_contract():
    rgb, mask = synthetic.render_lesion(np.random.default_rng(0), True, 100, 130)
    assert rgb.shape == (100, 130, 3) and rgb.dtype == np.uint8
    assert mask.shape == (100, 130) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    again, _ = synthetic.render_lesion(np.random.default_rng(0), True, 100, 130)
    assert np.array_equal(rgb, again)


def test_layout_labels_and_readme(dataset):
    rows = _labels(dataset)
    assert (dataset / "labels.csv").read_text().splitlines()[0] == "image_id,melanoma,seborrheic_keratosis,source"
    assert len(rows) == 106
    assert sum(r["melanoma"] == "1" for r in rows) == round(100 * 0.4)
    assert sum(r["seborrheic_keratosis"] == "1" for r in rows) == 6
    assert not any(r["melanoma"] == "1" and r["seborrheic_keratosis"] == "1" for r in rows)
    assert {r["source"] for r in rows} == {"synthetic|seed:3"}
    assert sorted(p.stem for p in (dataset / "images").iterdir()) == sorted(r["image_id"] for r in rows)
    readme = (dataset / "README.md").read_text()
    assert "synthetic" in readme.lower() and "seed: 3" in readme and "40 melanoma" in readme
    assert json.loads((dataset / "synthetic.json").read_text())["num_images"] == 100
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_masks_match_images_and_lesions_are_darker_than_skin(dataset):
    sizes, contrasts = set(), []
    for row in _labels(dataset):
        rgb, mask = _read(dataset, row["image_id"])
        sizes.add(rgb.shape[:2])
        assert mask is not None and mask.ndim == 2 and mask.dtype == np.uint8
        assert mask.shape == rgb.shape[:2]
        assert set(np.unique(mask)) == {0, 255}
        assert 0.01 < (mask > 0).mean() < 0.9
        ring = cv2.dilate(mask, np.ones((15, 15), np.uint8)) - mask
        gray = rgb.astype(np.float32).mean(-1)
        contrasts.append(gray[ring > 0].mean() - gray[mask > 0].mean())
    assert min(contrasts) > 5 and np.mean(contrasts) > 40  # light keratoses are the low-contrast ones
    heights = [h for h, _ in sizes]
    assert len(sizes) > 50 and 0.85 * 128 <= min(heights) and max(heights) <= 1.15 * 128


def test_mask_fraction_leaves_images_without_mask(tmp_path):
    root = synthetic.generate_dataset(tmp_path / "ds", seed=1, **SMALL)
    ids = {r["image_id"] for r in _labels(root)}
    masked = {p.name.removesuffix("_segmentation.png") for p in (root / "masks").iterdir()}
    assert masked < ids and len(masked) == round(10 * 0.5)


def test_features_separate_classes_but_not_perfectly(dataset):
    y, area, colour_std, solidity = [], [], [], []
    for row in _labels(dataset):
        if row["seborrheic_keratosis"] == "1":
            continue
        rgb, mask = _read(dataset, row["image_id"])
        y.append(int(row["melanoma"]))
        area.append((mask > 0).mean())
        colour_std.append(rgb[mask > 0].astype(np.float32).std(0).mean())
        contour = max(cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0], key=cv2.contourArea)
        solidity.append(cv2.contourArea(contour) / cv2.contourArea(cv2.convexHull(contour)))
    for name, feature in (("area", area), ("colour std", colour_std), ("irregularity", -np.array(solidity))):
        auc = roc_auc_score(y, feature)
        assert 0.7 < auc < 0.99, f"{name}: AUC {auc:.3f}"


def test_existing_folder_is_reused_or_refused(tmp_path, monkeypatch):
    root = synthetic.generate_dataset(tmp_path / "ds", seed=2, **SMALL)
    before = _files(root)
    monkeypatch.setattr(synthetic, "_write", lambda *a: pytest.fail("regenerated an up-to-date dataset"))
    assert synthetic.generate_dataset(tmp_path / "ds", seed=2, **SMALL) == root
    assert _files(root) == before
    with pytest.raises(FileExistsError, match="other parameters"):
        synthetic.generate_dataset(tmp_path / "ds", seed=3, **SMALL)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="other files"):
        synthetic.generate_dataset(tmp_path / "other", seed=2, **SMALL)
    with pytest.raises(ValueError):
        synthetic.generate_dataset(tmp_path / "bad", melanoma_fraction=1.5)


def test_empty_folder_is_filled_and_failed_run_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert (synthetic.generate_dataset(tmp_path / "empty", seed=2, **SMALL) / "labels.csv").exists()
    render, calls = synthetic._render, []

    def failing_render(*args):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return render(*args)

    monkeypatch.setattr(synthetic, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_dataset(tmp_path / "killed", seed=2, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_prints_summary(tmp_path, capsys):
    synthetic.main(["--output-dir", str(tmp_path / "cli"), "--num-images", "4", "--seed", "5",
                    "--image-size", "64", "80", "--include-other", "1", "--mask-fraction", "0.5"])
    out = capsys.readouterr().out
    assert "5 images" in out and "1 seborrheic keratosis" in out and "seed 5" in out
    assert len(_labels(tmp_path / "cli")) == 5
