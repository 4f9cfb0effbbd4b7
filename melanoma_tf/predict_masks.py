"""Fills in lesion masks predicted by the exported segmenter for records that have none.

    python -m melanoma_tf.predict_masks --data-dir tfrecords/NAME \
        --seg-model exports/lesion_segmenter/1 --output-dir tfrecords/NAME-predicted

About 40% of ISIC's labelled images come without a ground-truth mask. This copies the record
folder and rewrites its `*_nomask-*` shards: each image where the segmenter finds a lesion gets
that mask, its box and area, and `image/lesion/mask_source` "predicted". The shards keep their
names, so Mask R-CNN (which reads `<split>-*`) never trains on its own predictions, while the
classifier uses them when `data.mask_sources` includes "predicted". Images where no lesion is
found stay mask-less. The output is written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import tensorflow as tf
from tqdm import tqdm

from melanoma_tf import atomic, tfrecords
from melanoma_tf.data import images

PREDICTED = "predicted"


def fill_shard(source: Path, target: Path, segment, batch_size: int, progress: tqdm) -> dict[str, int]:
    """Writes `source`'s records to `target`, masks filled in where a lesion is found."""
    counts = {"predicted": 0, "no_lesion": 0}
    with tf.io.TFRecordWriter(str(target)) as writer:
        for raw in tf.data.TFRecordDataset(str(source)).batch(batch_size):
            batch = [tf.train.Example.FromString(r) for r in raw.numpy()]
            encoded = [e.features.feature["image/encoded"].bytes_list.value[0] for e in batch]
            out = segment(image_bytes=tf.constant(encoded))
            for example, mask, size, status in zip(batch, out["lesion_mask"].numpy(),
                                                   out["image_size"].numpy(), out["status"].numpy()):
                if status == 0:
                    mask = mask[:size[0], :size[1]]
                    example = tfrecords.add_mask(example, images.encode_mask_png(mask), images.mask_box(mask),
                                                 int(mask.sum()), PREDICTED)
                    counts["predicted"] += 1
                else:
                    counts["no_lesion"] += 1
                writer.write(example.SerializeToString())
            progress.update(len(batch))
    return counts


def fill(data_dir: Path | str, seg_model: Path | str, output_dir: Path | str, batch_size: int = 4) -> dict:
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not a record folder made by build_tfrecords")
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} exists; choose a new output folder")
    segment = tf.saved_model.load(str(seg_model)).signatures["serving_default"]
    manifest = json.loads(manifest_path.read_text())
    nomask = sorted(data_dir.glob("*_nomask-*.tfrecord"))
    total = sum(c["total"] - c["with_mask"] for c in manifest["counts"].values())
    with atomic.atomic_path(output_dir, replace=False) as tmp:
        tmp.mkdir(parents=True)
        for path in data_dir.iterdir():
            if path.is_file() and path not in nomask and path.name != "manifest.json":
                shutil.copy2(path, tmp / path.name)
        counts = {}
        with tqdm(total=total, desc="predicting masks", unit="img") as progress:
            for path in nomask:
                split = path.name.split("_nomask-")[0]
                shard = fill_shard(path, tmp / path.name, segment, batch_size, progress)
                for key, value in shard.items():
                    counts.setdefault(split, {}).setdefault(key, 0)
                    counts[split][key] += value
        manifest["predicted_masks"] = {"seg_model": str(Path(seg_model).resolve()), "counts": counts,
                                       "mask_source": PREDICTED, "from": str(data_dir.resolve())}
        atomic.write_json(tmp / "manifest.json", manifest)
    return manifest["predicted_masks"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="folder made by build_tfrecords")
    p.add_argument("--seg-model", type=Path, required=True, help="lesion_segmenter SavedModel version folder")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    result = fill(args.data_dir, args.seg_model, args.output_dir, args.batch_size)
    print(json.dumps(result["counts"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
