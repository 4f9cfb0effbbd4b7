"""Files and folders that a reader (a resumed run, TF Serving, a person) never sees half-written.

Everything is written to a temporary sibling and renamed over the target only once complete:
`os.replace` is atomic within one file system, so a kill leaves the old target or the new one,
never a mixture, and the temporary is removed on any error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A temporary sibling of `path` (same suffix, e.g. for `model.save`) to write a file or a
    folder at; it becomes `path` when the block ends without error. replace=False refuses an
    existing `path` (FileExistsError) before the block runs."""
    path = Path(path)
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists already")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    _remove(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():  # os.replace cannot replace a non-empty folder
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
        _remove(old)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` for writing, through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path, encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """obj as indented JSON (json.dumps keyword arguments, e.g. default=str), atomically."""
    return write_text(path, json.dumps(obj, **{"indent": 1, **dumps_kwargs}) + "\n")
