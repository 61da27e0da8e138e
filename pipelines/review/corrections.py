"""Production answers become training data: the work behind `llmops review corrections` and
`llmops review export` (docs/review.md, "Production answers become training data").

corrections (`request`): the windows `monitor` flagged (reports under monitor.reports_dir:
history.jsonl, and each window's decision.json) are read back: a drifted window, a window whose
mean feedback score failed `monitor.operational.min_feedback_score`, a window whose error rate
failed `max_error_rate`. From the inference log of each such window the requests that matter
become correction tasks in the Label Studio project `review.corrections_project`: in a drifted
window every prompt, in a feedback-failed window the answers scored below the minimum, in an
error-failed window the failed requests. A prompt the training data (`paths.ingested`) already
answers is not sent (its answer is labelled; a second one would be a conflicting answer that
`validate` blocks in the test split), and one prompt is sent once. Sending is idempotent: a
request id already sent (a task in the project, a row of the dataset, or a line of the ledger
`review.data_dir`/corrections-sent.jsonl, which also remembers tasks deleted in the tool) is not
sent again.

export: every task's annotations are read. `Approve answer` keeps the model's answer,
`Corrected` takes the reviewer's correction (the model's answer is kept as `rejected`, the other
side of a preference pair), `Reject prompt` drops the prompt. What blocks (nothing is written,
the message lists every blocked task by id): a `Corrected` with an empty correction, an approved
empty answer, no verdict, PII in the prompt, the answer or the correction (pipelines/data/pii.py).
What is reported and skipped: tasks nobody annotated yet, reviewers who disagree on the verdict
(no row until they agree or a manager marks one annotation as ground truth; an earlier row of that
task is withdrawn), tasks deleted in the tool (their rows are withdrawn). When reviewers agree on
the verdict, the latest annotation's text is taken; a reviewer who edits an annotation replaces it.
The dataset `paths.feedback_dir`/corrections.parquet is merged by request id (re-running adds
nothing twice; an updated annotation replaces its row), written to a temporary file and renamed,
and `dvc add`ed (a new data version: commit the .dvc file). Its columns: COLUMNS below.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config.params import OperationalParams, Params
from pipelines.config.settings import inference_log_url
from pipelines.data.pii import find_pii
from pipelines.data.sources import PROVENANCE, REVIEW_SOURCE
from pipelines.data.validation import prompt_key
from pipelines.errors import DataError
from pipelines.io import atomic_write_text, read_parquet, write_parquet
from pipelines.monitoring.monitor import Window, parse_time, read_history
from pipelines.review.labelstudio import CORRECTION_CONFIG, annotation_reviewer, annotation_values, connect
from pipelines.serving.inference_log import read_records

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

CORRECTIONS_FILE = "corrections.parquet"  # under paths.feedback_dir
LEDGER_FILE = "corrections-sent.jsonl"  # under review.data_dir, beside Label Studio's database
DOMAIN = "production"
# The labeling config's names (pipelines/review/labelstudio.py CORRECTION_CONFIG)
VERDICT, CORRECTION = "verdict", "correction"
APPROVE, CORRECTED, REJECT = "Approve answer", "Corrected", "Reject prompt"
# Why a request was sent (task meta `flags`)
DRIFT, LOW_FEEDBACK, ERROR = "drift", "low_feedback", "error"
PROJECT_DESCRIPTION = ("Production answers monitoring flagged. Approve the answer, write a corrected one, or reject "
                       "the prompt (not worth training on). Never type personal data.")
# The exported dataset: an `ingest` source (kind: review) reads these columns.
COLUMNS = ["id", "prompt", "response", "rejected", "source", "domain", *PROVENANCE]


# --- which windows and requests -------------------------------------------------------------


@dataclass(frozen=True)
class FlaggedWindow:
    window: Window
    drifted: bool
    low_feedback: bool  # the window's mean feedback score failed monitor.operational.min_feedback_score
    errors: bool  # its error rate failed monitor.operational.max_error_rate
    model_version: str | None = None


def flagged_windows(reports_dir: Path) -> list[FlaggedWindow]:
    """The windows `monitor` flagged, oldest first: from history.jsonl, with each window's
    decision.json for the operational checks that failed and the model version."""
    windows = []
    for entry in read_history(reports_dir / "history.jsonl"):
        try:
            window = Window(datetime.fromisoformat(entry["window"]["start"]),
                            datetime.fromisoformat(entry["window"]["end"]))
        except (KeyError, TypeError, ValueError):
            logger.warning("review corrections: skipped a history line without a window: %s", entry)
            continue
        decision_path = reports_dir / window.name / "decision.json"
        decision: dict[str, Any] = {}
        if decision_path.exists():
            try:
                decision = json.loads(decision_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                logger.warning("review corrections: %s is not JSON; only the drift verdict is used", decision_path)
        failed = (decision.get("operational") or {}).get("failed_checks") or []
        flagged = FlaggedWindow(window, drifted=bool(entry.get("drifted")),
                                low_feedback=any("feedback_score" in name for name in failed),
                                errors=any("is_error" in name for name in failed),
                                model_version=decision.get("model_version"))
        if flagged.drifted or flagged.low_feedback or flagged.errors:
            windows.append(flagged)
    return windows


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%MZ")


def describe_feedback(score: Any, comment: Any) -> str:
    """The user's feedback as a reviewer reads it: '0 (thumbs down): wrong', or ''."""
    import math

    parts = []
    if isinstance(score, int | float) and not math.isnan(score):
        thumbs = {1.0: " (thumbs up)", 0.0: " (thumbs down)"}.get(float(score), "")
        parts.append(f"{score:g}{thumbs}")
    if isinstance(comment, str) and comment.strip():
        parts.append(comment.strip())
    return ": ".join(parts)


