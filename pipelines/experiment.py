"""Command `experiment`: an orchestrated run (an Airflow DAG run) as a DVC experiment.

    llmops experiment start --name airflow-2026-11-29-abc -S train.max_steps=40 -S 'base_model.source=...'
    dvc --wait-for-lock repro --single-item ingest   # ... one stage at a time (what the DAG's tasks do)
    llmops experiment save --name airflow-2026-11-29-abc

`experiment start` sets params.yaml to the committed version (git HEAD) plus the run's
overrides, in DVC's own `dvc exp run -S` grammar (DVC's Hydra override parser writes the
file, so comments stay), validates the result with the same models every stage uses, and
writes it atomically. A bad override fails here, before any stage runs, and leaves
params.yaml as it was. The run starts from HEAD, not from the last run's overrides, so a
nightly run after a UI-triggered one trains with the committed params again (DVC's run cache
brings back outputs of params it has seen, so that costs nothing).

Edits to params.yaml that are neither committed nor written by an earlier run are never
overwritten: the command stops and says to commit or stash them.

`experiment save` records the workspace after the stages ran (params.yaml, dvc.lock and the
metrics) as the DVC experiment NAME (`dvc exp save`), so `dvc exp show` lists every
orchestrated run with its params and metrics, and `dvc exp apply NAME` restores one.

Reads and writes params.yaml, `.dvc/tmp/llmops-experiment.json` (what the last start wrote).
Why a command and not `dvc exp run -S`: `dvc exp run` reproduces the whole pipeline in one
process, while the orchestrator runs one stage per task (retries, logs and timing per stage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipelines.errors import LLMOpsError, ParamsError
from pipelines.io import atomic_write_json
from pipelines.params import Params, load_params

logger = logging.getLogger(__name__)
STATE = Path(".dvc/tmp/llmops-experiment.json")


class ExperimentError(LLMOpsError):
    """The workspace cannot hold an orchestrated run (not a git repo, uncommitted params edits)."""


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def committed_params(root: Path, params_file: str = "params.yaml") -> str:
    shown = _git(root, "show", f"HEAD:{params_file}")
    if shown.returncode != 0:
        raise ExperimentError(
            f"{root / params_file} is not committed to git ({shown.stderr.strip() or 'no HEAD'}); an orchestrated run "
            f"starts from the committed params: run `git add {params_file} dvc.yaml && git commit` in {root}")
    return shown.stdout


def start(root: Path, name: str, overrides: list[str], params_file: str = "params.yaml") -> Params:
    """params.yaml := HEAD's params.yaml + overrides (validated); returns the params the stages will read."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    target = root / params_file
    base = committed_params(root, params_file)
    current = target.read_text(encoding="utf-8") if target.exists() else base
    state_path = root / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if current != base and _digest(current) != state.get("sha256"):
        raise ExperimentError(
            f"{target} has edits that are not committed and were not written by an orchestrated run; they would be "
            f"replaced. Commit them (`git commit {params_file}`), stash them (`git stash`), or restore HEAD's "
            f"version (`git checkout {params_file}`)")
    with tempfile.TemporaryDirectory(dir=root / ".dvc" / "tmp" if (root / ".dvc").is_dir() else None) as tmp:
        draft = Path(tmp) / "params.yaml"
        draft.write_text(base, encoding="utf-8")
        if overrides:
            try:
                apply_overrides(draft, list(overrides))
            except InvalidArgumentError as error:
                cause = error.__cause__
                raise ParamsError(
                    f"override {' '.join(overrides)!r} is not valid `dvc exp run -S` syntax "
                    f"({str(cause).splitlines()[0] if cause else error}); write KEY=VALUE, e.g. "
                    f"train.max_steps=40 or 'base_model.source=\"org/model\"'") from None
        try:
            params = load_params(draft)  # every section validates itself; a bad value stops here
        except ParamsError as error:
            raise ParamsError(str(error).replace(str(draft), f"{params_file} (HEAD + {' '.join(overrides)})")) from None
        text = draft.read_text(encoding="utf-8")
        if text != current:
            shutil.copy2(draft, target.with_name(f".{target.name}.tmp"))
            target.with_name(f".{target.name}.tmp").replace(target)
    atomic_write_json(state_path, {"name": name, "sha256": _digest(text), "overrides": list(overrides)})
    logger.info("experiment %s: %s = HEAD%s", name, params_file,
                " + " + " ".join(overrides) if overrides else " (no overrides)")
    return params


def save(root: Path, name: str, message: str | None = None) -> str:
    """`dvc exp save` of the workspace as NAME (replacing an experiment of that name: a retried task)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # cache: false outputs (metrics, plots, records) are plain files git may not track yet
        untracked = sorted({str(Path(out.fs_path).relative_to(root.resolve())) for stage in repo.index.stages
                            for out in stage.outs if not out.use_cache and Path(out.fs_path).exists()})
    beside = Path(sys.executable).parent / "dvc"  # the dvc of this environment, whatever PATH says
    command = [str(beside) if beside.exists() else "dvc", "exp", "save", "--force", "--name", name]
    for path in untracked:
        if _git(root, "ls-files", "--error-unmatch", path).returncode != 0:
            command += ["--include-untracked", path]
    if message:
        command += ["--message", message]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExperimentError(f"`{' '.join(command)}` failed in {root}: {result.stderr.strip()[-600:]}")
    ref = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else name
    logger.info("experiment %s saved: %s (see `dvc exp show`)", name, ref)
    return ref


def main(params: Params, action: str, name: str, set_params: list[str] | None = None,
         message: str | None = None) -> None:
    root = Path.cwd()
    if action == "start":
        start(root, name, set_params or [])
    else:
        save(root, name, message)
