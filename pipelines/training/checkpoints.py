"""Resumable training: which checkpoints can be trusted, and whether they belong to this run.

The Trainer writes `checkpoint-<step>/` in place, file by file, so a process killed while
saving leaves a half-written folder that looks like a checkpoint, and a file can also be
damaged later (a torn write after a power loss, a bad copy, bit rot) without changing its
size. After every save, once all ranks are done, rank 0 fsyncs the checkpoint's files and
then writes the manifest `checkpoint-complete.json` into the folder, last and atomically:
the SHA-256 and size of every file. A checkpoint is complete only when its manifest exists
and every file it lists (trainer_state.json among them) still has that hash. On resume the
newest checkpoint is verified; a corrupt one is skipped with a warning that names it and
the file, and the previous complete one is used. Checkpoints without a manifest, corrupt
ones and any newer than the resume point are deleted before training starts.

`run.json` beside the checkpoints holds a fingerprint of everything that determines the
result (train params, base model hash, data hash) and the MLflow run id: checkpoints of a
run with other params or data are discarded instead of resumed, and a resumed run keeps
logging into the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from pipelines.io import atomic_write_json, fsync_dir, fsync_file

logger = logging.getLogger(__name__)

MARKER = "checkpoint-complete.json"
MANIFEST_FORMAT = 2  # 1 (sizes only) could not tell a damaged file of the same size
RUN_FILE = "run.json"
REQUIRED = ("trainer_state.json",)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, oldest step first."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [p for p in Path(checkpoint_dir).iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def mark_complete(checkpoint: Path) -> None:
    """Write the manifest of a fully written checkpoint (call once every rank has saved).

    Each file is hashed and fsynced first, so the manifest, written last, never vouches for
    data that is not on disk yet.
    """
    checkpoint = Path(checkpoint)
    missing = [name for name in REQUIRED if not (checkpoint / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint} lacks {', '.join(missing)}; not marking it complete")
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MARKER:
            fsync_file(path)
            files[path.relative_to(checkpoint).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    for folder in sorted({p.parent for p in checkpoint.rglob("*")}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)
    atomic_write_json(checkpoint / MARKER, {"format": MANIFEST_FORMAT, "step": checkpoint_step(checkpoint),
                                            "files": files})


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (None: its manifest vouches for every file).

    A reason starting with "incomplete" means no usable manifest (a save cut off); any
    other means the manifest is there but the content no longer matches it (corrupt).
    """
    checkpoint = Path(checkpoint)
    marker = checkpoint / MARKER
    if not marker.is_file():
        return f"incomplete: no {MARKER} (the save was cut off)"
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not all(
                isinstance(entry, dict) and entry.get("sha256") for entry in files.values()):
            return f"incomplete: {MARKER} has no content hashes (written by an older version)"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        return f"corrupt: {MARKER} cannot be read ({error})"
    for name in REQUIRED:
        if name not in files:
            return f"corrupt: {MARKER} does not list {name}"
    for name, entry in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"corrupt: {name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"corrupt: {name} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if _sha256(path) != entry["sha256"]:
            return f"corrupt: {name} does not match its sha256 in the manifest"
    return None


def is_complete(checkpoint: Path) -> bool:
    return problem(checkpoint) is None


def is_final(checkpoint: Path) -> bool:
    """Whether the checkpoint was saved at the last step (the Trainer saves one there).

    Resuming from it makes the Trainer (transformers 5.23) run one step past max_steps,
    so a run that died after its last save resumes from the checkpoint before.
    """
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["global_step"]) >= int(state["max_steps"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _scan(checkpoint_dir: Path) -> tuple[Path | None, dict[Path, str]]:
    """(the resume point, why each newer checkpoint was passed over), newest first.

    Only the checkpoints from the newest down to the first good one are hashed.
    """
    skipped: dict[Path, str] = {}
    for path in reversed(list_checkpoints(checkpoint_dir)):
        if is_final(path):
            skipped[path] = "the final step: resuming there steps past max_steps"
            continue
        reason = problem(path)
        if reason is None:
            return path, skipped
        skipped[path] = reason
        logger.warning("train: skipping checkpoint %s (%s); trying the one before", path, reason)
    return None, skipped


def resume_point(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint that is complete and not final, if any.

    Newest first, each is verified against its manifest; one that fails is skipped with a
    warning naming it and the reason, and the one before is used.
    """
    return _scan(checkpoint_dir)[0]


def read_run(checkpoint_dir: Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def update_run(checkpoint_dir: Path, **values: Any) -> None:
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(checkpoint_dir) / RUN_FILE, {**read_run(checkpoint_dir), **values})


def prepare_resume(checkpoint_dir: Path, run_fingerprint: str) -> Path | None:
    """Clean `checkpoint_dir` for this run and return the checkpoint to resume from, if any.

    Checkpoints written for another fingerprint are removed (with a warning), and so are
    incomplete or corrupt ones and any newer than the resume point, so the Trainer never
    writes into a folder left over from an earlier attempt.
    """
    checkpoint_dir = Path(checkpoint_dir)
    previous = read_run(checkpoint_dir)
    if previous and previous.get("fingerprint") != run_fingerprint:
        logger.warning("train: params, base model or data changed since %s was written; "
                       "starting afresh instead of resuming", checkpoint_dir)
        clear(checkpoint_dir)
        previous = {}
    latest, skipped = _scan(checkpoint_dir)
    for path in list_checkpoints(checkpoint_dir):
        if path in skipped:
            logger.warning("train: removing checkpoint %s (newer than the resume point; %s)", path, skipped[path])
            shutil.rmtree(path, ignore_errors=True)
        elif path != latest and not (path / MARKER).is_file():
            # older ones are not hashed (they are not resumed from); one without a manifest is debris
            logger.warning("train: removing checkpoint %s (incomplete: no %s)", path, MARKER)
            shutil.rmtree(path, ignore_errors=True)
    update_run(checkpoint_dir, fingerprint=run_fingerprint)
    if latest:
        logger.info("train: resuming from %s", latest)
    return latest


def clear(checkpoint_dir: Path) -> None:
    """Remove every checkpoint and the run record (after success, or when they are stale)."""
    checkpoint_dir = Path(checkpoint_dir)
    for path in list_checkpoints(checkpoint_dir):
        shutil.rmtree(path, ignore_errors=True)
    (checkpoint_dir / RUN_FILE).unlink(missing_ok=True)
    if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()
