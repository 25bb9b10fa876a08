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

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection

from .models import LogChunk

log = logging.getLogger(__name__)

STREAM_CODES = {"out": "o", "err": "e", "sys": "s"}


def group_name(deployment_id: int) -> str:
    return f"deployment-{deployment_id}"


def has_push_layer() -> bool:
    """True when the channel layer reaches other processes (Redis)."""
    return "InMemory" not in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def notify(deployment_id: int, message: dict) -> None:
    """Tell live followers of the deployment something changed (best effort: they also poll)."""
    if not has_push_layer():
        return
    from channels.layers import get_channel_layer

    try:
        async_to_sync(get_channel_layer().group_send)(group_name(deployment_id), message)
    except Exception:  # noqa: BLE001 - a lost notification only delays followers until their next poll
        log.warning("could not notify followers of deployment %s", deployment_id, exc_info=True)


@dataclass
class LogSummary:
    line_count: int
    byte_count: int
    sha256: str


def _clean(text: str) -> str:
    # A stray NUL or lone CR would corrupt the newline-separated chunk format or the page.
    return text.replace("\x00", "\ufffd").replace("\r", "")


class LogWriter:
    """Persists one deployment's log lines in order from a background thread."""

    def __init__(
        self,
        deployment_id: int,
        *,
        start_seq: int = 0,
        flush_interval: float | None = None,
        max_batch: int = 5000,
        max_pending: int = 50000,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        self.deployment_id = deployment_id
        self.flush_interval = settings.LOG_FLUSH_INTERVAL if flush_interval is None else flush_interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.on_flush = on_flush
        self._next_seq = start_seq
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._hash = hashlib.sha256()
        self.line_count = 0
        self.byte_count = 0
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
        return LogSummary(self.line_count, self.byte_count, self._hash.hexdigest())

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._pending and not self._closed:
                        self._cond.wait(self.flush_interval)
                    elif not self._closed and len(self._pending) < self.max_batch:
                        # Let a batch gather for a moment; lines arrive in bursts.
                        self._cond.wait(self.flush_interval)
                    batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                    done = self._closed and not self._pending
                    self._cond.notify_all()
                if batch:
                    self._persist(batch)
                elif self.on_flush:
                    self.on_flush()
                if done:
                    return
        except BaseException as exc:  # noqa: BLE001 - surfaced to the reader on its next write/close
            log.exception("log writer for deployment %s failed", self.deployment_id)
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            connection.close()

    def _persist(self, batch: list[str]) -> None:
        start = self._next_seq
        LogChunk.objects.create(
            deployment_id=self.deployment_id, seq_start=start, seq_end=start + len(batch), data="\n".join(batch)
        )
        self._next_seq += len(batch)
        for entry in batch:
            encoded = (entry[1:] + "\n").encode()
            self._hash.update(encoded)
            self.byte_count += len(encoded)
        self.line_count += len(batch)
        notify(self.deployment_id, {"type": "log.new", "seq": self._next_seq})
        if self.on_flush:
            self.on_flush()


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


def last_lines(deployment_id: int, n: int) -> list[tuple[int, str, str]]:
    """The last ``n`` lines, in order (reads the newest chunks only)."""
    out: list[tuple[int, str, str]] = []
    chunks = LogChunk.objects.filter(deployment_id=deployment_id).order_by("-seq_start")
    for chunk in chunks.iterator(chunk_size=4):
        out[:0] = chunk.lines()
        if len(out) >= n:
            break
    return out[-n:] if n else []


def iter_log_text(deployment_id: int) -> Iterator[str]:
    """The full log as text, one line each, streamed chunk by chunk (flat memory)."""
    chunks = LogChunk.objects.filter(deployment_id=deployment_id).order_by("seq_start").values_list("data", flat=True)
    for data in chunks.iterator(chunk_size=10):
        yield "".join(entry[1:] + "\n" for entry in data.split("\n"))
