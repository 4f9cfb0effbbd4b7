"""The main job: from images to records to trained, exported, served and evaluated models.

    python -m melanoma_tf.pipeline [--data-dir D] [--work-dir W] [--profile quick|paper]

Without --data-dir it runs on the embedded default, a synthetic dermoscopy dataset generated
into the work dir. Each step is skipped when its output is already there, so a rerun after a
crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from melanoma_tf import build_tfrecords
from melanoma_tf.data import synthetic

SYNTHETIC_IMAGES = 240


def run(data_dir: Path | None, work_dir: Path, profile: str = "quick") -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        data_dir = synthetic.generate_dataset(work_dir / "synthetic", num_images=SYNTHETIC_IMAGES, seed=0)
        print(f"[data] synthetic dataset in {data_dir}")
    records = work_dir / "tfrecords"
    if (records / "manifest.json").is_file():
        print(f"[records] up to date: {records}")
    else:
        manifest = build_tfrecords.build(data_dir, records)
        build_tfrecords.print_summary(manifest, records)
    return {"data_dir": str(data_dir), "records": str(records)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="ISIC download (default: synthetic)")
    p.add_argument("--work-dir", type=Path, default=Path("work"))
    p.add_argument("--profile", choices=("quick", "paper"), default="quick")
    args = p.parse_args(argv)
    run(args.data_dir, args.work_dir, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
