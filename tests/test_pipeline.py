"""The main job runs every step on a small synthetic set, a rerun skips what is done, and the
walkthrough notebook executes on the same work dir."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from melanoma_tf import pipeline

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


@pytest.fixture(scope="module")
def smoke_work(synthetic_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline") / "work"
    return work, pipeline.run(synthetic_dir, work, profile="smoke")


def test_pipeline_runs_end_to_end(smoke_work):
    work, result = smoke_work
    metrics = json.loads((work / "report" / "metrics.json").read_text())
    manifest = json.loads((work / "tfrecords" / "manifest.json").read_text())
    assert metrics["counts"]["images"] == len(manifest["splits"]["test"])
    assert (work / "report" / "index.html").is_file()
    assert result["segmentation"]["jaccard"] == metrics["segmentation"]["jaccard"]
    for name in ("lesion_segmenter", "melanoma_classifier"):
        assert (work / "exports" / name / "1" / "saved_model.pb").is_file()


def test_rerun_skips_finished_steps(smoke_work, synthetic_dir, capsys):
    work, _ = smoke_work
    capsys.readouterr()
    pipeline.run(synthetic_dir, work, profile="smoke")
    out = capsys.readouterr().out
    for step in ("data", "records", "segmentation", "classification", "export", "evaluate"):
        assert f"[{step}] up to date, skipped" in out
    metrics = json.loads((work / "report" / "metrics.json").read_text())
    auc = metrics["classification"]["roc_auc"]
    assert f"ROC AUC {auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]" in out
    assert str(work / "report" / "index.html") in out and str(work / "exports" / "melanoma_classifier" / "1") in out
    assert f"--model-base-path-map /models={work / 'exports'}" in out


def test_exporting_again_adds_the_next_version(smoke_work, synthetic_dir):
    """As after retraining: the old versions stay as they are, the new models become version 2."""
    work, _ = smoke_work
    for step in ("export", "evaluate"):
        (work / ".steps" / f"{step}.json").unlink()
    pipeline.run(synthetic_dir, work, profile="smoke")
    exported = json.loads((work / ".steps" / "export.json").read_text())["result"]
    for name in ("lesion_segmenter", "melanoma_classifier"):
        assert sorted(p.name for p in (work / "exports" / name).iterdir()) == ["1", "2"]
        assert Path(exported[name]) == work / "exports" / name / "2"


def test_walkthrough_notebook_executes(smoke_work, synthetic_dir, monkeypatch, tmp_path):
    """The notebook on the smoke run's work dir (its steps are done, so it only shows them)."""
    work, _ = smoke_work
    monkeypatch.setenv("WALKTHROUGH_PROFILE", "smoke")
    monkeypatch.setenv("WALKTHROUGH_WORK_DIR", str(work))
    monkeypatch.setenv("WALKTHROUGH_DATA_DIR", str(synthetic_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(notebook, tmp_path / NOTEBOOK.name)  # executed copy, to look at when this fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # images, masked inputs, predictions
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "up to date, skipped" in text and "segmentation jaccard" in text


class _Stop(Exception):
    pass


@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_two_folders_train_the_segmenter_on_the_first_and_the_classifier_by_evidence(profile, tmp_path, monkeypatch):
    """Which settings reach the two trainings (both replaced: the real ones take hours)."""
    from melanoma_tf.data import synthetic
    from melanoma_tf.tasks import lesion_segmentation, melanoma_classification

    isic = synthetic.generate_dataset(tmp_path / "isic", num_images=12, seed=1)
    ham = synthetic.generate_dataset(tmp_path / "ham", num_images=12, seed=2, image_size=(75, 100), layout="ham10000")
    seen = {}

    def segment(records, model_dir, experiment, config_files, params_override, train_steps):
        params = lesion_segmentation.build_experiment(experiment, records, config_files, params_override, train_steps)
        seen["seg"] = params.task.train_data.downloads
        Path(model_dir).mkdir(parents=True)
        (Path(model_dir) / lesion_segmentation.EVAL_METRICS_FILE).write_text("{}")

    def classify(records, model_dir, experiment, config_files, params_override, folds, epochs):
        seen["cls"] = melanoma_classification.resolve_params(experiment, config_files, params_override, folds, epochs)
        raise _Stop

    monkeypatch.setattr(lesion_segmentation, "train", segment)
    monkeypatch.setattr(melanoma_classification, "train", classify)
    with pytest.raises(_Stop):
        pipeline.run([isic, ham], tmp_path / "work", profile=profile)
    assert seen["seg"] == ["isic"]
    cls = seen["cls"]
    assert cls.training.folds == 5
    if profile == "cpu":  # HAM10000 did not help this classifier: it trains on the first folder
        assert cls.data.downloads == ["isic"] and not cls.data.balance_downloads
    else:
        assert cls.data.balance_downloads and cls.data.epoch_images == 2400 and not cls.data.downloads
        assert cls.evaluation.operating_point_downloads == ["isic"] and cls.data.view == "lesion"
    with pytest.raises(_Stop):  # one folder: the profile as it was
        pipeline.run(isic, tmp_path / "one", profile=profile)
    assert seen["seg"] == [] and not seen["cls"].data.balance_downloads and not seen["cls"].data.downloads


def test_ensemble_with_reaches_the_classifier_export(smoke_work, synthetic_dir, monkeypatch):
    """--ensemble-with joins the export step's key, so a finished run exports again, averaging
    its classifier with the given runs (the averaging itself: test_export_classifier)."""
    from melanoma_tf.serving import export_classifier, export_segmenter

    work, _ = smoke_work
    seen = {}

    def export(model_dir, export_dir, ensemble_with=()):
        seen.update(model_dir=Path(model_dir), ensemble_with=list(ensemble_with))
        raise _Stop

    monkeypatch.setattr(export_segmenter, "export", lambda *args, **kwargs: None)
    monkeypatch.setattr(export_classifier, "export", export)
    other = work / "runs" / "other_cls"
    with pytest.raises(_Stop):
        pipeline.run(synthetic_dir, work, profile="smoke", ensemble_with=[other])
    assert seen == {"model_dir": work / "runs" / "cls", "ensemble_with": [other]}
