"""An orchestrated run (an Airflow DAG run, a sweep trial) as a DVC experiment: the library
behind the command `llmops experiment` (pipelines/commands/experiment.py) and `llmops sweep`.

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

A run may override only params.RUN_OVERRIDABLE (hyperparameters and the choice of data);
any other key is refused before anything changes, with where it may be set instead: a
service endpoint or credential names its environment variable (settings.DEPLOYMENT_SETTINGS),
the rest a commit to params.yaml. The check compares the resulting params with HEAD's, key by
key, so the override's spelling (`train={...}`, `~key`) cannot get around it. A file a run
adds as a data source must resolve (symlinks followed) inside the committed paths.raw_dir or
paths.sample_dir (a `review` source's folder: paths.feedback_dir too); a local base model folder
inside the project.

One run at a time per workspace. `start` refuses while another orchestrated run holds the
workspace (from its `start` until `experiment end`, which the DAG runs as a teardown task
whatever the outcome), while a `dvc exp run` is running here (DVC's own record of it: the pid
in .dvc/tmp/exps/run/workspace/, stale once that pid is gone), or while any DVC command holds
the repository lock (.dvc/tmp/lock); it writes params.yaml under that lock itself. `save`
refuses when params.yaml is no longer what this run's `start` wrote (someone's `dvc exp run`
or edit in between), rather than record other params under the run's name.

    llmops experiment end --name airflow-2026-11-29-abc   # release the workspace (idempotent)

Reads and writes params.yaml, `.dvc/tmp/llmops-experiment.json` (the current or last run:
name, what start wrote, whether it ended). Why a command and not `dvc exp run -S`: `dvc exp
run` reproduces the whole pipeline in one process, while the orchestrator runs one stage per
task (retries, logs and timing per stage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipelines.config.params import RUN_OVERRIDABLE, Params, Paths, load_params, run_overridable
from pipelines.config.settings import DEPLOYMENT_SETTINGS
from pipelines.errors import LLMOpsError, ParamsError
from pipelines.io import atomic_copy, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)
STATE = Path(".dvc/tmp/llmops-experiment.json")
# Where `dvc exp run` records the pid of the experiment running in the workspace (DVC's
# WorkspaceQueue._proc_info_path("workspace"); its `_active_pid` reads it the same way).
DVC_WORKSPACE_RUN = Path(".dvc/tmp/exps/run/workspace/workspace.json")
_MISSING = object()


class ExperimentError(LLMOpsError):
    """The workspace cannot hold an orchestrated run (not a git repo, uncommitted params edits, busy)."""


class OverrideRefused(ParamsError):
    """A run tried to change a key that is not a run parameter (params.RUN_OVERRIDABLE)."""


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two params trees, down to the leaves (a list is
    one value): a section deleted or replaced by a value changes every key in it."""
    if before == after:
        return []
    if not isinstance(before, dict) and not isinstance(after, dict):
        return [prefix]
    old, new = (before if isinstance(before, dict) else {}), (after if isinstance(after, dict) else {})
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out += changed_keys(old.get(key, _MISSING), new.get(key, _MISSING), dotted)
    replaced = _MISSING not in (before, after) and not (isinstance(before, dict) and isinstance(after, dict))
    return [*out, prefix] if (replaced or not out) and prefix else out


def _refusal(key: str) -> str:
    for param, env in DEPLOYMENT_SETTINGS.items():
        if key == param or key.startswith(param + ".") or param.startswith(key + "."):
            return (f"{key} is a deployment setting, not a run parameter: set {env} in the environment of the "
                    "workers (see `llmops settings`)")
    if key == "paths" or key.startswith("paths.") or key.endswith("_dir"):
        return f"{key} is the project's layout, not a run parameter: change it in a commit to params.yaml"
    sections = ", ".join(sorted({allowed.split(".")[0] for allowed in RUN_OVERRIDABLE}))
    return (f"{key} is not a run parameter (a run may set only the {sections} keys docs/orchestration.md lists): "
            "change it in a commit to params.yaml")


def _inside(path: Path, folders: list[Path]) -> bool:
    resolved = path.expanduser().resolve()  # follows symlinks: a link inside pointing out is outside
    return any(resolved.is_relative_to(folder.resolve()) for folder in folders)


def _looks_local(value: str, root: Path) -> bool:
    # as pipelines.model.sources.looks_like_path, but relative to the workspace, not the cwd
    return value.startswith(("/", "./", "../", "~")) or (root / value).exists() or value.count("/") > 1


