"""The one masking function: exact at the mask border, black without a lesion, graph- and batch-safe."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from melanoma_tf import masking

SIZE = 48


def _lesion(h: int = 60, w: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured image and an off-centre elliptic lesion mask (0/1) that runs off the left edge,
    so the crop square needs padding."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.1 * w) / (0.25 * w)) ** 2 <= 1).astype(np.uint8)
    return image, mask


def _reference(image: np.ndarray, mask: np.ndarray, size: int, margin: float,
               keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Computed independently in NumPy: the lesion's square (box + margin, black padding), then
    the bilinear resample of the raw pixels and the nearest-neighbour resample of `keep` (default
    the mask)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = int(np.ceil(max(y1 - y0, x1 - x0) * (1 + 2 * margin)))
    top, left = int(np.floor((y0 + y1 - side) / 2)), int(np.floor((x0 + x1 - side) / 2))
    pad = side * 2
    big_image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    big_mask = np.pad(mask if keep is None else keep, ((pad, pad), (pad, pad)))
    crop = big_image[top + pad:top + pad + side, left + pad:left + pad + side]
    crop_mask = big_mask[top + pad:top + pad + side, left + pad:left + pad + side]
    pixels = tf.image.resize(crop.astype(np.float32), [size, size], "bilinear", antialias=True).numpy()
    keep = tf.image.resize(crop_mask[..., None], [size, size], "nearest").numpy()[..., 0]
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8), keep


def test_output_is_exact_at_the_mask_border():
    image, mask = _lesion()
    out, keep = (t.numpy() for t in masking.crop_lesion(image, mask, SIZE, 0.1))
    pixels, ref_keep = _reference(image, mask, SIZE, 0.1)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(keep, ref_keep)
    assert (out[keep == 0] == 0).all(), "a pixel outside the resampled mask is not black"
    np.testing.assert_array_equal(out[keep == 1], pixels[keep == 1])
    assert 0.3 < keep.mean() < 0.9, "the lesion should fill most of the square"


def test_mask_lesion_is_crop_lesion_image_and_accepts_any_mask_encoding():
    image, mask = _lesion(seed=1)
    expected = masking.crop_lesion(image, mask, SIZE)[0].numpy()
    np.testing.assert_array_equal(masking.mask_lesion(image, mask, SIZE).numpy(), expected)
    np.testing.assert_array_equal(masking.mask_lesion(image, (mask * 255)[..., None], SIZE).numpy(), expected)
    np.testing.assert_array_equal(masking.mask_lesion(image, mask.astype(np.float32), SIZE).numpy(), expected)


def test_lesion_is_centred_with_the_margin_on_its_longer_side():
    image = np.full((100, 100, 3), 90, np.uint8)
    mask = np.zeros((100, 100), np.uint8)
    mask[20:40, 10:70] = 1  # 20 x 60 box: square side 72, so 6 px (10 output px) of margin
    keep = masking.crop_lesion(image, mask, 120, 0.1)[1].numpy()
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    assert (cols.min(), cols.max()) == (10, 109)
    assert abs((rows.min() + rows.max()) / 2 - 59.5) <= 1 and abs(len(rows) - 33) <= 1


def test_all_zero_mask_gives_a_black_image():
    image, _ = _lesion()
    out = masking.mask_lesion(image, np.zeros(image.shape[:2], np.uint8), SIZE).numpy()
    assert out.shape == (SIZE, SIZE, 3) and not out.any()


def test_works_in_tf_function_with_unknown_height_and_width():
    fn = tf.function(lambda im, m: masking.mask_lesion(im, m, SIZE), input_signature=[
        tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None], tf.uint8)])
    for shape in ((60, 90), (81, 53)):
        image, mask = _lesion(*shape)
        out = fn(image, mask)
        assert out.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(out.numpy(), masking.mask_lesion(image, mask, SIZE).numpy())


def test_works_for_a_batch_via_map_fn():
    pairs = [_lesion(seed=s) for s in range(3)]
    images = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    masks[1] = 0
    out = tf.map_fn(lambda x: masking.mask_lesion(x[0], x[1], SIZE), (images, masks),
                    fn_output_signature=tf.TensorSpec([SIZE, SIZE, 3], tf.uint8)).numpy()
    for i in range(3):
        np.testing.assert_array_equal(out[i], masking.mask_lesion(images[i], masks[i], SIZE).numpy())
    assert not out[1].any()


def test_whole_frame_keeps_everything_and_pads_to_a_square():
    image = np.full((40, 80, 3), 200, np.uint8)
    out = masking.whole_frame(image, None, 80).numpy()
    assert (out[:19] == 0).all() and (out[-19:] == 0).all()  # 20 rows of padding above and below
    assert (out[21:59] == 200).all()


def test_skin_only_blacks_out_the_lesion_square_and_keeps_the_skin():
    image = np.full((100, 100, 3), 150, np.uint8)
    mask = np.zeros((100, 100), np.uint8)
    mask[40:60, 45:55] = 1
    out = masking.skin_only(image, mask, 100, 0.1).numpy()
    assert not out[38:62, 38:62].any(), "the lesion square (box + 10% of its longer side) is visible"
    assert (out[:30] == 150).all() and (out[70:] == 150).all()


def test_unknown_view_is_refused():
    with pytest.raises(ValueError, match="unknown view"):
        masking.view_fn("dermis")


def _resized(crop: np.ndarray, size: int) -> np.ndarray:
    pixels = tf.image.resize(crop.astype(np.float32), [size, size], "bilinear", antialias=True).numpy()
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("margin, rows, cols", [
    (0.25, (0, 56), (0, 56)),  # the 56-px square would start at row -1, column -12: shifted
    (0.5, (0, 60), (0, 60)),  # 74 px > the image's 60 rows: capped at 60, shifted inside
    (1.0, (0, 60), (0, 60)),
])
def test_context_view_is_a_raw_square_kept_inside_the_frame(margin, rows, cols):
    """The lesion (rows 9-45, columns 0-31 of a 60x90 image) touches the left edge: its square
    (longer side 37 plus `margin` per side) is shifted and capped inside the image, never padded."""
    image, mask = _lesion()
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (9, 46, 0, 32)
    out = masking.context_view(image, mask, SIZE, margin).numpy()
    np.testing.assert_array_equal(out, _resized(image[slice(*rows), slice(*cols)], SIZE))
    assert (out.max(-1) > 0).all(), "no black padding (the test image has no black pixel)"


def test_context_view_of_a_central_lesion_is_its_centred_square():
    image = np.random.default_rng(2).integers(20, 256, (100, 120, 3), dtype=np.uint8)
    mask = np.zeros((100, 120), np.uint8)
    mask[40:60, 50:66] = 1  # longer side 20: with margin 0.5 a 40-px square centred on the box
    out = masking.context_view(image, mask, SIZE, 0.5).numpy()
    np.testing.assert_array_equal(out, _resized(image[30:70, 38:78], SIZE))


def test_context_view_of_a_lesion_longer_than_the_short_side_and_without_a_lesion():
    """A lesion filling the 30x40 frame is longer than its 30 rows: the view is the whole frame,
    stretched to the square; no lesion gives the same (the frame's own box)."""
    image = np.random.default_rng(3).integers(20, 256, (30, 40, 3), dtype=np.uint8)
    out = masking.context_view(image, np.ones((30, 40), np.uint8), 80, 0.5).numpy()
    np.testing.assert_array_equal(out, _resized(image, 80))
    empty = masking.context_view(image, np.zeros((30, 40), np.uint8), 80, 0.5).numpy()
    np.testing.assert_array_equal(empty, out)
    wide = np.zeros((30, 40), np.uint8)
    wide[10:20, 0:40] = 1  # 40 wide > 30 rows: all rows, all columns
    np.testing.assert_array_equal(masking.context_view(image, wide, 80, 0.5).numpy(), out)


def test_box_jitter_moves_each_edge_within_its_share_and_is_reproducible():
    box = tf.constant([20, 30, 40, 90])  # 20 high, 60 wide
    seeds = [tf.constant([0, s]) for s in range(200)]
    moved = np.stack([masking.jitter_box(box, 0.1, s).numpy() for s in seeds])
    shift = moved - np.array([20, 30, 40, 90])
    assert (np.abs(shift[:, [0, 2]]) <= 2.0 + 1e-5).all() and (np.abs(shift[:, [1, 3]]) <= 6.0 + 1e-5).all()
    assert np.abs(shift).max(0).min() > 1.0, "every edge moves"
    np.testing.assert_array_equal(masking.jitter_box(box, 0.1, seeds[3]).numpy(), moved[3])
    np.testing.assert_array_equal(masking.jitter_box(box, 0.0, seeds[3]).numpy(), [20, 30, 40, 90])
    tiny = np.stack([masking.jitter_box(tf.constant([5, 5, 6, 6]), 3.0, s).numpy() for s in seeds[:50]])
    assert (tiny[:, 2:] - tiny[:, :2] >= 1.0 - 1e-5).all(), "a jittered box keeps at least one pixel"
    image = np.random.default_rng(2).integers(20, 256, (100, 120, 3), dtype=np.uint8)
    mask = np.zeros((100, 120), np.uint8)
    mask[40:60, 50:66] = 1
    views = {masking.context_view(image, mask, SIZE, 0.5, 0.2, s).numpy().tobytes() for s in seeds[:5]}
    assert len(views) == 5
