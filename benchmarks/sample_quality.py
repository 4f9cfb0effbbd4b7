"""Scores per image quality of the ISIC sample: v2 holds full images (`img:full`, <= 600 px) and
256-px copies un-squashed to their aspect ratio (`img:sq256-unsquashed`), tagged in the source
column of its labels.csv. Used by the segmentation and pipeline benchmarks."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from melanoma_tf import evaluate
from melanoma_tf.evaluation.bootstrap import bootstrap_ci


def quality_tags(data_dir: Path) -> dict[str, str]:
    """Each image's quality tag ('full', 'sq256-unsquashed'); {} when the sample tags none."""
    labels = data_dir / "labels.csv"
    if not labels.is_file():
        return {}
    with labels.open() as f:
        return {r["image_id"]: m.group(1) for r in csv.DictReader(f)
                if (m := re.search(r"img:([^|]+)", r.get("source", "")))}


def by_image_quality(rows: list[dict], data_dir: Path) -> dict:
    """Mean Jaccard and the paired difference to Otsu per image quality, from rows with
    image_id, jaccard and otsu_jaccard; {} when the sample tags no quality."""
    quality = quality_tags(data_dir)
    out = {}
    for name in sorted(set(quality.values())):
        scored = [r for r in rows if r["jaccard"] is not None and quality.get(r["image_id"]) == name]
        if scored:
            jaccard = np.array([r["jaccard"] for r in scored])
            low, high = bootstrap_ci(np.mean, jaccard)
            out[name] = {"images": len(scored),
                         "jaccard": {"value": float(jaccard.mean()), "ci95": [float(low), float(high)]},
                         "jaccard_minus_otsu": evaluate.jaccard_minus_otsu(scored)}
    return out
