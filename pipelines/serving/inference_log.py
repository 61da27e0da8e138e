"""The inference log: every request and response of `llmops serve`, durably, for monitoring.

Writes: `InferenceLog` (used by `pipelines/serving/app.py`) sends records through SQLAlchemy to
`inference_log.url`: SQLite in WAL mode by default (readers such as `monitor` do not block
the writer), PostgreSQL by URL. Reads: `read_records(url, start, end)` returns a window of
requests with their latest feedback, for the monitoring stage.

Two tables: `inference_requests` (one row per request, keyed by request_id) and
`inference_feedback` (one row per feedback, keyed by a client-side feedback_id and joined to
its request when read, so feedback that arrives later never updates a request row).

Acceptance is durable (write-ahead): `record()` and `feedback()` never block or raise; they put
the record on a queue and return a future. A journal thread appends each batch it takes from
the queue to `spool_dir/pending.jsonl` with one fsync and then settles the batch's futures, so
records that arrive during an fsync share the next one (group commit). The gateway waits for
its record's future before it answers, so an answered request is on disk whatever happens to
the process next (kill -9, OOM kill, power cut); the cost is one local fsync per batch on the
answer's path (measured in docs/monitoring.md). When the disk refuses the append, the batch goes
straight to the store (a committed transaction is durable too), else it stays in memory and is
retried. A second thread, the store writer, moves the spool into the store: it renames it to
`pending.flushing` (appends go to a fresh `pending.jsonl` meanwhile), inserts it batch by batch
in one transaction each, and deletes it; while the store is unreachable (down, locked, an old
schema) it retries every `flush_interval_seconds`. A failure part-way keeps the unwritten rest
in `pending.flushing`, which is flushed before anything newer. Every insert ignores rows whose
key is stored already, so replaying a spool after a partial failure or a crash writes nothing
twice. A spool left by a stopped or crashed process is flushed when the next one starts; a line
cut off by a crash is skipped, counted in a WARNING and kept in `rejected.jsonl`, as is a row
the store refuses (e.g. a NOT NULL field given None), so that one bad row cannot block the
others. SQLite runs with `synchronous=FULL`, so a batch the store committed (whose spool lines
are then deleted) survives a power cut too.

Prompts, outputs, errors, feedback comments and the strings among the decoding parameters
(`stop` sequences) are redacted (`pipelines.data.pii.redact`) before they are stored or spooled.

One spool_dir belongs to one process at a time: it is locked (`spool.lock`, flock, released by
the kernel when the process dies) from the moment an InferenceLog is made until close(); a
second process on the same folder stops at start with a one-line error (SpoolInUse).

Try it alone:
    python -c "from pipelines.serving.inference_log import read_records; print(read_records('sqlite:///data/inference/inference.db'))"
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from pipelines.config.params import InferenceLogParams
from pipelines.config.settings import DEFAULT_INFERENCE_LOG, inference_log_url
from pipelines.data.pii import redact
from pipelines.errors import LLMOpsError

if TYPE_CHECKING:
    import pandas as pd


logger = logging.getLogger(__name__)

SPOOL_FILE = "pending.jsonl"  # records waiting for the store, oldest first
FLUSHING_FILE = "pending.flushing"  # the spool while (or since) it is being flushed; older than SPOOL_FILE
REJECTED_FILE = "rejected.jsonl"  # corrupt spool lines and rows the store refused, kept for a person to look at
LOCK_FILE = "spool.lock"  # flock'ed by the one process that owns the spool; says which one
# The queue holds only what the journal has not fsynced yet (normally one batch: the gateway waits
# for each record to be on disk before it answers). It is bounded so that a disk that stops cannot
# exhaust memory; past the bound, record() appends to the spool from the caller's thread.
MAX_QUEUED = 100_000

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
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("feedback_id", sa.String(64), nullable=False, unique=True),  # client-side key: replays are no-ops
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("comment", sa.Text),
)
_KEYS = {"request": "request_id", "feedback": "feedback_id"}
_TABLES = {"request": requests_table, "feedback": feedback_table}
_COLUMNS = {kind: {c.name for c in table.columns if c.name != "id"} for kind, table in _TABLES.items()}
_REQUIRED = {kind: {c.name for c in table.columns if not c.nullable and c.name != "id"}
             for kind, table in _TABLES.items()}
_REDACTED = {"request": ("prompt", "output", "error"), "feedback": ("comment",)}


@dataclass
class InferenceRecord:
    request_id: str  # unique, e.g. "req-<uuid4 hex>"
    created_at: datetime  # stored in UTC; a naive value is taken as UTC
    endpoint: str  # "completions" | "chat.completions"
    model_name: str
    model_version: str
    prompt: str
    output: str
    status: int  # HTTP status of the response
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    params: dict | None = None  # decoding parameters (stored as JSON text)


@dataclass
class Feedback:
    request_id: str
    created_at: datetime
    score: float | None = None  # e.g. 1.0 / 0.0 for thumbs up / down
    comment: str | None = None
    feedback_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # makes a replayed insert a no-op


# --- the engine ----------------------------------------------------------------------------


def _safe_url(url: str) -> str:
    """`url` without its password, for messages (also when it does not parse)."""
    with contextlib.suppress(Exception):
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def make_engine(url: str, *, create_folder: bool = True) -> sa.Engine:
    """An engine for `url` (SQLite in WAL mode, or PostgreSQL); LLMOpsError for a URL the user must fix."""
    safe = _safe_url(url)
    example = f"e.g. {DEFAULT_INFERENCE_LOG} or postgresql+psycopg2://user@host/db"
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise LLMOpsError(f"inference_log.url {safe!r} is not a database URL; use {example}") from None
    backend = parsed.get_backend_name()
    if backend not in {"sqlite", "postgresql"}:
        raise LLMOpsError(f"inference_log.url {safe}: the {backend} dialect is not supported (the log needs "
                          f"INSERT ... ON CONFLICT DO NOTHING); use {example}")
    try:
        dialect = parsed.get_dialect()
    except sa.exc.NoSuchModuleError:
        raise LLMOpsError(f"inference_log.url {safe}: unknown driver '{parsed.drivername}'; use {example}") from None
    if dialect.is_async:
        raise LLMOpsError(f"inference_log.url {safe}: '{parsed.drivername}' is an asyncio driver and the log "
                          f"writes from a thread; use a synchronous one, {example}")
    options: dict[str, Any] = {}
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or parsed.query.get("mode") == "memory":
            raise LLMOpsError(f"inference_log.url {safe} is an in-memory SQLite database, which loses every "
                              f"record when the process exits; give a file, e.g. {DEFAULT_INFERENCE_LOG}")
        if create_folder and "uri" not in parsed.query:
            with contextlib.suppress(OSError):  # an unusable folder shows up as the store being down
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # A connection per transaction: a database file that is replaced or removed is noticed at the next
        # write instead of being written through a pooled handle to the old file. Opening SQLite is cheap.
        # Waits for a lock follow sqlite3's `timeout` (5 s; ?timeout=SECONDS in the URL changes it).
        options["poolclass"] = NullPool
    else:
        options["pool_pre_ping"] = True
        if dialect.driver in {"psycopg2", "psycopg"} and "connect_timeout" not in parsed.query:
            options["connect_args"] = {"connect_timeout": 10}  # a dead host must not hold the writer for minutes
    try:
        engine = sa.create_engine(parsed, **options)
    except ImportError as error:
        module = error.name or parsed.drivername
        fix = {"psycopg2": "pip install -e '.[postgres]' (psycopg2-binary)",
               "psycopg": "pip install 'psycopg[binary]', or write postgresql+psycopg2:// and "
                          "pip install -e '.[postgres]'"}.get(module, f"install the Python package for '{module}'")
        raise LLMOpsError(f"inference_log.url {safe} needs the database driver '{module}', which is not "
                          f"installed: {fix}") from None
    if backend == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, _record: Any) -> None:
            # synchronous=FULL, set here rather than left to how the SQLite library was built (some
            # builds default to NORMAL in WAL mode): NORMAL survives a crash but may lose the last
            # commits on a power cut, and the spool lines of a committed batch are deleted right
            # after the commit, so the commit must be on disk first. FULL costs one fsync of the
            # WAL per transaction, i.e. per batch, on the writer thread, not on an answer's path.
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
            finally:
                cursor.close()
    return engine


def _insert_ignoring_duplicates(engine: sa.Engine, kind: str) -> Any:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(_TABLES[kind]).on_conflict_do_nothing(index_elements=[_KEYS[kind]])


class SchemaMismatch(sa.exc.SQLAlchemyError):
    """The store's tables lack columns this version writes (made by an older version). Treated
    like an outage: records wait in the spool and go in once the columns exist."""


def _check_columns(engine: sa.Engine) -> None:
    # `create_all` creates missing tables but never alters existing ones; without this check an
    # old table refuses every insert with a driver error that does not say what to do.
    inspector = sa.inspect(engine)
    gaps = []
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column.name for column in table.columns if column.name not in present]
        if missing:
            gaps.append(f"{table.name} lacks {', '.join(missing)}")
    if gaps:
        raise SchemaMismatch(f"tables made by an older version: {'; '.join(gaps)}; add the columns (ALTER TABLE "
                             "... ADD COLUMN) or set inference_log.url to a new database")


def _is_bad_row(error: BaseException) -> bool:
    """The store refused the data (constraint, type), as opposed to being unreachable."""
    if isinstance(error, sa.exc.IntegrityError | sa.exc.DataError):
        return True
    return isinstance(error, sa.exc.StatementError) and not isinstance(error, sa.exc.DBAPIError)


# --- rows: what is inserted, and the same as one spool line ---------------------------------

Row = tuple[str, dict[str, Any]]  # (kind, column values)


def _utc(moment: Any) -> datetime:
    # SQLite's DateTime drops the zone, so every stored time is UTC: convert here, once.
    if not isinstance(moment, datetime):
        raise TypeError(f"created_at must be a datetime, got {type(moment).__name__}")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _to_row(item: InferenceRecord | Feedback, redact_pii: bool) -> Row:
    kind = "request" if isinstance(item, InferenceRecord) else "feedback"
    row = {f.name: getattr(item, f.name) for f in fields(item)}
    row["created_at"] = _utc(row["created_at"])
    if kind == "request" and row["params"] is not None:
        params = _redact_values(row["params"]) if redact_pii else row["params"]  # e.g. the stop strings
        row["params"] = json.dumps(params, sort_keys=True, default=str)
    for name, value in row.items():
        if isinstance(value, str):
            # A lone surrogate (JSON allows "\ud800") can be neither encoded for the store nor spooled,
            # and PostgreSQL refuses NUL in text (the whole batch would fail, again and again).
            row[name] = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    if redact_pii:
        for name in _REDACTED[kind]:
            if isinstance(row[name], str):
                row[name] = redact(row[name])
    return kind, row


def _redact_values(value: Any) -> Any:
    """`value` with every string in it redacted (dict keys are ours, not the client's: kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_values(item) for item in value]
    return value


def _to_line(kind: str, row: dict[str, Any]) -> str:
    return json.dumps({"kind": kind, **row, "created_at": row["created_at"].isoformat()}, default=str) + "\n"


def _from_line(line: bytes) -> Row:
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kind = data.pop("kind", None)
    if kind not in _COLUMNS:
        raise ValueError(f"unknown record kind {kind!r}")
    if not _REQUIRED[kind] <= data.keys() <= _COLUMNS[kind]:
        raise ValueError(f"wrong fields for a {kind}")
    data["created_at"] = _utc(datetime.fromisoformat(data["created_at"]))
    return kind, data


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` survive a power cut."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the log -------------------------------------------------------------------------------


class SpoolInUse(LLMOpsError):
    """Another process (or another InferenceLog) holds this spool folder."""


def _lock_spool(folder: Path) -> int:
    """An exclusive lock on `folder/spool.lock` (flock: released by the kernel when the process
    dies, kill -9 included, so a crash never leaves a stale lock); its file descriptor."""
    import fcntl
    import socket

    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise LLMOpsError(f"inference_log.spool_dir {folder}: cannot create the lock file {path} "
                          f"({error.strerror}); choose a writable folder with --set inference_log.spool_dir=PATH") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        if isinstance(error, BlockingIOError):
            holder = holder or f"see {path}"
            raise SpoolInUse(f"inference_log.spool_dir {folder} is in use by another process ({holder}); a spool "
                             "belongs to one gateway at a time: give each replica its own folder with --set "
                             "inference_log.spool_dir=PATH, or stop the other one") from None
        raise LLMOpsError(f"inference_log.spool_dir {folder}: cannot lock {path} ({error.strerror}); use a local "
                          "folder that supports flock with --set inference_log.spool_dir=PATH") from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _settle(done: Future[bool] | None, value: bool) -> None:
    if done is not None and not done.done():
        with contextlib.suppress(Exception):  # a caller may have cancelled it
            done.set_result(value)


Entry = tuple[Row, "Future[bool] | None"]  # a row, and the caller's future to settle once it is durable


class InferenceLog:
    """A write-ahead journal and a background writer to the inference-log database (see the
    module docstring)."""

    def __init__(self, url: str, spool_dir: Path | str, *, redact_pii: bool = True,
                 flush_interval_seconds: float = 1.0, batch_size: int = 256, max_queued: int = MAX_QUEUED,
                 store_delay_seconds: float = 0.0) -> None:
        if flush_interval_seconds <= 0 or batch_size < 1 or max_queued < 1 or store_delay_seconds < 0:
            raise ValueError("flush_interval_seconds must be > 0, batch_size and max_queued >= 1, "
                             "store_delay_seconds >= 0")
        self.url = url
        self.engine = make_engine(url)
        self.spool_dir = Path(spool_dir)
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LLMOpsError(f"inference_log.spool_dir {self.spool_dir} cannot be created ({error.strerror}); "
                              "choose a writable folder with --set inference_log.spool_dir=PATH") from None
        # Taken before the spool is read: two processes on one spool would flush, rename and delete
        # each other's files.
        self._lock_fd: int | None = _lock_spool(self.spool_dir)
        self.spool_path = self.spool_dir / SPOOL_FILE
        self.flushing_path = self.spool_dir / FLUSHING_FILE
        self.rejected_path = self.spool_dir / REJECTED_FILE
        self.redact_pii = redact_pii
        self.flush_interval = flush_interval_seconds
        self.batch_size = batch_size
        self.store_delay = store_delay_seconds
        self._announce_flush = True  # the first flush (a spool left by an earlier process) is said at INFO
        self._queue: queue.Queue[tuple[InferenceRecord | Feedback, Future[bool]]] = queue.Queue(maxsize=max_queued)
        self._lock = threading.Lock()  # the counters and _closed
        self._changed = threading.Condition(self._lock)  # notified whenever `pending` goes down
        self._spool_lock = threading.Lock()  # the spool files (the journal, the store writer, callers)
        self._tables_lock = threading.Lock()
        # pending = _in_memory (queued, or held by the journal) + _spooled (lines in the spool files)
        self._in_memory = 0
        self._spooled = _count_lines(self.flushing_path) + _count_lines(self.spool_path)
        self._held: list[Entry] = []  # the journal's rows that neither the disk nor the store took yet
        self._available = False
        self._tables_ready = False
        self._warned_down = False
        self._spool_failed = False
        self._last_drop_log = -1e9
        self.dropped = 0  # records that could go nowhere (store and spool disk both failed)
        self._closed = False
        self._stopping = threading.Event()  # close(): the journal drains the queue and stops
        self._journal_done = threading.Event()  # the journal stopped: the store writer's last flush, then it stops
        self._retry_now = threading.Event()
        self._hurry = threading.Event()  # flush() or close(): the store writer's coalescing wait ends
        self._wake = threading.Event()  # the journal appended: the store writer flushes
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_params(cls, params: InferenceLogParams) -> InferenceLog:
        """The log at inference_log.url, else $LLMOPS_INFERENCE_LOG_URL, else the SQLite default."""

        return cls(inference_log_url(params).value, params.spool_dir, redact_pii=params.redact_pii,
                   flush_interval_seconds=params.flush_interval_seconds, batch_size=params.batch_size,
                   store_delay_seconds=params.store_delay_seconds)

    # --- the caller's side ------------------------------------------------------------------

    def start(self) -> None:
        """Start the journal (queue -> fsynced spool) and the store writer (spool -> store), which
        creates the tables and flushes any spool left behind first."""
        if self._closed:
            raise RuntimeError("this InferenceLog is closed; make a new one")
        if self._threads:
            return
        _close_at_exit(self)
        self._threads = [threading.Thread(target=self._run_journal, name="llmops-inference-journal", daemon=True),
                         threading.Thread(target=self._run_store, name="llmops-inference-log", daemon=True)]
        for thread in self._threads:
            thread.start()

    def record(self, rec: InferenceRecord) -> Future[bool]:
        """Hand a request in; never blocks, never raises. The future turns True once the record
        is on disk (the fsynced spool, or committed to the store), False if it could go nowhere;
        a caller that must not answer before that (the gateway) waits for it."""
        return self._hand_in(rec)

    def feedback(self, fb: Feedback) -> Future[bool]:
        """Hand a feedback in; never blocks, never raises (the future: as for record())."""
        return self._hand_in(fb)

    def _hand_in(self, item: InferenceRecord | Feedback) -> Future[bool]:
        done: Future[bool] = Future()
        queued = False
        try:
            with self._lock:
                self._in_memory += 1
                if not self._closed:  # checked under the lock that close() sets it with: nothing is stranded
                    with contextlib.suppress(queue.Full):
                        self._queue.put_nowait((item, done))
                        queued = True
            if not queued:  # the queue is full (see MAX_QUEUED), or the log is closed: to the spool
                self._spool_from_caller(self._prepare([(item, done)]))
        except Exception:  # noqa: BLE001 - logging must never fail a response
            logger.exception("inference log: could not hand in a record")
            if not queued:
                self._count(in_memory=-1)
                _settle(done, False)
        return done

    @property
    def store_available(self) -> bool:
        """Whether the last write to (or check of) the store succeeded."""
        return self._available

    @property
    def pending(self) -> int:
        """Records handed in (or found in the spool) that are not in the store yet."""
        with self._lock:
            return self._in_memory + self._spooled

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed in so far (and any older spool) is in the store: True; False if
        `timeout` passes first. Asks the writer to retry the spool at once. For tests and shut-down."""
        self._retry_now.set()
        self._hurry.set()
        self._wake.set()
        with self._changed:
            return self._changed.wait_for(lambda: self._in_memory + self._spooled == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the writers: what is in memory goes to the spool, the spool to the store while it
        answers (what it does not take waits in the spool for the next start); releases the spool."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        self._hurry.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            self._wake.set()
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            logger.warning("inference log: %s did not stop within %.0f s (store or disk slow?); what it holds is "
                           "lost if the process exits before it finishes", ", ".join(stuck), timeout)
        leftover = []
        while True:  # the writer never started, or did not finish: the queue goes to the spool
            try:
                leftover.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if leftover:
            self._spool_from_caller(self._prepare(leftover))
        if self.pending:
            logger.info("inference log closed with %d record(s) in %s; the next start flushes them",
                        self.pending, self.spool_dir)
        self.engine.dispose()
        _open_logs.discard(self)
        if not stuck:  # a thread still running keeps the spool: no other process may take it meanwhile
            with self._spool_lock:
                fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)  # releases the flock

    def known_request(self, request_id: str) -> bool | None:
        """Whether the store holds `request_id`; None when the store cannot be asked."""
        try:
            self._ensure_tables()
            with self.engine.connect() as connection:
                found = connection.execute(sa.select(requests_table.c.request_id)
                                           .where(requests_table.c.request_id == request_id)).first()
        except (sa.exc.SQLAlchemyError, OSError):
            return None
        return found is not None

    # --- counting and the spool ------------------------------------------------------------

    def _count(self, in_memory: int = 0, spooled: int = 0) -> None:
        with self._lock:
            self._in_memory += in_memory
            self._spooled = max(0, self._spooled + spooled)
            self._changed.notify_all()

    def _prepare(self, items: list[tuple[InferenceRecord | Feedback, Future[bool] | None]]) -> list[Entry]:
        """Rows to store (redacted); an item that cannot become a row is kept in rejected.jsonl."""
        entries = []
        for item, done in items:
            try:
                entries.append((_to_row(item, self.redact_pii), done))
            except Exception as error:  # noqa: BLE001 - e.g. created_at is not a datetime
                text = repr(item)
                self._reject([{"reason": f"not a valid record: {error}",
                               "item": redact(text) if self.redact_pii else text}])
                self._count(in_memory=-1)
                _settle(done, True)  # on disk, in rejected.jsonl: nothing more will come of it
        return entries

    @contextlib.contextmanager
    def _holding_spool(self) -> Any:
        """The spool's flock for one write: held since __init__, or, after close(), taken for the
        write alone (OSError when another process has the spool now)."""
        if self._lock_fd is not None:
            yield
            return
        try:
            fd = _lock_spool(self.spool_dir)
        except LLMOpsError as error:
            raise OSError(str(error)) from None
        try:
            yield
        finally:
            os.close(fd)

    def _append_spool(self, rows: list[Row]) -> None:
        """Append rows (counted as in memory) to the spool and fsync; OSError leaves the file as it was."""
        data = "".join(_to_line(kind, row) for kind, row in rows).encode("utf-8")
        with self._spool_lock, self._holding_spool():
            new = not self.spool_path.exists()
            with open(self.spool_path, "a+b") as handle:
                size = handle.seek(0, os.SEEK_END)
                try:
                    if size:
                        handle.seek(size - 1)
                        if handle.read(1) != b"\n":  # a line cut off by a crash must not swallow the next one
                            data = b"\n" + data
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                except OSError:
                    with contextlib.suppress(OSError):
                        handle.truncate(size)  # no half-written line behind (e.g. disk full)
                    raise
            if new:
                _fsync_dir(self.spool_dir)
            self._count(in_memory=-len(rows), spooled=len(rows))
        self._wake.set()

    def _spool_from_caller(self, entries: list[Entry]) -> None:
        if not entries:
            return
        try:
            self._append_spool([row for row, _ in entries])
        except OSError as error:
            with self._lock:
                self.dropped += len(entries)
            self._count(in_memory=-len(entries))
            for _, done in entries:
                _settle(done, False)
            if time.monotonic() - self._last_drop_log > 60:  # at most one line a minute in this disaster
                self._last_drop_log = time.monotonic()
                logger.error("inference log: the queue is full or the log closed, and the spool %s cannot be "
                             "written (%s); %d record(s) lost so far", self.spool_path, error, self.dropped)
            return
        for _, done in entries:
            _settle(done, True)

    def _reject(self, entries: list[dict[str, Any]]) -> None:
        """Keep what can never be inserted in rejected.jsonl, out of the way of the other records."""
        try:
            with open(self.rejected_path, "a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(entry, default=str) + "\n" for entry in entries))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            logger.error("inference log: could not write %d rejected record(s) to %s: %s", len(entries),
                         self.rejected_path, error)

    # --- the store -------------------------------------------------------------------------

    def _ensure_tables(self) -> None:
        if self._tables_ready:
            return
        with self._tables_lock:
            if not self._tables_ready:
                metadata.create_all(self.engine)
                _check_columns(self.engine)
                self._tables_ready = True

    def _mark_down(self, error: BaseException) -> None:
        self._available = False
        self._announce_flush = True
        self._tables_ready = False  # check again when it is back (it may be a new, empty database)
        if not self._warned_down:  # one WARNING per outage, not one per record or retry
            self._warned_down = True
            logger.warning("inference log store %s is unavailable (%s); spooling records to %s and retrying "
                           "every %g s", _safe_url(self.url), str(error).splitlines()[0][:300], self.spool_dir,
                           self.flush_interval)

    def _mark_up(self) -> None:
        if self._warned_down:
            self._warned_down = False
            logger.info("inference log store %s is available again", _safe_url(self.url))
        self._available = True

    def _store(self, rows: list[Row]) -> int:
        """Insert rows in one transaction; the number of leading rows now stored (or rejected)."""
        if not rows:
            return 0
        try:
            self._ensure_tables()
            with self.engine.begin() as connection:
                for kind in ("request", "feedback"):
                    values = [row for k, row in rows if k == kind]
                    if values:
                        connection.execute(_insert_ignoring_duplicates(self.engine, kind), values)
        except (sa.exc.SQLAlchemyError, OSError) as error:
            if not _is_bad_row(error):
                self._mark_down(error)
                return 0
            if len(rows) > 1:  # find the bad row(s): one transaction each, stop at the first outage
                done = 0
                for row in rows:
                    if not self._store([row]):
                        break
                    done += 1
                return done
            kind, row = rows[0]
            logger.warning("inference log: the store refused %s %s (%s); kept in %s", kind, row.get(_KEYS[kind]),
                           str(error).splitlines()[0][:300], self.rejected_path)
            self._reject([{"reason": f"refused by the store: {str(error).splitlines()[0][:300]}",
                           "line": _to_line(kind, row)}])
        self._mark_up()
        return len(rows)

    # --- the journal thread: queue -> spool (group commit) ------------------------------------

    def _run_journal(self) -> None:
        """Every batch taken from the queue is appended to the spool with one fsync, then its
        futures are settled: what waited during an fsync goes in the next one (group commit)."""
        try:
            while True:
                try:
                    if self._held:
                        self._deliver_held()
                        if self._held:  # neither the disk nor the store takes them: wait, keep them
                            if self._stopping.wait(self.flush_interval):
                                break
                            continue
                    items = self._take_batch()
                    if items:
                        self._held.extend(self._prepare(items))
                        self._deliver_held()
                    elif self._stopping.is_set():
                        break
                except Exception:  # noqa: BLE001 - the journal must outlive any one failure; rows stay in _held
                    logger.exception("inference log journal: unexpected error; retrying in %g s", self.flush_interval)
                    if self._stopping.wait(self.flush_interval):
                        break
            if self._held:
                self._deliver_held()  # a last try
            if self._held:
                logger.error("inference log: %d record(s) could be neither spooled nor stored before shut-down",
                             len(self._held))
                for _, done in self._held:
                    _settle(done, False)
        finally:
            self._journal_done.set()
            self._wake.set()

    def _take_batch(self) -> list[tuple[InferenceRecord | Feedback, Future[bool]]]:
        try:
            items = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(items) < self.batch_size:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _deliver_held(self) -> None:
        """The held rows go to the spool (fsynced); when the disk refuses them, to the store directly
        (its commit is durable too); else they stay held and are tried again."""
        entries = self._held
        try:
            self._append_spool([row for row, _ in entries])
        except OSError as error:
            if not self._spool_failed:
                self._spool_failed = True
                logger.error("inference log: cannot write the spool %s (%s); writing %d record(s) straight to the "
                             "store, or keeping them in memory and retrying", self.spool_path, error, len(entries))
            done = self._store([row for row, _ in entries])
            self._count(in_memory=-done)
            for _, future in entries[:done]:
                _settle(future, True)
            self._held = entries[done:]
            return
        self._spool_failed = False
        self._held = []
        for _, future in entries:
            _settle(future, True)

    # --- the store writer thread: spool -> store ----------------------------------------------

    def _run_store(self) -> None:
        """Flushes the spool into the store whenever the journal appended (at once while the
        store answers, every flush_interval while it does not); flushes a spool left by an
        earlier process first."""
        try:
            self._ensure_tables()
            self._mark_up()
        except (sa.exc.SQLAlchemyError, OSError) as error:
            self._mark_down(error)
        next_try = 0.0
        while True:
            finishing = self._journal_done.is_set()  # read first: all the journal wrote is in the spool now
            due = self._retry_now.is_set() or time.monotonic() >= next_try or (finishing and self._available)
            if self._spooled and due:
                self._retry_now.clear()
                self._hurry.clear()  # this flush is the one asked for
                try:
                    flushed = self._flush_spool()
                except Exception:  # noqa: BLE001 - the writer must outlive any one failure; the spool stays
                    logger.exception("inference log writer: unexpected error; retrying in %g s", self.flush_interval)
                    flushed = False
                next_try = 0.0 if flushed else time.monotonic() + self.flush_interval
            elif not self.pending:
                self._hurry.clear()  # a flush() with nothing to flush is done
            if finishing:  # the last try was made only while the store answers (no hang at shut-down)
                break
            self._wake.wait(self.flush_interval if not next_try else max(0.0, next_try - time.monotonic()))
            self._wake.clear()  # `_spooled`, read after this, tells what to do
            if (self.store_delay and self._available and 0 < self._spooled < self.batch_size
                    and not self._stopping.is_set()):
                # Coalescing: the records are on disk in the spool already, so the store can wait a
                # moment and take what arrives meanwhile in the same transaction. One flush per
                # answer cost the gateway ~1.4 ms of CPU per request at 16 clients (a rename, three
                # fsyncs, a commit), on cores the engine needs. flush() and close() cut it short.
                self._hurry.wait(self.store_delay)
                self._hurry.clear()

    def _flush_spool(self) -> bool:
        """Move the spool into the store, oldest first; False when the store failed (the rest stays)."""
        for _ in range(2):  # pending.flushing (left by a failure or a crash) first, then pending.jsonl
            with self._spool_lock:
                if not self.flushing_path.exists():
                    if not self.spool_path.exists():
                        return True
                    os.replace(self.spool_path, self.flushing_path)  # appends go to a fresh spool meanwhile
            # The folder's fsync outside the lock, so the journal's appends do not wait for it: a
            # rename or unlink lost in a power cut only replays lines, and the inserts ignore
            # rows stored already.
            _fsync_dir(self.spool_dir)
            if not self._flush_file(self.flushing_path):
                return False
        return True

    def _flush_file(self, path: Path) -> bool:
        stored = corrupt = 0
        owed = 0  # the last batch's lines leave `pending` only once the file is gone too
        try:
            with open(path, "rb") as handle:
                offset = 0
                while lines := list(itertools.islice(handle, self.batch_size)):
                    entries: list[tuple[int, bytes, Row | None]] = []  # (offset, line, row; None if corrupt)
                    for line in lines:
                        if line.strip():
                            try:
                                entries.append((offset, line, _from_line(line)))
                            except (ValueError, TypeError, KeyError):
                                entries.append((offset, line, None))
                        offset += len(line)
                    rows = [row for _, _, row in entries if row is not None]
                    done = self._store(rows)
                    rest_at = None
                    if done < len(rows):  # the store failed: the lines from the first unwritten row on stay
                        cut = [i for i, (_, _, row) in enumerate(entries) if row is not None][done]
                        rest_at = entries[cut][0]
                        entries = entries[:cut]
                    bad = [line for _, line, row in entries if row is None]
                    if bad:
                        self._skip_corrupt(path, bad)
                        corrupt += len(bad)
                    stored += len(entries) - len(bad)
                    if rest_at is not None:
                        if rest_at:  # lines before it went in: drop them from the file (else it stays as it is)
                            self._keep_rest(handle, path, rest_at)
                        self._count(spooled=-(owed + len(entries)))
                        return False
                    self._count(spooled=-owed)
                    owed = len(entries)
            with self._spool_lock:
                path.unlink()
            _fsync_dir(self.spool_dir)
            self._count(spooled=-owed)
            if stored:  # at INFO after a start or an outage, else (every flush of normal running) DEBUG
                logger.log(logging.INFO if self._announce_flush else logging.DEBUG,
                           "inference log: flushed %d spooled record(s) to the store", stored)
            self._announce_flush = False
            return True
        finally:
            if corrupt:
                logger.warning("inference log: skipped %d corrupt line(s) in %s (e.g. a write cut off by a "
                               "crash); kept in %s", corrupt, path, self.rejected_path)

    def _skip_corrupt(self, path: Path, lines: list[bytes]) -> None:
        self._reject([{"reason": f"corrupt line in {path.name}", "line": line.decode("utf-8", "replace")}
                      for line in lines])

    def _keep_rest(self, handle: Any, path: Path, offset: int) -> None:
        """Replace `path` by its lines from `offset` on (those before are in the store)."""
        tmp = path.with_name(path.name + ".tmp")
        handle.seek(offset)
        with open(tmp, "wb") as out:
            shutil.copyfileobj(handle, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.spool_dir)


# Logs still open at interpreter exit are closed (drained to the store or the spool); the hook is
# registered by the first start(), not at import.
_open_logs: weakref.WeakSet[InferenceLog] = weakref.WeakSet()
_exit_hook_registered = False


def _close_at_exit(log: InferenceLog) -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_open_logs)
        _exit_hook_registered = True
    _open_logs.add(log)


def _close_open_logs() -> None:
    for log in list(_open_logs):
        with contextlib.suppress(Exception):
            log.close(timeout=5.0)


# --- reading -------------------------------------------------------------------------------

READ_COLUMNS = [c.name for c in requests_table.columns] + ["feedback_score", "feedback_comment"]


def read_records(url: str, start: datetime | None = None, end: datetime | None = None) -> pd.DataFrame:
    """Requests with created_at in [start, end), oldest first, with their latest feedback.

    Columns: those of `inference_requests` (`params` parsed back to a dict, `created_at` as UTC
    timestamps) plus `feedback_score` (NaN when none) and `feedback_comment` (None when none),
    from the feedback with the latest created_at per request. A naive start/end is taken as UTC.
    A store that does not exist yet reads as an empty frame.
    """
    import pandas as pd

    engine = make_engine(url, create_folder=False)
    rows: list[tuple] = []
    try:
        if engine.url.get_backend_name() == "sqlite" and not Path(engine.url.database or "").exists():
            return _records_frame(pd, rows)  # do not create an empty database by reading
        fb = feedback_table
        ranked = sa.select(fb.c.request_id, fb.c.score, fb.c.comment, sa.func.row_number().over(
            partition_by=fb.c.request_id, order_by=(fb.c.created_at.desc(), fb.c.id.desc())).label("rank")).subquery()
        query = (sa.select(requests_table, ranked.c.score.label("feedback_score"),
                           ranked.c.comment.label("feedback_comment"))
                 .select_from(requests_table.outerjoin(ranked, sa.and_(
                     ranked.c.request_id == requests_table.c.request_id, ranked.c.rank == 1)))
                 .order_by(requests_table.c.created_at, requests_table.c.request_id))
        if start is not None:
            query = query.where(requests_table.c.created_at >= _utc(start))
        if end is not None:
            query = query.where(requests_table.c.created_at < _utc(end))
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            if inspector.has_table(requests_table.name) and inspector.has_table(fb.name):
                rows = [tuple(row) for row in connection.execute(query)]
    except sa.exc.SQLAlchemyError as error:
        raise LLMOpsError(f"could not read the inference log at {_safe_url(url)} "
                          f"({str(error).splitlines()[0][:300]}); check that the store is reachable and "
                          "that inference_log.url is right") from None
    finally:
        engine.dispose()
    return _records_frame(pd, rows)


def _records_frame(pd: Any, rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=READ_COLUMNS)
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    frame["params"] = [json.loads(p) if isinstance(p, str) else None for p in frame["params"]]
    frame["feedback_score"] = frame["feedback_score"].astype(float)
    frame["feedback_comment"] = frame["feedback_comment"].astype(object).where(frame["feedback_comment"].notna(),
                                                                              None)
    return frame
