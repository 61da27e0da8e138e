"""The inference log survives `kill -9` while its store is down: the fsynced spool is flushed by the next process."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pipelines.serving.inference_log import InferenceLog, read_records
from tests.support import REPO

pytestmark = pytest.mark.integration

# A writer process: logs N records while the store is down, says so once they are all on disk, then waits.
WRITER = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from pipelines.serving.inference_log import InferenceLog, InferenceRecord

url, spool, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
log = InferenceLog(url, spool, flush_interval_seconds=0.05, batch_size=7)
log.start()
for i in range(n):
    log.record(InferenceRecord(f"req-{i}", datetime.now(UTC), "completions", "m", "1", "prompt", "output",
                               200, 1.0, 1, 1))
def on_disk():
    return sum(1 for name in ("pending.flushing", "pending.jsonl") if (spool / name).exists()
               for line in (spool / name).read_text().splitlines() if line.strip())
deadline = time.monotonic() + 60
while on_disk() < n and time.monotonic() < deadline:
    time.sleep(0.02)
print("spooled", on_disk(), flush=True)
time.sleep(600)
"""


def recover(url: str, spool, n: int):
    """A fresh log on the killed writer's spool: it finds the n records and moves them into the store."""
    log = InferenceLog(url, spool, flush_interval_seconds=0.05)
    assert log.pending == n
    log.start()
    try:
        assert log.flush(30), log.pending
    finally:
        log.close()
    return read_records(url)


def test_a_killed_process_loses_nothing_that_was_spooled(tmp_path):
    blocker = tmp_path / "store"
    blocker.write_text("the database folder is a file: the store cannot open")
    url, spool, n = f"sqlite:///{blocker / 'inference.db'}", tmp_path / "spool", 50
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url, str(spool), str(n)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = writer.stdout.readline()
        assert line.split() == ["spooled", str(n)], (line, writer.stderr.read() if writer.poll() is not None else "")
    finally:
        writer.send_signal(signal.SIGKILL)  # no close(), no atexit: only what is on disk survives
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    blocker.unlink()
    blocker.mkdir()  # the store is back
    frame = recover(url, spool, n)
    assert sorted(frame["request_id"]) == sorted(f"req-{i}" for i in range(n)) and frame["request_id"].is_unique


# A writer process whose store is up but stuck: it hands N records in, waits for each one's future
# (what the gateway does before it answers), says so, then waits to be killed.
DURABLE_WRITER = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from pipelines.serving.inference_log import InferenceLog, InferenceRecord

url, spool, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
log = InferenceLog(url, spool, flush_interval_seconds=0.05, batch_size=7)
log.start()
futures = [log.record(InferenceRecord(f"req-{i}", datetime.now(UTC), "completions", "m", "1", "prompt", "output",
                                      200, 1.0, 1, 1)) for i in range(n)]
print("durable", sum(1 for f in futures if f.result(30)), flush=True)
time.sleep(600)
"""


def test_a_killed_process_loses_nothing_it_was_told_was_durable_while_the_store_was_stuck(tmp_path):
    import sqlite3

    db = tmp_path / "inference.db"
    url, spool, n = f"sqlite:///{db}", tmp_path / "spool", 40
    ready = InferenceLog(url, tmp_path / "other-spool")  # the tables, made once the normal way
    ready.start()
    assert ready.flush(10)
    ready.close()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the store answers nothing for the writer's 60 s
    try:
        writer = subprocess.Popen([sys.executable, "-c", DURABLE_WRITER, f"{url}?timeout=60", str(spool), str(n)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = writer.stdout.readline()
            assert line.split() == ["durable", str(n)], (line, writer.stderr.read() if writer.poll() is not None
                                                         else "")
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # the kernel released the killed one's lock
    assert sorted(recover(url, spool, n)["request_id"]) == sorted(f"req-{i}" for i in range(n))
