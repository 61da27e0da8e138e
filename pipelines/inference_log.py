"""The inference log: every request and response of `llmops serve`, durably, for monitoring.

Records go through SQLAlchemy to `inference_log.url`: SQLite in WAL mode by default
(readers such as `monitor` do not block the writer), PostgreSQL by URL. Two tables:
`inference_requests` (one row per request) and `inference_feedback` (joined to its request
when read, so feedback that arrives later needs no update of the request row).

Writes never block or fail the caller: `record()` puts the record on a queue, and one
writer thread inserts batches. When an insert fails (store down, locked, disk full), the
batch is appended to a JSONL spool file in `spool_dir` and fsynced, and the writer retries
every `flush_interval_seconds`; spooled records are flushed first, in order, when the store
is back. Inserts ignore rows whose key is already stored, so replaying a spool after a
partial failure writes nothing twice. PII is redacted before a record is stored or spooled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pipelines.errors import LLMOpsError

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.params import InferenceLogParams

logger = logging.getLogger(__name__)

metadata = sa.MetaData()
requests_table = sa.Table(
    "inference_requests", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False, index=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("params", sa.Text),  # decoding parameters, JSON
)
feedback_table = sa.Table(
    "inference_feedback", metadata,
    sa.Column("feedback_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("comment", sa.Text),
)


@dataclass
class InferenceRecord:
    request_id: str
    created_at: datetime
    endpoint: str
    model_name: str
    model_version: str
    prompt: str
    output: str
    status: int
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    params: dict | None = None


@dataclass
class Feedback:
    request_id: str
    created_at: datetime
    score: float | None = None
    comment: str | None = None
    feedback_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def _safe_url(url: str) -> str:
    with contextlib.suppress(Exception):
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    return "<unparseable URL>"


def make_engine(url: str) -> sa.Engine:
    """An engine for `url`, with WAL for SQLite; a clear error for a bad URL or a missing driver."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise LLMOpsError(f"inference_log.url {url!r} is not a database URL; use e.g. "
                          "sqlite:///data/inference/inference.db or postgresql+psycopg2://user@host/db") from None
    if parsed.get_backend_name() not in {"sqlite", "postgresql"}:
        raise LLMOpsError(f"inference_log.url {_safe_url(url)}: the {parsed.get_backend_name()} dialect is not "
                          "supported; use sqlite or postgresql")
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        with contextlib.suppress(OSError):  # an unusable folder surfaces as a store error later
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(parsed, pool_pre_ping=True)
    except ModuleNotFoundError as error:
        package = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]"}.get(error.name, error.name)
        raise LLMOpsError(f"inference_log.url {_safe_url(url)} needs the database driver '{error.name}': "
                          f"pip install '{package}' (or pip install -e '.[postgres]')") from None
    if parsed.get_backend_name() == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()
    return engine


def _insert_ignoring_duplicates(engine: sa.Engine, table: sa.Table, key: str) -> Any:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing(index_elements=[key])


def _to_row(kind: str, item: InferenceRecord | Feedback) -> dict[str, Any]:
    row = asdict(item)
    if kind == "request":
        row["params"] = json.dumps(row["params"]) if row["params"] is not None else None
    return row


