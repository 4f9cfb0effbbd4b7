"""Builder and reader throughput on the real ISIC sample.

    python benchmarks/build_tfrecords.py [--data-dir ../shared/data/isic-sample]

Prints images/s of the builder with 1 and 2 workers, and records decoded per second through
tf.data (parse + JPEG/PNG decode of image and mask) next to a plain `tf.io.decode_jpeg` loop
over the same files, so the record overhead is a ratio. Writes benchmarks/results/build_tfrecords.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import tensorflow as tf
from official.vision.dataloaders.tf_example_decoder import TfExampleDecoder

from melanoma_tf import build_tfrecords
from melanoma_tf.data import isic

HERE = Path(__file__).resolve().parent


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared/data/isic-sample")
    args = p.parse_args()
    items, _ = isic.read_dataset(args.data_dir)
    results = {"images": len(items)}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            start = time.perf_counter()
            build_tfrecords.build(args.data_dir, Path(tmp) / f"w{workers}", num_workers=workers, progress=False)
            results[f"build_images_per_s_{workers}_workers"] = _rate(len(items), time.perf_counter() - start)

        files = tf.io.gfile.glob(str(Path(tmp) / "w1" / "*.tfrecord"))
        decoder = TfExampleDecoder(include_mask=True)
        ds = (tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
              .map(decoder.decode, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
        for _ in ds.take(8):  # warm up the pipeline and kernels
            pass
        start = time.perf_counter()
        n_records = sum(1 for _ in ds)
        results["tfdata_records_per_s"] = _rate(n_records, time.perf_counter() - start)

        paths = tf.data.Dataset.from_tensor_slices([str(it.image_path) for it in items])
        plain = paths.map(lambda f: tf.io.decode_jpeg(tf.io.read_file(f), channels=3),
                          num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        start = time.perf_counter()
        n_plain = sum(1 for _ in plain)
        results["plain_decode_jpeg_per_s"] = _rate(n_plain, time.perf_counter() - start)
    results["record_read_overhead_ratio"] = round(
        results["plain_decode_jpeg_per_s"] / results["tfdata_records_per_s"], 2)
    for k, v in results.items():
        print(f"{k:36s} {v}")
    out = HERE / "results" / "build_tfrecords.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
