"""Deployment logs: persist first, then notify.

``LogWriter`` is fed lines by the SSH read loop and persists them from a
thread of its own, in batches (every ``LOG_FLUSH_INTERVAL`` or
``max_batch`` lines), as ``LogChunk`` rows with gap-free sequence numbers;
only after a batch is committed does it tell the channel layer group
``deployment-<id>`` "lines up to seq N".  The reader blocks when the writer
falls ``max_pending`` lines behind, so memory stays flat however long the log.

``lines_after()`` is the one way to read a log back (replay, download).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from .dbretry import RETRY_FIRST, RETRY_MAX, TRANSIENT_DB_ERRORS, drop_connection
from .models import Deployment, LogChunk

log = logging.getLogger(__name__)

STREAM_CODES = {"out": "o", "err": "e", "sys": "s"}
# The longest pause between a writer's batches while the database is slow to take them (``LogWriter._paced``).
MAX_FLUSH_PAUSE = 0.25


def group_name(deployment_id: int) -> str:
    return f"deployment-{deployment_id}"


def has_push_layer() -> bool:
    """True when the channel layer reaches other processes (Redis)."""
    return "InMemory" not in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def notify(deployment_id: int, message: dict, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Tell live followers of the deployment something changed (best effort: they also poll).

    ``loop``: an event loop of the calling thread's own to send from (the log writer keeps one, so its
    Redis connection is reused across flushes instead of opened and closed for each).
    """
    if not has_push_layer():
        return
    from channels.layers import get_channel_layer

    try:
        layer = get_channel_layer()
        if loop is not None:
            loop.run_until_complete(asyncio.wait_for(layer.group_send(group_name(deployment_id), message), timeout=5))
        else:
            async_to_sync(layer.group_send)(group_name(deployment_id), message)
    except Exception as exc:  # noqa: BLE001 - a lost notification only delays followers until their next poll
        global _notify_warned_at
        now = time.monotonic()
        if now - _notify_warned_at >= NOTIFY_WARN_EVERY:  # one line per Redis outage, not one per flush
            _notify_warned_at = now
            log.warning("could not notify followers of deployment %s: %s", deployment_id, exc)


NOTIFY_WARN_EVERY = 30.0  # seconds
_notify_warned_at = -NOTIFY_WARN_EVERY


@dataclass
class LogSummary:
    line_count: int
    byte_count: int
    sha256: str
    # Lines of output that could not be stored (the database stayed unreachable past the writer's
    # patience) and were not yet recorded on the deployment as a gap; 0 normally.
    unrecorded_lost_lines: int = 0


def _clean(text: str) -> str:
    # A stray NUL or lone CR would corrupt the newline-separated chunk format or the page.
    return text.replace("\x00", "\ufffd").replace("\r", "")


