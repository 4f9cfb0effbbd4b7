"""Records, training runs, exports and scoring in a bucket: TensorFlow's in-memory `ram://` file
system stands in for gs:// and s3://, which the command-line tools reach the same way (tf.io.gfile).
Every step runs in this process, as `ram://` lives only in the process that writes it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from melanoma_tf import build_tfrecords, contract, export, score, storage, train
from melanoma_tf.configs import EXPERIMENTS_DIR
from melanoma_tf.serving import export_classifier, versions, warmup
from melanoma_tf.serving.server import start_server
from melanoma_tf.tasks import lesion_segmentation

import serving_fakes as fakes

pytestmark = pytest.mark.slow
BUCKET = "ram://melanoma-bucket"


def _files(url: str) -> list[str]:
    """Every file under url, relative to it."""
    return sorted(f"{top}/{name}"[len(url) + 1:] for top, _, names in tf.io.gfile.walk(url) for name in names)


@pytest.fixture(autouse=True)
def no_local_writes(tmp_path, monkeypatch):
    """Runs each test in an empty folder and checks that nothing landed there: a URL folded by
    pathlib into `ram:/...` would have made a local folder `ram:`."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def bucket_records(synthetic_dir) -> str:
    records = f"{BUCKET}/records"
    assert build_tfrecords.main(["--data-dir", str(synthetic_dir), "--output-dir", records, "--folds", "2",
                                 "--num-workers", "1"]) == 0
    return records


def test_records_are_built_into_a_bucket(bucket_records):
    manifest = json.loads(storage.path(f"{bucket_records}/manifest.json").read_text())
    shards = [name for name in _files(bucket_records) if name.endswith(".tfrecord")]
    assert sorted(shards) == sorted(n for names in manifest["shards"].values() for n in names)
    assert sum(1 for _ in tf.data.TFRecordDataset([f"{bucket_records}/{n}" for n in shards])) == 40
    assert not [n for n in tf.io.gfile.listdir(BUCKET) if ".tmp-" in n]  # no temporary left beside it


def test_a_classifier_run_and_its_exports_round_trip_through_a_bucket(bucket_records, tmp_path_factory, capsys):
    records, run, models = bucket_records, f"{BUCKET}/runs/cls", f"{BUCKET}/models/melanoma_classifier"
    manifest = json.loads(storage.path(f"{records}/manifest.json").read_text())

    # Two folds, the final model and the summary, all into the bucket; a rerun finds them done.
    flags = ["--stage", "cls", "--data-dir", records, "--model-dir", run, "--config-file", "cls_tiny_test.yaml"]
    assert train.main(flags) == 0
    written = _files(run)
    for name in ("params.yaml", "fold_0/result.json", "fold_1/history.csv", "fold_1/best.weights.h5",
                 "final_model.keras", "cv_metrics.json", "test_metrics.json", "predictions.csv", "roc_test.png"):
        assert name in written, name
    assert not [n for n in written if ".tmp-" in n or ".old-" in n]
    cv = json.loads(tf.io.gfile.GFile(f"{run}/cv_metrics.json").read())
    assert cv["pooled"]["n"] == manifest["counts"]["train"]["with_mask"]  # the lesion view needs a mask
    assert tf.io.gfile.GFile(f"{run}/roc_test.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert train.main(flags) == 0
    out = capsys.readouterr().out
    assert "fold 1/2: done before, skipped" in out and "final model: done before, loaded" in out

    # Exports: versions 1 then 2 in the bucket, each complete, and the same graph as a local export.
    assert export.main(["--stage", "cls", "--model-dir", run, "--export-dir", models, "--next-version"]) == 0
    assert export.main(["--stage", "cls", "--model-dir", run, "--export-dir", models, "--next-version"]) == 0
    assert sorted(versions.versions_on_disk(models)) == [1, 2]
    assert {"saved_model.pb", "assets.extra/params.yaml", "assets.extra/tf_serving_warmup_requests"} <= set(
        _files(f"{models}/1"))
    assert len(warmup.read_warmup_requests(f"{models}/2")) == 1
    local = export_classifier.export(run, tmp_path_factory.mktemp("local") / "melanoma_classifier" / "1")
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (3, 227, 227, 3), dtype=np.uint8))
    remote_out = tf.saved_model.load(f"{models}/1").signatures["serving_default"](images)
    local_out = tf.saved_model.load(str(local)).signatures["serving_default"](images)
    np.testing.assert_allclose(remote_out["melanoma_probability"], local_out["melanoma_probability"], atol=1e-6)
    with pytest.raises(FileExistsError, match="immutable"):
        export_classifier.export(run, f"{models}/2")

    # The embedded server serves the bucket's newest version, as TF Serving does from gs://.
    server = start_server({contract.CLASSIFIER: models}, poll_seconds=0)
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = contract.CLASSIFIER
        request.inputs[contract.MASKED_IMAGE].CopyFrom(tf.make_tensor_proto(images.numpy()))
        with grpc.insecure_channel(server.target) as channel:
            reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    finally:
        server.stop()
    assert reply.model_spec.version.value == 2
    np.testing.assert_allclose(tf.make_ndarray(reply.outputs["melanoma_probability"]),
                               local_out["melanoma_probability"], atol=1e-6)


