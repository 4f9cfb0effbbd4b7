"""The batch-scoring CLI: results, failures, resume, and a server killed mid-run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_tf import score
from melanoma_tf.client import MelanomaClient
from melanoma_tf.serving.server import start_server

import serving_fakes as fakes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fakes.copy_exports(tmp_path_factory.mktemp("score") / "exports")


@pytest.fixture(scope="module")
def server(exports: Path):
    handle = start_server({name: exports / name for name in (fakes.SEGMENTER, fakes.CLASSIFIER)},
                          poll_seconds=0, batching_parameters={
                              "max_batch_size": 8, "batch_timeout_micros": 2000,
                              "num_batch_threads": 2})
    yield handle
    handle.stop()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _run(server, *args: str) -> int:
    return score.main(["--server", server.target, "--no-progress", "--concurrency", "4", *args])


def test_scores_folder_writes_masks_and_records_failures(server, tmp_path: Path) -> None:
    images = fakes.write_images(tmp_path / "in", 5, size=30)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    output, masks = tmp_path / "scores.csv", tmp_path / "masks"
    assert _run(server, "--input", str(tmp_path / "in"), "--output", str(output),
                "--masks-dir", str(masks), "--threshold", "0.01") == 1
    rows = {row["image_id"]: row for row in _rows(output)}
    assert set(rows) == {p.stem for p in images} | {"broken"}
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"]
    assert not (masks / "broken_segmentation.png").exists()
    with MelanomaClient(server.target, threshold=0.01) as client:
        for path in images:
            row, expected = rows[path.stem], client.predict(path)
            assert row["status"] == "ok" and row["error"] == ""
            assert float(row["melanoma_probability"]) == pytest.approx(
                expected.melanoma_probability, abs=1e-6)
            assert row["is_melanoma"] == ("1" if expected.is_melanoma else "0")
            assert [float(v) for v in row["box"].split()] == pytest.approx(expected.lesion_box)
            assert row["path"] == str(path)
            mask = np.array(Image.open(masks / f"{path.stem}_segmentation.png"))
            np.testing.assert_array_equal(mask, expected.lesion_mask * 255)
    assert not [p for p in masks.iterdir() if p.name.startswith(".")]


def test_csv_input_with_ids_and_retry_failed(server, tmp_path: Path) -> None:
    images = fakes.write_images(tmp_path / "imgs", 3, size=24, fmt="jpg")
    listing = tmp_path / "list.csv"
    listing.write_text("image_id,image_path\n"
                       + "".join(f"case{i},imgs/{p.name}\n" for i, p in enumerate(images))
                       + "case9,imgs/missing.png\ncase0,imgs/duplicate.png\n")
    output = tmp_path / "out.csv"
    assert _run(server, "--input", str(listing), "--output", str(output)) == score.EXIT_IMAGE_ERRORS
    rows = {row["image_id"]: row for row in _rows(output)}
    assert set(rows) == {"case0", "case1", "case2", "case9"}
    assert "cannot read image" in rows["case9"]["error"]
    assert _run(server, "--input", str(listing), "--output", str(output)) == score.EXIT_IMAGE_ERRORS
    assert len(_rows(output)) == 4, "a rerun must not score anything twice"
    # A Job's restarted pod finds the error rows of its earlier attempt: the run is still complete.
    assert _run(server, "--input", str(listing), "--output", str(output), "--allow-image-errors") == score.EXIT_OK
    (tmp_path / "imgs" / "missing.png").write_bytes(fakes.encode_png(fakes.lesion_image(20, 20)))
    assert _run(server, "--input", str(listing), "--output", str(output), "--retry-failed") == 0
    rows = _rows(output)
    assert sorted(r["image_id"] for r in rows) == ["case0", "case1", "case2", "case9"]
    assert all(r["status"] == "ok" for r in rows)


def test_resume_drops_a_partial_last_line(server, tmp_path: Path) -> None:
    fakes.write_images(tmp_path / "in", 4, size=24)
    output = tmp_path / "scores.csv"
    assert _run(server, "--input", str(tmp_path / "in"), "--output", str(output)) == 0
    text = output.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    output.write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])
    fakes.write_images(tmp_path / "in", 6, size=24)
    assert _run(server, "--input", str(tmp_path / "in"), "--output", str(output)) == 0
    rows = _rows(output)
    assert sorted(r["image_id"] for r in rows) == [f"img_{i:03d}" for i in range(6)]
    assert all(r["status"] == "ok" for r in rows)
    assert output.read_text().endswith("\n")


def _start_cli_server(config: Path, exports: Path, batching: Path, port: int = 0):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "melanoma_tf.serve", "--model-config", str(config),
         "--model-base-path-map", f"/models={exports}", "--port", str(port),
         "--batching-parameters", str(batching), "--poll-seconds", "0", "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Serving"):
            for _ in range(2):
                lines.append(process.stdout.readline())
            return process, int(line.rsplit(":", 1)[1]), "".join(lines)
    process.kill()
    raise AssertionError("server did not start: " + "".join(lines))


def test_server_killed_and_restarted_mid_run(exports: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "/models/{name}" model_platform: "tensorflow" }}\n'
        for name in (fakes.SEGMENTER, fakes.CLASSIFIER)) + "}\n")
    batching = tmp_path / "batching.txt"
    # A long batch timeout makes every request take ~0.15 s, so the run is still going
    # when the server is killed.
    batching.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 150000 }\n"
                        "num_batch_threads { value: 2 }\n")
    images = fakes.write_images(tmp_path / "in", 30, size=24)
    output = tmp_path / "scores.csv"

    first, port, banner = _start_cli_server(config, exports, batching)
    assert f"{fakes.SEGMENTER}:" in banner and "1 AVAILABLE" in banner
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("code", score.main([
        "--server", f"127.0.0.1:{port}", "--input", str(tmp_path / "in"), "--output", str(output),
        "--concurrency", "4", "--server-wait", "120", "--no-progress"])))
    runner.start()
    second = None
    try:
        deadline = time.monotonic() + 60
        while not output.exists() or len(output.read_text().splitlines()) < 6:
            assert time.monotonic() < deadline and runner.is_alive(), "scoring did not start"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        scored_before_restart = len(_rows(output))
        assert scored_before_restart < len(images), "the run finished before the kill"
        second, _, _ = _start_cli_server(config, exports, batching, port=port)
        runner.join(180)
        assert not runner.is_alive()
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, "SIGTERM must shut the server down cleanly"
        assert "Stopped" in second.stdout.read()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert outcome.get("code") == 0
    rows = _rows(output)
    assert sorted(r["image_id"] for r in rows) == sorted(p.stem for p in images)
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)
