"""Cross-validation folds as parallel worker processes: `train --stage cls --fold K`, `--fold final`,
then `--summarize`, into one run folder, as the classifier's indexed Kubernetes Job runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.tasks import melanoma_classification as task

pytestmark = pytest.mark.slow
TIMEOUT = 300  # seconds per worker: a tiny fit takes seconds, TensorFlow's import most of the rest
RUN = ["--config-file", "cls_tiny_test.yaml", "--params-override", "evaluation.target_sensitivity=0.9"]


def _start(records: Path, model_dir: Path, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "melanoma_tf.train", "--stage", "cls", "--data-dir", str(records),
                             "--model-dir", str(model_dir), *RUN, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(*workers: subprocess.Popen) -> list[tuple[int, str, str]]:
    """Waits for every worker (bounded); kills all that are left when one overruns."""
    try:
        return [(w.returncode, *w.communicate(timeout=TIMEOUT)) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


def _run(records: Path, model_dir: Path, *flags: str) -> tuple[int, str, str]:
    worker = _start(records, model_dir, *flags)
    out, err = _finish(worker)[0][1:]
    return worker.returncode, out, err


def test_folds_train_in_parallel_workers_then_one_summary_pools_them(synthetic_records, tmp_path):
    run = tmp_path / "run"
    workers = [_start(synthetic_records, run, "--fold", k) for k in ("0", "1")]
    results = _finish(*workers)
    assert [w.returncode for w in workers] == [0, 0], [r[2][-2000:] for r in results]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["fold_0", "fold_1"]

    # The summary refuses while the final model is missing, naming it; no summary is written.
    code, _, err = _run(synthetic_records, run, "--summarize")
    assert code == 2 and "final model is not trained yet (--fold final)" in err
    assert not (run / "cv_metrics.json").exists()
    assert _run(synthetic_records, run, "--fold", "final")[0] == 0
    code, out, err = _run(synthetic_records, run, "--summarize")
    assert code == 0, err[-2000:]
    cv = json.loads((run / "cv_metrics.json").read_text())
    point = json.loads((run / "operating_point.json").read_text())
    assert [f["fold"] for f in cv["per_fold"]] == [0, 1] and 0 < point["threshold"] < 1
    assert "cross-validation" in out

    # Same fold membership as the one-process run: fold k held out exactly stored folds k, k+2, ...
    params = task.resolve_params(config_files=["cls_tiny_test.yaml"])
    data = inputs.read_lesions(synthetic_records, "train", params.data)
    pooled = []
    for k in (0, 1):
        result = json.loads((run / f"fold_{k}" / "result.json").read_text())
        held = {p["image_id"] for p in result["predictions"]}
        assert held == set(data.image_ids[inputs.fold_indices(data.folds, k, 2)[1]])
        pooled += result["predictions"]
    labels = np.array([p["label"] for p in pooled])
    assert cv["pooled"]["n"] == len(pooled) == len(data) and cv["pooled"]["n_melanoma"] == labels.sum()

    # A rerun skips a finished fit and writes nothing.
    stamp = (run / "fold_0" / "result.json").stat().st_mtime_ns
    code, out, _ = _run(synthetic_records, run, "--fold", "0")
    assert code == 0 and "done before, skipped" in out
    assert (run / "fold_0" / "result.json").stat().st_mtime_ns == stamp


def test_summary_refuses_a_missing_fold_and_a_fold_trained_under_another_config(synthetic_records, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    assert _run(synthetic_records, run, "--fold", "0")[0] == 0
    code, _, err = _run(synthetic_records, run, "--summarize")
    assert code == 2 and "fold 1 not trained yet (--fold K)" in err
    assert not (run / "cv_metrics.json").exists()
    # fold 1 of a run with another config, put where this run's fold 1 belongs
    assert _run(synthetic_records, other, "--fold", "1", "--epochs", "1")[0] == 0
    shutil.copytree(other / "fold_1", run / "fold_1")
    code, _, err = _run(synthetic_records, run, "--summarize")
    assert code == 2 and "fold 1 trained with other params" in err
    code, _, err = _run(synthetic_records, run, "--fold", "2")
    assert code == 2 and "fold 2: the run has folds 0..1" in err
