"""Reads a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format with pickle and NumPy.

The legacy file is a run of pickles: magic number, protocol version, system info, the state dict
(its tensors name storages by key through `persistent_load`), the list of storage keys; then each
storage as an 8-byte little-endian element count and its raw little-endian data. Tensors may be
strided views of a storage.

A pickle can run any importable callable, so the unpickler here knows only the few names a
tensor state dict needs and refuses every other one: loading weights never runs code.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, dtype: type, numel: int):
        self.dtype, self.numel, self.data = np.dtype(dtype).newbyteorder("<"), numel, None


class _TensorRef:
    """A tensor as the pickle describes it; its storage's data arrives after the pickle."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        if self.size and self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) >= len(data):
            raise ValueError(f"tensor of size {self.size}, stride {self.stride} runs past its storage")
        strides = tuple(s * data.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size, strides, writeable=False)
        return np.array(view, dtype=data.dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _TensorRef:
    return _TensorRef(storage, storage_offset, size, stride)


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The file names a class or function that a tensor state dict does not need."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `OrderedDict`, the tensor-rebuild function and the storage types."""

    def __init__(self, file: BinaryIO, path: Path, storages: dict[str, _Storage]):
        super().__init__(file)
        self.path, self.storages = path, storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise ForbiddenGlobalError(f"{self.path}: refuses to load {module}.{name}: a weights file may only "
                                     "hold tensors (OrderedDict, torch._utils._rebuild_tensor_v2, torch.*Storage)")

    def persistent_load(self, saved_id: Any) -> _Storage:
        if not (isinstance(saved_id, tuple) and len(saved_id) >= 5 and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"{self.path}: unexpected persistent id {saved_id!r}")
        _, dtype, key, _location, numel = saved_id[:5]
        if not isinstance(dtype, type) or dtype not in STORAGE_DTYPES.values():
            raise pickle.UnpicklingError(f"{self.path}: storage {key} of unknown type {dtype!r}")
        if len(saved_id) > 5 and saved_id[5] is not None:
            raise pickle.UnpicklingError(f"{self.path}: storage views (old PyTorch) are not supported")
        return self.storages.setdefault(str(key), _Storage(dtype, int(numel)))


def load(path: str | Path) -> dict[str, np.ndarray]:
    """name -> array of every tensor in the state dict at path (legacy PyTorch format).

    Raises ValueError naming the file when it is not such a file, ForbiddenGlobalError when it
    names anything but tensors.
    """
    path = Path(path)
    storages: dict[str, _Storage] = {}
    with path.open("rb") as f:
        def next_pickle():
            return _RestrictedUnpickler(f, path, storages).load()

        try:
            magic = next_pickle()
        except ForbiddenGlobalError:
            raise
        except (EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path}: not a PyTorch legacy-format file ({e})") from e
        if magic != MAGIC_NUMBER:
            raise ValueError(f"{path}: not a PyTorch legacy-format file (zip-format files need torch.load)")
        if next_pickle() != PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported PyTorch protocol version")
        sys_info = next_pickle()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: saved on a big-endian machine")
        state = next_pickle()
        keys = next_pickle()
        for key in keys:
            storage = storages[str(key)]
            count = int.from_bytes(f.read(8), "little")
            raw = f.read(count * storage.dtype.itemsize)
            if count != storage.numel or len(raw) != count * storage.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated or of the wrong size")
            storage.data = np.frombuffer(raw, storage.dtype)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {name: t.array() for name, t in state.items() if isinstance(t, _TensorRef)}
