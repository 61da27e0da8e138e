"""`llmops review corrections` / `export`: flagged monitor windows -> correction tasks, and
annotations in the shape of Label Studio's JSON export -> data/feedback/corrections.parquet.

The tool itself is replaced by a fake client here (tests/integration/test_review_corrections.py
runs the real one); the records follow Label Studio 1.23's JSON export (label_studio/data_export:
tasks serialised with their annotations, `completed_by` a user id, `result` a list of regions).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipelines.config.params import OperationalParams, parse_params
from pipelines.errors import DataError
from pipelines.monitoring.monitor import Window
from pipelines.review import corrections
from pipelines.review.corrections import (
    APPROVE,
    COLUMNS,
    CORRECTED,
    REJECT,
    FlaggedWindow,
    flagged_windows,
    merge,
    read_annotations,
    select_requests,
)
from pipelines.serving.inference_log import Feedback, InferenceLog, InferenceRecord, read_records

END = datetime(2026, 12, 6, tzinfo=UTC)
WINDOW = Window.ending(END, 24)


# --- records in the shape of Label Studio's JSON export ------------------------------------------

def annotation(verdict: str | None, correction: str = "", *, reviewer: int = 1, at: str = "2026-12-06T10:00:00Z",
               cancelled: bool = False, ground_truth: bool = False, annotation_id: int = 1) -> dict[str, Any]:
    result = []
    if verdict is not None:
        result.append({"value": {"choices": [verdict]}, "id": "v1", "from_name": "verdict", "to_name": "answer",
                       "type": "choices", "origin": "manual"})
    if correction:
        result.append({"value": {"text": [correction]}, "id": "c1", "from_name": "correction", "to_name": "answer",
                       "type": "textarea", "origin": "manual"})
    return {"id": annotation_id, "completed_by": reviewer, "result": result, "was_cancelled": cancelled,
            "ground_truth": ground_truth, "created_at": at, "updated_at": at, "lead_time": 4.2, "task": 0,
            "project": 1, "updated_by": reviewer, "parent_prediction": None, "parent_annotation": None}


def task(task_id: int, *annotations: dict[str, Any], prompt: str | None = None, answer: str = "A model answer.",
         request_id: str | None = None) -> dict[str, Any]:
    request_id = request_id or f"req-{task_id}"
    return {"id": task_id, "annotations": list(annotations), "drafts": [], "predictions": [], "file_upload": None,
            "data": {"prompt": prompt or f"What does the term widget{task_id} mean?", "answer": answer,
                     "flags": "drifted window 2026-12-06T00:00Z", "feedback": ""},
            "meta": {"request_id": request_id, "window": END.isoformat(), "model_version": "3",
                     "flags": ["drift"]},
            "created_at": "2026-12-06T09:00:00Z", "updated_at": "2026-12-06T10:00:00Z", "inner_id": task_id,
            "total_annotations": len(annotations), "cancelled_annotations": 0, "project": 1}


# --- export: annotations -> rows ----------------------------------------------------------------

def test_approve_correct_and_reject():
    out = read_annotations([
        task(1, annotation(APPROVE)),
        task(2, annotation(CORRECTED, "  A small gadget.  ", reviewer=2, at="2026-12-06T11:00:00Z")),
        task(3, annotation(REJECT)),
        task(4),  # nobody annotated it yet
        task(5, annotation(APPROVE, cancelled=True)),  # skipped: still pending
    ])
    assert out.blocked == [] and out.pending == 2 and out.rejected_prompts == ["req-3"]
    approved, corrected = out.rows
    assert approved["response"] == "A model answer." and approved["rejected"] is None
    assert corrected["response"] == "A small gadget." and corrected["rejected"] == "A model answer."
    assert corrected == {"id": "review-req-2", "prompt": "What does the term widget2 mean?",
                         "response": "A small gadget.", "rejected": "A model answer.", "source": "review",
                         "domain": "production", "request_id": "req-2", "task_id": 2, "reviewer": "2",
                         "reviewed_at": "2026-12-06T11:00:00Z", "window": END.isoformat()}
    assert set(corrected) == set(COLUMNS)


def test_a_correction_equal_to_the_answer_is_an_approval():
    (row,) = read_annotations([task(1, annotation(CORRECTED, "A model answer."))]).rows
    assert row["response"] == "A model answer." and row["rejected"] is None


@pytest.mark.parametrize(("annotated", "answer", "message"), [
    (annotation(CORRECTED, ""), "A model answer.", "task 7 (request req-7): the correction is empty"),
    (annotation(CORRECTED, "   "), "A model answer.", "task 7 (request req-7): the correction is empty"),
    (annotation(APPROVE), "", "task 7 (request req-7): the approved answer is empty"),
    (annotation(None), "A model answer.", "task 7 (request req-7): no verdict"),
    (annotation(CORRECTED, "Mail jane.doe@example.com for it."), "A model answer.",
     "task 7 (request req-7): personal data or a secret in the correction: email"),
    (annotation(APPROVE), "Call 555-123-4567.", "task 7 (request req-7): personal data or a secret in the answer: "
                                                "phone"),
])
def test_what_blocks_names_the_task(annotated, answer, message):
    out = read_annotations([task(7, annotated, answer=answer), task(8, annotation(APPROVE))])
    assert len(out.blocked) == 1 and out.blocked[0].startswith(message)
    assert [row["task_id"] for row in out.rows] == [8]


def test_reviewers_who_disagree_are_skipped_and_a_ground_truth_decides():
    disagree = task(1, annotation(APPROVE, reviewer=1), annotation(REJECT, reviewer=2, annotation_id=2))
    out = read_annotations([disagree])
    assert out.rows == [] and out.contested == ["req-1"] and out.blocked == []
    assert "task 1: reviewers disagree (1: Approve answer, 2: Reject prompt)" in out.contested_lines[0]
    settled = task(1, annotation(APPROVE, reviewer=1),
                   annotation(CORRECTED, "Better.", reviewer=2, ground_truth=True, annotation_id=2))
    (row,) = read_annotations([settled]).rows
    assert row["response"] == "Better." and row["reviewer"] == "2"


def test_agreeing_reviewers_give_the_latest_text_and_a_reviewer_counts_once():
    agree = task(1, annotation(CORRECTED, "First.", reviewer=1, at="2026-12-06T10:00:00Z"),
                 annotation(CORRECTED, "Second.", reviewer=2, at="2026-12-06T12:00:00Z", annotation_id=2))
    (row,) = read_annotations([agree]).rows
    assert row["response"] == "Second." and row["reviewer"] == "2" and row["reviewed_at"] == "2026-12-06T12:00:00Z"
    # one reviewer who changed their mind: their latest annotation is their verdict, no disagreement
    changed = task(1, annotation(REJECT, reviewer=1, at="2026-12-06T10:00:00Z"),
                   annotation(APPROVE, reviewer=1, at="2026-12-06T12:00:00Z", annotation_id=2))
    out = read_annotations([changed])
    assert out.contested == [] and [r["response"] for r in out.rows] == ["A model answer."]


def test_a_reviewer_shown_with_details_is_named_by_email():
    record = annotation(APPROVE)
    record["completed_by"] = {"id": 4, "email": "ana@example.org", "first_name": "", "last_name": ""}
    (row,) = read_annotations([task(1, record)]).rows
    assert row["reviewer"] == "ana@example.org"


def test_tasks_not_made_by_the_command_are_left_alone():
    other = task(1, annotation(APPROVE))
    other["meta"] = {}
    out = read_annotations([other])
    assert out.rows == [] and out.foreign == 1


def test_merge_is_idempotent_and_an_updated_annotation_replaces_its_row():
    first = read_annotations([task(1, annotation(APPROVE)), task(2, annotation(CORRECTED, "Fixed."))])
    frame, counts = merge(None, first, set())
    assert counts == {"added": 2, "updated": 0, "unchanged": 0, "withdrawn": 0}
    again, counts = merge(frame, first, set())
    assert counts == {"added": 0, "updated": 0, "unchanged": 2, "withdrawn": 0}
    pd.testing.assert_frame_equal(again, frame)
    later = read_annotations([task(1, annotation(CORRECTED, "Fixed again.", at="2026-12-07T09:00:00Z")),
                              task(2, annotation(REJECT))])
    frame, counts = merge(frame, later, set())
    assert counts == {"added": 0, "updated": 1, "unchanged": 0, "withdrawn": 1}
    assert frame.to_dict("records")[0]["response"] == "Fixed again." and len(frame) == 1


# --- the whole export against a fake tool -----------------------------------------------------------

class FakeTool:
    """What corrections.py asks of pipelines.review.labelstudio's client."""

    url = "http://127.0.0.1:1"

    def __init__(self, tasks: list[dict[str, Any]] | None = None) -> None:
        self.items = tasks or []
        self.imported: list[dict[str, Any]] = []

    def __enter__(self) -> FakeTool:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def check(self) -> dict[str, Any]:
        return {"version": "1.23.2", "user": "admin@llmops.local", "id": 1}

    def ensure_project(self, title: str, config: str, description: str = "") -> int:
        return 1

    def tasks(self, project: int) -> list[dict[str, Any]]:
        return list(self.items)

    def export(self, project: int, export_type: str = "JSON", *, all_tasks: bool = False) -> list[dict[str, Any]]:
        assert export_type == "JSON" and all_tasks  # unannotated tasks too: a missing one was deleted
        return list(self.items)

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> list[int]:
        start = max([t["id"] for t in self.items], default=0) + 1
        ids = list(range(start, start + len(tasks)))
        self.items += [{**item, "id": number, "annotations": []} for number, item in zip(ids, tasks)]
        self.imported += tasks
        return ids


