"""Initialises chosen layers of a classifier from a pretrained checkpoint, matched by layer name.

Nothing can be downloaded here, so training starts from scratch; a user who has ImageNet (or
larger-ISIC) weights passes them as `model.init_checkpoint`, and `model.init_checkpoint_layers`
says which layers to take (the conv layers by default: the dense layers and the 2-way softmax
depend on the task). Two formats, both matched by layer name:

- `.keras`: a whole Keras 3 model (e.g. `alexnet(num_classes=1000)` trained on ImageNet);
- `.npz`: arrays named `<layer>/kernel` and `<layer>/bias` in Keras layout ([h, w, in, out]),
  what converters of Caffe/PyTorch AlexNet weights produce. Caffe's AlexNet splits conv2, conv4
  and conv5 into 2 channel groups; such kernels (in-depth half of ours) are expanded to the
  equivalent block-diagonal kernel of our single-group layers, so they compute the same.

The checkpoint's input normalisation is not carried over: the model's own (adapted per channel)
applies, which fine-tuning absorbs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import keras
import numpy as np

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def ungroup_kernel(kernel: np.ndarray, in_channels: int) -> np.ndarray:
    """[h, w, in/g, out] kernel of a g-group convolution -> the same convolution's [h, w, in, out]
    kernel without groups: output group j reads only input group j, so the rest are zeros."""
    groups, rem = divmod(in_channels, kernel.shape[2])
    if groups == 1 or rem or kernel.shape[3] % groups:
        return kernel
    group_in, group_out = kernel.shape[2], kernel.shape[3] // groups
    full = np.zeros(kernel.shape[:2] + (in_channels, kernel.shape[3]), kernel.dtype)
    for g in range(groups):
        full[:, :, g * group_in:(g + 1) * group_in, g * group_out:(g + 1) * group_out] = \
            kernel[:, :, :, g * group_out:(g + 1) * group_out]
    return full


def _read(path: Path, names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    if path.suffix == ".keras":
        source = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        have = {layer.name: layer for layer in source.layers}
        return {n: [np.asarray(w) for w in have[n].get_weights()] for n in names if n in have}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            return {n: [arrays[f"{n}/kernel"]] + ([arrays[f"{n}/bias"]] if f"{n}/bias" in arrays else [])
                    for n in names if f"{n}/kernel" in arrays}
    raise ValueError(f"{path}: init_checkpoint must be a .keras model or an .npz of <layer>/kernel arrays")


def load(model: keras.Model, path: str | Path, layer_names: Sequence[str] = CONV_LAYERS) -> list[str]:
    """Copies the named layers' weights from the checkpoint at `path` into `model`; returns the
    names copied. Raises, naming the file and the layer, if one is missing or does not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: init_checkpoint not found")
    weights = _read(path, layer_names)
    missing = [n for n in layer_names if n not in weights]
    if missing:
        raise ValueError(f"{path}: no weights for layer(s) {missing} (it has to name them as the model does)")
    for name in layer_names:
        layer = model.get_layer(name)
        theirs = weights[name]
        ours = layer.get_weights()
        if theirs and ours and ours[0].ndim == 4:
            theirs = [ungroup_kernel(theirs[0], ours[0].shape[2]), *theirs[1:]]
        shapes = [w.shape for w in theirs]
        if shapes != [w.shape for w in ours]:
            raise ValueError(f"{path}: layer {name!r} has weights of shapes {shapes}, "
                             f"the model's are {[w.shape for w in ours]}")
        layer.set_weights(theirs)
    return list(layer_names)


def copy_weights(source: keras.Model, target: keras.Model) -> keras.Model:
    """Sets every layer of target that has weights from source's layer of the same name (e.g. a
    trained network into its inference twin without augmentation); returns target."""
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())
            # An adapted Normalization computes with constants made from its variables by
            # finalize_state (as on load); set_weights alone leaves it at mean 0, variance 1.
            if isinstance(layer, keras.layers.Normalization):
                layer.finalize_state()
    return target
