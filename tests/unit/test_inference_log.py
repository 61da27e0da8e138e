"""The inference log: round trip, PII redaction, WAL, a store outage, a crashed spool, replays."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from pipelines.errors import LLMOpsError
from pipelines.inference_log import Feedback, InferenceLog, InferenceRecord, read_records

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def rec(n: int, prompt: str = "What does the noun bank mean?", minutes: int = 0) -> InferenceRecord:
    return InferenceRecord(request_id=f"req-{n}", created_at=T0 + timedelta(minutes=minutes), endpoint="completions",
                           model_name="m", model_version="3", prompt=prompt, output=f"answer {n}", status=200,
                           latency_ms=12.5, prompt_tokens=7, completion_tokens=3, params={"max_tokens": 8})


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'inference.db'}"
    log = InferenceLog(url, tmp_path / "spool", flush_interval_seconds=0.05)
    log.start()
    yield url, log
    log.close()


def test_round_trip_window_and_latest_feedback(store):
    url, log = store
    for n in range(5):
        log.record(rec(n, minutes=n))
    log.feedback(Feedback("req-1", T0 + timedelta(hours=1), score=1.0, comment="good"))
    log.feedback(Feedback("req-1", T0 + timedelta(hours=2), score=0.0, comment="on second thought"))
    assert log.flush(10) and log.store_available and log.pending == 0
    frame = read_records(url, T0 + timedelta(minutes=1), T0 + timedelta(minutes=4))
    assert list(frame["request_id"]) == ["req-1", "req-2", "req-3"]
    first = frame.iloc[0]
    assert first["feedback_score"] == 0.0 and first["feedback_comment"] == "on second thought"
    assert pd.isna(frame.iloc[1]["feedback_score"]) and pd.isna(frame.iloc[1]["feedback_comment"])  # none given
    assert first["params"] == {"max_tokens": 8} and first["model_version"] == "3"
    assert log.known_request("req-4") is True and log.known_request("req-99") is False


def test_pii_is_redacted_and_sqlite_is_in_wal_mode(store, tmp_path):
    url, log = store
    log.record(rec(1, prompt="mail jane.doe@example.com or call 555-123-4567"))
    log.feedback(Feedback("req-1", T0, score=0.0, comment="key sk-abcdefghijklmnop1234567890"))
    assert log.flush(10)
    row = read_records(url).iloc[0]
    assert "jane.doe" not in row["prompt"] and "[EMAIL]" in row["prompt"] and "[PHONE]" in row["prompt"]
    assert "sk-abc" not in row["feedback_comment"]
    with sqlite3.connect(tmp_path / "db" / "inference.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_down_spools_then_flushes_every_record_once(tmp_path):
    blocker = tmp_path / "store"
    blocker.write_text("a file where the database folder should be")
    url = f"sqlite:///{blocker / 'inference.db'}"
    log = InferenceLog(url, tmp_path / "spool", flush_interval_seconds=0.05, redact_pii=True)
    log.start()
    try:
        for n in range(20):
            log.record(rec(n, prompt="reach me at jane@example.com"))  # never raises, never blocks
        assert not log.flush(1.0)
        assert log.pending == 20 and not log.store_available
        spooled = (tmp_path / "spool" / "pending.jsonl").read_text()
        assert spooled.count("\n") == 20 and "jane@example.com" not in spooled
        blocker.unlink()
        blocker.mkdir()  # the store is back
        assert log.flush(20), log.pending
        frame = read_records(url)
        assert sorted(frame["request_id"]) == sorted(f"req-{n}" for n in range(20))
        assert log.store_available and not (tmp_path / "spool" / "pending.jsonl").exists()
    finally:
        log.close()


def test_a_crashed_spool_is_flushed_at_start_and_corrupt_lines_are_skipped(tmp_path, caplog):
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [json.dumps({"kind": "request", **{**rec(n).__dict__, "created_at": T0.isoformat(),
                                                "params": json.dumps({"max_tokens": 8})}}) for n in range(3)]
    (spool / "pending.jsonl").write_text("\n".join(good) + '\n{"kind": "request", "request_id": "req-cut')
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    log = InferenceLog(url, spool, flush_interval_seconds=0.05)
    assert log.pending == 4  # the cut line is counted until it is read
    with caplog.at_level("WARNING"):
        log.start()
        assert log.flush(10)
    log.close()
    assert sorted(read_records(url)["request_id"]) == ["req-0", "req-1", "req-2"]
    assert "skipped 1 corrupt line" in caplog.text


def test_replaying_the_same_records_writes_each_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    for _ in range(2):
        log = InferenceLog(url, tmp_path / "spool", flush_interval_seconds=0.05)
        log.start()
        for n in range(3):
            log.record(rec(n))
        log.feedback(Feedback("req-0", T0, score=1.0, feedback_id="fb-1"))
        assert log.flush(10)
        log.close()
    frame = read_records(url)
    assert len(frame) == 3 and frame["request_id"].is_unique
    with sqlite3.connect(tmp_path / "inference.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM inference_feedback").fetchone()[0] == 1


def test_close_drains_what_is_queued(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    log = InferenceLog(url, tmp_path / "spool", flush_interval_seconds=0.05)
    log.start()
    for n in range(50):
        log.record(rec(n))
    log.close()
    assert len(read_records(url)) == 50


@pytest.mark.parametrize(("url", "message"), [
    ("not a url", "is not a database URL"),
    ("mysql://user:secret@host/db", "dialect is not supported"),
])
def test_bad_urls_are_clear_errors(tmp_path, url, message):
    with pytest.raises(LLMOpsError, match=message) as error:
        InferenceLog(url, tmp_path / "spool")
    assert "secret" not in str(error.value)


def test_a_missing_database_driver_names_the_package(tmp_path):
    try:
        import psycopg2  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(LLMOpsError, match=r"pip install 'psycopg2-binary'") as error:
            InferenceLog("postgresql+psycopg2://user:secret@localhost/db", tmp_path / "spool")
        assert "secret" not in str(error.value)
    else:
        pytest.skip("psycopg2 is installed here")


def test_an_empty_store_reads_as_an_empty_frame(tmp_path):
    frame = read_records(f"sqlite:///{tmp_path / 'new.db'}")
    assert frame.empty and {"request_id", "feedback_score"} <= set(frame.columns)