def test_a_segmenter_run_and_its_export_round_trip_through_a_bucket(bucket_records):
    run, version = f"{BUCKET}/runs/seg", f"{BUCKET}/models/lesion_segmenter/1"
    assert train.main(["--stage", "seg", "--data-dir", bucket_records, "--model-dir", run,
                       "--config-file", str(EXPERIMENTS_DIR / "seg_tiny_test.yaml")]) == 0
    assert tf.train.latest_checkpoint(run).endswith("ckpt-4")
    metrics = json.loads(storage.path(f"{run}/{lesion_segmentation.EVAL_METRICS_FILE}").read_text())
    assert metrics["step"] == 4 and metrics["lesion_num_images"] > 0
    assert {"params.yaml", lesion_segmentation.EVAL_PER_IMAGE_FILE} <= set(_files(run))
    assert export.main(["--stage", "seg", "--model-dir", run, "--export-dir", version]) == 0
    (request,) = warmup.read_warmup_requests(version)
    out = tf.saved_model.load(version).signatures["serving_default"](
        image_bytes=tf.constant(tf.make_ndarray(request.inputs["image_bytes"])))
    assert out["status"].numpy()[0] in (0, 1)


def test_scoring_reads_images_and_writes_scores_and_masks_in_a_bucket(tmp_path_factory):
    images, output, masks = f"{BUCKET}/score/images", f"{BUCKET}/score/out/scores.csv", f"{BUCKET}/score/masks"
    tf.io.gfile.makedirs(images)
    for i in range(5):
        storage.path(f"{images}/lesion_{i}.png").write_bytes(fakes.encode_png(fakes.lesion_image(48, 64, seed=i)))
    storage.path(f"{images}/broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    exports = fakes.copy_exports(tmp_path_factory.mktemp("exports"))
    server = start_server({name: exports / name for name in (fakes.SEGMENTER, fakes.CLASSIFIER)}, poll_seconds=0)
    try:
        run = ["--server", server.target, "--no-progress", "--input", images, "--output", output, "--masks-dir", masks]
        assert score.main(run) == score.EXIT_IMAGE_ERRORS
        rows = list(csv.DictReader(io.StringIO(storage.path(output).read_text())))
        assert sorted(r["image_id"] for r in rows) == ["broken"] + [f"lesion_{i}" for i in range(5)]
        assert {r["path"] for r in rows} == {f"{images}/{n}" for n in ["broken.jpg"] + [f"lesion_{i}.png"
                                                                                         for i in range(5)]}
        good = [r for r in rows if not r["error"]]
        assert len(good) == 5 and all(0.0 <= float(r["melanoma_probability"]) <= 1.0 for r in good)
        assert _files(masks) == [f"lesion_{i}_segmentation.png" for i in range(5)]

        # A rerun scores nothing twice; a partial last line (a killed upload) is dropped and rescored.
        data = storage.path(output).read_bytes()
        storage.path(output).write_bytes(data[: data.rindex(b"lesion_4") + 4])
        assert score.main(run + ["--allow-image-errors"]) == score.EXIT_OK
        rows = list(csv.DictReader(io.StringIO(storage.path(output).read_text())))
        assert sorted(r["image_id"] for r in rows) == ["broken"] + [f"lesion_{i}" for i in range(5)]
    finally:
        server.stop()


def test_a_folder_lands_in_a_bucket_with_its_commit_marker_last(monkeypatch):
    src, dst = f"{BUCKET}/move/.1.tmp", f"{BUCKET}/move/1"
    for name in ("saved_model.pb", "variables/variables.index", "assets.extra/warmup", "fingerprint.pb"):
        storage.path(f"{src}/{name}").parent.mkdir(parents=True, exist_ok=True)
        storage.path(f"{src}/{name}").write_text(name)
    copied = []
    real_copy = tf.io.gfile.copy
    monkeypatch.setattr(tf.io.gfile, "copy",
                        lambda a, b, overwrite=False: (copied.append(b), real_copy(a, b, overwrite)))
    storage.move(storage.path(src), storage.path(dst))
    assert copied[-1] == f"{dst}/saved_model.pb" and len(copied) == 4
    assert _files(f"{BUCKET}/move") == ["1/assets.extra/warmup", "1/fingerprint.pb", "1/saved_model.pb",
                                        "1/variables/variables.index"]
    assert storage.path(f"{dst}/assets.extra/warmup").read_text() == "assets.extra/warmup"


def test_a_bucket_path_behaves_like_a_pathlib_path():
    p = storage.path(f"{BUCKET}/names//a/scan.v2.jpg")
    assert (str(p), p.name, p.stem, p.suffix) == (f"{BUCKET}/names/a/scan.v2.jpg", "scan.v2.jpg", "scan.v2", ".jpg")
    assert p.parent == storage.path(f"{BUCKET}/names/a/") and p.with_suffix(".png").name == "scan.v2.png"
    assert p.relative_to(storage.path(f"{BUCKET}/names")).as_posix() == "a/scan.v2.jpg"
    assert storage.path("runs/x") == Path("runs/x")  # local paths stay pathlib's
    for name in ("a/1.png", "a/b/2.png", "3.png", "a/notes.txt"):
        storage.path(f"{BUCKET}/names/{name}").parent.mkdir(parents=True, exist_ok=True)
        storage.path(f"{BUCKET}/names/{name}").write_bytes(b"x")
    root = storage.path(f"{BUCKET}/names")
    assert [q.name for q in root.glob("*.png")] == ["3.png"]
    assert sorted(q.relative_to(root).as_posix() for q in root.glob("**/*.png")) == ["3.png", "a/1.png", "a/b/2.png"]
    with pytest.raises(TypeError):  # never a local file named "ram:/..."
        open(p, "wb")
