"""Lesion segmentation under a CPU budget, on the real ISIC sample, next to an Otsu baseline.

    python benchmarks/segmentation.py --profile cpu --budget-minutes 60     # or cpu_cascade, paper
    python benchmarks/segmentation.py --profile cpu_cascade --data-dir ../shared/data/isic-sample \
        --data-dir ../shared/data/ham10000-sample --records benchmarks/.cache/isic-ham --name-suffix ham
    python benchmarks/segmentation.py --plot     # Jaccard against budget, all results so far
    python benchmarks/segmentation.py --profile cpu_cascade --finished-run WORK/runs/seg --records WORK/tfrecords \
        --name-suffix pipeline --pair-with RESULT.json    # a pipeline's segmenter, scored the same way

The budget is in minutes of this 2-core machine, metered as the training process's CPU time
divided by the number of cores, so other jobs on the machine do not shrink it. A short probe
measures CPU seconds per step; the run then gets the number of steps that fits the budget and
a learning-rate schedule that ends exactly there. Evaluation (Model Garden's eval with our
full-resolution lesion metrics) runs on the test split after training, outside the budget.
Results go to benchmarks/results/segmentation-<profile>-<N>min-<sample version>.json (sample v1's
carry no suffix), with Otsu on the same test images and the model's Jaccard minus Otsu's, paired
per image; the per-image rows are kept (`per_image`) so that another run on the same test images
can be paired with this one (`--pair-with RESULT.json`). Further --data-dir folders (HAM10000)
only add training masks: the test split stays the first folder's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import tensorflow as tf
from official.core import task_factory

from melanoma_tf import atomic, build_tfrecords, evaluate, tfrecords
from melanoma_tf.configs import segmentation as seg_cfg
from melanoma_tf.evaluation import baselines
from melanoma_tf.evaluation import segmentation as seg_metrics
from melanoma_tf.tasks import lesion_segmentation

from sample_quality import by_image_quality

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROFILES = {"cpu": seg_cfg.CPU_EXPERIMENT, "cpu_cascade": seg_cfg.CPU_CASCADE_EXPERIMENT,
            "paper": seg_cfg.PAPER_EXPERIMENT}
SAMPLE = HERE.parent.parent / "shared/data/isic-sample"
CORES = os.cpu_count() or 1


def ensure_records(data_dir: Path | list[Path], records: Path) -> Path:
    if not (records / "manifest.json").is_file():
        build_tfrecords.build(data_dir, records, num_workers=CORES)
    return records


def cpu_seconds_per_step(params, probe_steps: int = 6) -> float:
    """Process CPU seconds of one training step, after the first (tracing) steps."""
    task = task_factory.get_task(params.task)
    model = task.build_model()
    optimizer = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
    batches = iter(task.build_inputs(params.task.train_data))
    step = tf.function(lambda inputs: task.train_step(inputs, model, optimizer))
    for _ in range(2):
        step(next(batches))
    start = time.process_time()
    for _ in range(probe_steps):
        step(next(batches))
    return (time.process_time() - start) / probe_steps


def otsu_baseline(records: Path) -> dict[str, dict]:
    """Otsu's metrics on every masked test image, by image id."""
    pattern = tfrecords.split_pattern(records, "test", with_nomask=False)
    per_image = {}
    for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))):
        ex = tfrecords.parse_lesion(raw)
        pred = baselines.otsu_lesion_mask(ex["image"].numpy())
        per_image[ex["image_id"].numpy().decode()] = seg_metrics.image_metrics(pred, ex["mask"].numpy())
    return per_image


def paired_with_otsu(records: Path, model_dir: Path, data_dir: Path) -> dict:
    """Otsu's summary and the model's Jaccard minus Otsu's on the same test images (paired
    bootstrap), overall and per image quality of the sample, the model's per-image metrics taken
    from its last evaluation."""
    otsu = otsu_baseline(records)
    by_source = {r["source_id"]: image_id
                 for image_id, r in json.loads((records / "manifest.json").read_text())["images"].items()}
    model = json.loads((model_dir / lesion_segmentation.EVAL_PER_IMAGE_FILE).read_text())["images"]
    ids = [by_source[r["source_id"]] for r in model]
    rows = [{"image_id": i, "jaccard": r["jaccard"], "otsu_jaccard": otsu[i]["jaccard"]} for i, r in zip(ids, model)]
    return {"otsu": seg_metrics.summarize(list(otsu.values())), "jaccard_minus_otsu": evaluate.jaccard_minus_otsu(rows),
            "by_image_quality": by_image_quality(rows, data_dir), "per_image": rows}


