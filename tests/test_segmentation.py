"""Segmentation stage on the tiny CPU config: experiments, training, resume, eval, export."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from official.core import exp_factory, task_factory
from PIL import Image

from melanoma_tf import masking
from melanoma_tf.configs import EXPERIMENTS_DIR
from melanoma_tf.configs import segmentation as seg_cfg
from melanoma_tf.serving import export_segmenter, warmup
from melanoma_tf.tasks import lesion_segmentation

TINY = str(EXPERIMENTS_DIR / "seg_tiny_test.yaml")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", [seg_cfg.PAPER_EXPERIMENT, seg_cfg.CPU_EXPERIMENT, seg_cfg.CPU_CASCADE_EXPERIMENT])
def test_registered_experiments_are_lesion_mask_rcnns(name):
    params = exp_factory.get_exp_config(name)
    params.validate()
    model = params.task.model
    assert model.num_classes == 2 and model.include_mask
    assert model.backbone.type == "resnet" and model.backbone.resnet.model_id == 101
    assert model.decoder.type == "fpn"
    parser = params.task.train_data.parser
    assert parser.aug_rand_hflip and parser.aug_rand_vflip and parser.aug_rand_rot90
    assert parser.aug_scale_min < 1 < parser.aug_scale_max and parser.aug_color_jitter > 0
    assert params.trainer.optimizer_config.optimizer.type == "sgd"


def test_gpu_yaml_sets_mixed_precision_and_mirrored():
    params = lesion_segmentation.build_experiment(
        seg_cfg.PAPER_EXPERIMENT, None, [str(EXPERIMENTS_DIR / "seg_r101_gpu.yaml")])
    assert params.runtime.distribution_strategy == "mirrored"
    assert params.runtime.mixed_precision_dtype == "float16"


def test_schedule_ends_exactly_at_the_budget(synthetic_records):
    params = lesion_segmentation.build_experiment(seg_cfg.CPU_EXPERIMENT, synthetic_records, train_steps=137)
    task = task_factory.get_task(params.task)
    optimizer = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
    schedule = optimizer.learning_rate
    assert params.trainer.train_steps == 137
    assert float(schedule(136)) > 0
    assert float(schedule(137)) == pytest.approx(0.0, abs=1e-9)
    assert float(schedule(60)) > float(schedule(120))


def test_rot90_boxes_follow_the_image():
    from melanoma_tf.dataloaders.maskrcnn_input import rot90_boxes

    mask = np.zeros((8, 10), np.float32)
    mask[1:3, 2:7] = 1
    box = tf.constant([[1 / 8, 2 / 10, 3 / 8, 7 / 10]])
    for k in range(4):
        turned = np.rot90(mask, k)
        rows, cols = np.flatnonzero(turned.any(1)), np.flatnonzero(turned.any(0))
        h, w = turned.shape
        want = [rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w]
        np.testing.assert_allclose(rot90_boxes(box, tf.constant(k))[0].numpy(), want, atol=1e-6)


def test_one_train_step_lowers_the_loss_on_a_fixed_batch(synthetic_records):
    params = lesion_segmentation.build_experiment(seg_cfg.PAPER_EXPERIMENT, synthetic_records, [TINY])
    task = task_factory.get_task(params.task)
    model = task.build_model()
    optimizer = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
    batch = next(iter(task.build_inputs(params.task.train_data)))
    step = tf.function(lambda: task.train_step(batch, model, optimizer))
    losses = [float(step()["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0], losses


def test_training_reads_only_the_chosen_downloads(tmp_path):
    """task.train_data.downloads: the `cpu` pipeline trains on ISIC's masks beside HAM10000."""
    from melanoma_tf import build_tfrecords
    from melanoma_tf.data import synthetic

    large = synthetic.generate_dataset(tmp_path / "large", num_images=12, seed=6, image_size=(240, 320))
    small = synthetic.generate_dataset(tmp_path / "small", num_images=12, seed=7, image_size=(75, 100),
                                       layout="ham10000")
    build_tfrecords.build([large, small], tmp_path / "records", folds=2, seed=0, progress=False)

    def sizes(downloads):
        params = lesion_segmentation.build_experiment(seg_cfg.PAPER_EXPERIMENT, tmp_path / "records", [TINY], {
            "task": {"train_data": {"downloads": downloads, "global_batch_size": 4}}})
        batches = task_factory.get_task(params.task).build_inputs(params.task.train_data).take(8)
        # image_info's first row: each image's size as read (a quarter turn may swap its sides)
        return {"large" if int(tf.reduce_max(hw)) > 200 else "small"
                for _, labels in batches for hw in labels["image_info"][:, 0]}

    assert sizes([]) == {"large", "small"}
    assert sizes(["large"]) == {"large"}
    assert sizes(["small"]) == {"small"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [seg_cfg.PAPER_EXPERIMENT, seg_cfg.CPU_EXPERIMENT, seg_cfg.QUICK_EXPERIMENT])
