"""Resumable training: which checkpoints can be trusted, and whether they belong to this run.

The Trainer writes `checkpoint-<step>/` in place, file by file, so a process killed while
saving leaves a half-written folder that looks like a checkpoint. After every save, once all
ranks are done, rank 0 writes `checkpoint-complete.json` into the folder: the list of its
files and their sizes, written to a temporary name and renamed. Only a folder whose marker
exists and whose files all match it (trainer_state.json among them) is ever resumed from;
other `checkpoint-*` folders are deleted before training starts.

`run.json` beside the checkpoints holds a fingerprint of everything that determines the
result (train params, base model hash, data hash) and the MLflow run id: checkpoints of a
run with other params or data are discarded instead of resumed, and a resumed run keeps
logging into the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER = "checkpoint-complete.json"
RUN_FILE = "run.json"
REQUIRED = ("trainer_state.json",)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
    """Record the files of a fully written checkpoint (call once every rank has saved)."""
    checkpoint = Path(checkpoint)
    missing = [name for name in REQUIRED if not (checkpoint / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint} lacks {', '.join(missing)}; not marking it complete")
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MARKER}
    _write_json_atomically(checkpoint / MARKER, {"step": checkpoint_step(checkpoint), "files": files})


def is_complete(checkpoint: Path) -> bool:
    checkpoint = Path(checkpoint)
    marker = checkpoint / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError):
        return False
    if any(name not in files for name in REQUIRED):
        return False
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


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


def resume_point(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint that is complete and not final, if any."""
    usable = [p for p in list_checkpoints(checkpoint_dir) if is_complete(p) and not is_final(p)]
    return usable[-1] if usable else None


def read_run(checkpoint_dir: Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def update_run(checkpoint_dir: Path, **values: Any) -> None:
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    _write_json_atomically(Path(checkpoint_dir) / RUN_FILE, {**read_run(checkpoint_dir), **values})


def prepare_resume(checkpoint_dir: Path, run_fingerprint: str) -> Path | None:
    """Clean `checkpoint_dir` for this run and return the checkpoint to resume from, if any.

    Checkpoints written for another fingerprint are removed (with a warning), and so are
    incomplete ones and any newer than the resume point, so the Trainer never writes into
    a folder left over from an earlier attempt.
    """
    checkpoint_dir = Path(checkpoint_dir)
    previous = read_run(checkpoint_dir)
    if previous and previous.get("fingerprint") != run_fingerprint:
        logger.warning("train: params, base model or data changed since %s was written; "
                       "starting afresh instead of resuming", checkpoint_dir)
        clear(checkpoint_dir)
        previous = {}
    latest = resume_point(checkpoint_dir)
    latest_step = checkpoint_step(latest) if latest else -1
    for path in list_checkpoints(checkpoint_dir):
        if not is_complete(path) or (checkpoint_step(path) or 0) > (latest_step or 0):
            logger.warning("train: removing checkpoint %s (%s)", path,
                           "incomplete" if not is_complete(path) else "newer than the resume point")
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
