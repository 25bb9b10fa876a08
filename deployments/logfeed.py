"""One reader per deployment per daphne process, shared by every local follower of its log.

A ``Feed`` reads a deployment's new lines and status from the database once
for all the sockets that follow it in this process (one query per flush, not
one per viewer), keeps the latest messages pre-encoded in a bounded cache and
wakes its followers, who send the same bytes to their clients: a ``lines``
message is UTF-8 JSON encoded once, sent as a binary WebSocket frame, so a
socket's only cost per message is its framing.  It learns of
new lines from a push (with a cross-process channel layer: the feed, not each
socket, is the one member of the group ``deployment-<id>``) or by polling the
database every ``LOG_POLL_INTERVAL`` (the embedded default); with pushes the
poll stays as a slow safety net, so a lost push delays lines but never loses
them.  A database or Redis error is retried with back-off; followers are never
closed for it, nor for lack of traffic.

Messages are kept by their first sequence number: live ones as they are read,
older ones when a follower asks for them (one read for all the followers at
that place: viewers joining mid-log share the catch-up too).  Each follower
walks them from its own last seq, so every line is sent once, in order,
whatever point it starts from.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
import zlib
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings

from . import logstream
from .dbretry import TRANSIENT_DB_ERRORS
from .models import Deployment, LogChunk

log = logging.getLogger(__name__)

BATCH_LINES = 2000  # lines per WebSocket message
CACHE_LINES = 100_000  # lines a feed keeps encoded (about 10 MB); older ones are read again when asked for
FETCH_ROWS = 10  # log chunks a feed reads per query (a chunk holds up to 5,000 lines)
PUSH_SAFETY_POLL = 1.0  # seconds between polls when pushes arrive
MAX_BACKOFF = 5.0  # seconds between retries of a failing database or channel layer
RECANCEL_EVERY = 0.1  # seconds: a closed feed's task still running is cancelled again (see Feed.close)
RECANCEL_TRIES = 100


def encode(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))


def encode_bytes(message: dict) -> bytes:
    """The message as the UTF-8 JSON of a binary frame (``ensure_ascii``: the encoding is a plain copy)."""
    return encode(message).encode()


def deflate(data: bytes) -> bytes:
    """A ``lines`` frame for a socket that asked for ``compress=deflate``: the zlib stream (RFC 1950) of its
    UTF-8 JSON, which browsers read with ``DecompressionStream('deflate')``. Level 1: log text shrinks
    5-10 times at ~200 MB/s, once per message for every socket."""
    return zlib.compress(data, 1)


@dataclass
class Message:
    """Lines ``first`` .. ``last`` as one ``lines`` message, pre-encoded as the bytes of a binary frame
    (and, once a socket asks for it, compressed: ``deflated``)."""

    first: int
    last: int
    data: bytes
    _deflated: bytes | None = None

    def deflated(self) -> bytes:
        if self._deflated is None:
            self._deflated = deflate(self.data)
        return self._deflated

    def after(self, seq: int, *, compressed: bool = False) -> bytes:
        """The message without its lines up to ``seq`` (a follower that stopped inside it)."""
        if seq < self.first:
            return self.deflated() if compressed else self.data
        lines = json.loads(self.data)["lines"]
        data = encode_bytes({"type": "lines", "lines": lines[seq + 1 - self.first :]})
        return deflate(data) if compressed else data


def _messages(seq_start: int, data: str) -> list[Message]:
    """A stored chunk as messages of at most BATCH_LINES lines, always split at the same places."""
    entries = data.split("\n")
    out = []
    for i in range(0, len(entries), BATCH_LINES):
        part = entries[i : i + BATCH_LINES]
        first = seq_start + i
        lines = [[first + k, entry[:1], entry[1:]] for k, entry in enumerate(part)]
        out.append(Message(first, first + len(part) - 1, encode_bytes({"type": "lines", "lines": lines})))
    return out


class Feed:
    """The shared reader of one deployment's log in one process (see the module docstring).

    Messages are kept by their first seq, live ones as they are read and older ones when a follower
    behind asks for them (one read for all followers at that place), up to ``CACHE_LINES`` lines.
    """

    def __init__(self, deployment_id: int) -> None:
        self.deployment_id = deployment_id
        self.loop = asyncio.get_running_loop()
        self.followers = 0
        self._messages: dict[int, Message] = {}
        self._starts: list[int] = []  # sorted keys of _messages
        self.cached_lines = 0
        self.next_seq: int | None = None  # the seq the next stored line will get; None until the first read
        self.status: dict | None = None
        self.status_text = ""
        self.status_version = 0
        self.complete = False  # the status is terminal and every line is in: no more reads
        self.reads = 0
        self._loads: dict[int, asyncio.Future] = {}
        self._changed = asyncio.Event()
        self._poke = asyncio.Event()
        self.push = logstream.has_push_layer()
        self.closed = False
        self._cleaning: set[asyncio.Task] = set()  # tasks in their last clean-up, not to be cancelled again
        self._tasks = [self.loop.create_task(self._read_loop(), name=f"logfeed-{deployment_id}")]
        if self.push:
            self._tasks.append(self.loop.create_task(self._listen(), name=f"logfeed-push-{deployment_id}"))

    # -- what followers use ------------------------------------------------------------
    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change; take it before looking at the feed, then wait on it."""
        return self._changed

    async def next_message(self, after: int, *, compressed: bool = False) -> tuple[bytes, int] | None:
        """(frame bytes, last seq) of the stored lines right after ``after``, or None if there are none yet;
        ``compressed``: the frame deflated (``deflate``)."""
        if self.next_seq is None or after + 1 >= self.next_seq:
            return None
        message = self._find(after + 1)
        if message is None:
            try:
                await self._load(after + 1)
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("log feed of deployment %s: %s; the follower waits", self.deployment_id, exc)
                return None
            message = self._find(after + 1)
            if message is None:  # evicted at once by another load: the follower asks again at the next change
                return None
        return message.after(after, compressed=compressed), message.last

    def _find(self, seq: int) -> Message | None:
        i = bisect.bisect_right(self._starts, seq) - 1
        if i >= 0:
            message = self._messages[self._starts[i]]
            if message.first <= seq <= message.last:
                return message
        return None

    def _add(self, message: Message) -> None:
        if message.first in self._messages:
            return
        bisect.insort(self._starts, message.first)
        self._messages[message.first] = message
        self.cached_lines += message.last - message.first + 1

    def _evict(self, keep: int) -> None:
        """Drop the oldest messages beyond CACHE_LINES, never the one starting at ``keep``."""
        i = 0
        while self.cached_lines > CACHE_LINES and i < len(self._starts) - 1:
            if self._starts[i] == keep:
                i += 1
                continue
            message = self._messages.pop(self._starts.pop(i))
            self.cached_lines -= message.last - message.first + 1

    async def _load(self, seq: int) -> None:
        """Read the stored chunks from the one holding ``seq`` on; followers asking for the same wait together."""
        pending = self._loads.get(seq)
        if pending is None:
            pending = self._loads[seq] = self.loop.create_task(self._read_back(seq))
            pending.add_done_callback(lambda _: self._loads.pop(seq, None))
        await asyncio.shield(pending)

    async def _read_back(self, seq: int) -> None:
        rows = await database_sync_to_async(self._rows_from)(seq)
        for seq_start, _seq_end, data in rows:
            for message in _messages(seq_start, data):
                self._add(message)
        self._evict(keep=self._find(seq).first if self._find(seq) else -1)

    def _rows_from(self, seq: int) -> list:
        return list(
            LogChunk.objects.filter(deployment_id=self.deployment_id, seq_end__gt=seq)
            .order_by("seq_start")
            .values_list("seq_start", "seq_end", "data")[:FETCH_ROWS]
        )

    # -- reading -------------------------------------------------------------------------
    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _read_loop(self) -> None:
        backoff = 0.1
        while True:
            self._stop_if_closed()
            try:
                status, rows, start = await self._read()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a database blip: followers wait, nothing is lost
                self._stop_if_closed()
                log.warning("log feed of deployment %s: %s; retrying in %.1f s", self.deployment_id, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self._take(status, rows, start)
            if len(rows) >= FETCH_ROWS:
                continue  # more to read: do not wait
            if self.complete:
                return
            self._poke.clear()
            interval = max(PUSH_SAFETY_POLL, settings.LOG_POLL_INTERVAL) if self.push else settings.LOG_POLL_INTERVAL
            try:
                await asyncio.wait_for(self._poke.wait(), timeout=interval)
            except TimeoutError:
                pass

    @database_sync_to_async
    def _read(self) -> tuple[dict, list, int]:
        # Status first: a terminal status is written only after the last line, so lines read after it
        # are all there are.
        status = Deployment.objects.get(pk=self.deployment_id).status_payload()
        start = self.next_seq if self.next_seq is not None else logstream.next_seq(self.deployment_id)
        rows = list(
            LogChunk.objects.filter(deployment_id=self.deployment_id, seq_start__gte=start)
            .order_by("seq_start")
            .values_list("seq_start", "seq_end", "data")[:FETCH_ROWS]
        )
        self.reads += 1
        return status, rows, start

    def _take(self, status: dict, rows: list, start: int) -> None:
        if self.next_seq is None:
            self.next_seq = start
        hole = False
        for seq_start, seq_end, data in rows:
            if seq_start != self.next_seq:
                # Chunks tile the sequence; a hole means the read raced a writer's commit order. Read again.
                hole = True
                break
            for message in _messages(seq_start, data):
                self._add(message)
            self.next_seq = seq_end
        self._evict(keep=-1)
        if status != self.status:
            self.status = status
            self.status_text = encode({"type": "status", **status})
            self.status_version += 1
        self.complete = status["status"] in Deployment.TERMINAL and len(rows) < FETCH_ROWS and not hole
        self._wake()

    async def _listen(self) -> None:
        """Be the process's one member of the deployment's group; every notice pokes the reader."""
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        group = logstream.group_name(self.deployment_id)
        channel = await layer.new_channel()
        backoff = 0.1
        try:
            while True:
                try:
                    await layer.group_add(group, channel)
                    while True:
                        await layer.receive(channel)
                        self._stop_if_closed()
                        self._poke.set()
                        backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Redis away or slow: the poll carries on meanwhile
                    self._stop_if_closed()
                    if type(exc).__name__ != "TimeoutError":
                        log.warning("log feed of deployment %s: channel layer: %s", self.deployment_id, exc)
                    self._poke.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            self._cleaning.add(asyncio.current_task())
            try:
                await asyncio.wait_for(layer.group_discard(group, channel), timeout=2)
            except Exception:  # noqa: BLE001 - the membership expires on its own
                pass

    def _stop_if_closed(self) -> None:
        """End the task when the feed was closed, even if its cancel was swallowed on the way.

        Checked on every turn of the loops, not only on errors, because a cancel can get lost two ways:
        redis-py reads under a timeout of its own, and a cancel that lands as that timeout expires comes
        out as ``TimeoutError`` (django/channels_redis#422, redis/redis-py#4091); and Python 3.11's
        ``asyncio.wait_for`` returns the result, dropping the cancel, when what it awaited finished in
        the same loop step.  Either way the task would loop on, and a loop closing under
        ``async_to_sync`` would wait for it for ever.
        """
        if self.closed:
            raise asyncio.CancelledError()
        raise_if_cancelled()

    def close(self) -> None:
        """Stop the feed's tasks: cancelled now, and again every ``RECANCEL_EVERY`` while one still runs.

        One cancel is not always enough: redis-py 8 on Python 3.11 drops a cancel that lands as it
        finishes sending a command (its ``asyncio.wait_for`` around the socket drain), then goes on to
        channels-redis's BZPOPMIN, which loops until a message comes.  The feed's listener would wait
        for ever, and so would the event loop closing over it (``async_to_sync`` in tests and commands).
        """
        self.closed = True
        self._cancel_tasks(RECANCEL_TRIES)

    def _cancel_tasks(self, tries_left: int) -> None:
        running = [task for task in self._tasks if not task.done() and task not in self._cleaning]
        for task in running:
            task.cancel()
        if running and tries_left > 0 and not self.loop.is_closed():
            self.loop.call_later(RECANCEL_EVERY, self._cancel_tasks, tries_left - 1)


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` in a task that was asked to cancel, even if the cancel itself was swallowed
    (``Feed._stop_if_closed``): a task's count of cancel requests stays up until it ends."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


_feeds: dict[int, Feed] = {}


def join(deployment_id: int) -> Feed:
    """The feed of ``deployment_id`` in this process, started if needed; pair with ``leave``."""
    feed = _feeds.get(deployment_id)
    if feed is None or feed.loop is not asyncio.get_running_loop():
        feed = _feeds[deployment_id] = Feed(deployment_id)
    feed.followers += 1
    return feed


def leave(feed: Feed) -> None:
    feed.followers -= 1
    if feed.followers <= 0:
        feed.close()
        if _feeds.get(feed.deployment_id) is feed:
            del _feeds[feed.deployment_id]


class SharedCheck:
    """A permission re-check done once per key (a session) and interval for all the sockets that share it."""

    def __init__(self) -> None:
        self._results: dict[object, tuple[float, asyncio.Future]] = {}

    async def __call__(self, key: object, check, ttl: float) -> bool:
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        cached = self._results.get(key)
        if cached is None or cached[0] < now or cached[1].get_loop() is not loop:
            future = loop.create_future()
            self._results[key] = (now + ttl, future)
            try:
                future.set_result(await check())
            except BaseException as exc:
                self._results.pop(key, None)
                future.set_exception(exc)
                future.exception()  # retrieved: the callers below see it
                raise
            if len(self._results) > 10_000:
                self._results = {k: v for k, v in self._results.items() if v[0] >= now}
            return future.result()
        return await asyncio.shield(cached[1])