def test_profile_trains_one_step(name, synthetic_records):
    # The profile's own model, input size and optimizer; one image per batch keeps it quick.
    params = lesion_segmentation.build_experiment(name, synthetic_records,
                                                  params_override="task.train_data.global_batch_size=1")
    task = task_factory.get_task(params.task)
    model = task.build_model()
    optimizer = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
    batch = next(iter(task.build_inputs(params.task.train_data)))
    assert batch[0].shape[1:3] == params.task.model.input_size[:2]
    before = [v.numpy() for v in model.trainable_variables[:3]]
    logs = task.train_step(batch, model, optimizer)
    assert np.isfinite(float(logs["loss"])) and int(optimizer.iterations) == 1
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables[:3]))


def test_training_writes_checkpoints_summaries_and_lesion_metrics(tiny_seg_run, synthetic_records):
    assert tf.train.latest_checkpoint(str(tiny_seg_run)).endswith("ckpt-4")
    assert list((tiny_seg_run / "train").glob("events.out.tfevents.*"))
    metrics = json.loads((tiny_seg_run / lesion_segmentation.EVAL_METRICS_FILE).read_text())
    for key in ("jaccard", "threshold_jaccard", "dice", "accuracy", "sensitivity", "specificity",
                "detection_rate", "segmentation_precision", "table1_found", "table1_missed",
                "table1_background_called_lesion"):
        assert 0 <= metrics[f"lesion_{key}"] <= max(1, metrics["lesion_num_images"]), key
    test_masked = json.loads((synthetic_records / "manifest.json").read_text())["counts"]["test"]["with_mask"]
    assert metrics["lesion_num_images"] == test_masked
    assert metrics["lesion_table1_found"] + metrics["lesion_table1_missed"] + \
        metrics["lesion_table1_background_called_lesion"] == test_masked
    assert "mask_AP" in metrics and metrics["step"] == 4
    per_image = json.loads((tiny_seg_run / lesion_segmentation.EVAL_PER_IMAGE_FILE).read_text())
    manifest = json.loads((synthetic_records / "manifest.json").read_text())["images"]
    test_ids = {r["source_id"] for r in manifest.values() if r["split"] == "test" and r["has_mask"]}
    assert sorted(r["source_id"] for r in per_image["images"]) == sorted(test_ids)
    assert np.mean([r["jaccard"] for r in per_image["images"]]) == pytest.approx(metrics["lesion_jaccard"])


def test_rerun_after_the_last_step_still_evaluates(tiny_seg_run, synthetic_records, tmp_path):
    """Killed during the final evaluation: the rerun trains nothing and evaluates."""
    import shutil

    model_dir = tmp_path / "run"
    shutil.copytree(tiny_seg_run, model_dir)
    (model_dir / lesion_segmentation.EVAL_METRICS_FILE).unlink()
    checkpoint = (model_dir / "ckpt-4.index").read_bytes()
    lesion_segmentation.train(synthetic_records, model_dir, seg_cfg.PAPER_EXPERIMENT, [TINY])
    assert json.loads((model_dir / lesion_segmentation.EVAL_METRICS_FILE).read_text())["step"] == 4
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
    assert (model_dir / "ckpt-4.index").read_bytes() == checkpoint


def _events_steps(directory: Path) -> list[list[int]]:
    from tensorflow.core.util import event_pb2

    runs = []
    for path in sorted(directory.glob("events.out.tfevents.*"), key=os.path.getmtime):
        steps = {event_pb2.Event.FromString(r.numpy()).step for r in tf.data.TFRecordDataset(str(path))}
        runs.append(sorted(s for s in steps if s > 0))
    return runs


