"""What the test images a segmenter scores worst share: lesion size, frame contact, contrast, hair,
dark dermoscope frame, calibration stickers or ink, and the sample's image-quality tag.

    python benchmarks/worst_segmentations.py \
        --result benchmarks/results/segmentation-cpu_cascade-60min-v2-ham.json --records tfrecords/isic-sample

Reads the per-image Jaccard rows of a `benchmarks/segmentation.py` result and the ground-truth
masks of the same test images from the records. For each attribute: Spearman's correlation with
the Jaccard (95% bootstrap interval) and its median among the worst decile against the rest.
Writes benchmarks/results/worst-<result>.json and a contact sheet of the worst images (ground-truth
outline in green, the model's Jaccard and Otsu's in the corner): worst-<result>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf
from scipy.stats import spearmanr

from melanoma_tf import atomic, tfrecords
from melanoma_tf.evaluation.bootstrap import bootstrap_ci

from sample_quality import quality_tags

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SAMPLE = HERE.parent.parent / "shared/data/isic-sample"


def attributes(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Per-image measures of what makes a lesion hard to outline."""
    lesion = mask > 0
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    lightness = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 0].astype(np.float32)
    border = np.concatenate([lesion[0], lesion[-1], lesion[:, 0], lesion[:, -1]])
    skin = ~lesion & (gray > 30)  # the dermoscope's black frame is not skin
    contrast = ((lightness[skin].mean() - lightness[lesion].mean()) / (lightness.std() + 1e-6)
                if skin.any() and lesion.any() else 0.0)
    # DullRazor's hair detector: thin dark lines stand out in a black-hat transform.
    size = max(9, round(min(gray.shape) / 25)) | 1
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    # Colour-calibration stickers and skin-marker ink: strongly saturated, or blue to purple,
    # which neither skin nor pigment is.
    hue, saturation, _ = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    marker = ((saturation > 170) | ((hue > 100) & (hue < 165) & (saturation > 60))) & ~lesion
    return {"lesion_area_fraction": float(lesion.mean()), "frame_contact": float(border.mean()),
            "contrast": float(contrast), "hair_fraction": float((blackhat > 15).mean()),
            "dark_frame_fraction": float(((gray <= 30) & ~lesion).mean()),
            "sticker_or_ink_fraction": float(marker.mean())}


def test_images(records: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pattern = tfrecords.split_pattern(records, "test", with_nomask=False)
    out = {}
    for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))):
        ex = tfrecords.parse_lesion(raw)
        out[ex["image_id"].numpy().decode()] = (ex["image"].numpy(), ex["mask"].numpy())
    return out


def summarize(rows: list[dict], worst_fraction: float = 0.1) -> dict:
    jaccard = np.array([r["jaccard"] for r in rows])
    worst = jaccard <= np.quantile(jaccard, worst_fraction)
    out = {}
    for name in rows[0]["attributes"]:
        values = np.array([r["attributes"][name] for r in rows])
        rho = spearmanr(values, jaccard).statistic
        low, high = bootstrap_ci(lambda v, j: spearmanr(v, j).statistic, values, jaccard)
        out[name] = {"spearman_with_jaccard": {"value": float(rho), "ci95": [float(low), float(high)]},
                     "median_worst": float(np.median(values[worst])), "median_rest": float(np.median(values[~worst]))}
    return {"images": len(rows), "worst_images": int(worst.sum()), "worst_jaccard_at_most": float(jaccard[worst].max()),
            "attributes": out}


def contact_sheet(rows: list[dict], images: dict, path: Path, count: int = 12, size: int = 200) -> None:
    tiles = []
    for r in rows[:count]:
        image, mask = images[r["image_id"]]
        tile = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        outline = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours((outline > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, (0, 255, 0), 2)
        cv2.putText(tile, f"J {r['jaccard']:.2f} / Otsu {r['otsu_jaccard']:.2f}", (4, 16),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 4)
    sheet = np.vstack([np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles), 4)])
    with atomic.atomic_file(path, "wb") as handle:
        handle.write(cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))[1].tobytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--result", type=Path, required=True, help="a benchmarks/segmentation.py result with per_image")
    p.add_argument("--records", type=Path, required=True, help="the records its test split came from")
    p.add_argument("--data-dir", type=Path, default=SAMPLE, help="for the sample's image-quality tags")
    args = p.parse_args()
    per_image = json.loads(args.result.read_text())["per_image"]
    images = test_images(args.records)
    tags = quality_tags(args.data_dir)
    rows = sorted(({**r, "quality": tags.get(r["image_id"], ""), "attributes": attributes(*images[r["image_id"]])}
                   for r in per_image if r["jaccard"] is not None), key=lambda r: r["jaccard"])
    out = summarize(rows)
    worst = [r for r in rows if r["jaccard"] <= out["worst_jaccard_at_most"]]
    out["worst_by_quality"] = {q: sum(r["quality"] == q for r in worst) for q in sorted({r["quality"] for r in rows})}
    out["all_by_quality"] = {q: sum(r["quality"] == q for r in rows) for q in sorted({r["quality"] for r in rows})}
    out["worst"] = worst
    name = f"worst-{args.result.stem}"
    atomic.write_json(RESULTS / f"{name}.json", out)
    contact_sheet(rows, images, RESULTS / f"{name}.png")
    for key, a in out["attributes"].items():
        rho = a["spearman_with_jaccard"]
        print(f"{key:22s} rho {rho['value']:+.2f} [{rho['ci95'][0]:+.2f}, {rho['ci95'][1]:+.2f}]  "
              f"median worst {a['median_worst']:.3f} / rest {a['median_rest']:.3f}")
    print(f"worst {out['worst_images']} by quality {out['worst_by_quality']} (all {out['all_by_quality']})")
    print(f"results: {RESULTS / name}.json, .png")


if __name__ == "__main__":
    main()