@pytest.fixture
def params(tmp_path):
    return parse_params({
        "paths": {"feedback_dir": str(tmp_path / "feedback"), "ingested": str(tmp_path / "pairs.parquet")},
        "ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]},
        "review": {"data_dir": str(tmp_path / "labelstudio")},
        "inference_log": {"url": f"sqlite:///{tmp_path / 'log' / 'inference.db'}",
                          "spool_dir": str(tmp_path / "log" / "spool")},
        "monitor": {"reports_dir": str(tmp_path / "reports")},
    })


def test_export_writes_once_blocks_whole_and_withdraws_deleted_tasks(params, monkeypatch, capsys):
    tool = FakeTool([task(1, annotation(APPROVE)), task(2, annotation(CORRECTED, "Fixed.")), task(3)])
    monkeypatch.setattr(corrections, "connect", lambda _params: tool)
    corrections.append_ledger(params.review.data_dir / corrections.LEDGER_FILE,
                              [{"project": 1, "task_id": t["id"], "request_id": t["meta"]["request_id"],
                                "prompt_key": ""} for t in tool.items])
    path = params.paths.feedback_dir / corrections.CORRECTIONS_FILE
    summary = corrections.export(params)
    assert summary["rows"] == 2 and summary["added"] == 2 and summary["pending"] == 1 and summary["changed"]
    assert summary["dvc_file"] is None  # tmp_path is not a DVC repository
    written = pd.read_parquet(path)
    assert list(written.columns) == COLUMNS and list(written["request_id"]) == ["req-1", "req-2"]
    assert written["rejected"].tolist() == [None, "A model answer."]
    stamp = path.stat().st_mtime_ns

    # the same export twice: nothing added, the file not even rewritten
    summary = corrections.export(params)
    assert not summary["changed"] and summary["unchanged"] == 2 and path.stat().st_mtime_ns == stamp

    # a PII correction blocks the export with its task id; the dataset stays as it was
    tool.items[2] = task(3, annotation(CORRECTED, "Ask admin@example.com"))
    with pytest.raises(DataError, match=r"1 task\(s\) blocked, nothing exported: task 3 \(request req-3\): "
                                        r"personal data"):
        corrections.export(params)
    assert path.stat().st_mtime_ns == stamp

    # a task deleted in the tool: its row is withdrawn, and the export says so
    tool.items = [t for t in tool.items if t["id"] not in (1, 3)]
    summary = corrections.export(params)
    assert summary["deleted"] == [1, 3] and summary["withdrawn"] == 1
    assert list(pd.read_parquet(path)["request_id"]) == ["req-2"]
    assert "2 deleted in the tool" in capsys.readouterr().out


