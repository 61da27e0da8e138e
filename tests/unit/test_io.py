"""Atomic writes: a failure leaves the old output (or nothing), never a half-written one."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.io import atomic_copy, atomic_path, atomic_write_json, atomic_write_text


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


# --- durability: fsync the temporary file before the rename, the folder after -------------

@pytest.fixture
def disk_events(monkeypatch):
    """The fsync and rename calls, in order, with the path each fsync was for (Linux /proc)."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/fd to name the fsynced paths")
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_durable(events, target) -> None:
    """`target` was renamed into place after its data was fsynced, and its folder fsynced after."""
    target = str(target)
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == target]
    assert renames, f"{target} was not renamed into place: {events}"
    at = renames[-1]
    source = events[at][1]
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert source in synced_before, f"{source} was renamed to {target} without an fsync first: {events}"
    synced_after = [e[1] for e in events[at + 1:] if e[0] == "fsync"]
    assert str(Path(target).parent) in synced_after, f"the folder of {target} was not fsynced after: {events}"


def _write_folder(target):
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "sub").mkdir()
        (tmp / "train.parquet").write_text("rows")
        (tmp / "sub" / "part.bin").write_bytes(b"x")


def _write_parquet(target):
    import pandas as pd

    from pipelines.io import write_parquet

    write_parquet(pd.DataFrame({"a": [1, 2]}), target)


@pytest.mark.parametrize("name, write", [
    ("a.txt", lambda target: atomic_write_text(target, "one")),
    ("a.json", lambda target: atomic_write_json(target, {"v": 1})),
    ("a.parquet", _write_parquet),
])
def test_every_atomic_file_write_is_fsynced_before_and_after_the_rename(tmp_path, disk_events, name, write):
    target = tmp_path / "out" / name
    write(target)  # a first write creates the file, a second replaces it: both must be durable
    assert_durable(disk_events, target)
    disk_events.clear()
    write(target)
    assert_durable(disk_events, target)


def test_a_folder_swapped_in_is_fsynced_file_by_file_before_the_rename(tmp_path, disk_events):
    target = tmp_path / "prepared"
    _write_folder(target)
    assert_durable(disk_events, target)
    at = max(i for i, e in enumerate(disk_events) if e[0] == "replace" and e[2] == str(target))
    source = disk_events[at][1]
    synced = {e[1] for e in disk_events[:at] if e[0] == "fsync"}
    assert {f"{source}/train.parquet", f"{source}/sub/part.bin", f"{source}/sub"} <= synced


def test_a_copied_file_is_replaced_whole_and_durably(tmp_path, disk_events):
    source = tmp_path / "draft.yaml"
    source.write_text("train:\n  seed: 7\n")
    target = tmp_path / "params.yaml"
    target.write_text("old")
    atomic_copy(source, target)
    assert target.read_text() == source.read_text()
    assert_durable(disk_events, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft.yaml", "params.yaml"]