def _path_problems(root: Path, base: dict, draft: dict, changed: list[str]) -> list[str]:
    """Data and model locations a run adds must stay inside the project (its data folders)."""
    paths = {**Paths().model_dump(mode="json"), **(base.get("paths") or {})}
    data_dirs = [root / str(paths["raw_dir"]), root / str(paths["sample_dir"])]
    shown = " or ".join(str(Path(str(paths[k]))) + "/" for k in ("raw_dir", "sample_dir"))
    problems = []
    if any(key == "ingest.sources" or key.startswith("ingest.sources.") for key in changed):
        for index, source in enumerate((draft.get("ingest") or {}).get("sources") or []):
            if not isinstance(source, dict):
                continue  # the params models reject it with their own message
            where = f"ingest.sources[{index}]"
            if source.get("kind") == "file" and source.get("path") is not None:
                if not _inside(root / str(source["path"]), data_dirs):
                    problems.append(f"{where}.path {source['path']} is outside the project's data folders: "
                                    f"copy the file under {shown} and name it there")
            elif source.get("kind") == "review" and source.get("path") is not None:
                feedback = root / str(paths["feedback_dir"])
                if not _inside(root / str(source["path"]), [feedback, *data_dirs]):
                    problems.append(f"{where}.path {source['path']} is outside the project's data folders: "
                                    f"name {Path(str(paths['feedback_dir']))}/ (or leave path out), {shown}")
            elif source.get("kind") == "hf":
                name = str(source.get("name") or "")
                if name and _looks_local(name, root) and not _inside(root / name, data_dirs):
                    problems.append(f"{where}.name {name} is a local folder outside the project's data folders: "
                                    f"copy it under {shown} or name a hub dataset")
                for item in source.get("data_files") or []:
                    if "://" not in str(item) and not _inside(root / str(item), data_dirs):
                        problems.append(f"{where}.data_files {item} is outside the project's data folders: "
                                        f"copy it under {shown}")
    if "base_model.source" in changed:
        value = str((draft.get("base_model") or {}).get("source") or "")
        if not value.startswith("bundled:") and _looks_local(value, root) and not _inside(root / value, [root]):
            problems.append(f"base_model.source {value} is a local folder outside the project: copy it into the "
                            "project (e.g. models/) or name a hub id")
    return problems