class LogWriter:
    """Persists one deployment's log lines in order from a background thread.

    Across a database outage it keeps the lines (``max_pending`` at most: then ``write`` blocks, which
    holds the SSH reader back) and retries with back-off; a retried batch is never stored twice (the
    unique ``(deployment, seq_start)`` tells an insert that committed before its answer was lost).
    Only when the database stays unreachable for ``give_up_after`` seconds are the lines it holds
    dropped, and then never silently: the next stored line says how many were lost and when, and the
    deployment's ``log_gaps`` records where (``after_seq``) and how many.  ``on_flush`` (the heartbeat)
    failing in an outage is logged and tried again at the next flush.
    """

    def __init__(
        self,
        deployment_id: int,
        *,
        start_seq: int = 0,
        flush_interval: float | None = None,
        max_batch: int = 5000,
        max_pending: int = 50000,
        give_up_after: float | None = None,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        self.deployment_id = deployment_id
        self.flush_interval = settings.LOG_FLUSH_INTERVAL if flush_interval is None else flush_interval
        # The pause before the next batch: ``flush_interval``, longer while storing is slow (see ``_paced``).
        self.pause = self.flush_interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.give_up_after = settings.LOG_STORE_GIVE_UP_AFTER if give_up_after is None else give_up_after
        self.on_flush = on_flush
        self._next_seq = start_seq
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._hash = hashlib.sha256()
        self._lost = 0  # lines dropped and not yet recorded
        self._lost_window: tuple[datetime, datetime] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.line_count = 0
        self.byte_count = 0
        self.outages = 0  # times storing failed and was retried (for tests and logs)
        self._failing_since: float | None = None  # monotonic start of the current outage
        self._wall_failing_since: datetime | None = None
        self._thread = threading.Thread(target=self._run, name=f"logwriter-{deployment_id}", daemon=True)
        self._thread.start()

    def write(self, stream: str, line: bytes | str) -> None:
        """Queue one line (without its newline) from ``stream`` (out, err, sys)."""
        text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
        entry = STREAM_CODES[stream] + _clean(text)
        with self._cond:
            if self._error:
                raise RuntimeError("log writer failed") from self._error
            self._pending.append(entry)
            if len(self._pending) >= self.max_batch:
                self._cond.notify()
            while len(self._pending) >= self.max_pending and not self._error:
                # Back-pressure: the SSH reader waits for the database rather than buffering the log.
                self._cond.wait(0.5)

    def close(self) -> LogSummary:
        """Flush everything, stop the thread, and return the log's counts and SHA-256."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._error:
            raise RuntimeError("log writer failed") from self._error
        return LogSummary(self.line_count, self.byte_count, self._hash.hexdigest(), self._lost)

    def _run(self) -> None:
        try:
            if has_push_layer():
                self._loop = asyncio.new_event_loop()
            while True:
                with self._cond:
                    if not self._pending and not self._closed:
                        self._cond.wait(self.pause)
                    elif not self._closed and len(self._pending) < self.max_batch:
                        # Let a batch gather for a moment; lines arrive in bursts.
                        self._cond.wait(self.pause)
                    batch = self._pending[: self.max_batch]
                if batch:
                    began = time.monotonic()
                    self._store(batch)
                    self._paced(time.monotonic() - began)
                    with self._cond:
                        # Taken off only once stored (or given up): a full buffer holds the reader back.
                        del self._pending[: len(batch)]
                        self._cond.notify_all()
                else:
                    self._flushed()
                with self._cond:
                    if self._closed and not self._pending:
                        return
        except BaseException as exc:  # noqa: BLE001 - surfaced to the reader on its next write/close
            log.exception("log writer for deployment %s failed", self.deployment_id)
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            if self._loop is not None:
                self._loop.close()
            connection.close()

    def _paced(self, took: float) -> None:
        """Group commit: the pause before the next batch follows how long this one took to store.

        On a quiet database a batch commits in a millisecond or two and lines are stored every
        ``flush_interval``. When writers queue for SQLite's one write lock (a rollout's ten
        deployments, their heartbeats and hand-overs), a commit takes as long as the queue, and
        committing every 25 ms only lengthens it: then each writer waits twice as long as its last
        commit took (at most ``MAX_FLUSH_PAUSE``) and stores what gathered meanwhile in one row.
        """
        self.pause = min(MAX_FLUSH_PAUSE, max(self.flush_interval, 2 * took))

    def _store(self, batch: list[str]) -> None:
        """Store ``batch``, retrying across a database outage; drop it (as a recorded gap) once the outage has
        lasted ``give_up_after``.  The outage is the writer's, not the batch's: after giving up, each later
        batch gets one attempt, so the reader is not held back again for as long."""
        delay = RETRY_FIRST
        while True:
            try:
                self._persist(batch)
            except TRANSIENT_DB_ERRORS as exc:
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since, self._wall_failing_since = now, timezone.now()
                    self.outages += 1
                    log.warning("log of deployment %s: cannot store lines (%s); retrying", self.deployment_id, exc)
                drop_connection()
                if now - self._failing_since >= self.give_up_after:
                    if not self._lost:
                        log.error(
                            "log of deployment %s: database unreachable for %.0f s; dropping the lines held",
                            self.deployment_id,
                            now - self._failing_since,
                        )
                    self._lost += len(batch)
                    start = self._lost_window[0] if self._lost_window else self._wall_failing_since
                    self._lost_window = (start, timezone.now())
                    return
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if self._failing_since is not None:
                log.warning(
                    "log of deployment %s: stored again after %.1f s",
                    self.deployment_id,
                    time.monotonic() - self._failing_since,
                )
                self._failing_since = None
            return

    def _persist(self, batch: list[str]) -> None:
        start = self._next_seq
        entries = batch
        gap = None
        if self._lost:
            first, last = self._lost_window
            gap = {
                "after_seq": start - 1,
                "lines": self._lost,
                "reason": f"database unreachable from {first:%Y-%m-%d %H:%M:%S} to {last:%H:%M:%S} UTC",
            }
            entries = [f"s[panel] {self._lost} lines of output were lost here: {gap['reason']}", *batch]
        data = "\n".join(entries)
        try:
            with transaction.atomic():
                LogChunk.objects.create(
                    deployment_id=self.deployment_id, seq_start=start, seq_end=start + len(entries), data=data
                )
                if gap:
                    row = Deployment.objects.select_for_update().only("log_gaps").get(pk=self.deployment_id)
                    Deployment.objects.filter(pk=self.deployment_id).update(log_gaps=[*(row.log_gaps or []), gap])
        except IntegrityError:
            # An earlier attempt may have committed before the connection dropped: then it is ours already.
            stored = LogChunk.objects.filter(deployment_id=self.deployment_id, seq_start=start).values_list(
                "seq_end", "data"
            )
            if list(stored) != [(start + len(entries), data)]:
                raise
        if gap:
            self._lost, self._lost_window = 0, None
        self._next_seq += len(entries)
        for entry in entries:
            encoded = (entry[1:] + "\n").encode()
            self._hash.update(encoded)
            self.byte_count += len(encoded)
        self.line_count += len(entries)
        notify(self.deployment_id, {"type": "log.new", "seq": self._next_seq}, loop=self._loop)
        self._flushed()

    def _flushed(self) -> None:
        if not self.on_flush:
            return
        try:
            self.on_flush()
        except TRANSIENT_DB_ERRORS as exc:
            # The heartbeat misses a beat; the next flush tries again (the reaper allows a minute).
            log.warning("deployment %s: heartbeat not written (%s)", self.deployment_id, exc)
            drop_connection()


def next_seq(deployment_id: int) -> int:
    """The sequence number the deployment's next line gets."""
    last = LogChunk.objects.filter(deployment_id=deployment_id).order_by("-seq_start").values("seq_end").first()
    return last["seq_end"] if last else 0