def select_requests(records: pd.DataFrame, flagged: FlaggedWindow, operational: OperationalParams,
                    known_prompts: set[str]) -> list[dict[str, Any]]:
    """Correction tasks (Label Studio's import format: data + meta) for the requests of one
    flagged window that matter, one per prompt, in the log's order. `known_prompts` (prompt_key)
    are prompts the training data answers already: not sent."""
    import math

    tasks: dict[str, dict[str, Any]] = {}
    window_end = flagged.window.end.isoformat()
    for row in records.itertuples(index=False):
        prompt = row.prompt
        if not isinstance(prompt, str) or not prompt.strip():
            continue
        score = row.feedback_score
        has_score = isinstance(score, int | float) and not math.isnan(score)
        flags, reasons = [], []
        if flagged.drifted:
            flags.append(DRIFT)
            reasons.append(f"drifted window {_stamp(flagged.window.end)}")
        if flagged.low_feedback and has_score and score < operational.min_feedback_score:
            flags.append(LOW_FEEDBACK)
            reasons.append(f"feedback {describe_feedback(score, None)}")
        if flagged.errors and int(row.status) >= 400:
            flags.append(ERROR)
            error = (row.error or "").strip().splitlines()[0][:200] if isinstance(row.error, str) else ""
            reasons.append(f"error: HTTP {int(row.status)}" + (f" ({error})" if error else ""))
        key = prompt_key(prompt)
        if not flags or key in known_prompts:
            continue
        task = {
            "data": {"prompt": prompt, "answer": row.output if isinstance(row.output, str) else "",
                     "flags": "; ".join(reasons), "feedback": describe_feedback(score, row.feedback_comment)},
            "meta": {"request_id": str(row.request_id), "window": window_end,
                     "model_version": str(row.model_version), "flags": flags},
        }
        # the same prompt asked again in the window: one task, the request with the most reasons
        if key not in tasks or len(flags) > len(tasks[key]["meta"]["flags"]):
            tasks[key] = task
    return list(tasks.values())


# --- the ledger of what was sent ----------------------------------------------------------------