def test_export_of_nothing_reviewed_writes_no_file(params, monkeypatch):
    monkeypatch.setattr(corrections, "connect", lambda _params: FakeTool([task(1)]))
    summary = corrections.export(params)
    assert summary["rows"] == 0 and not summary["changed"]
    assert not (params.paths.feedback_dir / corrections.CORRECTIONS_FILE).exists()


# --- which windows and requests -----------------------------------------------------------------

def write_monitor_outputs(reports: Path, windows: list[tuple[datetime, bool, list[str]]]) -> None:
    """history.jsonl and <window>/decision.json as pipelines/monitoring/monitor.py writes them."""
    reports.mkdir(parents=True, exist_ok=True)
    lines = []
    for end, drifted, failed in windows:
        window = Window.ending(end, 24)
        (reports / window.name).mkdir(exist_ok=True)
        (reports / window.name / "decision.json").write_text(json.dumps({
            "window": window.as_dict(), "model_version": "3", "rows": 40, "status": "ok",
            "drift": {"detected": drifted, "drifted_signals": []},
            "operational": {"p95_latency_ms": 10.0, "error_rate": 0.0, "failed_checks": failed}}))
        lines.append(json.dumps({"window": window.as_dict(), "status": "ok", "drifted": drifted,
                                 "retrain_requested": False, "rows": 40}))
    (reports / "history.jsonl").write_text("\n".join(lines) + "\n")


