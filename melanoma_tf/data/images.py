"""Loads and checks one image and its lesion mask, the way the TFRecord builder needs them.

Every problem raises `BadInput` with a reason a person can act on; the builder turns it into a
line of its problem report (or a failure with `--strict`). Images that need converting (CMYK,
grayscale, opaque RGBA, 16-bit, palette) are converted to 8-bit RGB and re-encoded as PNG, so the
record holds exactly the pixels we checked; plain 8-bit RGB JPEG/PNG files are kept byte for byte.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from melanoma_tf import atomic, storage
from melanoma_tf.data.isic import LesionItem, Problem

# Decompression-bomb protection stays on, but dermoscopy originals reach ~40 MP.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadInput(ValueError):
    """An input file the builder must skip (or fail on, with --strict)."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    encoded: bytes  # JPEG or PNG bytes, 8-bit RGB
    format: str  # "jpeg" or "png"
    height: int
    width: int
    original_size: tuple[int, int]  # (height, width) of the file, before any downscaling
    notes: tuple[str, ...] = ()  # conversions applied, for the report


def _open(path: Path) -> tuple[bytes, Image.Image]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(path, f"unreadable file ({e.strerror or e})") from e
    if not data:
        raise BadInput(path, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # forces a full decode: truncated and corrupt files fail here
    except Image.UnidentifiedImageError:  # its message names the BytesIO, not the file
        raise BadInput(path, f"not a decodable image ({path.name}: not in an image format Pillow reads, "
                             "or its header is corrupt)") from None
    except Exception as e:  # Pillow raises many types for corrupt data
        raise BadInput(path, f"not a decodable image ({path.name}: {e})") from e
    if img.width == 0 or img.height == 0:
        raise BadInput(path, f"image has zero size {img.width}x{img.height}")
    return data, img


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype in (np.uint16, np.int32, np.uint32) and arr.max(initial=0) <= 65535:
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def _encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _rgb_pixels(path: Path, img: Image.Image) -> np.ndarray:
    """8-bit RGB pixels of any mode where the conversion is sound."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            raise BadInput(path, f"{mode} image with transparent pixels: colours there are undefined")
        rgb = np.asarray(img.convert("RGB"))
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = _to_8bit(np.asarray(img))
        rgb = np.repeat(gray[..., None], 3, axis=-1)
    elif mode in ("RGB", "L", "CMYK", "P", "YCbCr"):
        rgb = np.asarray(img.convert("RGB"))
    else:
        raise BadInput(path, f"unsupported image mode {mode}")
    return np.ascontiguousarray(rgb)


def load_image(path: Path | str, max_side: int | None = None) -> LoadedImage:
    """Reads an image file, converting to 8-bit RGB where that is sound.

    With `max_side`, larger images are downscaled (area interpolation) and stored as JPEG.
    """
    path = Path(path)
    data, img = _open(path)
    size = (img.height, img.width)
    too_big = max_side is not None and max(size) > max_side
    # 8-bit RGB JPEG/PNG files are stored as they are (PNG bit depth is byte 24, in IHDR).
    plain = img.mode == "RGB" and (img.format == "JPEG" or (img.format == "PNG" and data[24] == 8))
    if plain and not too_big:
        return LoadedImage(data, img.format.lower(), img.height, img.width, size)
    rgb = _rgb_pixels(path, img)
    notes = [] if plain else [f"converted {img.format} {img.mode} to 8-bit RGB"]
    if too_big:
        h, w = resized_shape(rgb.shape[0], rgb.shape[1], max_side)
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        notes.append(f"downscaled {img.width}x{img.height} to {w}x{h}")
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
        return LoadedImage(buf.getvalue(), "jpeg", h, w, size, tuple(notes))
    return LoadedImage(_encode_png(rgb), "png", rgb.shape[0], rgb.shape[1], size, tuple(notes))


def resized_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def write_mask(masks_dir: Path | storage.GfilePath, image_id: str, mask: np.ndarray) -> Path | storage.GfilePath:
    """`<image_id>_segmentation.png` (0/255, the ISIC submission format), written atomically."""
    target = storage.path(masks_dir) / f"{image_id}_segmentation.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(target, "wb") as handle:
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(handle, format="PNG")
    return target


def load_mask(path: Path | str, height: int, width: int, resize_to: tuple[int, int] | None = None
              ) -> np.ndarray:
    """Reads a lesion mask as a 0/1 uint8 array of the image's size (then `resize_to`, nearest).

    ISIC masks are single-channel 0/255 PNGs; anything else (other values, other size, nothing
    marked) is reported rather than guessed at.
    """
    path = Path(path)
    _, img = _open(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(arr.shape[-1], 3))):
            raise BadInput(path, f"mask is a colour image ({img.mode}), expected one channel")
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if arr.max(initial=0) in (0, 65535) and set(np.unique(arr).tolist()) <= {0, 65535}:
            arr = (arr > 0).astype(np.uint8) * 255
        else:
            raise BadInput(path, f"mask has pixel type {arr.dtype} with values other than 0/65535")
    if arr.shape != (height, width):
        raise BadInput(path, f"mask is {arr.shape[1]}x{arr.shape[0]} but its image is {width}x{height}")
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 255}:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise BadInput(path, f"mask has values other than 0/255 ({shown})")
    if values.max(initial=0) == 0:
        raise BadInput(path, "mask is empty (no lesion pixel)")
    mask = (arr > 0).astype(np.uint8)
    if resize_to is not None and resize_to != mask.shape:
        mask = cv2.resize(mask, resize_to[::-1], interpolation=cv2.INTER_NEAREST)
        if not mask.any():
            raise BadInput(path, "mask vanishes when downscaled (lesion too small)")
    return mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (ymin, xmin, ymax, xmax) of a non-empty mask, max exclusive, in pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def encode_mask_png(mask: np.ndarray) -> bytes:
    """PNG of a 0/1 mask: Model Garden's decoder uses the stored values as training targets."""
    return _encode_png(mask.astype(np.uint8))


def decode_mask_png(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@dataclasses.dataclass(frozen=True)
class LoadedLesion:
    """What a record needs from one item; made in worker processes (no TensorFlow here)."""

    image: LoadedImage
    mask_png: bytes | None
    box: tuple[int, int, int, int] | None
    area: int


def load_lesion(image_path: Path | str, mask_path: Path | str | None,
                max_side: int | None = None) -> LoadedLesion:
    image = load_image(image_path, max_side)
    if mask_path is None:
        return LoadedLesion(image, None, None, 0)
    mask = load_mask(mask_path, *image.original_size, resize_to=(image.height, image.width))
    return LoadedLesion(image, encode_mask_png(mask), mask_box(mask), int(mask.sum()))


def load_item(task: tuple[LesionItem, int | None]) -> LoadedLesion | Problem:
    """`load_lesion` for a worker process: a bad input comes back as a Problem, not an error.

    This module imports no TensorFlow, so spawned workers start in a fraction of a second.
    """
    item, max_side = task
    try:
        return load_lesion(item.image_path, item.mask_path, max_side)
    except BadInput as e:
        return Problem(e.path, e.reason, item.image_id)