def read_ledger(path: Path, project: int) -> list[dict[str, Any]]:
    """Lines of the ledger for `project` ({project, task_id, request_id, prompt_key})."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("review: skipped a corrupt line in %s", path)
            continue
        if isinstance(entry, dict) and entry.get("project") == project:
            lines.append(entry)
    return lines


def append_ledger(path: Path, entries: list[dict[str, Any]]) -> None:
    if not entries:
        return
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries))


def read_dataset(path: Path) -> pd.DataFrame | None:
    return read_parquet(path, produced_by="review export")[COLUMNS] if path.exists() else None


def _known_prompts(params: Params) -> set[str]:
    path = params.paths.ingested
    if not path.exists():
        logger.warning("review corrections: %s is missing (run `dvc pull` or `llmops ingest`): prompts the training "
                       "data answers already cannot be left out", path)
        return set()
    return {prompt_key(p) for p in read_parquet(path, produced_by="ingest")["prompt"]}


def request(params: Params, end: str | None = None, **_: Any) -> dict[str, Any]:
    """Send correction tasks for every window monitor flagged (or only the one ending at `end`)."""
    windows = flagged_windows(params.monitor.reports_dir)
    if end is not None:
        when = parse_time(end)
        windows = [w for w in windows if w.window.end == when]
    if not windows:
        message = (f"no window flagged by monitor in {params.monitor.reports_dir / 'history.jsonl'}"
                   + (f" ending at {end}" if end else "") + ": no correction tasks to send")
        logger.info("review corrections: %s", message)
        print(message)
        return {"windows": 0, "created": 0}
    with connect(params) as client:
        client.check()
        project = client.ensure_project(params.review.corrections_project, CORRECTION_CONFIG,
                                        description=PROJECT_DESCRIPTION)
        new, existing = _send(params, client, project, windows)
        project_url = f"{client.url}/projects/{project}"
    logger.info("review corrections: %d new task(s) from %d flagged window(s), %d in the project",
                len(new), len(windows), len(existing) + len(new))
    print(f"{len(new)} correction task(s) created ({len(existing) + len(new)} in all): {project_url}")
    return {"windows": len(windows), "created": len(new), "tasks": len(existing) + len(new),
            "project_id": project, "url": project_url}


def _send(params: Params, client: Any, project: int,
          windows: list[FlaggedWindow]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(tasks sent now, tasks the project held before)."""
    existing = client.tasks(project)
    ledger_path = params.review.data_dir / LEDGER_FILE
    ledger = read_ledger(ledger_path, project)
    dataset = read_dataset(params.paths.feedback_dir / CORRECTIONS_FILE)
    sent_ids = {str((t.get("meta") or {}).get("request_id")) for t in existing} | {e["request_id"] for e in ledger}
    sent_prompts = {prompt_key((t.get("data") or {}).get("prompt")) for t in existing}
    sent_prompts |= {e.get("prompt_key") for e in ledger}
    if dataset is not None:
        sent_ids |= set(dataset["request_id"].astype(str))
        sent_prompts |= {prompt_key(p) for p in dataset["prompt"]}
    known = _known_prompts(params)
    url = inference_log_url(params.inference_log).value
    new: list[dict[str, Any]] = []
    for flagged in windows:
        records = read_records(url, flagged.window.start, flagged.window.end)
        for task in select_requests(records, flagged, params.monitor.operational, known):
            key = prompt_key(task["data"]["prompt"])
            if task["meta"]["request_id"] in sent_ids or key in sent_prompts:
                continue
            sent_ids.add(task["meta"]["request_id"])
            sent_prompts.add(key)
            new.append(task)
    if new:
        task_ids = client.import_tasks(project, new)
        append_ledger(ledger_path, [{"project": project, "request_id": t["meta"]["request_id"], "task_id": task_id,
                                     "prompt_key": prompt_key(t["data"]["prompt"])}
                                    for t, task_id in zip(new, task_ids)])
    return new, existing


# --- export: annotations -> rows --------------------------------------------------------------




def _when(annotation: dict[str, Any]) -> str:
    return str(annotation.get("updated_at") or annotation.get("created_at") or "")