def test_flagged_windows_are_read_from_the_monitor_reports(tmp_path):
    write_monitor_outputs(tmp_path, [
        (END - timedelta(days=2), False, []),
        (END - timedelta(days=1), False, ["Mean value of feedback_score: Greater or equal 0.5",
                                          "Mean value of is_error: Less or equal 0.05"]),
        (END, True, []),
    ])
    flagged = flagged_windows(tmp_path)
    assert [(f.window.end, f.drifted, f.low_feedback, f.errors) for f in flagged] == [
        (END - timedelta(days=1), False, True, True), (END, True, False, False)]
    assert flagged[0].model_version == "3"
    assert flagged_windows(tmp_path / "nothing-yet") == []


def records(rows: list[dict[str, Any]]) -> pd.DataFrame:
    base = {"status": 200, "error": None, "feedback_score": float("nan"), "feedback_comment": None,
            "model_version": "3", "output": "An answer."}
    return pd.DataFrame([{**base, "request_id": f"req-{i}", **row} for i, row in enumerate(rows)])


def test_a_drifted_window_sends_each_new_prompt_once():
    frame = records([{"prompt": "What is a daemon?"}, {"prompt": "What is  a daemon?"},
                     {"prompt": "Define the word cat."}, {"prompt": " "}])
    tasks = select_requests(frame, FlaggedWindow(WINDOW, True, False, False), OperationalParams(),
                            known_prompts={"Define the word cat."})
    assert [t["data"]["prompt"] for t in tasks] == ["What is a daemon?"]
    (sent,) = tasks
    assert sent["data"] == {"prompt": "What is a daemon?", "answer": "An answer.",
                            "flags": "drifted window 2026-12-06T00:00Z", "feedback": ""}
    assert sent["meta"] == {"request_id": "req-0", "window": END.isoformat(), "model_version": "3",
                            "flags": ["drift"]}


def test_low_feedback_and_errors_are_sent_only_from_windows_that_failed_them():
    frame = records([{"prompt": "What is a daemon?", "feedback_score": 0.0, "feedback_comment": "wrong"},
                     {"prompt": "What is a kernel?", "feedback_score": 1.0},
                     {"prompt": "What is a shell?", "status": 500, "output": "", "error": "engine timeout"}])
    both = FlaggedWindow(WINDOW, False, True, True)
    tasks = {t["data"]["prompt"]: t for t in select_requests(frame, both, OperationalParams(), set())}
    assert set(tasks) == {"What is a daemon?", "What is a shell?"}
    assert tasks["What is a daemon?"]["data"]["flags"] == "feedback 0 (thumbs down)"
    assert tasks["What is a daemon?"]["data"]["feedback"] == "0 (thumbs down): wrong"
    assert tasks["What is a shell?"]["data"]["flags"] == "error: HTTP 500 (engine timeout)"
    assert tasks["What is a shell?"]["meta"]["flags"] == ["error"]
    assert select_requests(frame, FlaggedWindow(WINDOW, False, True, False), OperationalParams(), set())[0][
        "meta"]["flags"] == ["low_feedback"]


def log_traffic(params, prompts: list[tuple[str, float | None]]) -> None:
    log = InferenceLog.from_params(params.inference_log)
    log.start()
    try:
        for n, (prompt, score) in enumerate(prompts):
            at = END - timedelta(hours=12) + timedelta(minutes=n)
            log.record(InferenceRecord(f"req-{n}", at, "chat.completions", "m", "3", prompt, f"answer {n}", 200,
                                       5.0, 3, 3))
            if score is not None:
                log.feedback(Feedback(f"req-{n}", at + timedelta(seconds=5), score=score))
        assert log.flush(10)
    finally:
        log.close()


def test_request_creates_tasks_once_and_not_for_known_or_deleted_ones(params, monkeypatch, capsys):
    write_monitor_outputs(params.monitor.reports_dir, [(END, True, [])])
    log_traffic(params, [("What is a daemon?", 0.0), ("What is a kernel?", None), ("Define the word cat.", None)])
    pd.DataFrame({"prompt": ["Define the word cat."], "response": ["A feline."]}).to_parquet(params.paths.ingested)
    tool = FakeTool()
    monkeypatch.setattr(corrections, "connect", lambda _params: tool)
    assert len(read_records(params.inference_log.url)) == 3
    summary = corrections.request(params)
    assert summary["created"] == 2 and summary["windows"] == 1
    assert [t["meta"]["request_id"] for t in tool.items] == ["req-0", "req-1"]
    assert tool.items[0]["data"]["feedback"] == "0 (thumbs down)"
    assert "2 correction task(s) created (2 in all): http://127.0.0.1:1/projects/1" in capsys.readouterr().out
    # again: nothing new; and a task deleted in the tool is not sent again (the ledger remembers it)
    assert corrections.request(params)["created"] == 0
    tool.items = tool.items[1:]
    assert corrections.request(params)["created"] == 0
    # only the window ending at --end, and none flagged there
    assert corrections.request(params, end="2026-11-01")["windows"] == 0
