"""Cross-validation folds as parallel processes against one process fitting them in turn.

    python benchmarks/parallel_folds.py [--records tfrecords/isic-sample] [--epochs 3]

Two folds of the pretrained `cpu` classifier (`melanoma_efficientnet_lite0`, 2 folds so that each
fit holds out half of sample v2's train split, `--epochs` to bound the cost) are trained
  sequential: `train --stage cls --fold 0`, then `--fold 1`, each process using both cores;
  parallel:   both at once, each pinned to one core (taskset, one TensorFlow thread pool each).
Each way then runs `--summarize`. Reported: wall time for both fits, the fold membership and
per-fold AUCs of the two ways, and whether the parallel summary is the same when recomputed with
the folds' results written in the other order. On a cluster each fold is its own pod, so the
cross-validated classifier costs the wall time of one fit there; this measures what the split
costs on one machine. Results: benchmarks/results/parallel-folds-v2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from melanoma_tf import atomic

ROOT = Path(__file__).resolve().parents[1]


def _command(records: Path, run: Path, epochs: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "melanoma_tf.train", "--stage", "cls", "--data-dir", str(records),
            "--model-dir", str(run), "--experiment", "melanoma_efficientnet_lite0", "--folds", "2",
            "--epochs", str(epochs), "--params-override", "training.final_model=false,training.verbose=0", *flags]


def _fits(run: Path) -> dict:
    out = {}
    for k in (0, 1):
        result = json.loads((run / f"fold_{k}" / "result.json").read_text())
        out[k] = {"held_out": sorted(p["image_id"] for p in result["predictions"]),
                  "auc_last_epoch": result["metrics_last_epoch"]["roc_auc"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=Path, default=ROOT / "tfrecords/isic-sample")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--runs", type=Path, default=ROOT / "runs/benchmark_parallel_folds")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/parallel-folds-v2.json")
    args = p.parse_args(argv)
    shutil.rmtree(args.runs, ignore_errors=True)
    sequential, parallel = args.runs / "sequential", args.runs / "parallel"
    quiet = dict(env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.DEVNULL)

    start = time.perf_counter()
    for k in ("0", "1"):
        subprocess.run(_command(args.records, sequential, args.epochs, "--fold", k), check=True, **quiet)
    sequential_wall = time.perf_counter() - start

    one_thread = dict(quiet["env"], TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    start = time.perf_counter()
    workers = [subprocess.Popen(["taskset", "-c", str(core)] + _command(args.records, parallel, args.epochs,
                                                                         "--fold", str(core)),
                                env=one_thread, stdout=subprocess.DEVNULL) for core in (0, 1)]
    if [w.wait() for w in workers] != [0, 0]:
        raise SystemExit("a parallel fit failed")
    parallel_wall = time.perf_counter() - start

    for run in (sequential, parallel):
        subprocess.run(_command(args.records, run, args.epochs, "--summarize"), check=True, **quiet)
    summary = json.loads((parallel / "cv_metrics.json").read_text())
    # The summary depends on the fold results, not on the order they were written in.
    for k in (1, 0):
        path = parallel / f"fold_{k}" / "result.json"
        atomic.write_text(path, path.read_text())
    subprocess.run(_command(args.records, parallel, args.epochs, "--summarize"), check=True, **quiet)
    same_after_reorder = json.loads((parallel / "cv_metrics.json").read_text()) == summary

    fits = {"sequential": _fits(sequential), "parallel": _fits(parallel)}
    result = {
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "records": os.path.relpath(args.records, ROOT), "epochs": args.epochs, "cores": os.cpu_count(),
        "sequential_wall_minutes": round(sequential_wall / 60, 2),
        "parallel_wall_minutes": round(parallel_wall / 60, 2),
        "same_fold_membership": all(fits["sequential"][k]["held_out"] == fits["parallel"][k]["held_out"]
                                    for k in (0, 1)),
        "fold_auc_last_epoch": {way: {k: v["auc_last_epoch"] for k, v in f.items()} for way, f in fits.items()},
        "pooled_auc_last_epoch": {way: json.loads((run / "cv_metrics.json").read_text())["pooled_last_epoch"]
                                  ["metrics"]["roc_auc"]["value"] for way, run in (("sequential", sequential),
                                                                                  ("parallel", parallel))},
        "parallel_summary_same_after_reordering_fold_results": same_after_reorder,
    }
    atomic.write_json(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k != "protocol"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