@dataclass
class Export:
    """What the annotations say: rows to write, and what was blocked, skipped or left out."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected_prompts: list[str] = field(default_factory=list)  # request ids a reviewer rejected
    blocked: list[str] = field(default_factory=list)  # one line per task: its id and what to fix
    contested: list[str] = field(default_factory=list)  # request ids whose reviewers disagree
    contested_lines: list[str] = field(default_factory=list)
    pending: int = 0  # tasks nobody annotated yet
    foreign: int = 0  # tasks not made by `llmops review corrections` (no request id)
    tasks: set[int] = field(default_factory=set)  # ids of the tasks the tool holds


def _chosen(task_id: int, annotations: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """(the annotation that decides, why there is none): each reviewer's latest annotation;
    a ground-truth one wins; otherwise the reviewers must agree on the verdict, and the latest
    annotation's text is taken."""
    latest: dict[str, dict[str, Any]] = {}
    for annotation in sorted(annotations, key=_when):
        latest[annotation_reviewer(annotation)] = annotation
    truth = [a for a in latest.values() if a.get("ground_truth")]
    if truth:
        return max(truth, key=_when), None
    verdicts = {reviewer: (annotation_values(a, VERDICT, "choices") or ["(none)"])[0] for reviewer, a in latest.items()}
    if len(set(verdicts.values())) > 1:
        shown = ", ".join(f"{reviewer}: {verdict}" for reviewer, verdict in sorted(verdicts.items()))
        return None, f"task {task_id}: reviewers disagree ({shown})"
    return max(latest.values(), key=_when), None


def read_annotations(tasks: list[dict[str, Any]]) -> Export:
    """Tasks in the shape of Label Studio's JSON export (each with `data`, `meta` and
    `annotations`) -> rows of the dataset, and the tasks that block or are skipped."""
    out = Export()
    for task in tasks:
        task_id = int(task["id"])
        out.tasks.add(task_id)
        meta, data = task.get("meta") or {}, task.get("data") or {}
        request_id = meta.get("request_id")
        if not request_id:
            out.foreign += 1
            continue
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            out.pending += 1
            continue
        annotation, why = _chosen(task_id, annotations)
        if annotation is None:
            out.contested.append(str(request_id))
            out.contested_lines.append(f"{why} (request {request_id})")
            continue
        where = f"task {task_id} (request {request_id})"
        verdict = (annotation_values(annotation, VERDICT, "choices") or [""])[0]
        prompt = str(data.get("prompt") or "")
        answer = str(data.get("answer") or "").strip()
        correction = "\n".join(t.strip() for t in annotation_values(annotation, CORRECTION, "text")).strip()
        if verdict == REJECT:
            out.rejected_prompts.append(str(request_id))
            continue
        if verdict == APPROVE:
            response, rejected = answer, None
            if not response:
                out.blocked.append(f"{where}: the approved answer is empty; write a correction (Corrected) or "
                                   "choose Reject prompt")
                continue
        elif verdict == CORRECTED:
            if not correction:
                out.blocked.append(f"{where}: the correction is empty; write the answer, or choose Approve answer "
                                   "or Reject prompt")
                continue
            # a "correction" that is the answer itself approves it: no preference pair
            response, rejected = correction, (answer or None) if correction != answer else None
        else:
            out.blocked.append(f"{where}: no verdict ({' / '.join((APPROVE, CORRECTED, REJECT))}) was chosen"
                               + (f" (got {verdict!r})" if verdict else ""))
            continue
        pii = {name: find_pii(text) for name, text in
               (("prompt", prompt), ("answer", response if verdict == APPROVE else answer),
                ("correction", correction if verdict == CORRECTED else ""))}
        found = [f"{name}: {', '.join(kinds)}" for name, kinds in pii.items() if kinds]
        if found:
            out.blocked.append(f"{where}: personal data or a secret in the {'; '.join(found)}; remove it in the "
                               "correction (or choose Reject prompt)")
            continue
        out.rows.append({
            "id": f"{REVIEW_SOURCE}-{request_id}", "prompt": prompt, "response": response, "rejected": rejected,
            "source": REVIEW_SOURCE, "domain": DOMAIN, "request_id": str(request_id), "task_id": task_id,
            "reviewer": annotation_reviewer(annotation), "reviewed_at": _when(annotation),
            "window": str(meta["window"]) if meta.get("window") else None,
        })
    return out


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS).astype(object)
    frame["task_id"] = frame["task_id"].astype("int64")
    return frame.sort_values("request_id", kind="stable").reset_index(drop=True)