def test_killed_run_resumes_at_its_last_checkpoint(synthetic_records, tmp_path):
    model_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "melanoma_tf.train", "--stage", "seg", "--data-dir", str(synthetic_records),
           "--model-dir", str(model_dir), "--config-file", TINY, "--mode", "train",
           "--params-override", "trainer.train_steps=40,trainer.checkpoint_interval=2,"
                                "trainer.optimizer_config.learning_rate.cosine.decay_steps=40"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not list(model_dir.glob("ckpt-4.index")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = int(tf.train.latest_checkpoint(str(model_dir)).rsplit("-", 1)[1])
    assert 4 <= killed_at < 40
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=900)
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-40")
    first_run, second_run = _events_steps(model_dir / "train")
    assert second_run[0] > killed_at  # no step before the checkpoint was trained again


def test_mirrored_strategy_over_two_logical_cpus(synthetic_records, tmp_path):
    script = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from melanoma_tf.tasks import lesion_segmentation as ls
params = ls.build_experiment("{seg_cfg.PAPER_EXPERIMENT}", "{synthetic_records}", ["{TINY}"],
                             "runtime.distribution_strategy=mirrored,trainer.train_steps=2")
strategy = ls.distribution_strategy(params)
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
ls.run(params, "{tmp_path / 'mirrored'}", "train_and_eval")
print("REPLICAS", strategy.num_replicas_in_sync)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICAS 2" in out.stdout
    assert (tmp_path / "mirrored" / lesion_segmentation.EVAL_METRICS_FILE).is_file()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_export_signature_shapes_dtypes_and_bad_images(seg_export, synthetic_dir):
    model = tf.saved_model.load(str(seg_export))
    serve = model.signatures["serving_default"]
    paths = sorted((synthetic_dir / "images").glob("*.jpg"))[:2]
    sources = [np.asarray(Image.open(p)) for p in paths]
    png = io.BytesIO()
    Image.fromarray(sources[1]).save(png, format="PNG")
    batch = [paths[0].read_bytes(), b"not an image", b"", png.getvalue()]
    out = {k: v.numpy() for k, v in serve(image_bytes=tf.constant(batch)).items()}
    hmax = max(s.shape[0] for s in sources)
    wmax = max(s.shape[1] for s in sources)
    assert out["lesion_mask"].shape == (4, hmax, wmax) and out["lesion_mask"].dtype == np.uint8
    assert out["masked_image"].shape == (4, 227, 227, 3) and out["masked_image"].dtype == np.uint8
    assert out["lesion_box"].shape == (4, 4) and out["lesion_score"].dtype == np.float32
    assert list(out["status"][1:3]) == [2, 2]
    assert out["image_size"].tolist() == [list(sources[0].shape[:2]), [0, 0], [0, 0], list(sources[1].shape[:2])]
    assert not out["lesion_mask"][1:3].any() and not out["masked_image"][1:3].any()
    for i, source in ((0, sources[0]), (3, sources[1])):
        h, w = source.shape[:2]
        mask = out["lesion_mask"][i]
        assert set(np.unique(mask)) <= {0, 1} and not mask[h:].any() and not mask[:, w:].any()
        decoded = tf.io.decode_image(batch[i], channels=3).numpy()
        want = masking.mask_lesion(tf.constant(decoded), tf.constant(mask[:h, :w])).numpy()
        np.testing.assert_array_equal(out["masked_image"][i], want)
        assert out["status"][i] == (0 if mask.any() else 1)
    # A valid image over the pixel limit is refused from its header (status 3, its size), not decoded.
    huge = io.BytesIO()
    Image.new("1", (12_000, 9_000)).save(huge, format="PNG")  # 108 MP > contract.MAX_IMAGE_PIXELS
    refused = {k: v.numpy() for k, v in serve(image_bytes=tf.constant([huge.getvalue(), batch[0]])).items()}
    assert refused["status"].tolist() == [3, out["status"][0]]
    assert refused["image_size"].tolist() == [[9_000, 12_000], list(sources[0].shape[:2])]
    np.testing.assert_array_equal(refused["lesion_mask"][1], out["lesion_mask"][0][:hmax, :wmax][
        :refused["lesion_mask"].shape[1], :refused["lesion_mask"].shape[2]])
    # The same pixels as serving_default decoded (PIL's JPEG decoder differs from TF's by a few levels).
    decoded = tf.io.decode_image(batch[0], channels=3)
    tensor_out = model.signatures["serving_image_tensor"](images=decoded[None])
    height, width = sources[0].shape[:2]
    np.testing.assert_array_equal(tensor_out["lesion_mask"][0].numpy(), out["lesion_mask"][0][:height, :width])


