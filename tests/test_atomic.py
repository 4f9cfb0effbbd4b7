"""Files and folders are replaced whole or not at all."""

from __future__ import annotations

import json

import pytest

from melanoma_tf import atomic


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_is_replaced_only_when_its_block_succeeds(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.write_json(path, {"auc": 0.5})
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(path) as handle:
            handle.write('{"auc": 0.9')  # half written, then the run dies
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"auc": 0.5} and not _leftovers(tmp_path)
    atomic.write_json(path, {"auc": 0.9})
    assert json.loads(path.read_text()) == {"auc": 0.9} and not _leftovers(tmp_path)


def test_a_folder_replaces_a_full_one_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "records"
    target.mkdir()
    (target / "old-shard").write_text("old")
    with atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new-shard").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new-shard"] and not _leftovers(tmp_path)
    with atomic.atomic_path(tmp_path / "final_model.keras") as tmp:
        assert tmp.suffix == ".keras" and tmp.parent == tmp_path  # what model.save needs
        tmp.write_text("model")
    assert (tmp_path / "final_model.keras").read_text() == "model"


def test_refusing_to_replace_happens_before_any_work(tmp_path):
    (tmp_path / "1").mkdir()
    with pytest.raises(FileExistsError):
        with atomic.atomic_path(tmp_path / "1", replace=False):
            raise AssertionError("the block must not run")
