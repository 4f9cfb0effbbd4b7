"""Whole-chain evaluation: our numbers are the ISIC scorer's, the CLI runs the served chain end
to end, and the report is one self-contained page that a browser renders."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html.parser
import io
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import ClassificationMetric, ClassificationScore, SegmentationScore
from PIL import Image

from melanoma_tf import evaluate, report
from melanoma_tf.client import LesionPrediction
from melanoma_tf.evaluation import baselines

CHROMIUM = Path("/usr/bin/chromium")
PAPER_FIGURES = ("92.6%", "80.16%", "70.21%", "90.11%", "87.79%")
METRIC_KEYS = {
    "segmentation": {"jaccard", "threshold_jaccard", "dice", "accuracy", "sensitivity", "specificity",
                     "detection_rate", "segmentation_precision"},
    "classification": {"roc_auc", "accuracy", "sensitivity", "specificity", "precision", "balanced_accuracy"},
}


class FakeChain:
    """Stands in for MelanomaClient without models: Otsu masks grown or shrunk per image (a
    spread of Jaccards), noisy label-driven probabilities, one image without a lesion and one
    that fails, so every path of `evaluate` is taken."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels

    def predict_many(self, images, concurrency=8):
        rng = np.random.default_rng(0)
        for index, (image_id, path) in enumerate(images):
            if index == 0:
                yield LesionPrediction(image_id, math.nan, None, None, None, math.nan, "error", {}, index,
                                       error="cannot read image: simulated")
                continue
            mask = baselines.otsu_lesion_mask(report.decode_rgb(path))
            if index == 1:
                yield LesionPrediction(image_id, math.nan, None, np.zeros_like(mask), (0.0,) * 4, 0.0,
                                       "no_lesion", {}, index, model_versions={"lesion_segmenter": 1})
                continue
            step = index % 5 - 2
            kernel = np.ones((2 * abs(step) + 1,) * 2, np.uint8)
            mask = cv2.dilate(mask, kernel) if step > 0 else cv2.erode(mask, kernel)
            shift = 0.22 if self.labels[image_id] == "melanoma" else -0.22
            p = float(np.clip(0.5 + shift + rng.normal(0, 0.2), 0.01, 0.99))
            p = p + 1e-3 if p == 0.5 else p  # the ISIC scorer calls > 0.5 melanoma, we >= 0.5
            yield LesionPrediction(image_id, p, p >= 0.5, mask, (0.0,) * 4, 0.9, "ok", {}, index,
                                   model_versions={"lesion_segmenter": 1, "melanoma_classifier": 1})


class ServedThresholds(FakeChain):
    """FakeChain whose answers carry served thresholds, cycling through `thresholds`."""

    def __init__(self, labels: dict[str, str], thresholds: list[float]):
        super().__init__(labels)
        self.thresholds = thresholds

    def predict_many(self, images, concurrency=8):
        for i, result in enumerate(super().predict_many(images, concurrency)):
            yield dataclasses.replace(result, threshold=self.thresholds[i % len(self.thresholds)])


