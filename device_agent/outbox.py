"""The durable outbox: every device message waits on disk until the service's receipt names it.

The agent writes a message here first (``put``), the pump publishes what is ``due``, and a
receipt from the service (``confirm``) deletes it. The broker's PUBACK is only one hop and the
broker's persistence is a periodic snapshot, so nothing is forgotten on the device before the
service says it is stored. While the device is offline the outbox keeps filling, up to
``max_messages`` and ``max_bytes``; past those bounds it drops by priority:

    telemetry (0)  dropped first: the next sample describes the device just as well
    logs      (1)
    reported  (2)  a state snapshot; a newer one supersedes it anyway
    acks, results (3)  dropped last: an operator or an integration waits for each of them

Within one priority the oldest entry goes first. The entry being put is only dropped itself when
everything else is more important than it. Drops are counted per kind in the database.

The API blocks (SQLite, fsync): the agent calls it through ``asyncio.to_thread``. One connection,
guarded by a lock, serves every thread.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from device_agent.errors import AgentError, PayloadTooLargeError
from fleet_protocol import MAX_PAYLOAD_BYTES, DeviceMessage, TopicKind

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGES",
    "OUTBOX_FILE",
    "PRIORITY",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
]

logger = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.db"

# A week of telemetry at the default 30 s interval is ~20,000 messages; 100,000 leaves room for
# logs and acks on top, and at a few hundred bytes each stays far below DEFAULT_MAX_BYTES.
DEFAULT_MAX_MESSAGES = 100_000
# Small enough for a 4 GB SD card that also holds models; large enough for days offline.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# Which kinds go through the outbox, and how precious each one is (higher is dropped later).
PRIORITY: dict[TopicKind, int] = {
    TopicKind.TELEMETRY: 0,
    TopicKind.LOGS: 1,
    TopicKind.REPORTED: 2,
    TopicKind.ACKS: 3,
    TopicKind.RESULTS: 3,
}

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    -- AUTOINCREMENT: a seq is never reused, even after the newest rows were deleted, so the
    -- insertion order survives any mix of confirms and drops.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    model TEXT,
    priority INTEGER NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_by_priority ON outbox (priority, seq);
CREATE TABLE IF NOT EXISTS outbox_stats (
    kind TEXT PRIMARY KEY,
    dropped INTEGER NOT NULL
);
"""

# Victims are looked up this many at a time while making room; a put usually needs one.
_EVICTION_CHUNK = 256
# SQLite's default limit on host parameters is 999 on older builds; confirm in chunks below it.
_CONFIRM_CHUNK = 500


class OutboxError(AgentError):
    """The outbox database cannot be opened, read or written (disk full, I/O error)."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One stored message, ready to publish as-is."""

    seq: int
    message_id: str
    kind: TopicKind
    model: str | None
    payload: bytes
    retain: bool
    attempts: int


@dataclass(frozen=True, slots=True)
class _Prepared:
    message_id: str
    kind: TopicKind
    model: str | None
    payload: bytes
    retain: bool
    created: float


