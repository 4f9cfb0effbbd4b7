"""Peak memory of the classifier's training against the number of training images.

    python benchmarks/classifier_memory.py --records tfrecords/isic-sample \
        --records benchmarks/.runs/two-folder/tfrecords [--experiment E] [--params-override S] \
        [--checkout DIR --name NAME]

Trains cross-validation fold 0 of each records folder for one short epoch (`train --stage cls
--fold 0`, each in its own process) and reads that process's peak resident memory from the
kernel (`wait4`'s ru_maxrss). The training images stream from the records (a shuffle buffer of
`classification_input.SHUFFLE_RECORDS` records), so the peak should not grow with the folder's
size. --checkout runs the training of another checkout of the project (e.g. a `git worktree` of
an earlier commit, for before and after). Writes benchmarks/results/classifier-memory.json, one
entry per --name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melanoma_tf import atomic  # noqa: E402


def peak_rss(command: list[str], checkout: Path) -> tuple[float, float, int]:
    """(peak RSS in GB, wall seconds, exit status) of one child process run in `checkout`."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1e6, time.perf_counter() - start, child.returncode  # ru_maxrss is in KB


def training_images(records: Path) -> int:
    """The train split's images the classifier uses (melanoma and nevus with a mask)."""
    from melanoma_tf.configs import classification as configs
    from melanoma_tf.dataloaders import classification_input as inputs

    return len(inputs.read_index(records, "train", configs.DataConfig()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=Path, action="append", required=True, help="records folder; repeat")
    p.add_argument("--experiment", default="melanoma_efficientnet_lite0_context")
    p.add_argument("--params-override", default="data.epoch_images=640,data.balance_downloads=true")
    p.add_argument("--checkout", type=Path, default=ROOT, help="the project checkout whose training runs")
    p.add_argument("--name", default="streamed", help="this measurement's name in the results")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/classifier-memory.json")
    args = p.parse_args(argv)
    rows = []
    for records in args.records:
        with tempfile.TemporaryDirectory() as run:
            command = [sys.executable, "-m", "melanoma_tf.train", "--stage", "cls",
                       "--data-dir", str(records.resolve()), "--model-dir", run, "--experiment", args.experiment,
                       "--epochs", "1", "--fold", "0", "--params-override", args.params_override]
            gb, seconds, status = peak_rss(command, args.checkout.resolve())
        if status:
            raise SystemExit(f"{' '.join(command)} exited {status}")
        rows.append({"records": os.path.relpath(records, ROOT), "training_images": training_images(records),
                     "peak_rss_gb": round(gb, 2), "wall_seconds": round(seconds, 1)})
        print(f"{records}: {rows[-1]['training_images']} training images, peak RSS {gb:.2f} GB, {seconds:.0f} s")
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results[args.name] = {"checkout": os.path.relpath(args.checkout.resolve(), ROOT.parent), "commit": commit,
                          "experiment": args.experiment, "params_override": args.params_override,
                          "what": "train --stage cls --fold 0, one epoch", "runs": rows,
                          "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    atomic.write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
