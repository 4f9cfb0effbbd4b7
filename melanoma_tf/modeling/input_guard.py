"""Knowing when not to answer: is the classifier's input a dermoscopic lesion like those it learned?

Two checks, one function (`check`) for training-time fitting, the export's graph and the
benchmarks, so they cannot disagree:

- **Usable**: a view that is nearly all black (>= 98%: blank, or no lesion to show) or half
  white (>= 50%: saturated), or has less detail (variance of the grey Laplacian) than the
  training views' lowest, is refused as `contract.INPUT_UNUSABLE`.
- **In distribution**: the Mahalanobis distance of the classifier's own penultimate features
  (what its softmax layer reads: the pooled backbone features) from the training views'
  Gaussian, Ledoit-Wolf-shrunk (1,280 features, ~1,500 images). Beyond the threshold:
  `contract.INPUT_NOT_DERMOSCOPY`. Chosen over a k-nearest-neighbour distance, measured in
  benchmarks/input_guard.py: one matrix product in the graph, no stored training set.

Fitted on the training split only: the Gaussian on folds 1..K-1, the thresholds on fold 0
(held out from the Gaussian, so its distances are what an unseen image's are), at the quantile
that refuses `refusal_rate` of those views, or further out where a log-normal fitted to them
puts it (a small set's empirical quantile rests on one or two views). Exposure statistics need
no model, but a guard of exposure statistics alone would accept a well-exposed photo of a face;
the distance refuses it. Measured (benchmarks/README.md): in the context view's feature space
the distance separates; in the masked lesion's, a view cut by a rougher mask already looks
foreign.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from melanoma_tf import atomic, contract

GUARD_FILE = "input_guard.npz"
FEATURES_OF = "probabilities"  # the layer whose input are the features the guard reads
DARK, BRIGHT = 16, 240  # a pixel whose every channel is below DARK (above BRIGHT)
# Shares of the view beyond which it is unusable: the masked lesion's views are mostly black, and
# no context view of sample v2's training split is more than 32% white.
MAX_DARK, MAX_BRIGHT = 0.98, 0.5


@dataclasses.dataclass
class Guard:
    mean: np.ndarray  # [C]
    whitening: np.ndarray  # [C, C]: distance = |(x - mean) @ whitening|
    max_distance: float
    min_detail: float  # the smallest grey-Laplacian variance accepted

    def save(self, path: Path) -> None:
        with atomic.atomic_file(path, "wb") as handle:
            np.savez(handle, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Guard":
        with np.load(path) as stored:
            return cls(**{f.name: stored[f.name].item() if stored[f.name].ndim == 0 else stored[f.name]
                          for f in dataclasses.fields(cls)})


def with_features(model: keras.Model) -> keras.Model:
    """The classifier with a second output: the features its softmax layer reads, computed in
    the same pass (the guard costs no second run of the backbone)."""
    try:
        layer = model.get_layer(FEATURES_OF)
    except ValueError:
        raise ValueError(f"{model.name}: no '{FEATURES_OF}' layer; the input guard reads its input "
                         "(an ensemble has no single one)") from None
    return keras.Model(model.inputs[0], [model.outputs[0], layer.input])


def image_statistics(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per uint8 view [N, S, S, 3]: share of dark pixels, share of bright pixels, variance of
    the grey Laplacian (detail)."""
    pixels = tf.cast(images, tf.float32)
    dark = tf.reduce_mean(tf.cast(tf.reduce_max(pixels, -1) < DARK, tf.float32), [1, 2])
    bright = tf.reduce_mean(tf.cast(tf.reduce_min(pixels, -1) > BRIGHT, tf.float32), [1, 2])
    grey = tf.image.rgb_to_grayscale(pixels)
    laplacian = tf.constant([[0, 1, 0], [1, -4, 1], [0, 1, 0]], tf.float32)[:, :, None, None]
    detail = tf.math.reduce_variance(tf.nn.conv2d(grey, laplacian, 1, "VALID"), [1, 2, 3])
    return dark, bright, detail


def distance(features: tf.Tensor, guard: Guard) -> tf.Tensor:
    centred = tf.cast(features, tf.float32) - tf.constant(guard.mean, tf.float32)
    return tf.norm(tf.matmul(centred, tf.constant(guard.whitening, tf.float32)), axis=-1)


def check(images: tf.Tensor, features: tf.Tensor, guard: Guard) -> tuple[tf.Tensor, tf.Tensor]:
    """(input_distance [N] float32: the Mahalanobis distance over the guard's threshold, > 1
    refused; input_status [N] int32: contract.INPUT_OK, INPUT_NOT_DERMOSCOPY or INPUT_UNUSABLE)."""
    dark, bright, detail = image_statistics(images)
    unusable = (dark >= MAX_DARK) | (bright >= MAX_BRIGHT) | (detail < guard.min_detail)
    scaled = distance(features, guard) / guard.max_distance
    status = tf.where(unusable, contract.INPUT_UNUSABLE,
                      tf.where(scaled > 1.0, contract.INPUT_NOT_DERMOSCOPY, contract.INPUT_OK))
    return scaled, tf.cast(status, tf.int32)


def fit(features: np.ndarray, statistics: tuple[np.ndarray, ...], held: np.ndarray,
        refusal_rate: float = 0.01) -> Guard:
    """The guard of training views: the Gaussian of features[~held]; the distance threshold at
    the held-out views' (1 - refusal_rate) quantile, the detail threshold at their
    refusal_rate / 10 quantile, each the more lenient of the empirical quantile and a log-normal
    fitted to the values (which extrapolates past the few held-out views of a small set)."""
    from scipy.stats import norm
    from sklearn.covariance import LedoitWolf

    if not 0 < refusal_rate < 1:
        raise ValueError(f"input guard: refusal_rate {refusal_rate} must be in (0, 1)")
    fitted = LedoitWolf().fit(features[~held].astype(np.float64))
    # (x - mean) V diag(1 / sqrt(eigenvalues)): the Mahalanobis distance, without inverting a
    # covariance whose smallest eigenvalues (dead features) are at rounding level.
    eigenvalues, vectors = np.linalg.eigh(fitted.covariance_)
    floor = eigenvalues.max() * 1e-6
    whitening = (vectors / np.sqrt(np.maximum(eigenvalues, floor))).astype(np.float32)
    partial = Guard(fitted.location_.astype(np.float32), whitening, 1.0, 0.0)
    held_distance = distance(tf.constant(features[held]), partial).numpy()
    held_detail = np.maximum(statistics[2][held], 1e-6)

    def log_normal(values: np.ndarray, quantile: float) -> float:
        logs = np.log(values)
        return float(np.exp(logs.mean() + norm.ppf(quantile) * logs.std()))

    top, bottom = 1 - refusal_rate, refusal_rate / 10
    return dataclasses.replace(
        partial, max_distance=max(float(np.quantile(held_distance, top)), log_normal(held_distance, top)),
        min_detail=min(float(np.quantile(held_detail, bottom)), log_normal(held_detail, bottom)))


def describe(views: tf.data.Dataset, model: keras.Model) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Features and image statistics of every view of a dataset of uint8 batches."""
    classifier = with_features(model)
    features, stats = [], []
    for images in views:
        features.append(classifier(images, training=False)[1].numpy())
        stats.append([s.numpy() for s in image_statistics(images)])
    return np.concatenate(features), tuple(np.concatenate(column) for column in zip(*stats))