def _to_json(kind: str, row: dict[str, Any]) -> str:
    return json.dumps({"kind": kind, **row}, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def _from_json(line: str) -> tuple[str, dict[str, Any]]:
    data = json.loads(line)
    kind = data.pop("kind")
    if kind not in {"request", "feedback"}:
        raise ValueError(f"unknown record kind {kind!r}")
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    return kind, data


class InferenceLog:
    """A background writer to the inference-log database with an on-disk spool (see module docstring)."""

    SPOOL = "pending.jsonl"
    # Bounded so a store that stays down cannot exhaust memory; when full, record() appends to
    # the spool from the caller's thread instead of dropping (slower, but nothing is lost).
    MAX_QUEUED = 100_000

    def __init__(self, url: str, spool_dir: Path | str, *, redact_pii: bool = True,
                 flush_interval_seconds: float = 1.0, batch_size: int = 256) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.spool_dir / self.SPOOL
        self.redact_pii = redact_pii
        self.flush_interval = flush_interval_seconds
        self.batch_size = batch_size
        self.queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=self.MAX_QUEUED)
        self.spool_lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmops-inference-log", daemon=True)
        self._available = False
        self._tables_ready = False
        self._spooled = self._count_spool()
        self._in_flight = 0
        self._handed_in = 0
        self._stored = 0

    @classmethod
    def from_params(cls, params: InferenceLogParams) -> InferenceLog:
        return cls(params.url, params.spool_dir, redact_pii=params.redact_pii,
                   flush_interval_seconds=params.flush_interval_seconds, batch_size=params.batch_size)

    # --- the caller's side --------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def record(self, rec: InferenceRecord) -> None:
        if self.redact_pii:
            from pipelines.pii import redact

            rec.prompt, rec.output = redact(rec.prompt), redact(rec.output)
        self._hand_in("request", _to_row("request", rec))

    def feedback(self, fb: Feedback) -> None:
        if self.redact_pii and fb.comment:
            from pipelines.pii import redact

            fb.comment = redact(fb.comment)
        self._hand_in("feedback", _to_row("feedback", fb))

    def _hand_in(self, kind: str, row: dict[str, Any]) -> None:
        try:
            self._handed_in += 1
            try:
                self.queue.put_nowait((kind, row))
            except queue.Full:
                self._append_spool([(kind, row)])
        except Exception:  # noqa: BLE001 - logging must never fail a response
            logger.exception("inference log: could not queue a record")

    @property
    def store_available(self) -> bool:
        return self._available

    @property
    def pending(self) -> int:
        return self.queue.qsize() + self._in_flight + self._spooled

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed in so far is in the store (False on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending == 0:
                return True
            time.sleep(0.05)
        return self.pending == 0

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=timeout)
        leftover = []
        while True:  # anything still queued goes to the spool, to be flushed by the next start
            try:
                leftover.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if leftover:
            self._append_spool(leftover)
        self.engine.dispose()

    def known_request(self, request_id: str) -> bool | None:
        try:
            with self.engine.connect() as connection:
                found = connection.execute(sa.select(requests_table.c.request_id)
                                           .where(requests_table.c.request_id == request_id)).first()
            return found is not None
        except sa.exc.SQLAlchemyError:
            return None

    # --- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        last_attempt = 0.0
        while not self.stopping.is_set():
            if self._spooled and time.monotonic() - last_attempt >= self.flush_interval:
                last_attempt = time.monotonic()
                self._flush_spool()
            batch = self._take_batch()
            if batch:
                if self._spooled or not self._write(batch):  # keep order: after what is already spooled
                    self._append_spool(batch)
                self._in_flight = 0

    def _take_batch(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            batch = [self.queue.get(timeout=min(0.2, self.flush_interval))]
        except queue.Empty:
            return []
        self._in_flight = 1  # counted as pending at once, so flush() cannot see a false zero
        while len(batch) < self.batch_size:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
            self._in_flight = len(batch)
        return batch

    def _write(self, batch: list[tuple[str, dict[str, Any]]]) -> bool:
        requests = [row for kind, row in batch if kind == "request"]
        feedback = [row for kind, row in batch if kind == "feedback"]
        try:
            if not self._tables_ready:
                metadata.create_all(self.engine)
                self._tables_ready = True
            with self.engine.begin() as connection:
                if requests:
                    connection.execute(_insert_ignoring_duplicates(self.engine, requests_table, "request_id"),
                                       requests)
                if feedback:
                    connection.execute(_insert_ignoring_duplicates(self.engine, feedback_table, "feedback_id"),
                                       feedback)
        except (sa.exc.SQLAlchemyError, OSError) as error:
            if self._available or not hasattr(self, "_warned"):
                logger.warning("inference log store %s unavailable (%s); spooling records to %s and retrying "
                               "every %.1f s", _safe_url(self.url), str(error).splitlines()[0][:200],
                               self.spool, self.flush_interval)
                self._warned = True
            self._available = False
            return False
        if not self._available:
            logger.info("inference log store %s is available", _safe_url(self.url))
        self._available = True
        self._stored += len(batch)
        return True

    # --- the spool ----------------------------------------------------------------------------

    def _count_spool(self) -> int:
        total = 0
        for path in (self.spool.with_suffix(".flushing"), self.spool):
            if path.exists():
                with open(path, encoding="utf-8", errors="replace") as handle:
                    total += sum(1 for line in handle if line.strip())
        return total

    def _append_spool(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        with self.spool_lock:
            with open(self.spool, "a", encoding="utf-8") as handle:
                handle.write("".join(_to_json(kind, row) + "\n" for kind, row in batch))
                handle.flush()
                os.fsync(handle.fileno())
            self._spooled += len(batch)

    def _flush_spool(self) -> None:
        """Move the spool into the store, oldest first; on failure keep everything for later."""
        flushing = self.spool.with_suffix(".flushing")
        with self.spool_lock:
            if not flushing.exists():
                if not self.spool.exists():
                    self._spooled = 0
                    return
                os.replace(self.spool, flushing)  # new failures append to a fresh spool meanwhile
        rows, corrupt = [], 0
        with open(flushing, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    rows.append(_from_json(line))
                except (ValueError, KeyError, TypeError):
                    corrupt += 1
        if corrupt:
            logger.warning("inference log: skipped %d corrupt line(s) in %s (e.g. a write cut off by a crash)",
                           corrupt, flushing)
        for start in range(0, len(rows), self.batch_size):
            if not self._write(rows[start: start + self.batch_size]):
                # keep the unwritten rest (already-written rows are ignored on replay)
                with self.spool_lock:
                    rest = "".join(_to_json(kind, row) + "\n" for kind, row in rows[start:])
                    newer = self.spool.read_text(encoding="utf-8") if self.spool.exists() else ""
                    tmp = flushing.with_suffix(".tmp")
                    tmp.write_text(rest + newer, encoding="utf-8")
                    with open(tmp, encoding="utf-8") as handle:
                        os.fsync(handle.fileno())
                    os.replace(tmp, self.spool)
                    flushing.unlink()
                    self._spooled = len(rows) - start + (newer.count("\n"))
                return
        with self.spool_lock:
            flushing.unlink()
            self._spooled = self._count_spool()
        logger.info("inference log: flushed %d spooled record(s) to the store", len(rows))


def read_records(url: str, start: datetime | None = None, end: datetime | None = None) -> pd.DataFrame:
    """Requests with created_at in [start, end), oldest first, with the latest feedback joined."""
    import pandas as pd

    engine = make_engine(url)
    # SQLite keeps datetimes without their zone: every timestamp here is UTC.
    start, end = (t.astimezone(UTC) if t is not None and t.tzinfo else t for t in (start, end))
    try:
        query = sa.select(requests_table).order_by(requests_table.c.created_at)
        if start is not None:
            query = query.where(requests_table.c.created_at >= start)
        if end is not None:
            query = query.where(requests_table.c.created_at < end)
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("inference_requests"):
                return pd.DataFrame(columns=[c.name for c in requests_table.columns]
                                    + ["feedback_score", "feedback_comment"])
            frame = pd.read_sql(query, connection)
            feedback = pd.read_sql(sa.select(feedback_table).order_by(feedback_table.c.created_at), connection)
    finally:
        engine.dispose()
    latest = (feedback.drop_duplicates("request_id", keep="last")
              .rename(columns={"score": "feedback_score", "comment": "feedback_comment"})
              [["request_id", "feedback_score", "feedback_comment"]])
    frame = frame.merge(latest, on="request_id", how="left")
    frame["params"] = [json.loads(p) if isinstance(p, str) else None for p in frame["params"]]
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    return frame

