"""Paths that are local or in a bucket: `gs://` or any scheme a TensorFlow file-system plugin
registers with `tf.io.gfile`, which Model Garden and TF Serving use too (TensorFlow's in-memory
`ram://` in tests).

`path(x)` keeps a local path a `pathlib.Path` and makes a URL a `GfilePath`: the part of pathlib's
API the project's command-line tools use, over `tf.io.gfile`. (`pathlib` would fold `gs://b/x`
into `gs:/b/x`.) A `GfilePath` has no `__fspath__`, so a call that would quietly write a local
file named `gs:/...` fails loudly instead.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
from pathlib import Path
from typing import IO, Iterator


def _gfile():
    import tensorflow as tf  # on first use: the image readers that import this module need no TensorFlow

    return tf.io.gfile


def is_url(p: str | os.PathLike | GfilePath) -> bool:
    return isinstance(p, GfilePath) or "://" in str(p)


def absolute(p: str) -> str:
    """A local path made absolute against the cwd; a URL as it is."""
    return p if is_url(p) else os.path.abspath(p)


def path(p: str | os.PathLike | GfilePath) -> Path | GfilePath:
    """The argparse `type` and the conversion for every path a user may point at a bucket."""
    if isinstance(p, (Path, GfilePath)):
        return p
    return GfilePath(str(p)) if is_url(p) else Path(p)


class GfilePath:
    """`scheme://bucket/key` with pathlib's names, backed by tf.io.gfile."""

    def __init__(self, url: str):
        scheme, _, rest = url.partition("://")
        rest = posixpath.normpath(rest) if rest.strip("/") else ""
        self._scheme, self._rest = scheme, "" if rest == "." else rest.lstrip("/")

    def __str__(self) -> str:
        return f"{self._scheme}://{self._rest}"

    def __repr__(self) -> str:
        return f"GfilePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, GfilePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: GfilePath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, part: str | os.PathLike) -> GfilePath:
        return GfilePath(f"{self}/{os.fspath(part)}")

    def joinpath(self, *parts: str | os.PathLike) -> GfilePath:
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self._rest)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return self.name[: len(self.name) - len(self.suffix)]

    @property
    def parent(self) -> GfilePath:
        return GfilePath(f"{self._scheme}://{posixpath.dirname(self._rest)}")

    def with_name(self, name: str) -> GfilePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> GfilePath:
        return self.with_name(self.stem + suffix)

    def relative_to(self, other: GfilePath) -> Path:
        prefix = str(other).rstrip("/") + "/"
        if not str(self).startswith(prefix):
            raise ValueError(f"{self} is not under {other}")
        return Path(str(self)[len(prefix):])

    def is_absolute(self) -> bool:
        return True

    def resolve(self) -> GfilePath:
        return self

    def exists(self) -> bool:
        return _gfile().exists(str(self))

    def is_dir(self) -> bool:
        return _gfile().isdir(str(self))

    def is_file(self) -> bool:
        return self.exists() and not self.is_dir()

    def is_symlink(self) -> bool:
        return False

    def stat(self):
        """Only `st_size`, which is what callers read."""
        return os.stat_result((0, 0, 0, 0, 0, 0, _gfile().stat(str(self)).length, 0, 0, 0))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.exists() and not exist_ok:
            raise FileExistsError(f"{self} exists already")
        _gfile().makedirs(str(self)) if parents else _gfile().mkdir(str(self))

    def iterdir(self) -> Iterator[GfilePath]:
        return (self / name.rstrip("/") for name in sorted(_gfile().listdir(str(self))))

    def glob(self, pattern: str) -> Iterator[GfilePath]:
        """`*`-style patterns; `**/` matches any depth, as pathlib's glob does."""
        if not pattern.startswith("**/"):
            return (GfilePath(p) for p in sorted(_gfile().glob(f"{self}/{pattern}")))
        return (GfilePath(top) / name for top, dirs, files in _gfile().walk(str(self))
                for name in sorted(dirs + files) if fnmatch.fnmatch(name, pattern[3:]))

    def open(self, mode: str = "r", newline: str | None = None, encoding: str | None = None) -> IO:
        """A GFile (UTF-8 text or bytes); `newline`/`encoding` are accepted for pathlib's callers."""
        if "w" in mode:
            self.unlink(missing_ok=True)  # ram:// would append to the old content
        return _gfile().GFile(str(self), mode.replace("+", ""))

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str | None = None) -> str:
        with self.open("r") as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as f:
            f.write(data)

    def write_text(self, text: str, encoding: str | None = None) -> None:
        with self.open("w") as f:
            f.write(text)

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        _gfile().remove(str(self))


def _files_under(root: GfilePath) -> list[Path]:
    """The files under root, relative to it. Only those that exist: a listing can name files
    deleted meanwhile, and ram:// lists a sibling `dir_x` inside `dir` as `_x`."""
    return [(GfilePath(top) / name).relative_to(root) for top, _, names in _gfile().walk(str(root))
            for name in names if _gfile().exists(f"{top}/{name}")]


def remove(p: Path | GfilePath) -> None:
    """Removes a file or a folder tree; nothing if it is absent."""
    if isinstance(p, GfilePath):
        if not p.is_dir():
            p.unlink(missing_ok=True)
            return
        for rel in _files_under(p):
            (p / rel).unlink(missing_ok=True)
        import tensorflow as tf

        try:
            _gfile().rmtree(str(p))  # the folder entries, where the file system keeps any
        except tf.errors.NotFoundError:
            pass
    elif p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


# Files whose presence tells a reader that their folder is complete: copied last.
COMMIT_MARKERS = ("saved_model.pb", "manifest.json")


def move(src: Path | GfilePath, dst: Path | GfilePath) -> None:
    """Renames `src` to `dst` (absent, or a file). Locally `os.replace`, atomic. In a bucket a
    file is renamed (one object), and a folder is copied object by object, its commit markers
    (`saved_model.pb`, `manifest.json`) last, then deleted: object stores have no folder rename
    (gfile's rename of a folder is a copy there too, or unsupported), so a reader must wait for
    the marker, as TF Serving's version check and the record readers do."""
    if not isinstance(src, GfilePath):
        os.replace(src, dst)
        return
    if not src.is_dir():
        _gfile().rename(str(src), str(dst), overwrite=True)
        return
    for rel in sorted(_files_under(src), key=lambda rel: (rel.name in COMMIT_MARKERS, str(rel))):
        target = dst / rel.as_posix()
        _gfile().makedirs(str(target.parent))
        _gfile().copy(str(src / rel.as_posix()), str(target), overwrite=True)
    remove(src)
