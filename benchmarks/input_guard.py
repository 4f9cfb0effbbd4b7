"""The classifier's input guard (issue 37): refusals of in-distribution and out-of-distribution
images, per kind, against a k-nearest-neighbour alternative, and its cost in the served graph.

    python benchmarks/input_guard.py --run runs/benchmark_cls/C50F [--records tfrecords/isic-sample]
        [--ham ../shared/data/ham10000-sample] [--ham-images 1000]

Fits the run's guard as training does (`task.fit_input_guard`: the Gaussian on folds 1-4 of the
training views, thresholds on fold 0's; written beside the run, so its export serves it), then
measures what it refuses:
- in distribution: sample v2's test split, with the ground-truth masks and with Otsu's masks
  (a stand-in for the served segmenter's, which this machine has no export of); HAM10000 images
  (none trained on), ground-truth masks;
- out of distribution, with Otsu's masks as the segmenter's stand-in: images that installed
  packages ship (scikit-image's `skimage.data`, matplotlib's sample photo), rendered documents
  and charts, flat frames, noise, and blurred or overexposed versions of v2 test images; none
  of them is ever fitted on.
The alternative: the mean distance to the 5 nearest training views' features (thresholds on
fold 0 the same way). Cost: the classifier export's serve() on batches of 32 with and without
the guard. Writes benchmarks/results/input-guard.json and a contact sheet of the OOD set.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf
from PIL import Image

from melanoma_tf import atomic, contract, masking
from melanoma_tf.configs import classification as cls_cfg
from melanoma_tf.dataloaders import classification_input as inputs
from melanoma_tf.evaluation import baselines
from melanoma_tf.modeling import input_guard
from melanoma_tf.serving import export_classifier
from melanoma_tf.tasks import melanoma_classification as task

ROOT = Path(__file__).resolve().parents[1]


def _rgb(path: Path | io.BytesIO) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _rendered(draw) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(6, 4.5), dpi=100)
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return _rgb(buffer)


def ood_set(v2_test: list[np.ndarray], seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{kind: [(name, uint8 RGB image)]}: what the guard must refuse, never fitted on."""
    import skimage
    from matplotlib import cbook

    rng = np.random.default_rng(seed)
    data = Path(skimage.__file__).parent / "data"
    shipped = {"photos": ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                          "motorcycle_right.png", "horse.png", "camera.png"],
               "textures and other imaging": ["brick.png", "grass.png", "gravel.png", "cell.png", "ihc.png",
                                              "retina.jpg", "microaneurysms.png", "moon.png", "coins.png",
                                              "hubble_deep_field.jpg"],
               "documents": ["page.png", "text.png"]}
    kinds = {kind: [(name, _rgb(data / name)) for name in names] for kind, names in shipped.items()}
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        kinds["photos"].append(("grace_hopper.jpg", _rgb(handle)))
    words = "lesion dermoscopy patient report melanoma nevus clinic referral date signature page".split()
    for i in range(5):
        text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(18))
        kinds["documents"].append((f"rendered document {i}", _rendered(
            lambda f, t=text: f.text(0.05, 0.95, t, va="top", family="serif", fontsize=9))))
    charts = [lambda ax: ax.plot(rng.normal(size=(50, 3)).cumsum(0)), lambda ax: ax.bar(range(8), rng.uniform(1, 5, 8)),
              lambda ax: ax.scatter(*rng.normal(size=(2, 200))), lambda ax: ax.pie(rng.uniform(1, 3, 5)),
              lambda ax: ax.hist(rng.normal(size=500), 30), lambda ax: ax.imshow(rng.normal(size=(12, 12)))]
    kinds["charts"] = [(f"chart {i}", _rendered(lambda f, c=c: c(f.add_subplot(111)))) for i, c in enumerate(charts)]
    kinds["flat frames"] = [(f"flat {v}", np.full((450, 600, 3), v, np.uint8))
                            for v in ((0, 0, 0), (255, 255, 255), (128, 128, 128), (224, 172, 150), (80, 40, 30))]
    kinds["noise"] = [("uniform noise", rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)),
                      ("gaussian noise", np.clip(rng.normal(128, 50, (450, 600, 3)), 0, 255).astype(np.uint8)),
                      ("salt and pepper", (rng.uniform(size=(450, 600, 1)) > 0.5).repeat(3, -1).astype(np.uint8) * 255),
                      ("coloured blocks", cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (600, 450),
                                                     interpolation=cv2.INTER_NEAREST))]
    picks = rng.choice(len(v2_test), 10, replace=False)
    kinds["blurred dermoscopy"] = [(f"blurred v2 test {i}", cv2.GaussianBlur(v2_test[i], (0, 0), 25))
                                   for i in picks[:5]]
    kinds["overexposed dermoscopy"] = [(f"overexposed v2 test {i}", np.clip(v2_test[i].astype(int) * 4, 0, 255)
                                        .astype(np.uint8)) for i in picks[5:]]
    return kinds