def merge(existing: pd.DataFrame | None, result: Export, deleted_requests: set[str]) -> tuple[pd.DataFrame, dict]:
    """The dataset after this export, merged by request id: a row of this export replaces the
    row of its request; rows whose task was rejected, contested or deleted since are withdrawn;
    other rows stay. Returns (frame, counts of added/updated/withdrawn/unchanged)."""
    old = {str(r["request_id"]): r for r in (existing.to_dict("records") if existing is not None else [])}
    new = {str(r["request_id"]): r for r in result.rows}
    withdraw = (set(result.rejected_prompts) | set(result.contested) | deleted_requests) - set(new)
    merged = {key: row for key, row in old.items() if key not in withdraw}
    counts = {"added": 0, "updated": 0, "unchanged": 0,
              "withdrawn": sum(1 for key in old if key in withdraw)}
    for key, row in new.items():
        if key not in old:
            counts["added"] += 1
        elif _same(old[key], row):
            counts["unchanged"] += 1
        else:
            counts["updated"] += 1
        merged[key] = row
    return to_frame(list(merged.values())), counts


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def clean(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and v != v) else v

    return all(clean(a.get(c)) == clean(b.get(c)) for c in COLUMNS)


def dvc_add(path: Path) -> str | None:
    """`dvc add` the file when it lies in a DVC repository; returns the .dvc file (None outside one)."""
    path = path.resolve()
    root = next((p for p in path.parents if (p / ".dvc").is_dir()), None)
    if root is None:
        logger.info("review export: %s is not in a DVC repository; not versioned with dvc add", path)
        return None
    done = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(path.relative_to(root))], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise DataError(f"review export: {path} is written but `dvc add` failed "
                        f"({detail[-1] if detail else f'exit {done.returncode}'}); run `dvc add {path}` yourself")
    return str(path.relative_to(root)) + ".dvc"


def export(params: Params, **_: Any) -> dict[str, Any]:
    """Approved and corrected answers of the corrections project -> paths.feedback_dir/corrections.parquet."""
    with connect(params) as client:
        client.check()
        project = client.ensure_project(params.review.corrections_project, CORRECTION_CONFIG,
                                        description=PROJECT_DESCRIPTION)
        # every task, annotated or not: one missing from the export was deleted in the tool
        result = read_annotations(client.export(project, "JSON", all_tasks=True))
        project_url = f"{client.url}/projects/{project}"
    if result.blocked:
        raise DataError(f"review export: {len(result.blocked)} task(s) blocked, nothing exported: "
                        + "; ".join(result.blocked) + f". Fix them in Label Studio ({project_url}) and run "
                        "`llmops review export` again")
    ledger = read_ledger(params.review.data_dir / LEDGER_FILE, project)
    gone = sorted({(int(e["task_id"]), str(e["request_id"])) for e in ledger
                   if e.get("task_id") is not None and int(e["task_id"]) not in result.tasks})
    path = params.paths.feedback_dir / CORRECTIONS_FILE
    existing = read_dataset(path)
    frame, counts = merge(existing, result, {request_id for _, request_id in gone})
    if gone:
        logger.warning("review export: %d task(s) were deleted in Label Studio, not exported (an earlier row "
                       "is withdrawn): %s", len(gone), ", ".join(f"task {t} (request {r})" for t, r in gone))
    for line in result.contested_lines:
        logger.warning("review export: %s: not exported until they agree or one annotation is marked ground "
                       "truth", line)
    changed = bool(counts["added"] or counts["updated"] or counts["withdrawn"])
    if changed:
        write_parquet(frame, path)
    dvc_file = dvc_add(path) if path.exists() else None
    summary = {"path": str(path), "rows": len(frame), **counts, "pending": result.pending,
               "rejected": len(result.rejected_prompts), "contested": len(result.contested),
               "deleted": [t for t, _ in gone], "dvc_file": dvc_file, "changed": changed}
    logger.info("review export: %s", json.dumps(summary))
    print(f"{path}: {len(frame)} row(s); {counts['added']} added, {counts['updated']} updated, "
          f"{counts['withdrawn']} withdrawn; {result.pending} task(s) not reviewed yet, "
          f"{len(result.rejected_prompts)} prompt(s) rejected, {len(result.contested)} contested, "
          f"{len(gone)} deleted in the tool")
    if changed and dvc_file:
        print(f"a new data version: git add {dvc_file} {Path(dvc_file).parent / '.gitignore'} && "
              f"git commit -m 'review export: {len(frame)} reviewed rows' && dvc push")
    return summary
