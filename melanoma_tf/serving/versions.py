"""TF Serving's model folder layout: `<base_path>/<version>/saved_model.pb`, integer versions
that are never overwritten. Used by the exporters, the pipeline and the server's registry."""

from __future__ import annotations

import contextlib
from pathlib import Path

from melanoma_tf import atomic, storage


def _children(base_path: str) -> list[Path | storage.GfilePath]:
    base = storage.path(base_path)
    try:
        return list(base.iterdir()) if base.is_dir() else []
    except OSError:  # removed meanwhile
        return []


def versions_on_disk(base_path: str) -> dict[int, str]:
    """Integer-named sub-folders that already contain a SavedModel (local or in a bucket)."""
    return {int(child.name): str(child) for child in _children(base_path)
            if child.name.isdigit() and child.is_dir() and any(
                (child / name).exists() for name in ("saved_model.pb", "saved_model.pbtxt"))}


def newest_version(base_path: str) -> str:
    """The highest version folder on disk: the one served under the default `latest` policy."""
    versions = versions_on_disk(base_path)
    if not versions:
        raise FileNotFoundError(f"{base_path}: no integer-named version folder holding a SavedModel")
    return versions[max(versions)]


def next_version(base_path: str) -> str:
    """Where a new export goes: versions are immutable, so one above every version folder,
    including any left without a SavedModel (a failed copy) that an export would collide with."""
    names = [child.name for child in _children(base_path)]
    return str(storage.path(base_path) / str(max((int(n) for n in names if n.isdigit()), default=0) + 1))


@contextlib.contextmanager
def writing_version(export_dir: Path | str):
    """Yields a temporary sibling folder to write a new version into and renames it to
    `export_dir` when the block succeeds, so a server never sees half a version; refuses a
    version that exists (versions are immutable) before any work is done."""
    export_dir = storage.path(export_dir)
    if export_dir.exists():
        raise FileExistsError(f"{export_dir} exists: TF Serving versions are immutable, export a new version")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(export_dir, replace=False) as tmp:
        yield tmp
