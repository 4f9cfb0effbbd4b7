"""Files and folders that a reader (a resumed run, TF Serving, a person) never sees half-written.

Everything is written to a temporary sibling and renamed over the target only once complete:
`os.replace` is atomic within one file system, so a kill leaves the old target or the new one,
never a mixture, and the temporary is removed on any error. In a bucket (`storage.GfilePath`) a
file is one object and appears whole; a folder is copied in with its commit marker last
(`storage.move`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator

from melanoma_tf import storage
from melanoma_tf.storage import GfilePath


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike | GfilePath, replace: bool = True) -> Iterator[Path | GfilePath]:
    """A temporary sibling of `path` (same suffix, e.g. for `model.save`) to write a file or a
    folder at; it becomes `path` when the block ends without error. replace=False refuses an
    existing `path` (FileExistsError) before the block runs."""
    path = storage.path(path)
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists already")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    storage.remove(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():  # os.replace cannot replace a non-empty folder
            storage.move(path, old)
        storage.move(tmp, path)
    finally:
        storage.remove(tmp)
        storage.remove(old)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike | GfilePath, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` for writing, through `atomic_path`."""
    with atomic_path(path) as tmp, tmp.open(mode, **open_kwargs) as handle:
        yield handle


def write_bytes(path: str | os.PathLike | GfilePath, data: bytes) -> Path | GfilePath:
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    return storage.path(path)


def write_text(path: str | os.PathLike | GfilePath, text: str) -> Path | GfilePath:
    with atomic_file(path, encoding="utf-8") as handle:
        handle.write(text)
    return storage.path(path)


def write_json(path: str | os.PathLike | GfilePath, obj: Any, **dumps_kwargs: Any) -> Path | GfilePath:
    """obj as indented JSON (json.dumps keyword arguments, e.g. default=str), atomically."""
    return write_text(path, json.dumps(obj, **{"indent": 1, **dumps_kwargs}) + "\n")
