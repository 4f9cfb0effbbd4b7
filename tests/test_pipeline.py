"""The main job runs every step on a small synthetic set, and a rerun skips what is done."""

import json

from melanoma_tf import pipeline


def test_pipeline_runs_end_to_end_then_skips_finished_steps(synthetic_dir, tmp_path, capsys):
    work = tmp_path / "work"
    result = pipeline.run(synthetic_dir, work, profile="smoke")
    metrics = json.loads((work / "report" / "metrics.json").read_text())
    manifest = json.loads((work / "tfrecords" / "manifest.json").read_text())
    assert metrics["counts"]["images"] == len(manifest["splits"]["test"])
    assert (work / "report" / "index.html").is_file()
    assert result["segmentation"]["jaccard"] == metrics["segmentation"]["jaccard"]
    for name in ("lesion_segmenter", "melanoma_classifier"):
        assert (work / "exports" / name / "1" / "saved_model.pb").is_file()
    capsys.readouterr()
    pipeline.run(synthetic_dir, work, profile="smoke")
    out = capsys.readouterr().out
    for step in ("data", "records", "segmentation", "classification", "export", "evaluate"):
        assert f"[{step}] up to date, skipped" in out
