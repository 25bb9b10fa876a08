"""One reader per deployment per daphne process, shared by every local follower of its log.

A ``Feed`` reads a deployment's new lines and status from the database once
for all the sockets that follow it in this process (one query per flush, not
one per viewer), keeps the latest messages pre-encoded in a bounded cache and
wakes its followers, who send the same text to their clients.  It learns of
new lines from a push (with a cross-process channel layer: the feed, not each
socket, is the one member of the group ``deployment-<id>``) or by polling the
database every ``LOG_POLL_INTERVAL`` (the embedded default); with pushes the
poll stays as a slow safety net, so a lost push delays lines but never loses
them.  A database or Redis error is retried with back-off; followers are never
closed for it, nor for lack of traffic.

A follower that is behind the cache (it joined mid-log, or the cache moved on)
reads from the database itself until it reaches the cache, so every line is
sent once, in order, whatever point it starts from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings

from . import logstream
from .models import Deployment, LogChunk

log = logging.getLogger(__name__)

BATCH_LINES = 2000  # lines per WebSocket message
CACHE_LINES = 50_000  # lines a feed keeps for followers; one behind that reads the database
FETCH_ROWS = 20  # log chunks a feed reads per query (a chunk holds up to 5,000 lines)
PUSH_SAFETY_POLL = 1.0  # seconds between polls when pushes arrive
MAX_BACKOFF = 5.0  # seconds between retries of a failing database or channel layer


def encode(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))


@dataclass(frozen=True)
class Message:
    """Lines ``first`` .. ``last`` as one pre-encoded ``lines`` message."""

    first: int
    last: int
    lines: list
    text: str


class Feed:
    """The shared reader of one deployment's log in one process (see the module docstring)."""

    def __init__(self, deployment_id: int) -> None:
        self.deployment_id = deployment_id
        self.loop = asyncio.get_running_loop()
        self.followers = 0
        self.cache: deque[Message] = deque()
        self.cached_lines = 0
        self.next_seq: int | None = None  # the seq the next stored line will get; None until the first read
        self.cache_start = 0  # the first seq the cache holds (== next_seq while it is empty)
        self.status: dict | None = None
        self.status_text = ""
        self.status_version = 0
        self.complete = False  # the status is terminal and every line is in: no more reads
        self.reads = 0
        self._changed = asyncio.Event()
        self._poke = asyncio.Event()
        self.push = logstream.has_push_layer()
        self._tasks = [self.loop.create_task(self._read_loop(), name=f"logfeed-{deployment_id}")]
        if self.push:
            self._tasks.append(self.loop.create_task(self._listen(), name=f"logfeed-push-{deployment_id}"))

    # -- what followers use ------------------------------------------------------------
    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change; take it before looking at the feed, then wait on it."""
        return self._changed

    def messages_after(self, after: int) -> list[tuple[str, int]]:
        """(text, last seq) of the cached lines after ``after``; the caller checked after + 1 >= cache_start."""
        out = []
        for message in self.cache:
            if message.last <= after:
                continue
            if message.first > after:
                out.append((message.text, message.last))
            else:  # the follower stopped inside this message (it joined from the database)
                rest = message.lines[after + 1 - message.first :]
                out.append((encode({"type": "lines", "lines": rest}), message.last))
        return out

    # -- reading -------------------------------------------------------------------------
    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _read_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                status, rows, start = await self._read()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a database blip: followers wait, nothing is lost
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
            self.next_seq = self.cache_start = start
        for seq_start, seq_end, data in rows:
            if seq_start != self.next_seq:
                # Chunks tile the sequence; a hole means the read raced a writer's commit order. Read again.
                break
            entries = data.split("\n")
            for i in range(0, len(entries), BATCH_LINES):
                part = entries[i : i + BATCH_LINES]
                first = seq_start + i
                lines = [[first + k, entry[:1], entry[1:]] for k, entry in enumerate(part)]
                self.cache.append(
                    Message(first, first + len(part) - 1, lines, encode({"type": "lines", "lines": lines}))
                )
                self.cached_lines += len(part)
            self.next_seq = seq_end
        while self.cached_lines > CACHE_LINES and len(self.cache) > 1:
            dropped = self.cache.popleft()
            self.cached_lines -= dropped.last - dropped.first + 1
        self.cache_start = self.cache[0].first if self.cache else self.next_seq
        if status != self.status:
            self.status = status
            self.status_text = encode({"type": "status", **status})
            self.status_version += 1
        self.complete = status["status"] in Deployment.TERMINAL and len(rows) < FETCH_ROWS
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
                        self._poke.set()
                        backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Redis away or slow: the poll carries on meanwhile
                    if type(exc).__name__ != "TimeoutError":
                        log.warning("log feed of deployment %s: channel layer: %s", self.deployment_id, exc)
                    self._poke.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            try:
                await asyncio.wait_for(layer.group_discard(group, channel), timeout=2)
            except Exception:  # noqa: BLE001 - the membership expires on its own
                pass

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


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
