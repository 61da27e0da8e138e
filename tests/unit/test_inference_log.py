"""The inference log: round trip, PII, WAL, real store outages, crashed spools, replays, bad URLs."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines.config.params import InferenceLogParams
from pipelines.errors import LLMOpsError
from pipelines.serving.inference_log import READ_COLUMNS, Feedback, InferenceLog, InferenceRecord, read_records

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
EMAIL = "jane.doe@example.com"


def rec(n: int, prompt: str = "What does the noun bank mean?", minutes: int = 0, **kw) -> InferenceRecord:
    fields = dict(request_id=f"req-{n}", created_at=T0 + timedelta(minutes=minutes), endpoint="completions",
                  model_name="m", model_version="3", prompt=prompt, output=f"answer {n}", status=200,
                  latency_ms=12.5, prompt_tokens=7, completion_tokens=3, params={"max_tokens": 8})
    return InferenceRecord(**{**fields, **kw})


def spool_line(n: int) -> str:
    """One spooled request as a (crashed) writer leaves it: the row as inserted, plus its kind."""
    row = {"kind": "request", **rec(n).__dict__, "created_at": (T0 + timedelta(minutes=n)).isoformat(),
           "params": json.dumps({"max_tokens": 8})}
    return json.dumps(row) + "\n"


def count_rows(db: Path, table: str = "inference_requests") -> int:
    with sqlite3.connect(db) as connection:
        return connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def spooled_lines(spool: Path) -> list[str]:
    """The spool's lines, oldest first. The store writer may rename pending.jsonl to pending.flushing
    between our two reads (a line then is read twice, or not at all, or the file is gone): read until two
    snapshots in a row agree."""

    def snapshot() -> list[str] | None:
        try:
            return [line for name in ("pending.flushing", "pending.jsonl") if (spool / name).exists()
                    for line in (spool / name).read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return None

    previous = snapshot()
    for _ in range(100):
        current = snapshot()
        if current is not None and current == previous:
            return current
        previous = current
    raise AssertionError(f"the spool in {spool} kept changing while it was read")


def make_log(url: str, spool: Path, **kw) -> InferenceLog:
    return InferenceLog(url, spool, **{"flush_interval_seconds": 0.05, **kw})


@pytest.fixture
def store(tmp_path):
    db = tmp_path / "db" / "inference.db"  # the folder does not exist yet: the log creates it
    log = make_log(f"sqlite:///{db}", tmp_path / "spool")
    log.start()
    yield f"sqlite:///{db}", log, db
    log.close()


@pytest.fixture
def down(tmp_path):
    """A store that really cannot open: the database's folder is a file. `up()` brings it back."""
    blocker = tmp_path / "store"
    blocker.write_text("a file where the database folder should be")

    def up() -> Path:
        blocker.unlink()
        blocker.mkdir()
        return blocker / "inference.db"

    return f"sqlite:///{blocker / 'inference.db'}", up


def test_round_trip_window_and_latest_feedback(store):
    url, log, _ = store
    for n in range(5):
        log.record(rec(n, minutes=n))
    # handed in out of order: the latest by created_at wins, not the last handed in
    log.feedback(Feedback("req-1", T0 + timedelta(hours=2), score=0.0, comment="on second thought"))
    log.feedback(Feedback("req-1", T0 + timedelta(hours=1), score=1.0, comment="good"))
    assert log.flush(10) and log.store_available and log.pending == 0
    frame = read_records(url, T0 + timedelta(minutes=1), T0 + timedelta(minutes=4))  # [start, end)
    assert list(frame["request_id"]) == ["req-1", "req-2", "req-3"]
    assert list(frame.columns) == READ_COLUMNS
    first, second = frame.iloc[0], frame.iloc[1]
    assert first["feedback_score"] == 0.0 and first["feedback_comment"] == "on second thought"
    assert pd.isna(second["feedback_score"]) and second["feedback_comment"] is None  # no feedback given
    assert first["params"] == {"max_tokens": 8} and first["model_version"] == "3" and first["status"] == 200
    assert first["created_at"] == T0 + timedelta(minutes=1)
    assert log.known_request("req-4") is True and log.known_request("req-99") is False