def paired_with_run(result: dict, other: dict, data_dir: Path) -> dict:
    """This run's Jaccard minus another run's on the test images both scored (paired bootstrap),
    overall and per image quality: `jaccard_minus_otsu`'s arithmetic with the other run as baseline."""
    theirs = {r["image_id"]: r["jaccard"] for r in other["per_image"]}
    rows = [{"image_id": r["image_id"], "jaccard": r["jaccard"], "otsu_jaccard": theirs[r["image_id"]]}
            for r in result["per_image"] if r["image_id"] in theirs]
    rename = {"jaccard_minus_otsu": "jaccard_minus_other"}
    quality = {name: {rename.get(k, k): v for k, v in q.items()}
               for name, q in by_image_quality(rows, data_dir).items()}
    return {"jaccard_minus_other": evaluate.jaccard_minus_otsu(rows), "by_image_quality": quality}


def run(profile: str, budget_minutes: float, records: Path, model_dir: Path, overrides: str,
        train_steps: int | None = None, per_step: float | None = None) -> dict:
    per_step = per_step or cpu_seconds_per_step(
        lesion_segmentation.build_experiment(PROFILES[profile], records, (), overrides))
    steps = train_steps or max(10, int(budget_minutes * 60 * CORES / per_step))
    print(f"{profile}: {per_step:.1f} CPU-s/step -> {steps} steps in {budget_minutes} min x {CORES} cores")
    params = lesion_segmentation.build_experiment(PROFILES[profile], records, (), overrides, train_steps=steps)
    wall, cpu = time.time(), time.process_time()
    lesion_segmentation.run(params, model_dir, mode="train")
    wall, cpu = time.time() - wall, time.process_time() - cpu
    lesion_segmentation.run(params, model_dir, mode="eval")
    return {
        "overrides": overrides, "train_steps": steps, "cpu_seconds_per_step": per_step,
        "train_wall_minutes": wall / 60, "train_cpu_minutes_per_core": cpu / 60 / CORES,
        "batch_size": params.task.train_data.global_batch_size,
        **evaluated_run(profile, budget_minutes, params, model_dir),
    }


def evaluated_run(profile: str, budget_minutes: float, params, model_dir: Path) -> dict:
    """The model and its last evaluation, as every result holds them."""
    metrics = json.loads((model_dir / lesion_segmentation.EVAL_METRICS_FILE).read_text())
    return {"profile": profile, "experiment": PROFILES[profile], "budget_minutes": budget_minutes,
            "input_size": params.task.model.input_size,
            "backbone": f"resnet-{params.task.model.backbone.resnet.model_id}",
            "model": {k[len("lesion_"):]: v for k, v in metrics.items() if k.startswith("lesion_")},
            "coco_mask_AP": metrics.get("mask_AP")}


def finished_run(profile: str, budget_minutes: float, model_dir: Path) -> dict:
    """What `run` returns, for a run trained elsewhere (the pipeline's segmenter, whose step count
    is a budget's) and evaluated there: its params and last evaluation, no timing of ours."""
    step = json.loads((model_dir / lesion_segmentation.EVAL_PER_IMAGE_FILE).read_text())["step"]
    return {"trained_in": os.path.relpath(model_dir, HERE.parent), "train_steps": step,
            **evaluated_run(profile, budget_minutes, lesion_segmentation.build_experiment(PROFILES[profile], None),
                            model_dir)}


def _sample_version(name: str) -> str:
    """Results of sample v1 carry no suffix (`segmentation-cpu-60min.json`), later ones `-v2`."""
    return name.rsplit("min-", 1)[1].removesuffix(".json") if "min-" in name else "v1"


