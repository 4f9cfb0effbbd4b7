"""Deterministic synthetic dermoscopy dataset: the embedded default dataset and test fixture source.

Real ISIC images cannot ship with the package, so this renders look-alikes in the "simple layout"
(images/, masks/, labels.csv), or in HAM10000's. Melanomas differ from nevi the way the dermoscopic ABCD rule says
(asymmetry, border irregularity, colour variegation, diameter), but each cue is drawn from
overlapping per-class distributions so no single feature separates the classes perfectly.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import cv2
import numpy as np

GENERATOR_VERSION = 1  # bump when the rendering changes: cached datasets then stop matching
HAM10000_DIRS = ("HAM10000_images", "HAM10000_segmentations_lesion_tschandl")
_BLOTCH_COLOURS = np.array(  # RGB: dark brown, black, blue-grey, red, tan (regression)
    [(78, 46, 30), (28, 20, 20), (92, 104, 128), (158, 80, 72), (180, 138, 104)], np.float32)[..., None, None]


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth zero-mean noise with features about `cell` pixels wide (bicubic upsampled grid)."""
    grid = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _rgb(*values: float) -> np.ndarray:
    """Colour as a (3, 1, 1) array: images are channel-first internally, which numpy broadcasts fast."""
    return np.array(values, np.float32)[:, None, None]


def _skin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Skin tone varies per image (light to tanned) with mottling, a little erythema and grain."""
    t = rng.uniform()
    base = (1 - t) * _rgb(238, 198, 174) + t * _rgb(182, 124, 94) + _rgb(*rng.normal(0, 5, 3))
    mottle = _noise(rng, h, w, 40) * rng.uniform(3, 8)
    redness = np.clip(_noise(rng, h, w, 60), 0, None) * rng.uniform(0, 10)
    grain = rng.standard_normal((h, w), dtype=np.float32) * 2
    return base + (mottle + grain) * _rgb(1, 0.9, 0.8) + redness * _rgb(0.3, -1, -0.8)


def _shape(rng: np.random.Generator, h: int, w: int, irregularity: float, size: float) -> np.ndarray:
    """Lesion mask from a radius-of-angle function with random Fourier harmonics, smoothed."""
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    k = np.arange(1, 15)[:, None]
    amp = (0.02 + 0.16 * irregularity) * rng.standard_normal((14, 1)) / k ** (1.4 - 0.6 * irregularity)
    amp[1] += rng.uniform(0, 0.15)  # elongation, independent of class
    r = 1 + (amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi, (14, 1)))).sum(0)
    kernel = cv2.getGaussianKernel(9, 1.5).ravel()
    r = np.clip(np.convolve(np.r_[r[-4:], r, r[:4]], kernel, "valid"), 0.4, 1.6)
    r0 = min(h, w) * (0.13 + 0.2 * size)
    cy = h / 2 + np.clip(rng.normal(0, 0.07 * h), -0.2 * h, 0.2 * h)
    cx = w / 2 + np.clip(rng.normal(0, 0.07 * w), -0.2 * w, 0.2 * w)
    pts = np.stack([cx + r0 * r * np.cos(theta), cy + r0 * r * np.sin(theta)], -1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)
    return mask


def _pigment(rng: np.random.Generator, mask: np.ndarray, variegation: float) -> tuple[np.ndarray, np.ndarray]:
    """Brown lesion with darker centre, pigment network and, with variegation, coloured blotches."""
    h, w = mask.shape
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    ys, xs = np.nonzero(mask)
    radius = float(np.sqrt(len(ys) / np.pi))
    t = rng.uniform()
    base = (1 - t) * _rgb(158, 108, 76) + t * _rgb(104, 66, 44)
    shade = 1 - rng.uniform(0, 0.2) * np.sqrt(dist / max(float(dist.max()), 1.0))
    shade += 0.05 * _noise(rng, h, w, max(radius / 2, 4)) + 0.03 * _noise(rng, h, w, 4)
    network = cv2.GaussianBlur(np.exp(-(_noise(rng, h, w, rng.uniform(5, 8)) / 0.25) ** 2), (3, 3), 0.8)
    shade -= rng.uniform(0.04, 0.18) * network * np.clip(0.6 + _noise(rng, h, w, radius / 2), 0, 1)
    colour = shade * base
    yy, xx = np.ogrid[0:h, 0:w]
    for _ in range(rng.poisson(0.1 + 6 * variegation ** 2)):
        i = rng.integers(len(ys))
        sigma = radius * rng.uniform(0.2, 0.5)
        blob = np.exp(((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2).astype(np.float32) / (-2 * sigma ** 2))
        blob *= np.clip(0.8 + 0.6 * _noise(rng, h, w, sigma), 0, 1) * rng.uniform(0.5, 1.0)
        c = _BLOTCH_COLOURS[rng.integers(1, 5) if rng.uniform() < variegation else 0]
        colour += blob * (c - colour)
    alpha = (0.8 + 0.2 * np.clip(dist / rng.uniform(1, 4), 0, 1)) * (mask > 0)
    return colour, alpha.astype(np.float32)


def _keratosis(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seborrheic keratosis: waxy light brown, sharply bounded, fissures, milia cysts and comedo dots."""
    h, w = mask.shape
    t = rng.uniform()
    base = (1 - t) * _rgb(196, 158, 118) + t * _rgb(150, 108, 74)
    fissures = cv2.GaussianBlur(np.exp(-(_noise(rng, h, w, 10) / 0.3) ** 2), (5, 5), 1.2)
    shade = 1 - 0.2 * fissures + 0.05 * _noise(rng, h, w, 3) + 0.06 * _noise(rng, h, w, 25)
    colour = shade * base
    ys, xs = np.nonzero(mask)
    for count, rgb in ((rng.poisson(6), _rgb(236, 226, 204)), (rng.poisson(5), _rgb(72, 52, 38))):
        dots = np.zeros((h, w), np.uint8)
        for i in rng.integers(len(ys), size=count):
            cv2.circle(dots, (int(xs[i]), int(ys[i])), int(rng.integers(1, 4)), 255, -1, cv2.LINE_AA)
        colour += dots.astype(np.float32) / 255 * (rgb - colour)
    return colour, (0.93 * (mask > 0)).astype(np.float32)


