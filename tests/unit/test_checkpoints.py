"""Resumable checkpoints: complete only with a manifest of content hashes, verified on resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from pipelines.training.checkpoints import MARKER, is_complete, mark_complete, prepare_resume, resume_point


def _checkpoint(root: Path, step: int, max_steps: int = 40) -> Path:
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "sub" / "optimizer.pt").write_bytes(b"state" * 20)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    mark_complete(folder)
    return folder


def _flip_a_byte(path: Path) -> None:
    """Silent corruption: same size, other content (bit rot, a torn write, a bad copy)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_manifest_holds_a_content_hash_of_every_file(tmp_path):
    folder = _checkpoint(tmp_path, 10)
    manifest = json.loads((folder / MARKER).read_text())
    expected = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in folder.rglob("*") if p.is_file() and p.name != MARKER}
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == expected
    assert set(expected) == {"adapter_model.safetensors", "sub/optimizer.pt", "trainer_state.json"}


def test_a_checkpoint_with_a_changed_byte_is_not_complete(tmp_path):
    folder = _checkpoint(tmp_path, 10)
    assert is_complete(folder)
    _flip_a_byte(folder / "sub" / "optimizer.pt")
    assert not is_complete(folder)


def test_a_size_only_manifest_does_not_make_a_checkpoint_complete(tmp_path):
    """Markers of the old format (sizes, no hashes) cannot vouch for the content."""
    folder = _checkpoint(tmp_path, 10)
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in folder.rglob("*") if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"step": 10, "files": sizes}))
    assert not is_complete(folder)


def test_a_corrupt_checkpoint_is_skipped_with_a_warning_and_the_previous_one_is_used(tmp_path, caplog):
    _checkpoint(tmp_path, 10)
    previous = _checkpoint(tmp_path, 20)
    newest = _checkpoint(tmp_path, 30)
    _flip_a_byte(newest / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING, logger="pipelines.training.checkpoints"):
        assert resume_point(tmp_path) == previous
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in w and "adapter_model.safetensors" in w and "sha256" in w for w in warnings), warnings


def test_prepare_resume_removes_the_corrupt_checkpoint_and_resumes_from_the_previous_one(tmp_path, caplog):
    _checkpoint(tmp_path, 10)
    previous = _checkpoint(tmp_path, 20)
    newest = _checkpoint(tmp_path, 30)
    (newest / "trainer_state.json").write_text(json.dumps({"global_step": 31, "max_steps": 40}))  # same size
    with caplog.at_level(logging.WARNING, logger="pipelines.training.checkpoints"):
        assert prepare_resume(tmp_path, "run-a") == previous
    assert not newest.exists() and previous.exists()
    assert any("checkpoint-30" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)


def test_the_manifest_is_written_last_after_the_files_are_on_disk(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/fd to name the fsynced paths")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst, **kw: (events.append(("replace", os.fspath(dst))),
                                                               real_replace(src, dst, **kw))[1])
    folder = _checkpoint(tmp_path, 10)
    manifest_at = events.index(("replace", str(folder / MARKER)))
    synced_before = {path for kind, path in events[:manifest_at] if kind == "fsync"}
    assert {str(folder / "adapter_model.safetensors"), str(folder / "sub" / "optimizer.pt"),
            str(folder / "trainer_state.json")} <= synced_before
    assert ("fsync", str(folder)) in events[manifest_at:]