def views(images: list[np.ndarray], masks: list[np.ndarray | None], params) -> np.ndarray:
    """The classifier's input views, cut by the same function as training and the segmenter's export."""
    view = masking.view_fn(params.data.view)
    return np.stack([view(image, baselines.otsu_lesion_mask(image) if mask is None else mask, params.data.input_size,
                          params.data.margin).numpy() for image, mask in zip(images, masks)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished run (cross-validation and final model)")
    p.add_argument("--records", type=Path, default=ROOT / "tfrecords/isic-sample")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/isic-sample")
    p.add_argument("--ham", type=Path, default=ROOT.parent / "shared/data/ham10000-sample")
    p.add_argument("--ham-images", type=int, default=1000)
    p.add_argument("--refusal-rate", type=float, default=0.01,
                   help="the guard's target refusal rate of held-out training views")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/input-guard.json")
    args = p.parse_args(argv)

    params = cls_cfg.load_config(args.run / "params.yaml")
    model = export_classifier.load_trained(args.run)[1]
    task.fit_input_guard(model, args.records, params, args.run, args.refusal_rate)
    guard = input_guard.Guard.load(args.run / input_guard.GUARD_FILE)
    classifier = input_guard.with_features(model)

    def judge(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = ([], [], [])
        for i in range(0, len(batch), 32):
            images = tf.constant(batch[i:i + 32])
            features = classifier(images, training=False)[1]
            scaled, status = input_guard.check(images, features, guard)
            for column, value in zip(out, (scaled.numpy(), status.numpy(), features.numpy())):
                column.append(value)
        return tuple(np.concatenate(c) for c in out)

    # k-nearest-neighbour alternative, fitted the same way (folds 1-4; threshold on fold 0)
    train = inputs.read_index(args.records, "train", params.data)
    train_views = np.concatenate(list(inputs.images(train, params.data).as_numpy_iterator()))
    _, _, train_features = judge(train_views)
    held = train.folds == 0
    bank = train_features[~held]

    def knn(features: np.ndarray, k: int = 5) -> np.ndarray:
        d = np.sqrt(np.maximum(((features[:, None, :] - bank[None]) ** 2).sum(-1), 0))
        return np.sort(d, 1)[:, :k].mean(1)

    knn_threshold = float(np.quantile(knn(train_features[held]), 1 - args.refusal_rate))

    test = inputs.read_index(args.records, "test", params.data)
    test_gt = np.concatenate(list(inputs.images(test, params.data).as_numpy_iterator()))
    raw = [cv2.cvtColor(cv2.imread(str(next((args.data_dir / "images").glob(f"{i}.*")))), cv2.COLOR_BGR2RGB)
           for i in test.image_ids]
    masks_dir = args.ham / "HAM10000_segmentations_lesion_tschandl"
    ham_files = [f for f in sorted((args.ham / "HAM10000_images").glob("*.jpg"))
                 if (masks_dir / f"{f.stem}_segmentation.png").is_file()][:args.ham_images]
    ham_images = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in ham_files]
    ham_masks = [cv2.imread(str(masks_dir / f"{f.stem}_segmentation.png"), cv2.IMREAD_GRAYSCALE) for f in ham_files]
    sets = {"v2 test split, ground-truth masks": test_gt,
            "v2 test split, Otsu masks": views(raw, [None] * len(raw), params),
            f"HAM10000 ({len(ham_images)} images, none trained on), ground-truth masks": views(
                ham_images, ham_masks, params)}
    kinds = ood_set(raw)
    results: dict = {"in_distribution": {}, "out_of_distribution": {}}
    for name, batch in sets.items():
        scaled, status, features = judge(batch)
        results["in_distribution"][name] = {
            "images": len(batch), "refused": float((status != contract.INPUT_OK).mean()),
            "refused_as_unusable": float((status == contract.INPUT_UNUSABLE).mean()),
            "knn_refused": float((knn(features) > knn_threshold).mean())}
    total = refused_all = knn_all = 0
    for kind, items in kinds.items():
        scaled, status, features = judge(views([im for _, im in items], [None] * len(items), params))
        refused, knn_refused = status != contract.INPUT_OK, knn(features) > knn_threshold
        results["out_of_distribution"][kind] = {
            "images": len(items), "refused": float(refused.mean()), "knn_refused": float(knn_refused.mean()),
            "per_image": {n: {"status": int(s), "distance_over_threshold": round(float(d), 3)}
                          for (n, _), s, d in zip(items, status, scaled)}}
        total, refused_all, knn_all = total + len(items), refused_all + refused.sum(), knn_all + knn_refused.sum()
    results["out_of_distribution_all"] = {"images": total, "kinds": len(kinds), "refused": float(refused_all / total),
                                          "knn_refused": float(knn_all / total)}

    # Serving cost: the export's serve() with and without the guard, batches of 32, the two
    # interleaved (another job's load then weighs on both alike), median of 12 calls each.
    export_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"guard_cost_{os.getpid()}"
    batch = tf.constant(test_gt[:32])
    serves = {}
    for name, checkpoint in (("with guard", None), ("without guard", args.run / task.FINAL_MODEL)):
        path = export_classifier.export(args.run, export_dir / name.replace(" ", "_") / "1", checkpoint)
        serves[name] = tf.saved_model.load(str(path)).signatures["serving_default"]
        serves[name](masked_image=batch)
    calls: dict[str, list[float]] = {name: [] for name in serves}
    for _ in range(12):
        for name, serve in serves.items():
            start = time.perf_counter()
            serve(masked_image=batch)
            calls[name].append((time.perf_counter() - start) * 1000 / 32)
    timings = {name: float(np.median(ms)) for name, ms in calls.items()}
    results.update({
        "run": os.path.relpath(args.run, ROOT), "view": params.data.view,
        "refusal_rate_target": args.refusal_rate,
        "guard": {"max_distance": guard.max_distance, "min_detail": guard.min_detail, "knn_threshold": knn_threshold},
        "classifier_ms_per_image": {k: round(v, 2) for k, v in timings.items()},
        "guard_cost": round(timings["with guard"] / timings["without guard"] - 1, 4),
        "finished": datetime.datetime.now().isoformat(timespec="seconds")})
    atomic.write_json(args.output, results)
    sheet = [cv2.resize(im, (96, 72)) for items in kinds.values() for _, im in items]
    sheet += [np.zeros_like(sheet[0])] * (-len(sheet) % 10)
    grid = np.concatenate([np.concatenate(sheet[i:i + 10], 1) for i in range(0, len(sheet), 10)], 0)
    cv2.imwrite(str(args.output.with_suffix(".jpg")), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    for name, row in results["in_distribution"].items():
        print(f"in distribution  {name:60s} refused {row['refused']:.3f} (kNN {row['knn_refused']:.3f})")
    for kind, row in results["out_of_distribution"].items():
        print(f"out of distribution {kind:30s} {row['images']:3d} refused {row['refused']:.2f} "
              f"(kNN {row['knn_refused']:.2f})")
    print(f"guard cost: {results['guard_cost']:+.1%} of the classifier's time per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
