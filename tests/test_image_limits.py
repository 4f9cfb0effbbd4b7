"""A valid image too large to serve is told apart from a broken file: its header is read in graph,
it is never decoded, and the answer names its pixel count and the limit (score CSV, gRPC, REST)."""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from melanoma_tf import contract, score
from melanoma_tf.client import ImageTooLargeError, MelanomaClient
from melanoma_tf.serving.image_header import header_sizes

import serving_fakes as fakes

ROOT = Path(__file__).resolve().parents[1]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """25000x25000: a valid PNG of 625 megapixels (76 kB: one bit a pixel, all black)."""
    return _encoded(Image.new("1", (25_000, 25_000)), "PNG")


def test_header_sizes_of_every_format_without_decoding(huge_png):
    small = Image.fromarray(np.zeros((37, 53, 3), np.uint8))
    images = [_encoded(small, fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF")]
    images += [b"not an image", b"", b"\xff\xd8\xff\xe0 a truncated jpeg", huge_png]
    assert header_sizes(tf.constant(images)).numpy().tolist() == [[37, 53]] * 4 + [[0, 0]] * 3 + [[25_000, 25_000]]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _wait_until_serving(process: subprocess.Popen, rest_port: int, log: Path) -> None:
    """Until the REST API answers a model's status (the gRPC port opens before it), bounded."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=5)
            connection.request("GET", f"/v1/models/{fakes.CLASSIFIER}")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not start")


def test_too_large_is_its_own_error_in_grpc_rest_and_the_score_csv_with_memory_bounded(huge_png, tmp_path):
    """A 144-megapixel JPEG (decoded: 432 MB of RGB) and the 625 MP PNG, against a broken file,
    through a standalone server process whose peak memory is watched."""
    exports = fakes.stand_in_exports()
    config = tmp_path / "models.config"
    config.write_text("".join(f'config {{ name: "{m}" base_path: "{exports / m}" model_platform: "tensorflow" }}\n'
                              for m in (fakes.SEGMENTER, fakes.CLASSIFIER)).join(["model_config_list {\n", "}\n"]))
    inputs = tmp_path / "in"
    fakes.write_images(inputs, 2, size=40)
    (inputs / "huge.png").write_bytes(huge_png)
    (inputs / "wide.jpg").write_bytes(_encoded(Image.new("L", (12_000, 12_000)), "JPEG"))
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 a jpeg cut short")  # no size in it: broken, not large
    log = tmp_path / "serve.log"  # a file, not a pipe nobody drains: TF's logging must not block the server
    grpc_port, rest_port = fakes.free_port(), fakes.free_port()
    server = subprocess.Popen([sys.executable, "-m", "melanoma_tf.serve", "--model-config", str(config),
                               "--port", str(grpc_port), "--rest-api-port", str(rest_port), "--poll-seconds", "0"],
                              stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        _wait_until_serving(server, rest_port, log)
        before = _peak_rss_mb(server.pid)
        output = tmp_path / "scores.csv"
        assert score.main(["--server", f"127.0.0.1:{grpc_port}", "--input", str(inputs), "--output", str(output),
                           "--no-progress"]) == 1
        rows = {r["image_id"]: r for r in csv.DictReader(output.open())}
        limit = f"{contract.MAX_IMAGE_PIXELS:,}"
        assert "25000x25000 = 625,000,000 pixels" in rows["huge"]["error"] and limit in rows["huge"]["error"]
        assert "12000x12000 = 144,000,000 pixels" in rows["wide"]["error"]
        assert "could not decode" in rows["broken"]["error"] and "pixels" not in rows["broken"]["error"]
        assert sum(not r["error"] for r in rows.values()) == 2  # the good images are scored

        with MelanomaClient(f"127.0.0.1:{grpc_port}") as client, pytest.raises(ImageTooLargeError, match=limit):
            client.predict(huge_png, "huge")
        connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=60)
        connection.request("POST", f"/v1/models/{fakes.SEGMENTER}:predict", json.dumps(
            {"instances": [{"b64": base64.b64encode(huge_png).decode()}]}))
        (answer,) = json.loads(connection.getresponse().read())["predictions"]
        assert answer["status"] == contract.STATUS_TOO_LARGE and answer["image_size"] == [25_000, 25_000]
        # Refused from the header: decoding the JPEG alone would have needed 432 MB.
        assert _peak_rss_mb(server.pid) - before < 150, (before, _peak_rss_mb(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=60)