class Outbox:
    """The SQLite outbox at ``<state_dir>/outbox.db``; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(
                f"outbox bounds must be positive, got max_messages={max_messages} "
                f"max_bytes={max_bytes}"
            )
        self._path = path
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._burst_drops = 0  # drops since the outbox last had room; warned about at the first
        self._conn = _connect(path)
        try:
            count, size = self._conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
            ).fetchone()
        except sqlite3.Error as exc:
            self._conn.close()
            raise _translate(exc, f"reading {path}") from exc
        # Kept in memory (one agent owns the file) so that a put need not scan the table.
        self._count: int = count
        self._bytes: int = size

    @classmethod
    def in_state_dir(
        cls,
        state_dir: Path,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Outbox:
        """Open (creating if needed) the outbox of the agent whose state is in ``state_dir``."""
        return cls(state_dir / OUTBOX_FILE, max_messages=max_messages, max_bytes=max_bytes)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def put(
        self,
        kind: TopicKind,
        message: DeviceMessage,
        *,
        model: str | None = None,
        retain: bool = False,
    ) -> None:
        """Store ``message`` for ``kind``; it is on disk when this returns.

        A message id already stored is ignored. A retained message supersedes the older
        unconfirmed retained ones on its topic, since only the newest state matters. Raises
        :class:`PayloadTooLargeError` for a message no broker of the fleet would accept.
        """
        self.put_many([(kind, message, model, retain)])

    def put_many(self, items: Iterable[tuple[TopicKind, DeviceMessage, str | None, bool]]) -> None:
        """:meth:`put` for several ``(kind, message, model, retain)``, with a single fsync."""
        prepared = [_prepare(*item) for item in items]
        if not prepared:
            return
        with self._lock, self._transaction("writing to"):
            for entry in prepared:
                self._put_one(entry)

    def due(self, limit: int, *, resend_after_s: float, now: float) -> list[OutboxEntry]:
        """Up to ``limit`` entries never sent or sent over ``resend_after_s`` ago, oldest first.

        ``now`` and the ``now`` given to :meth:`mark_sent` come from one monotonic clock.
        """
        with self._lock:
            rows = self._read(
                "SELECT seq, message_id, kind, model, payload, retain, attempts FROM outbox "
                "WHERE sent_at IS NULL OR sent_at <= ? ORDER BY seq LIMIT ?",
                (now - resend_after_s, limit),
            )
        return [
            OutboxEntry(
                seq=seq,
                message_id=message_id,
                kind=TopicKind(kind),
                model=model,
                payload=bytes(payload),
                retain=bool(retain),
                attempts=attempts,
            )
            for seq, message_id, kind, model, payload, retain, attempts in rows
        ]

    def mark_sent(self, seqs: Sequence[int], now: float) -> None:
        """Record that the broker acknowledged these entries at ``now``."""
        if not seqs:
            return
        with self._lock, self._transaction("marking sent in"):
            self._conn.executemany(
                "UPDATE outbox SET sent_at = ?, attempts = attempts + 1 WHERE seq = ?",
                [(now, seq) for seq in seqs],
            )

    def confirm(self, message_ids: Iterable[str]) -> int:
        """Delete the entries the service has committed; return how many were still here."""
        ids = list(dict.fromkeys(message_ids))
        removed = 0
        if not ids:
            return removed
        with self._lock, self._transaction("confirming in"):
            for start in range(0, len(ids), _CONFIRM_CHUNK):
                chunk = ids[start : start + _CONFIRM_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT seq, length(payload) FROM outbox WHERE message_id IN ({marks})",  # noqa: S608 -- only '?' marks are interpolated
                    chunk,
                ).fetchall()
                self._delete(rows)
                removed += len(rows)
        return removed

    def depth(self) -> int:
        """How many messages wait for a receipt."""
        with self._lock:
            return self._count

    def size_bytes(self) -> int:
        """The payload bytes waiting for a receipt."""
        with self._lock:
            return self._bytes

    def oldest_age_s(self, now: float) -> float | None:
        """Seconds since the oldest waiting message was created, or None when empty.

        ``now`` is wall-clock time (``time.time()``), the clock of the messages' timestamps.
        """
        with self._lock:
            rows = self._read("SELECT created FROM outbox ORDER BY seq LIMIT 1", ())
        if not rows:
            return None
        created: float = rows[0][0]
        return max(0.0, now - created)

    def dropped(self) -> dict[str, int]:
        """Messages the bounds have dropped since the outbox was created, per kind."""
        with self._lock:
            rows = self._read("SELECT kind, dropped FROM outbox_stats ORDER BY kind", ())
        return dict(rows)

    def close(self) -> None:
        """Close the database; later calls raise OutboxError. Closing twice is harmless."""
        with self._lock:
            self._conn.close()

    # -- under the lock, inside a transaction --------------------------------------------------

    def _put_one(self, entry: _Prepared) -> None:
        known = self._conn.execute(
            "SELECT 1 FROM outbox WHERE message_id = ?", (entry.message_id,)
        ).fetchone()
        if known is not None:
            return
        priority = PRIORITY[entry.kind]
        if entry.retain:
            self._delete(
                self._conn.execute(
                    "SELECT seq, length(payload) FROM outbox "
                    "WHERE kind = ? AND model IS ? AND retain = 1",
                    (entry.kind.value, entry.model),
                ).fetchall()
            )
        victims = self._victims(priority, len(entry.payload))
        if victims is None:
            # Everything stored matters more than this message, or it alone exceeds the bounds.
            self._count_drops({entry.kind.value: 1})
            return
        if victims:
            drops: dict[str, int] = {}
            for _, kind, _ in victims:
                drops[kind] = drops.get(kind, 0) + 1
            self._count_drops(drops)
            self._delete([(seq, size) for seq, _, size in victims])
        elif self._burst_drops:
            logger.info(
                "outbox has room again after dropping %d messages; drops per kind so far: %s",
                self._burst_drops,
                dict(self._conn.execute("SELECT kind, dropped FROM outbox_stats").fetchall()),
            )
            self._burst_drops = 0
        # OR IGNORE: a second line of defence behind the lookup above, same outcome.
        self._conn.execute(
            "INSERT OR IGNORE INTO outbox "
            "(message_id, kind, model, priority, payload, retain, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                entry.message_id,
                entry.kind.value,
                entry.model,
                priority,
                entry.payload,
                int(entry.retain),
                entry.created,
            ),
        )
        self._count += 1
        self._bytes += len(entry.payload)

    def _victims(self, priority: int, size: int) -> list[tuple[int, str, int]] | None:
        """``(seq, kind, size)`` of the entries to delete so ``size`` more bytes fit.

        None when even deleting every entry of ``priority`` or lower would not make room: then
        the new entry is the one to drop.
        """
        if size > self._max_bytes:
            return None
        excess_count = self._count + 1 - self._max_messages
        excess_bytes = self._bytes + size - self._max_bytes
        victims: list[tuple[int, str, int]] = []
        after = (-1, -1)  # (priority, seq) of the last candidate looked at
        while excess_count > 0 or excess_bytes > 0:
            chunk = self._conn.execute(
                "SELECT priority, seq, kind, length(payload) FROM outbox "
                "WHERE priority <= ? AND (priority, seq) > (?, ?) "
                "ORDER BY priority, seq LIMIT ?",
                (priority, *after, _EVICTION_CHUNK),
            ).fetchall()
            if not chunk:
                return None
            for row_priority, seq, kind, length in chunk:
                after = (row_priority, seq)
                victims.append((seq, kind, length))
                excess_count -= 1
                excess_bytes -= length
                if excess_count <= 0 and excess_bytes <= 0:
                    break
        return victims

    def _delete(self, rows: Sequence[tuple[int, int]]) -> None:
        """Delete ``(seq, size)`` rows and keep the totals in step."""
        if not rows:
            return
        self._conn.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _ in rows])
        self._count -= len(rows)
        self._bytes -= sum(size for _, size in rows)

    def _count_drops(self, drops: dict[str, int]) -> None:
        self._conn.executemany(
            "INSERT INTO outbox_stats (kind, dropped) VALUES (?, ?) "
            "ON CONFLICT (kind) DO UPDATE SET dropped = dropped + excluded.dropped",
            list(drops.items()),
        )
        if not self._burst_drops:
            # Once per burst: a device offline for days would otherwise warn about every sample.
            logger.warning(
                "outbox full (%d messages, %d bytes; limits %d and %d): dropping the oldest "
                "messages of the lowest priority, telemetry first; this time %s",
                self._count,
                self._bytes,
                self._max_messages,
                self._max_bytes,
                drops,
            )
        self._burst_drops += sum(drops.values())

    # -- plumbing -------------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[object]) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, f"reading {self._path}") from exc

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on any error roll back, totals included."""
        saved = (self._count, self._bytes, self._burst_drops)
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc, f"{doing} {self._path}") from exc
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as exc:
            self._count, self._bytes, self._burst_drops = saved
            if self._conn.in_transaction:
                # A failed rollback leaves nothing to save; the original error says more.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, f"{doing} {self._path}") from exc
            raise


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # Autocommit mode: every write opens its own explicit transaction (_transaction).
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _translate(exc, f"opening {path}") from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL fsyncs the WAL at every commit, so a power cut at any moment loses nothing that
        # was written: that is the outbox's whole promise (NORMAL may lose the last commits,
        # and Raspberry Pis lose power a lot).
        conn.execute("PRAGMA synchronous=FULL")
        # Another process reading the file (an operator's sqlite3 shell) only delays us.
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        # Send times of an earlier run mean nothing now (a monotonic clock, maybe a reboot in
        # between) and nothing it sent was confirmed since: all of it is due again.
        conn.execute("UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL")
    except sqlite3.Error as exc:
        conn.close()
        raise _translate(exc, f"opening {path}") from exc
    return conn


def _prepare(kind: TopicKind, message: DeviceMessage, model: str | None, retain: bool) -> _Prepared:
    if kind not in PRIORITY:
        raise ValueError(
            f"{kind.value} messages do not go through the outbox; only "
            f"{', '.join(sorted(PRIORITY))} do"
        )
    if (kind is TopicKind.RESULTS) != (model is not None):
        raise ValueError(f"a model name goes with results and only with them, got {model!r}")
    payload = message.to_payload()
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"{kind.value} message {message.message_id} of {len(payload)} bytes exceeds the "
            f"protocol limit of {MAX_PAYLOAD_BYTES} bytes; it was not stored"
        )
    return _Prepared(
        message_id=message.message_id,
        kind=kind,
        model=model,
        payload=payload,
        retain=retain,
        created=message.timestamp.timestamp(),
    )


def _translate(exc: sqlite3.Error, doing: str) -> OutboxError:
    hint = "check the free space and permissions of the state dir"
    if getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        hint = "the file is damaged: stop the agent and move it aside to start an empty outbox"
    return OutboxError(f"outbox failure {doing}: {exc}; {hint}")