def plot() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    longest, otsu_drawn = 0.0, set()
    for profile in PROFILES:
        by_sample: dict[str, list[dict]] = {}
        for path in RESULTS.glob(f"segmentation-{profile}-*min*.json"):
            by_sample.setdefault(_sample_version(path.name), []).append(json.loads(path.read_text()))
        for sample, rows in sorted(by_sample.items()):
            rows.sort(key=lambda r: r["budget_minutes"])
            line, = ax.plot([r["budget_minutes"] for r in rows], [r["model"]["jaccard"] for r in rows], "o-",
                            label=f"{profile}, sample {sample} ({rows[0]['backbone']}, {rows[0]['input_size'][0]}px)")
            if sample not in otsu_drawn:  # the same test images whatever the profile
                otsu_drawn.add(sample)
                ax.axhline(rows[0]["otsu"]["jaccard"], color=line.get_color(), ls="--", lw=0.8,
                           label=f"Otsu threshold, sample {sample}")
            longest = max(longest, rows[-1]["budget_minutes"])
    ax.set(xlabel="training budget (minutes of a 2-core CPU)", ylabel="mean Jaccard, test split",
           title="Lesion segmentation on the ISIC sample", ylim=(-0.03, 1), xlim=(0, longest * 1.1 or 1))
    ax.legend(fontsize=7, loc="lower right")
    out = RESULTS / "segmentation_budget.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--budget-minutes", type=float, default=60)
    p.add_argument("--data-dir", type=Path, action="append", default=None,
                   help=f"ISIC download (default {SAMPLE}); repeat to add training masks (HAM10000)")
    p.add_argument("--name-suffix", default="", help="appended to the result's name, e.g. 'ham'")
    p.add_argument("--pair-with", type=Path, default=None,
                   help="a result JSON (with per_image rows) of another run on the same test images")
    p.add_argument("--records", type=Path, default=HERE / ".cache" / "isic-sample")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--params-override", default="")
    p.add_argument("--train-steps", type=int, default=None,
                   help="fix the step count (e.g. to resume an interrupted run from its checkpoints)")
    p.add_argument("--cpu-seconds-per-step", type=float, default=None,
                   help="skip the probe and use this cost, e.g. from an earlier run's JSON of the same profile")
    p.add_argument("--sample-version", default="v2", help="suffix of the result file: which sample version it is on")
    p.add_argument("--finished-run", type=Path, default=None,
                   help="score a run trained and evaluated elsewhere (e.g. a pipeline's runs/seg) instead of training")
    p.add_argument("--plot", action="store_true", help="only redraw the chart from saved results")
    args = p.parse_args()
    if args.plot:
        print(plot())
        return
    data_dirs = args.data_dir or [SAMPLE]
    records = ensure_records(data_dirs, args.records)
    name = f"segmentation-{args.profile}-{args.budget_minutes:g}min-{args.sample_version}"
    name += f"-{args.name_suffix}" if args.name_suffix else ""
    model_dir = args.finished_run or args.model_dir or HERE / ".runs" / name
    result = finished_run(args.profile, args.budget_minutes, model_dir) if args.finished_run else run(
        args.profile, args.budget_minutes, records, model_dir, args.params_override, args.train_steps,
        args.cpu_seconds_per_step)
    result.update(paired_with_otsu(records, model_dir, data_dirs[0]))
    result["sample_version"] = args.sample_version
    result["data_dirs"] = [os.path.relpath(d, HERE.parent) for d in data_dirs]
    if args.pair_with:
        result[f"minus_{args.pair_with.stem}"] = paired_with_run(result, json.loads(args.pair_with.read_text()),
                                                                 data_dirs[0])
    atomic.write_json(RESULTS / f"{name}.json", result, indent=1)
    keys = ("jaccard", "threshold_jaccard", "dice", "detection_rate", "segmentation_precision")
    print(f"{'':10s}" + "".join(f"{k:>20s}" for k in keys))
    for who in ("model", "otsu"):
        print(f"{who:10s}" + "".join(f"{result[who][k]:20.3f}" for k in keys))
    diff = result["jaccard_minus_otsu"]
    print(f"Jaccard minus Otsu, paired on {diff['num_images']} images: {diff['value']:+.3f} "
          f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]")
    plot()


if __name__ == "__main__":
    main()