def lines_after(deployment_id: int, after: int = -1, limit: int | None = None) -> list[tuple[int, str, str]]:
    """Lines with seq > ``after``, in order, at most ``limit`` (whole chunks beyond are cut)."""
    chunks = LogChunk.objects.filter(deployment_id=deployment_id, seq_end__gt=after + 1).order_by("seq_start")
    out: list[tuple[int, str, str]] = []
    for chunk in chunks.iterator(chunk_size=20):
        for line in chunk.lines():
            if line[0] > after:
                out.append(line)
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def last_lines_of(line_counts: dict[int, int], n: int) -> dict[int, list[tuple[int, str, str]]]:
    """The last ``n`` lines of each finished deployment in ``line_counts`` (id -> its line count), in one
    query that reads only the chunks holding them."""
    if not line_counts or not n:
        return {pk: [] for pk in line_counts}
    wanted = Q()
    for pk, count in line_counts.items():
        wanted |= Q(deployment_id=pk, seq_end__gt=count - n)
    out: dict[int, list[tuple[int, str, str]]] = {pk: [] for pk in line_counts}
    for chunk in LogChunk.objects.filter(wanted).order_by("deployment_id", "seq_start"):
        out[chunk.deployment_id].extend(chunk.lines())
    return {pk: lines[-n:] for pk, lines in out.items()}


def iter_log_text(deployment_id: int) -> Iterator[str]:
    """The full log as text, one line each, streamed chunk by chunk (flat memory)."""
    chunks = LogChunk.objects.filter(deployment_id=deployment_id).order_by("seq_start").values_list("data", flat=True)
    for data in chunks.iterator(chunk_size=10):
        yield "".join(entry[1:] + "\n" for entry in data.split("\n"))
