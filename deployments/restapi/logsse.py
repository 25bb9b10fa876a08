"""A deployment's log as server-sent events, followed until the deployment ends.

The database is the source, as for the WebSocket follower: each step reads the status, then the
lines after the last one sent (so a line stored before the status turned terminal is always sent
before ``end``).  A step every ``POLL`` seconds while nothing new arrives (the log writer flushes
every 25 ms; scripts do not need the page's 50 ms), at once while a backlog remains.  Every
``RECHECK`` seconds the caller is judged again, from the database: a revoked or expired token, a
deactivated user or a lost grant ends the stream with an ``error`` event within that time.

Under daphne (ASGI) the stream is an async generator whose database steps run in Django's
thread-sensitive executor; a sync iterator there would be read whole before the first byte left.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.handlers.asgi import ASGIRequest

from deployments import logstream
from deployments.access import gate
from deployments.models import Deployment

from . import tokens

POLL = 0.2
RECHECK = 2.0
KEEPALIVE = 15.0
BATCH = 2000


def event(name: str, data, *, id: int | None = None) -> str:
    """One server-sent event; ``data`` as one line of JSON (it never holds a raw newline)."""
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def is_asgi(request) -> bool:
    return isinstance(getattr(request, "_request", request), ASGIRequest)


class Follower:
    """Follows one deployment's log for one caller (``user_id``, and ``token_id`` when a token is used)."""

    def __init__(self, deployment_id: int, *, after: int, user_id: int, token_id: int | None) -> None:
        self.deployment_id = deployment_id
        self.after = after
        self.user_id = user_id
        self.token_id = token_id
        self.done = False
        self.last_check = time.monotonic()
        self.last_sent = time.monotonic()

    def step(self) -> tuple[str, bool]:
        """The text of the events ready now, and whether more are already waiting (no pause before the next)."""
        now = time.monotonic()
        if now - self.last_check >= RECHECK:
            self.last_check = now
            refused = self._refusal()
            if refused:
                self.done = True
                return event("error", {"error": refused}), False
        status = Deployment.objects.filter(pk=self.deployment_id).values_list("status", flat=True).first()
        lines = logstream.lines_after(self.deployment_id, self.after, limit=BATCH)
        out = []
        for seq, stream, text in lines:
            out.append(event("line", {"seq": seq, "stream": stream, "text": text}, id=seq))
            self.after = seq
        backlog = len(lines) >= BATCH
        if not backlog and (status is None or status in Deployment.TERMINAL):
            out.append(event("end", {"status": status, "next_after": self.after}))
            self.done = True
        if not out and now - self.last_sent >= KEEPALIVE:
            out.append(": keep-alive\n\n")
        if out:
            self.last_sent = now
        return "".join(out), backlog

    def _refusal(self) -> str:
        """Why the caller may no longer read this log ("" if they still may), judged afresh."""
        user = get_user_model().objects.filter(pk=self.user_id).first()
        if user is None or not user.is_active:
            return "the user is deactivated"
        if self.token_id is not None and not tokens.still_valid(self.token_id):
            return "the token was revoked or has expired"
        if not gate.visible_deployments(user).filter(pk=self.deployment_id).exists():
            return "you may no longer see this deployment"
        return ""

    def stream(self, *, asynchronous: bool) -> Iterator[str] | AsyncIterator[str]:
        return self._async_stream() if asynchronous else self._sync_stream()

    def _sync_stream(self) -> Iterator[str]:
        while not self.done:
            text, backlog = self.step()
            if text:
                yield text
            if not self.done and not backlog:
                time.sleep(POLL)

    async def _async_stream(self) -> AsyncIterator[str]:
        step = sync_to_async(self.step, thread_sensitive=True)
        while not self.done:
            text, backlog = await step()
            if text:
                yield text
            if not self.done and not backlog:
                await asyncio.sleep(POLL)