def test_times_in_other_zones_are_stored_and_filtered_as_utc(store):
    url, log, _ = store
    plus2 = timezone(timedelta(hours=2))
    log.record(rec(1, created_at=datetime(2026, 11, 24, 14, 30, tzinfo=plus2)))  # 12:30 UTC
    log.record(rec(2, created_at=datetime(2026, 11, 24, 13, 0)))  # naive: taken as UTC
    assert log.flush(10)
    frame = read_records(url, start=datetime(2026, 11, 24, 14, 15, tzinfo=plus2))  # 12:15 UTC
    assert list(frame["request_id"]) == ["req-1", "req-2"]
    assert frame.iloc[0]["created_at"] == datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
    assert read_records(url, end=datetime(2026, 11, 24, 12, 45))["request_id"].tolist() == ["req-1"]


def test_pii_is_redacted_in_the_store_and_sqlite_is_in_wal_mode(store):
    url, log, db = store
    mine = rec(1, prompt=f"mail {EMAIL} or call 555-123-4567", error=f"could not reach {EMAIL}")
    log.record(mine)
    log.feedback(Feedback("req-1", T0, score=0.0, comment="my key is sk-abcdefghijklmnop1234567890"))
    assert log.flush(10)
    row = read_records(url).iloc[0]
    assert row["prompt"] == "mail [EMAIL] or call [PHONE]" and row["error"] == "could not reach [EMAIL]"
    assert "sk-abc" not in row["feedback_comment"] and "[API_KEY]" in row["feedback_comment"]
    assert EMAIL in mine.prompt  # the caller's object is not changed
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_redaction_can_be_turned_off(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    log = make_log(url, tmp_path / "spool", redact_pii=False)
    log.start()
    log.record(rec(1, prompt=f"mail {EMAIL}"))
    log.close()
    assert read_records(url).iloc[0]["prompt"] == f"mail {EMAIL}"


def test_store_down_spools_redacted_then_flushes_every_record_once(tmp_path, down, caplog):
    url, up = down
    log = make_log(url, tmp_path / "spool", batch_size=3)
    with caplog.at_level(logging.INFO, logger="pipelines.serving.inference_log"):
        log.start()
        try:
            for n in range(20):
                log.record(rec(n, prompt=f"reach me at {EMAIL}"))  # never raises, never blocks
            assert not log.flush(1.0)
            assert log.pending == 20 and not log.store_available
            assert log.known_request("req-1") is None  # the store cannot be asked
            lines = spooled_lines(tmp_path / "spool")
            assert len(lines) == 20 and not any(EMAIL in line for line in lines)
            assert all("[EMAIL]" in json.loads(line)["prompt"] for line in lines)
            db = up()
            assert log.flush(20), log.pending
            assert log.store_available and log.pending == 0 and spooled_lines(tmp_path / "spool") == []
            frame = read_records(url)
            assert sorted(frame["request_id"]) == sorted(f"req-{n}" for n in range(20))
            assert count_rows(db) == 20
        finally:
            log.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # one per outage, not one per batch or retry
    assert "available again" in caplog.text


def test_a_locked_store_does_not_block_record_and_nothing_is_lost(tmp_path):
    db = tmp_path / "inference.db"
    log = make_log(f"sqlite:///{db}?timeout=0.1", tmp_path / "spool", batch_size=4)
    log.start()
    try:
        for n in range(3):
            log.record(rec(n))
        assert log.flush(10)
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
        try:
            for n in range(3, 13):
                log.record(rec(n))  # returns at once although no write can succeed
            assert not log.flush(1.0)
            assert log.pending == 10 and not log.store_available
            assert len(spooled_lines(tmp_path / "spool")) == 10
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert log.flush(20)
        assert count_rows(db) == 13
    finally:
        log.close()


def test_a_replaced_database_file_is_an_outage_and_the_original_comes_back(tmp_path):
    db = tmp_path / "inference.db"
    url = f"sqlite:///{db}"
    log = make_log(url, tmp_path / "spool")
    log.start()
    try:
        log.record(rec(0))
        assert log.flush(10)
        os.replace(db, tmp_path / "moved.db")
        db.write_bytes(b"this is not an SQLite database\n" * 40)
        for n in range(1, 6):
            log.record(rec(n))
        assert not log.flush(1.0) and log.pending == 5
        os.replace(tmp_path / "moved.db", db)
        assert log.flush(20)
        assert sorted(read_records(url)["request_id"]) == [f"req-{n}" for n in range(6)]
    finally:
        log.close()


def test_a_table_from_an_older_version_is_named_with_the_fix_and_records_wait_for_the_columns(tmp_path, caplog):
    db = tmp_path / "inference.db"
    with sqlite3.connect(db) as connection:  # the requests table as a version without `params` made it
        connection.execute("CREATE TABLE inference_requests (request_id VARCHAR(64) PRIMARY KEY, created_at DATETIME "
                           "NOT NULL, endpoint VARCHAR(32) NOT NULL, model_name VARCHAR(200) NOT NULL, model_version "
                           "VARCHAR(200) NOT NULL, prompt TEXT NOT NULL, output TEXT NOT NULL, status INTEGER NOT "
                           "NULL, latency_ms FLOAT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens "
                           "INTEGER NOT NULL, error TEXT)")
    log = make_log(f"sqlite:///{db}", tmp_path / "spool")
    with caplog.at_level(logging.WARNING, logger="pipelines.serving.inference_log"):
        log.start()
        try:
            for n in range(3):
                log.record(rec(n))
            assert not log.flush(1.0) and log.pending == 3 and not log.store_available
            assert len(spooled_lines(tmp_path / "spool")) == 3
            message = next(r.getMessage() for r in caplog.records if "unavailable" in r.getMessage())
            assert "inference_requests lacks params" in message and "ADD COLUMN" in message
            with sqlite3.connect(db) as connection:  # the operator adds the column: the records go in
                connection.execute("ALTER TABLE inference_requests ADD COLUMN params TEXT")
            assert log.flush(20)
            assert count_rows(db) == 3
        finally:
            log.close()


def test_a_crashed_spool_is_flushed_at_start_and_corrupt_lines_are_counted(tmp_path, caplog):
    spool = tmp_path / "spool"
    spool.mkdir()
    # the crashed process was flushing req-0, req-1 and had spooled req-2..4 and a feedback since;
    # its last line was cut off mid-write
    (spool / "pending.flushing").write_text(spool_line(0) + spool_line(1))
    fb = {"kind": "feedback", "feedback_id": "fb-1", "request_id": "req-2", "created_at": T0.isoformat(),
          "score": 1.0, "comment": None}
    (spool / "pending.jsonl").write_text(spool_line(2) + spool_line(3) + spool_line(4) + json.dumps(fb) + "\n"
                                         + '{"kind": "request", "request_id": "req-cut", "crea')
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    log = make_log(url, spool)
    assert log.pending == 7  # the cut line counts until it is read
    with caplog.at_level(logging.WARNING, logger="pipelines.serving.inference_log"):
        log.start()
        assert log.flush(10)
    log.close()
    frame = read_records(url)
    assert list(frame["request_id"]) == [f"req-{n}" for n in range(5)]
    assert frame.set_index("request_id").loc["req-2", "feedback_score"] == 1.0
    assert "skipped 1 corrupt line" in caplog.text
    assert spooled_lines(spool) == [] and log.pending == 0
    rejected = (spool / "rejected.jsonl").read_text()
    assert "req-cut" in rejected  # kept for a person to look at, out of the way


def test_a_cut_line_does_not_swallow_the_next_record(tmp_path, down):
    url, up = down
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "pending.flushing").write_text(spool_line(0))
    (spool / "pending.jsonl").write_text('{"kind": "request", "request_id": "req-cut", "crea')  # no newline
    log = make_log(url, spool)
    log.start()
    try:
        log.record(rec(1))  # the store is down: appended after the cut line
        assert not log.flush(0.5)
        assert log.pending == 3
        up()
        assert log.flush(20)
        assert sorted(read_records(url)["request_id"]) == ["req-0", "req-1"]
    finally:
        log.close()