def _hairs(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Thin dark curved hairs; about half pass over the lesion, as in real dermoscopy."""
    h, w = mask.shape
    layer = np.zeros((h, w), np.uint8)
    ys, xs = np.nonzero(mask)
    t = np.linspace(0, 1, 48)[:, None]
    for _ in range(rng.integers(0, 6)):
        p = np.array([xs.mean(), ys.mean()]) if rng.uniform() < 0.5 else rng.uniform((0, 0), (w, h))
        p = p + rng.normal(0, 0.1 * min(h, w), 2)
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.6) * np.hypot(h, w)
        d, n = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
        a, b = p - length * d, p + length * d
        c1, c2 = (a + f * (b - a) + n * rng.normal(0, 0.12 * length) for f in (1 / 3, 2 / 3))
        curve = (1 - t) ** 3 * a + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t ** 2 * c2 + t ** 3 * b
        thickness = int(rng.choice([1, 1, 2]))
        cv2.polylines(layer, [np.round(curve * 16).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, 4)
    a = layer.astype(np.float32) * (rng.uniform(0.7, 0.95) / 255)
    return img + a * (rng.uniform(15, 55) * _rgb(1, 0.85, 0.75) - img)


def _render(rng: np.random.Generator, kind: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "keratosis":
        irregularity, size = rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.7)
        mask = _shape(rng, height, width, irregularity, size)
        colour, alpha = _keratosis(rng, mask)
    else:
        # Beta(a, b) per cue (irregularity, variegation, size): overlapping, so no cue alone decides the class.
        a, b = ([4, 5, 4], [2, 2, 2]) if kind == "melanoma" else ([2, 1.5, 2], [4, 5, 4])
        irregularity, variegation, size = rng.beta(a, b)
        mask = _shape(rng, height, width, irregularity, size)
        colour, alpha = _pigment(rng, mask, variegation)
    skin = _skin(rng, height, width)
    img = _hairs(rng, skin + alpha * (colour - skin), mask)
    yy, xx = np.ogrid[0:height, 0:width]
    r = (np.hypot(yy - height / 2, xx - width / 2) / (width / 2)).astype(np.float32)
    edge = rng.uniform(0.98, 1.2)
    img *= np.clip((edge - r) / rng.uniform(0.04, 0.1), 0, 1) * (1 - 0.25 * (r / edge) ** 2)
    img = cv2.GaussianBlur(cv2.merge(list(img)), (3, 3), 0.6)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def render_lesion(rng: np.random.Generator, melanoma: bool, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One dermoscopy-like RGB uint8 image [H,W,3] and its exact lesion mask [H,W] (0/255, drawn before hairs)."""
    return _render(rng, "melanoma" if melanoma else "nevus", height, width)


def _params_match(out: pathlib.Path, params: dict) -> bool:
    try:
        return json.loads((out / "synthetic.json").read_text()) == json.loads(json.dumps(params))
    except (OSError, ValueError):
        return False


def _write(tmp: pathlib.Path, params: dict) -> None:
    """Renders every image into `tmp`. Image i depends only on (seed, i), not on the other images."""
    seed, n, (height, width) = params["seed"], params["num_images"], params["image_size"]
    n_mel = round(n * params["melanoma_fraction"])
    kinds = ["melanoma"] * n_mel + ["nevus"] * (n - n_mel) + ["keratosis"] * params["include_other"]
    rng = np.random.default_rng(seed)
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    has_mask = rng.permutation(len(kinds)) < round(len(kinds) * params["mask_fraction"])
    ham = params.get("layout") == "ham10000"
    if ham:  # HAM10000 shows most lesions twice: image i is lesion i // 2, of that lesion's kind
        kinds = [kinds[i - i % 2] for i in range(len(kinds))]
    image_dir, mask_dir = (tmp / d for d in (HAM10000_DIRS if ham else ("images", "masks")))
    image_dir.mkdir()
    mask_dir.mkdir()
    rows = []
    for i, kind in enumerate(kinds):
        image_rng = np.random.default_rng([seed, i])
        scale, aspect = image_rng.uniform(0.9, 1.1), image_rng.uniform(0.93, 1.07)
        rgb, mask = _render(image_rng, kind, round(height * scale * aspect), round(width * scale / aspect))
        image_id = f"{'SYNHAM' if ham else 'SYN'}_{i:07d}"
        ok = cv2.imwrite(str(image_dir / f"{image_id}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                         [cv2.IMWRITE_JPEG_QUALITY, 92])
        if has_mask[i]:
            ok &= cv2.imwrite(str(mask_dir / f"{image_id}_segmentation.png"), mask)
        if not ok:
            raise OSError(f"could not write {image_id} into {tmp}")
        rows.append((image_id, kind))
    if ham:
        dx = {"melanoma": "mel", "nevus": "nv", "keratosis": "bkl"}
        lines = [f"HAM_S{i // 2:06d},{image_id},{dx[k]},histo" for i, (image_id, k) in enumerate(rows)]
        (tmp / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx,dx_type\n" + "\n".join(lines) + "\n")
    else:
        source = f"synthetic|seed:{seed}"
        lines = [f"{i},{int(k == 'melanoma')},{int(k == 'keratosis')},{source}" for i, k in rows]
        (tmp / "labels.csv").write_text("image_id,melanoma,seborrheic_keratosis,source\n" + "\n".join(lines) + "\n")
    counts = {k: sum(kind == k for _, kind in rows) for k in ("melanoma", "nevus", "keratosis")}
    (tmp / "README.md").write_text(
        "# Synthetic dermoscopy dataset\n\nRendered by `melanoma_tf.data.synthetic`; these are NOT real "
        f"patient images and say nothing about real-world accuracy.\n\n- seed: {seed}\n"
        f"- images: {len(rows)} ({counts['melanoma']} melanoma, {counts['nevus']} nevus, "
        f"{counts['keratosis']} seborrheic keratosis)\n- masks: {int(has_mask.sum())}\n"
        f"- parameters: see synthetic.json\n")
    (tmp / "synthetic.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def generate_dataset(output_dir: str | os.PathLike, num_images: int = 200, seed: int = 0,
                     melanoma_fraction: float = 0.35, image_size: tuple[int, int] = (256, 320),
                     mask_fraction: float = 1.0, include_other: int = 0, layout: str = "simple") -> pathlib.Path:
    """Writes (or reuses, if made with the same parameters) a synthetic dataset in the simple layout,
    or with layout='ham10000' in HAM10000's (two images a lesion, ids SYNHAM_*, keratoses as bkl).

    Rendering happens in a hidden sibling folder renamed into place at the end, so an interrupted
    run never leaves a folder that looks like a complete dataset.
    """
    out = pathlib.Path(output_dir)
    params = {"generator": "melanoma_tf.data.synthetic", "version": GENERATOR_VERSION,
              "num_images": int(num_images), "seed": int(seed), "melanoma_fraction": float(melanoma_fraction),
              "image_size": [int(v) for v in image_size], "mask_fraction": float(mask_fraction),
              "include_other": int(include_other)}
    if layout != "simple":
        params["layout"] = layout  # absent for the simple layout: datasets made before it stay valid
    if (layout not in ("simple", "ham10000") or num_images < 0 or include_other < 0
            or num_images + include_other == 0 or seed < 0
            or not 0 <= melanoma_fraction <= 1 or not 0 <= mask_fraction <= 1
            or len(params["image_size"]) != 2 or min(params["image_size"]) < 32):
        raise ValueError(f"invalid synthetic dataset parameters: {params}")
    if _params_match(out, params):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a synthetic dataset made with other parameters" if (out / "synthetic.json").exists() else "other files"
        raise FileExistsError(f"{out} already holds {what}; choose another output folder or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        _write(tmp, params)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.replace(tmp, out)
        except OSError:
            if not _params_match(out, params):  # a concurrent run may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m melanoma_tf.data.synthetic --output-dir D [--num-images N] [--seed S] ..."""
    ap = argparse.ArgumentParser(prog="python -m melanoma_tf.data.synthetic",
                                 description="Generate a deterministic synthetic dermoscopy dataset.")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--num-images", type=int, default=200, help="melanoma + nevus images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--melanoma-fraction", type=float, default=0.35)
    ap.add_argument("--image-size", type=int, nargs=2, default=(256, 320), metavar=("HEIGHT", "WIDTH"))
    ap.add_argument("--mask-fraction", type=float, default=1.0)
    ap.add_argument("--include-other", type=int, default=0, help="extra seborrheic keratosis images")
    args = ap.parse_args(argv)
    start, reused = time.perf_counter(), (pathlib.Path(args.output_dir) / "synthetic.json").exists()
    try:
        out = generate_dataset(args.output_dir, args.num_images, args.seed, args.melanoma_fraction,
                               tuple(args.image_size), args.mask_fraction, args.include_other)
    except (FileExistsError, ValueError) as e:
        ap.error(str(e))
    rows = (out / "labels.csv").read_text().splitlines()[1:]
    n_mel = sum(r.split(",")[1] == "1" for r in rows)
    n_sk = sum(r.split(",")[2] == "1" for r in rows)
    n_masks = len(list((out / "masks").glob("*_segmentation.png")))
    print(f"{out}: {len(rows)} images ({n_mel} melanoma, {len(rows) - n_mel - n_sk} nevus, "
          f"{n_sk} seborrheic keratosis), {n_masks} masks, seed {args.seed}, "
          + ("reused existing dataset" if reused else f"generated in {time.perf_counter() - start:.1f}s"))


if __name__ == "__main__":
    main()