def test_export_computes_the_view_its_classifier_trained_on(tiny_seg_run, synthetic_dir, tmp_path):
    """`masked_image` is the context view of the served mask when the classifier run trained on
    it: the same pixels as the training function (`masking.context_view`) for the same image and
    mask, and assets.extra says which view it is."""
    from melanoma_tf.configs import classification as cls_cfg
    from melanoma_tf.export import main as export_main

    cls_run = tmp_path / "cls"
    cls_run.mkdir()
    cls_cfg.save_config(cls_cfg.build_config("melanoma_efficientnet_lite0_context"), cls_run / "params.yaml")
    export = tmp_path / "lesion_segmenter" / "1"
    assert export_main(["--stage", "seg", "--model-dir", str(tiny_seg_run), "--export-dir", str(export),
                        "--classifier-model-dir", str(cls_run)]) == 0
    assert json.loads((export / export_segmenter.CLASSIFIER_INPUT_FILE).read_text()) == {
        "view": "context", "margin": 0.5, "size": 227}
    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    paths = sorted((synthetic_dir / "images").glob("*.jpg"))[:4]
    out = serve(image_bytes=tf.constant([p.read_bytes() for p in paths]))
    found = 0
    for i, path in enumerate(paths):
        image = tf.io.decode_image(path.read_bytes(), channels=3)
        h, w = image.shape[:2]
        mask = out["lesion_mask"].numpy()[i][:h, :w]
        want = masking.context_view(image, tf.constant(mask), 227, 0.5).numpy()
        np.testing.assert_array_equal(out["masked_image"].numpy()[i], want)
        found += bool(mask.any())
    assert found, "the tiny segmenter found no lesion: the test would not compare a lesion's square"


def test_export_has_warmup_requests_that_it_answers(seg_export):
    requests = warmup.read_warmup_requests(seg_export)
    assert len(requests) == 1 and requests[0].model_spec.name == export_segmenter.MODEL_NAME
    model = tf.saved_model.load(str(seg_export))
    images = tf.make_ndarray(requests[0].inputs["image_bytes"])
    out = model.signatures["serving_default"](image_bytes=tf.constant(images))
    assert out["status"].numpy()[0] in (0, 1)


def test_export_never_overwrites_a_version(seg_export, tiny_seg_run):
    """TF Serving versions are immutable: a server may be serving this one."""
    before = sorted(str(p) for p in seg_export.rglob("*"))
    with pytest.raises(FileExistsError, match=str(seg_export)):
        export_segmenter.export(tiny_seg_run, seg_export)
    assert sorted(str(p) for p in seg_export.rglob("*")) == before


@pytest.mark.slow
def test_cascade_heads_train_export_and_serve(synthetic_records, synthetic_dir, tmp_path):
    """`lesion_maskrcnn_cpu_cascade`'s Cascade R-CNN heads on the tiny model: the export keeps all
    three box heads and serves one lesion mask per image, the one its masked image shows."""
    cpu = exp_factory.get_exp_config(seg_cfg.CPU_CASCADE_EXPERIMENT).task.model
    cascade = {"task": {"model": {
        "roi_sampler": {"cascade_iou_thresholds": list(cpu.roi_sampler.cascade_iou_thresholds)},
        "detection_head": {"class_agnostic_bbox_pred": cpu.detection_head.class_agnostic_bbox_pred,
                           "cascade_class_ensemble": cpu.detection_head.cascade_class_ensemble}}}}
    lesion_segmentation.train(synthetic_records, tmp_path / "run", seg_cfg.PAPER_EXPERIMENT, [TINY], cascade,
                              mode="train", train_steps=2)
    export = export_segmenter.export(tmp_path / "run", tmp_path / "exports" / "lesion_segmenter" / "1")
    saved = [name for name, _ in tf.train.list_variables(str(export / "variables" / "variables"))]
    heads = {name.split("/")[2] for name in saved if name.startswith("model/detection_head/")}
    assert heads == {"0", "1", "2"}, heads
    model = tf.saved_model.load(str(export))
    path = sorted((synthetic_dir / "images").glob("*.jpg"))[0]
    out = model.signatures["serving_default"](image_bytes=tf.constant([path.read_bytes()]))
    mask = out["lesion_mask"].numpy()[0]
    assert set(np.unique(mask)) <= {0, 1} and out["status"].numpy()[0] == (0 if mask.any() else 1)
    image = tf.io.decode_image(path.read_bytes(), channels=3)
    np.testing.assert_array_equal(out["masked_image"].numpy()[0],
                                  masking.mask_lesion(image, tf.constant(mask)).numpy())
