"""Test-time augmentation views: the 8 symmetries of the square, each undone exactly."""

from __future__ import annotations

import numpy as np

from melanoma_tf.evaluation import tta


def test_views_are_the_8_distinct_symmetries_and_unview_undoes_each():
    images = np.random.default_rng(0).integers(0, 255, (2, 5, 7, 3), dtype=np.uint8)
    assert tta.VIEWS[0] == (0, False)
    seen = set()
    for turns, mirrored in tta.VIEWS:
        v = tta.view(images, turns, mirrored)
        assert v.shape == ((2, 5, 7, 3) if turns % 2 == 0 else (2, 7, 5, 3))
        np.testing.assert_array_equal(tta.unview(v, turns, mirrored), images)
        seen.add(v.tobytes() + bytes(v.shape))
    assert len(seen) == 8


def test_average_is_the_mean_over_the_views():
    images = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
    top_left = tta.average(lambda x: x[:, 0, 0, 0], images)
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]
    np.testing.assert_allclose(top_left, corners.mean(1))  # each corner lands top-left twice