def test_a_failure_part_way_through_a_flush_keeps_the_rest_in_order(tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "pending.jsonl").write_text("".join(spool_line(n) for n in range(6)))
    db = tmp_path / "inference.db"
    log = make_log(f"sqlite:///{db}", spool, batch_size=2)  # not started: the test drives the writer
    real_store, calls = log._store, []

    def store_goes_down_at_the_second_batch(rows):
        calls.append(len(rows))
        if len(calls) == 2:
            log._mark_down(sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection")))
            return 0
        return real_store(rows)

    monkeypatch.setattr(log, "_store", store_goes_down_at_the_second_batch)
    assert log._flush_spool() is False
    assert count_rows(db) == 2 and log.pending == 4 and not log.store_available
    assert [json.loads(line)["request_id"] for line in spooled_lines(spool)] == [f"req-{n}" for n in range(2, 6)]
    monkeypatch.setattr(log, "_store", real_store)
    assert log._flush_spool() is True
    assert count_rows(db) == 6 and log.pending == 0 and spooled_lines(spool) == []


def test_replaying_the_same_spool_and_records_writes_each_once(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    fb = {"kind": "feedback", "feedback_id": "fb-1", "request_id": "req-0", "created_at": T0.isoformat(),
          "score": 1.0, "comment": "thanks"}
    content = "".join(spool_line(n) for n in range(3)) + json.dumps(fb) + "\n"
    db = tmp_path / "inference.db"
    for _ in range(2):  # e.g. a crash after the inserts but before the spool file was deleted
        (spool / "pending.jsonl").write_text(content)
        log = make_log(f"sqlite:///{db}", spool)
        log.start()
        log.record(rec(1))  # and the same request handed in again
        log.feedback(Feedback("req-0", T0, score=1.0, comment="thanks", feedback_id="fb-1"))
        assert log.flush(10)
        log.close()
    assert count_rows(db) == 3 and count_rows(db, "inference_feedback") == 1
    assert read_records(f"sqlite:///{db}")["request_id"].is_unique


def test_when_neither_store_nor_spool_can_be_written_records_wait_in_memory(tmp_path, down, caplog):
    url, up = down
    spool = tmp_path / "spool"
    log = make_log(url, spool)
    (spool / "spool.lock").unlink()
    spool.rmdir()
    spool.write_text("a file where the spool folder should be")  # every append fails (like a full disk)
    with caplog.at_level(logging.ERROR, logger="pipelines.serving.inference_log"):
        log.start()
        try:
            for n in range(6):
                log.record(rec(n))
            assert not log.flush(0.5) and log.pending == 6
            assert [r.levelno for r in caplog.records].count(logging.ERROR) == 1  # said once, not per retry
            spool.unlink()
            spool.mkdir()  # the disk has room again, the store is still down
            assert not log.flush(0.5)
            assert len(spooled_lines(spool)) == 6
            up()
            assert log.flush(20)
        finally:
            log.close()
    assert sorted(read_records(url)["request_id"]) == [f"req-{n}" for n in range(6)] and log.dropped == 0


def test_a_full_queue_spools_from_the_caller_instead_of_dropping(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    log = make_log(url, tmp_path / "spool", max_queued=3)  # not started: nothing drains the queue
    for n in range(8):
        log.record(rec(n, prompt=f"from {EMAIL}"))
    assert log.pending == 8
    lines = spooled_lines(tmp_path / "spool")
    assert len(lines) == 5 and not any(EMAIL in line for line in lines)
    log.start()
    assert log.flush(10)
    log.close()
    assert sorted(read_records(url)["request_id"]) == sorted(f"req-{n}" for n in range(8))


def test_a_row_the_store_refuses_is_set_aside_and_the_rest_is_written(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    log = make_log(url, tmp_path / "spool")
    log.start()
    with caplog.at_level(logging.WARNING, logger="pipelines.serving.inference_log"):
        log.record(rec(0))
        log.record(rec(1, prompt=None))  # NOT NULL: the store refuses it, whatever the retries
        log.record(rec(2))
        assert log.flush(10)
    log.close()
    assert read_records(url)["request_id"].tolist() == ["req-0", "req-2"]
    assert log.store_available and "refused request req-1" in caplog.text
    assert "req-1" in (tmp_path / "spool" / "rejected.jsonl").read_text()


def test_text_that_cannot_be_encoded_is_stored_with_a_replacement(store):
    url, log, _ = store
    log.record(rec(1, prompt="broken \ud800 surrogate"))
    assert log.flush(10)
    assert read_records(url).iloc[0]["prompt"] == "broken ? surrogate"


def test_close_drains_to_the_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    log = make_log(url, tmp_path / "spool")
    log.start()
    for n in range(50):
        log.record(rec(n))
    log.close()
    assert len(read_records(url)) == 50 and spooled_lines(tmp_path / "spool") == []


def test_close_while_down_spools_and_the_next_start_flushes(tmp_path, down):
    url, up = down
    log = make_log(url, tmp_path / "spool")
    log.start()
    for n in range(10):
        log.record(rec(n))
    log.close(timeout=5)
    log.record(rec(10))  # after close: straight to the spool, not lost
    assert len(spooled_lines(tmp_path / "spool")) == 11
    up()
    again = make_log(url, tmp_path / "spool")
    assert again.pending == 11
    again.start()
    assert again.flush(10)
    again.close()
    assert sorted(read_records(url)["request_id"]) == sorted(f"req-{n}" for n in range(11))


def test_close_without_a_writer_spools_what_was_handed_in(tmp_path):
    log = make_log(f"sqlite:///{tmp_path / 'inference.db'}", tmp_path / "spool")  # never started
    for n in range(4):
        log.record(rec(n, prompt=f"from {EMAIL}"))
    log.close()
    lines = spooled_lines(tmp_path / "spool")
    assert [json.loads(line)["request_id"] for line in lines] == [f"req-{n}" for n in range(4)]
    assert log.pending == 4 and not any(EMAIL in line for line in lines)


def test_from_params(tmp_path):
    params = InferenceLogParams(url=f"sqlite:///{tmp_path / 'x.db'}", spool_dir=tmp_path / "sp",
                                redact_pii=False, flush_interval_seconds=0.3, batch_size=7)
    log = InferenceLog.from_params(params)
    assert (log.url, log.spool_dir, log.redact_pii, log.flush_interval, log.batch_size) == (
        params.url, tmp_path / "sp", False, 0.3, 7)
    assert (tmp_path / "sp").is_dir()


@pytest.mark.parametrize(("url", "message"), [
    ("not a url", "is not a database URL"),
    ("mysql://user:secret@host/db", "the mysql dialect is not supported"),
    ("postgresql+nosuchdriver://user:secret@host/db", "unknown driver"),
    ("postgresql+asyncpg://user:secret@host/db", "asyncio driver"),
    ("sqlite://", "in-memory SQLite"),
])
def test_bad_urls_are_clear_errors_without_the_password(tmp_path, url, message):
    with pytest.raises(LLMOpsError, match=message) as error:
        InferenceLog(url, tmp_path / "spool")
    assert "secret" not in str(error.value) and "\n" not in str(error.value)


def test_a_missing_database_driver_names_the_package(tmp_path, monkeypatch):
    # the dev extras install psycopg2: hide it, as on a machine without the `postgres` extra
    for name in [m for m in sys.modules if m == "psycopg2" or m.startswith("psycopg2.")] + ["psycopg2"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(LLMOpsError, match=r"psycopg2.*not installed.*pip install -e '\.\[postgres\]'") as error:
        InferenceLog("postgresql+psycopg2://user:secret@localhost/db", tmp_path / "spool")
    assert "secret" not in str(error.value) and "localhost" in str(error.value)


def test_reading_a_store_that_does_not_exist_gives_an_empty_frame_and_creates_nothing(tmp_path):
    frame = read_records(f"sqlite:///{tmp_path / 'new' / 'inference.db'}")
    assert frame.empty and list(frame.columns) == READ_COLUMNS
    assert not (tmp_path / "new").exists()


def test_reading_a_broken_store_is_a_clear_error(tmp_path):
    db = tmp_path / "inference.db"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(LLMOpsError, match="could not read the inference log"):
        read_records(f"sqlite:///{db}")


def test_an_unwritable_spool_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(LLMOpsError, match="spool_dir"):
        InferenceLog(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "file" / "spool")



# --- durable acceptance, the store's sync mode, the spool's lock, redacted parameters (issue 15) ---


def test_a_record_is_in_the_fsynced_spool_when_its_future_says_so_even_with_the_store_stuck(tmp_path):
    db = tmp_path / "inference.db"
    log = make_log(f"sqlite:///{db}?timeout=5", tmp_path / "spool")
    log.start()
    try:
        assert log.record(rec(0)).result(10) is True and log.flush(10)
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the store takes nothing for 5 s: only the journal can make it durable
        try:
            futures = [log.record(rec(n)) for n in range(1, 6)] + [log.feedback(Feedback("req-1", T0, score=1.0))]
            assert all(future.result(2) is True for future in futures)
            on_disk = [json.loads(line) for line in spooled_lines(tmp_path / "spool")]
            assert {line.get("request_id") for line in on_disk} >= {f"req-{n}" for n in range(1, 6)}
            assert [line["kind"] for line in on_disk].count("feedback") == 1
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert log.flush(20) and count_rows(db) == 6
    finally:
        log.close()


def test_sqlite_runs_with_synchronous_full_whatever_the_library_default(tmp_path, monkeypatch):
    # A library built with NORMAL as its WAL default (e.g. SQLITE_DEFAULT_WAL_SYNCHRONOUS=1) may lose the
    # last commits on a power cut, after their spool lines were deleted: the log sets FULL itself.
    real_connect = sqlite3.dbapi2.connect

    def connect_with_normal_default(*args, **kwargs):
        connection = real_connect(*args, **kwargs)
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    monkeypatch.setattr(sqlite3.dbapi2, "connect", connect_with_normal_default)  # what SQLAlchemy calls
    log = make_log(f"sqlite:///{tmp_path / 'inference.db'}", tmp_path / "spool")
    try:
        with log.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        log.close()


def test_a_second_log_on_the_same_spool_is_refused_in_one_line_until_the_first_is_closed(tmp_path):
    from pipelines.serving.inference_log import SpoolInUse

    url, spool = f"sqlite:///{tmp_path / 'inference.db'}", tmp_path / "spool"
    first = make_log(url, spool)
    with pytest.raises(SpoolInUse, match="in use by another process") as refused:
        make_log(url, spool)
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "inference_log.spool_dir" in message and "\n" not in message
    first.close()
    second = make_log(url, spool)  # closed: released
    second.close()


# Holds the spool of argv[1] until killed.
HOLDER = """
import sys, time
from pipelines.serving.inference_log import InferenceLog
log = InferenceLog(sys.argv[2], sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


def test_a_gateway_on_a_spool_another_process_holds_stops_at_start_with_one_line(tmp_path):
    import signal
    import subprocess

    from tests.support import REPO, TEST_TOKEN

    url, spool = f"sqlite:///{tmp_path / 'inference.db'}", tmp_path / "spool"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(spool), url], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--params", str(REPO / "params.yaml"),
                               "--set", f"inference_log.url={url}", "--set", f"inference_log.spool_dir={spool}",
                               "--set", f"serve.engine.cache_dir={tmp_path / 'models'}",
                               "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                              cwd=REPO, env={**os.environ, "LLMOPS_API_TOKEN": TEST_TOKEN}, capture_output=True,
                              text=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert done.returncode != 0
    assert "in use by another process" in done.stderr and f"pid {holder.pid}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # the holder was killed: the kernel released its lock, nothing stale is left behind
    make_log(url, spool).close()


def test_strings_in_the_decoding_parameters_such_as_stop_are_redacted(tmp_path, down):
    url, up = down
    log = make_log(url, tmp_path / "spool")
    log.start()
    try:
        log.record(rec(1, params={"max_tokens": 8, "stop": [f"write to {EMAIL}", "###"], "note": "555-123-4567"}))
        assert not log.flush(0.5)
        spooled = spooled_lines(tmp_path / "spool")
        assert len(spooled) == 1 and EMAIL not in spooled[0] and "555-123-4567" not in spooled[0]
        up()
        assert log.flush(20)
    finally:
        log.close()
    params = read_records(url).iloc[0]["params"]
    assert params == {"max_tokens": 8, "stop": ["write to [EMAIL]", "###"], "note": "[PHONE]"}


def test_the_store_takes_the_records_of_a_moment_in_one_transaction(tmp_path):
    """inference_log.store_delay_seconds: each record is on disk (the spool) when its future
    settles, as before; the store writer then waits a moment, so that answers arriving one after
    another go into the store in one transaction rather than one each. close() does not wait."""
    db = tmp_path / "inference.db"
    log = make_log(f"sqlite:///{db}", tmp_path / "spool", store_delay_seconds=1.0)
    log.start()
    assert log.record(rec(100)).result(timeout=10) is True
    assert log.flush(10) and count_rows(db) == 1  # the tables exist
    time.sleep(0.3)  # the writer is idle again
    commits = []
    sa.event.listen(log.engine, "commit", lambda connection: commits.append(time.monotonic()))
    for n in range(6):  # the gateway's way: the answer waits for its record to be on disk
        assert log.record(rec(n)).result(timeout=10) is True
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    while count_rows(db) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count_rows(db) == 7 and len(commits) == 1  # not six
    log.record(rec(6)).result(timeout=10)
    started = time.monotonic()
    log.close()
    assert time.monotonic() - started < 0.9 and count_rows(db) == 8  # close() cut the wait short
