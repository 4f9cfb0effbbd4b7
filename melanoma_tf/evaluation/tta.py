"""Test-time augmentation over the 8 symmetries of the square (4 rotations, each also mirrored).

A dermoscopy image has no canonical orientation, so a model's answer should not depend on it;
averaging over these views makes it exactly independent, at 8 times the cost. Nothing is
interpolated: the views are rotations by 90 degrees and mirror images.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

VIEWS = tuple((turns, mirrored) for mirrored in (False, True) for turns in range(4))  # [0]: identity


def view(images: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """images [N, H, W, ...] rotated by turns x 90 degrees, then mirrored left-right."""
    out = np.rot90(images, turns, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if mirrored else out)


def unview(images: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """The inverse of `view`: maps a view's per-pixel output back onto the original image."""
    out = images[:, :, ::-1] if mirrored else images
    return np.ascontiguousarray(np.rot90(out, -turns, axes=(1, 2)))


def average(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """The mean of fn's per-image outputs over the 8 views of images."""
    return np.mean([fn(view(images, t, m)) for t, m in VIEWS], axis=0)
