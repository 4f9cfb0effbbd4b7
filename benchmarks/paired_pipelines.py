"""Two served chains on the same test images, paired image by image.

    python benchmarks/paired_pipelines.py benchmarks/results/NEW.json benchmarks/results/BASE.json

Both files are results of benchmarks/pipeline.py (their `per_image` scores and the keratoses'
scores). Prints NEW minus BASE with paired bootstrap 95% intervals (both chains scored on every
resample): ROC AUC of melanoma against nevus, and against nevus + seborrheic keratosis (ISIC 2017
Part 3), the specificity each keeps at its own served threshold, and the mean Jaccard. The
difference is written into NEW's file under `paired_against`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from melanoma_tf import atomic
from melanoma_tf.evaluation import classification as metrics
from melanoma_tf.evaluation.bootstrap import bootstrap_ci


def _scores(result: dict, with_keratoses: bool) -> dict[str, tuple[int, float]]:
    """{image_id: (melanoma, score)} of the images the chain answered."""
    out = {r["image_id"]: (r["melanoma"], r["score"]) for r in result["per_image"] if r["score"] is not None}
    if with_keratoses:
        out.update({i: (0, s) for i, s in result["melanoma_vs_nevus_and_sk"]["keratosis_scores"].items()})
    return out


def _specificity(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    return float(np.mean(score[y == 0] < threshold))


def compare(new: dict, base: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    out = {}
    for key, with_keratoses in (("melanoma_vs_nevus", False), ("melanoma_vs_nevus_and_sk", True)):
        a, b = _scores(new, with_keratoses), _scores(base, with_keratoses)
        ids = sorted(set(a) & set(b))
        if any(a[i][0] != b[i][0] for i in ids):
            raise SystemExit("the two results label some image differently: not the same test split")
        y = np.array([a[i][0] for i in ids])
        sa, sb = np.array([a[i][1] for i in ids]), np.array([b[i][1] for i in ids])
        ta, tb = (r["melanoma_vs_nevus_and_sk"]["threshold"] for r in (new, base))  # the served one
        low, high = bootstrap_ci(
            lambda y_, x, z: _specificity(y_, x, ta) - _specificity(y_, z, tb), y, sa, sb,
            n=n_boot, seed=seed, strata=y)
        out[key] = {"images": len(ids), "melanoma": int(y.sum()),
                    "roc_auc": metrics.auc_difference(y, sa, sb, n=n_boot, seed=seed),
                    "specificity_at_served_threshold": {"value": _specificity(y, sa, ta) - _specificity(y, sb, tb),
                                                        "ci95": [low, high], "thresholds": [ta, tb]}}
    a = {r["image_id"]: r["jaccard"] for r in new["per_image"] if r["jaccard"] is not None}
    b = {r["image_id"]: r["jaccard"] for r in base["per_image"] if r["jaccard"] is not None}
    diff = np.array([a[i] - b[i] for i in sorted(set(a) & set(b))])
    low, high = bootstrap_ci(np.mean, diff, n=n_boot, seed=seed)
    out["jaccard"] = {"images": len(diff), "value": float(diff.mean()), "ci95": [low, high]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("new", type=Path)
    p.add_argument("base", type=Path)
    args = p.parse_args(argv)
    new, base = (json.loads(f.read_text()) for f in (args.new, args.base))
    for name, result in ((args.new, new), (args.base, base)):
        if "per_image" not in result:
            raise SystemExit(f"{name}: no per_image scores (written by benchmarks/pipeline.py since December 2026)")
    paired = compare(new, base)
    new.setdefault("paired_against", {})[args.base.stem] = paired
    atomic.write_json(args.new, new)
    for key in ("melanoma_vs_nevus", "melanoma_vs_nevus_and_sk"):
        d = paired[key]
        print(f"{key} ({d['images']} images): ROC AUC {metrics.format_ci(d['roc_auc'])}, "
              f"specificity at the served thresholds {metrics.format_ci(d['specificity_at_served_threshold'])}")
    print(f"jaccard ({paired['jaccard']['images']} images): {metrics.format_ci(paired['jaccard'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