def _labels(data_dir: Path) -> dict[str, str]:
    with open(data_dir / "labels.csv") as f:
        return {r["image_id"]: "melanoma" if r["melanoma"] == "1" else "nevus" for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def fake_report(synthetic_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fake") / "report"
    evaluate.evaluate(synthetic_dir, FakeChain(_labels(synthetic_dir)), out, bootstrap=200,
                      progress=False, source="fake chain")
    return out


@pytest.fixture(scope="module")
def served_report(synthetic_dir, seg_export, tiny_exports, tmp_path_factory) -> Path:
    """The CLI on the tiny models through the embedded gRPC server (a SavedModel folder for one
    model, a versions folder for the other: both forms of --seg-model/--cls-model)."""
    out = tmp_path_factory.mktemp("served") / "report"
    code = evaluate.main(["--data-dir", str(synthetic_dir), "--output-dir", str(out),
                          "--seg-model", str(seg_export), "--cls-model", str(tiny_exports["melanoma_classifier"]),
                          "--bootstrap", "200", "--concurrency", "4", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def real_report(isic_sample, tmp_path_factory) -> Path:
    """The fake chain on the first 30 images of the real ISIC sample (skipped where absent)."""
    out = tmp_path_factory.mktemp("real") / "report"
    labels = _labels(isic_sample)
    evaluate.evaluate(isic_sample, FakeChain(labels), out, limit=30, bootstrap=200, progress=False)
    return out


REPORTS = ["fake_report", "real_report", pytest.param("served_report", marks=pytest.mark.slow)]


def _rows(report_dir: Path) -> list[dict]:
    return report.read_predictions(report_dir / "predictions.csv")


@pytest.mark.parametrize("which", REPORTS)
def test_segmentation_numbers_equal_the_isic_scorer(which, request, synthetic_dir, tmp_path):
    out = request.getfixturevalue(which)
    metrics = json.loads((out / "metrics.json").read_text())
    truth_dir, prediction_dir = tmp_path / "truth", tmp_path / "prediction"
    truth_dir.mkdir()
    prediction_dir.mkdir()
    scored = [r for r in _rows(out) if r["jaccard"] is not None]
    for row in scored:
        # The scorer matches files by ISIC_<7 digits>: SYN_0000012 becomes ISIC_0000012.
        isic_id = "ISIC_" + row["image_id"].rsplit("_", 1)[1]
        shutil.copy(row["truth_mask_path"], truth_dir / f"{isic_id}_segmentation.png")
        shutil.copy(out / row["mask_path"], prediction_dir / f"{isic_id}_segmentation.png")
    theirs = SegmentationScore.from_dir(truth_dir, prediction_dir).macro_average
    ours = metrics["segmentation"]
    assert ours["num_images"] == len(scored) == len(list(truth_dir.iterdir())) > 15
    for key in ("jaccard", "threshold_jaccard", "dice", "accuracy", "sensitivity", "specificity"):
        assert ours[key]["value"] == pytest.approx(theirs[key], abs=1e-12), key
    if which != "served_report":  # the 4-step tiny model's masks hardly overlap any lesion
        assert 0.05 < np.std([r["jaccard"] for r in scored]), "the comparison needs a spread of Jaccards"


@pytest.mark.parametrize("which", REPORTS)
def test_classification_numbers_equal_the_isic_scorer(which, request, tmp_path, monkeypatch):
    # isic-challenge-scoring 5.6 validates prediction CSVs with DataFrame.applymap, which pandas 3
    # removed; DataFrame.map is the same function under its new name.
    monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    out = request.getfixturevalue(which)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [r for r in _rows(out) if r["score"] is not None]
    assert all(r["score"] != metrics["threshold"] for r in rows)  # where > and >= would differ
    truth, prediction = tmp_path / "truth.csv", tmp_path / "prediction.csv"
    truth.write_text("image,MEL,NV\n" + "".join(f"{r['image_id']},{r['melanoma']}.0,{1 - r['melanoma']}.0\n"
                                                for r in rows))
    prediction.write_text("image,MEL,NV\n" + "".join(f"{r['image_id']},{r['score']!r},{1 - r['score']!r}\n"
                                                     for r in rows))
    score = ClassificationScore.from_file(truth, prediction, ClassificationMetric.AUC)
    mel = score.per_category.loc["MEL"]
    ours = metrics["classification"]
    assert ours["num_images"] == len(rows)
    pairs = {"roc_auc": mel["auc"], "accuracy": mel["accuracy"], "sensitivity": mel["sensitivity"],
             "specificity": mel["specificity"], "precision": mel["ppv"],
             "balanced_accuracy": score.aggregate["balanced_accuracy"]}
    called = sum(ours["table2"][actual]["predicted_melanoma"] for actual in ("actual_melanoma", "actual_nevus"))
    if called == 0:
        # Nothing called melanoma: precision is undefined; scikit-learn says 0, the ISIC scorer 1.
        del pairs["precision"]
    for key, theirs in pairs.items():
        assert ours[key]["value"] == pytest.approx(theirs, abs=1e-6), key
    table = ours["table2"]
    assert sum(table["actual_melanoma"].values()) == sum(r["melanoma"] for r in rows)


def test_model_minus_otsu_is_paired_on_the_same_images(fake_report):
    metrics = json.loads((fake_report / "metrics.json").read_text())
    scored = [r for r in _rows(fake_report) if r["jaccard"] is not None]
    difference = metrics["jaccard_minus_otsu"]
    assert difference["num_images"] == len(scored) == metrics["segmentation"]["num_images"]
    assert difference["value"] == pytest.approx(np.mean([r["jaccard"] - r["otsu_jaccard"] for r in scored]))
    low, high = difference["ci95"]
    assert low < difference["value"] < high
    # paired: narrower than the two marginal intervals' spread would suggest
    model, otsu = metrics["segmentation"]["jaccard"]["ci95"], metrics["segmentation_otsu"]["jaccard"]["ci95"]
    assert high - low < (model[1] - model[0]) + (otsu[1] - otsu[0])


def test_decisions_default_to_the_served_threshold_which_must_be_one(synthetic_dir, tmp_path):
    labels = _labels(synthetic_dir)
    metrics = evaluate.evaluate(synthetic_dir, ServedThresholds(labels, [0.6]), tmp_path / "one", bootstrap=20,
                                progress=False, write_html=False)
    assert metrics["threshold"] == 0.6
    scored = [r for r in _rows(tmp_path / "one") if r["score"] is not None]
    assert all(r["predicted"] == (r["score"] >= 0.6) for r in scored)
    assert any(0.5 <= r["score"] < 0.6 for r in scored), "no image tells 0.6 from 0.5"
    # beside a screening threshold, the balanced point p >= 0.5
    melanoma = [r["score"] >= 0.5 for r in scored if r["label"] == "melanoma"]
    nevus = [r["score"] < 0.5 for r in scored if r["label"] == "nevus"]
    half = metrics["classification_at_0.5"]
    assert half["sensitivity"]["value"] == pytest.approx(np.mean(melanoma))
    assert half["balanced_accuracy"]["value"] == pytest.approx((np.mean(melanoma) + np.mean(nevus)) / 2)
    assert half["sensitivity"]["value"] > metrics["classification"]["sensitivity"]["value"]
    assert any(line.startswith("  at p ≥ 0.5: ") for line in report.headline(metrics))
    # and the served probability's calibration: Brier score = mean squared error of the probability
    y = np.array([r["label"] == "melanoma" for r in scored], float)
    brier = metrics["calibration"]["brier_score"]
    assert brier == pytest.approx(np.mean((np.array([r["score"] for r in scored]) - y) ** 2))
    assert sum(metrics["calibration"]["images_per_bin"]) == len(scored)
    assert f"  calibration: Brier score {brier:.3f}" in report.headline(metrics)
    with pytest.raises(ValueError, match=r"different thresholds \[0.6, 0.7\]"):
        evaluate.evaluate(synthetic_dir, ServedThresholds(labels, [0.6, 0.7]), tmp_path / "two", bootstrap=20,
                          progress=False, write_html=False)


def test_no_lesion_is_scored_as_nevus_and_failures_are_listed(fake_report):
    metrics = json.loads((fake_report / "metrics.json").read_text())
    rows = {r["image_id"]: r for r in _rows(fake_report)}
    failed, no_lesion = sorted(rows)[:2]
    assert rows[failed]["status"] == "error" and rows[failed]["score"] is None
    assert [p["image_id"] for p in metrics["problems"]] == [failed]
    assert not (fake_report / "masks" / f"{failed}_segmentation.png").exists()
    assert rows[no_lesion]["score"] == 0.0 and rows[no_lesion]["predicted"] == 0.0
    assert metrics["counts"]["no_lesion"] == metrics["classification"]["no_lesion"] == 1
    assert metrics["counts"]["answered"] == metrics["classification"]["num_images"] == 39
    masks = sorted(p.name for p in (fake_report / "masks").iterdir())
    assert masks == sorted(f"{i}_segmentation.png" for i in rows if i != failed)
    assert set(np.unique(np.asarray(Image.open(fake_report / "masks" / masks[0])))) <= {0, 255}


def _check_metrics_file(report_dir: Path) -> dict:
    metrics = json.loads((report_dir / "metrics.json").read_text())
    for group, keys in METRIC_KEYS.items():
        for key in keys:
            entry = metrics[group][key]
            assert set(entry) == {"value", "ci95"} and len(entry["ci95"]) == 2, (group, key)
    for key in METRIC_KEYS["segmentation"]:
        assert set(metrics["segmentation_otsu"][key]) == {"value", "ci95"}
    assert set(metrics["segmentation"]["table1"]) == {"found", "missed", "background_called_lesion"}
    assert set(metrics["classification"]["table2"]) == {"actual_melanoma", "actual_nevus"}
    assert metrics["paper"] == report.PAPER
    return metrics


@pytest.mark.slow
def test_cli_evaluates_the_served_tiny_chain_end_to_end(served_report, synthetic_dir):
    metrics = _check_metrics_file(served_report)
    assert metrics["counts"]["images"] == 40 and metrics["counts"]["errors"] == 0
    assert metrics["segmentation"]["num_images"] == metrics["counts"]["with_mask"] == 32
    assert metrics["model_versions"] == {"lesion_segmenter": 1, "melanoma_classifier": 1}
    rows = _rows(served_report)
    assert [r["image_id"] for r in rows] == sorted(p.stem for p in (synthetic_dir / "images").iterdir())
    assert len(list((served_report / "masks").glob("*_segmentation.png"))) == 40
    # Every classified image: its served input beside its heat map, shown in the report's cases.
    classified = [r for r in rows if r["status"] == "ok"]
    assert classified and all(r["explained_path"] for r in classified)
    assert not any(r["explained_path"] for r in rows if r["status"] != "ok")
    shown = np.asarray(Image.open(served_report / classified[0]["explained_path"]))
    assert shown.shape == (227, 454, 3)
    _check_page(served_report / "index.html")
    assert "Grad-CAM" in (served_report / "index.html").read_text()


def test_metrics_file_has_every_metric_with_a_ci(fake_report):
    metrics = _check_metrics_file(fake_report)
    seg = metrics["segmentation"]
    for key in METRIC_KEYS["segmentation"]:
        low, high = seg[key]["ci95"]
        assert low <= seg[key]["value"] <= high, key
    assert sum(seg["table1"].values()) == seg["num_images"]


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _check_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert page.images and not page.links, page.links  # no script, stylesheet or link to fetch
    prefix = "data:image/png;base64,"
    for src in page.images:
        assert src.startswith(prefix), src[:60]
        png = base64.b64decode(src[len(prefix):], validate=True)
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and min(image.size) > 10
            image.verify()
    text = " ".join(page.text)
    for figure in PAPER_FIGURES:
        assert figure in text, figure
    return page


def test_report_is_self_contained_with_the_papers_figures_roc_tables_and_gallery(fake_report):
    page = _check_page(fake_report / "index.html")
    text = " ".join(page.text)
    assert "Table I" in text and "Table II" in text and "Otsu baseline" in text
    html = (fake_report / "index.html").read_text()
    assert "ROC curve" in html and "reliability diagram" in html and "Brier score" in text
    assert (fake_report / "reliability.png").is_file()
    # ROC, reliability + (best, borderline, worst) x 3 cases x (outline, masked input) x (by Jaccard, by margin)
    assert len(page.images) == 2 + 3 * 3 * 2 * 2


def test_report_renders_in_headless_chromium(fake_report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (Debian package `chromium`); the page was still parsed "
                    "and its images decoded by the other report tests")
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
                        "--window-size=1200,2000", (fake_report / "index.html").resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1200, 3)
    background = np.all(pixels == pixels[0, 0], axis=-1).mean()
    assert background < 0.9 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


@pytest.mark.parametrize("layout", ["savedmodel", "versions", "neither"])
def test_model_folders_become_serving_base_paths(layout, tmp_path):
    model = tmp_path / "model"
    folder = model if layout == "savedmodel" else model / "3"
    folder.mkdir(parents=True)
    if layout != "neither":
        (folder / "saved_model.pb").write_bytes(b"")
    if layout == "neither":
        with pytest.raises(FileNotFoundError, match="neither a SavedModel"):
            evaluate._base_path(model, tmp_path / "base")
        return
    base = evaluate._base_path(model, tmp_path / "base")
    versions = {p.name: p.resolve() for p in base.iterdir()}
    assert versions == ({"1": model.resolve()} if layout == "savedmodel" else {"3": folder.resolve()})


def test_the_report_says_what_the_classifiers_weights_licence_asks(fake_report, served_report):
    """A classifier export on licensed weights (assets.extra/weights_licence.txt) is named in the
    report; the tiny export has none."""
    assert json.loads((served_report / "metrics.json").read_text())["weights_licence"] == ""
    metrics = json.loads((fake_report / "metrics.json").read_text())
    rows = report.read_predictions(fake_report / "predictions.csv")
    assert "non-commercial" not in report.render(metrics, rows, fake_report)
    metrics["weights_licence"] = "uses weights trained on HAM10000 (CC BY-NC 4.0): non-commercial use only"
    assert "non-commercial use only" in report.render(metrics, rows, fake_report)
