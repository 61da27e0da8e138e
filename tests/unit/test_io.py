"""Atomic writes: a failure leaves the old output (or nothing), never a half-written one."""

from __future__ import annotations

import pytest

from pipelines.io import atomic_path, atomic_write_json, atomic_write_text


def test_file_is_replaced_whole(tmp_path):
    target = tmp_path / "out" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("crash half-way")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_folder_is_swapped_in_whole(tmp_path):
    target = tmp_path / "prepared"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "train.parquet").write_text("old")
        (tmp / "stale.parquet").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "train.parquet").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["train.parquet"]
    assert (target / "train.parquet").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_failed_folder_build_leaves_nothing_new(tmp_path):
    target = tmp_path / "prepared"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "train.parquet").write_text("partial")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x"):
            pass
