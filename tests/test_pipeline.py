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