def check_run_overrides(root: Path, base_text: str, draft_text: str, overrides: list[str]) -> None:
    """Refuse (one line) what a run may not change: keys outside RUN_OVERRIDABLE, data outside the project."""
    base = yaml.safe_load(base_text) or {}
    draft = yaml.safe_load(draft_text) or {}
    changed = changed_keys(base, draft)
    problems = [_refusal(key) for key in changed if not run_overridable(key)]
    problems += _path_problems(root, base, draft, changed)
    if problems:
        raise OverrideRefused(f"run override {' '.join(overrides)!r} refused: {'; '.join(problems)}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def running_dvc_experiment(root: Path) -> int | None:
    """The pid of a `dvc exp run` in progress in this workspace (DVC's own record), else None."""
    try:
        pid = int(json.loads((root / DVC_WORKSPACE_RUN).read_text()).get("pid"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return pid if pid_alive(pid) else None


@contextmanager
def _dvc_lock(root: Path):
    """Hold DVC's repository lock (what every `dvc repro` / `dvc exp run` takes) while params.yaml is written."""
    if not (root / ".dvc").is_dir():
        yield
        return
    from dvc.lock import LockError, make_lock
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # the lock Repo itself makes (same file, same hardlink_lock setting), without its progress bar,
        # so a refusal stays one line; it gives up after DVC's default 3 s
        lock = make_lock(os.path.join(repo.tmp_dir, "lock"), tmp_dir=repo.tmp_dir,
                         hardlink_lock=repo.config["core"].get("hardlink_lock", False), friendly=False)
        try:
            lock.lock()
        except LockError:
            pid = (root / ".dvc" / "tmp" / "lock").read_text(errors="replace").strip() \
                if (root / ".dvc" / "tmp" / "lock").exists() else ""
            raise ExperimentError(
                f"a DVC command (pid {pid or '?'}) holds the repository lock in {root}: an orchestrated run "
                "does not start while `dvc repro` or `dvc exp run` runs in its workspace; wait for it to finish "
                "(a stale lock: https://dvc.org/doc/user-guide/troubleshooting#lock-issue)") from None
        try:
            yield
        finally:
            lock.unlock()


def read_state(root: Path) -> dict:
    path = root / STATE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}  # unreadable: as if no run had been recorded (params.yaml is still checked against HEAD)


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


def _holder(state: dict) -> str:
    return f"{state.get('name')} (started {state.get('started_at', '?')} on {state.get('host', '?')})"


def start(root: Path, name: str, overrides: list[str], params_file: str = "params.yaml") -> Params:
    """params.yaml := HEAD's params.yaml + overrides (validated, run parameters only); the workspace
    is this run's until `end`. Returns the params the stages will read."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    target = root / params_file
    base = committed_params(root, params_file)
    pid = running_dvc_experiment(root)
    if pid is not None:
        raise ExperimentError(
            f"`dvc exp run` (pid {pid}) is running in {root}: two runs in one workspace overwrite each other's "
            "params and outputs; wait for it to finish, or run experiments elsewhere (`dvc exp run --queue` "
            "runs them in temporary copies)")
    with _dvc_lock(root):
        state = read_state(root)
        if state.get("status") == "running" and state.get("name") != name:
            raise ExperimentError(
                f"orchestrated run {_holder(state)} has not ended in {root}: one run at a time per workspace; "
                f"wait for it, or, if it is dead, release it with `llmops experiment end --name {state.get('name')}`")
        current = target.read_text(encoding="utf-8") if target.exists() else base
        if current != base and _digest(current) != state.get("sha256"):
            raise ExperimentError(
                f"{target} has edits that are not committed and were not written by an orchestrated run; they "
                f"would be replaced. Commit them (`git commit {params_file}`), stash them (`git stash`), or "
                f"restore HEAD's version (`git checkout {params_file}`)")
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
            text = draft.read_text(encoding="utf-8")
            try:
                params = load_params(draft)  # every section validates itself; a bad value stops here
            except ParamsError as error:
                raise ParamsError(str(error).replace(str(draft), f"{params_file} (HEAD + {' '.join(overrides)})")) \
                    from None
            check_run_overrides(root, base, text, list(overrides))  # valid, but may this run set it?
            if text != current:
                atomic_copy(draft, target)
        atomic_write_json(root / STATE, {
            "name": name, "sha256": _digest(text), "overrides": list(overrides), "status": "running",
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "pid": os.getpid()})
    logger.info("experiment %s: %s = HEAD%s", name, params_file,
                " + " + " ".join(overrides) if overrides else " (no overrides)")
    return params


def end(root: Path, name: str) -> bool:
    """Release the workspace held by run NAME (whatever its outcome). Another run's hold is left
    alone, so a late or repeated `end` never frees the workspace under a newer run."""
    with _dvc_lock(root):
        state = read_state(root)
        if state.get("name") != name or state.get("status") != "running":
            logger.info("experiment %s: nothing to end (the workspace is %s)", name,
                        f"held by {_holder(state)}" if state.get("status") == "running" else "free")
            return False
        atomic_write_json(root / STATE, {**state, "status": "ended",
                                         "ended_at": datetime.now(UTC).isoformat(timespec="seconds")})
    logger.info("experiment %s ended: the workspace is free for the next run", name)
    return True


def save(root: Path, name: str, message: str | None = None, include: list[str] | None = None,
         targets: list[str] | None = None) -> str:
    """`dvc exp save` of the workspace as NAME (replacing an experiment of that name: a retried task);
    `include`: more files (relative to root) to record with it though git does not track them;
    `targets`: the stages whose outputs are recorded (default all: a run of the whole pipeline; a
    sweep trial runs up to `train`, and DVC refuses to save the outputs of stages that did not run)."""
    from dvc.repo import Repo

    state = read_state(root)
    target = root / "params.yaml"
    if state.get("name") == name and target.exists() and _digest(target.read_text(encoding="utf-8")) != \
            state.get("sha256"):
        raise ExperimentError(
            f"{target} is not what `llmops experiment start --name {name}` wrote: something else in {root} (a "
            f"`dvc exp run`, an edit) changed it during the run, so its outputs may not match its params; not "
            f"saved as {name}. See `git diff params.yaml`, then re-run")

    with Repo(str(root)) as repo:
        # cache: false outputs (metrics, plots, records) are plain files git may not track yet
        untracked = sorted({str(Path(out.fs_path).relative_to(root.resolve())) for stage in repo.index.stages
                            for out in stage.outs if not out.use_cache and Path(out.fs_path).exists()})
    beside = Path(sys.executable).parent / "dvc"  # the dvc of this environment, whatever PATH says
    command = [str(beside) if beside.exists() else "dvc", "exp", "save", "--force", "--name", name]
    for path in [*untracked, *(p for p in include or [] if (root / p).exists() and p not in untracked)]:
        if _git(root, "ls-files", "--error-unmatch", path).returncode != 0:
            command += ["--include-untracked", path]
    if message:
        command += ["--message", message]
    command += list(targets or [])
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExperimentError(f"`{' '.join(command)}` failed in {root}: {result.stderr.strip()[-600:]}")
    ref = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else name
    logger.info("experiment %s saved: %s (see `dvc exp show`)", name, ref)
    return ref


def repair_lockfile(root: Path) -> str | None:
    """A `dvc repro` killed while it wrote dvc.lock leaves it empty or cut short (DVC rewrites the
    file in place), and every later `dvc repro` then fails on it. A killed run's entries are worth
    nothing (the run is done again): put back HEAD's dvc.lock, or none if HEAD has none. Returns
    what was wrong, or None when dvc.lock was sound."""
    path = root / "dvc.lock"
    if not path.exists():
        return None
    from dvc.dvcfile import Lockfile
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            Lockfile(repo, str(path)).load()
        return None
    except Exception as error:  # noqa: BLE001 - DVC's YAML and schema errors have no common base here
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
    shown = _git(root, "show", "HEAD:dvc.lock")
    if shown.returncode == 0:
        atomic_write_text(path, shown.stdout)
    else:
        path.unlink()
    logger.warning("dvc.lock was damaged by a killed run (%s): %s", problem,
                   "restored HEAD's" if shown.returncode == 0 else "removed (HEAD has none)")
    return problem
