"""WebSocket follower of one deployment's log.

On connect: permission through the gate (closed on denial, 4404 for an
unseen deployment).  Then replay from the database after the client's last
sequence number (``?after=N``; or only the last lines, ``?tail=N``), then follow: pushed "new lines" notices when
a cross-process channel layer exists, and in any case a database poll, so a
lost notice only delays lines, never loses them.  The database is the source:
every line is sent once, in order, across reconnects.  Permission is checked
again while following, so a revoked user's socket is closed; so is the socket of a session that
has since logged out (or whose user was deactivated or changed password).
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import import_module

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.http import Http404

from . import logstream
from .access.gate import deployment_for
from .models import Deployment

log = logging.getLogger(__name__)

BATCH_LINES = 2000  # lines per WebSocket message
RECHECK_PERMISSION_EVERY = 2.0  # seconds


class DeploymentLogConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.deployment_id = int(self.scope["url_route"]["kwargs"]["pk"])
        self.user = self.scope.get("user")
        query = self._query()
        try:
            self.after = int(query.get("after", "-1"))
            tail = int(query["tail"]) if "tail" in query else None
        except ValueError:
            self.after, tail = -1, None
        if not await self._allowed():
            await self.close(code=4404)
            return
        skipped = 0
        if tail is not None and self.after < 0:
            # A page showing only the last ``tail`` lines need not download a million first.
            skipped = max(0, await database_sync_to_async(logstream.next_seq)(self.deployment_id) - max(tail, 0))
            self.after = skipped - 1
        self.wakeup = asyncio.Event()
        self.group = logstream.group_name(self.deployment_id)
        self.push = logstream.has_push_layer()
        if self.push:
            await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        if skipped:
            await self.send_json({"type": "skipped", "count": skipped})
        self.follower = asyncio.create_task(self._follow())

    def _query(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.scope.get("query_string", b"").decode()))

    async def disconnect(self, code) -> None:
        follower = getattr(self, "follower", None)
        if follower:
            follower.cancel()
        if getattr(self, "push", False):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        # The page may only ask to resume from a sequence number; everything else is ignored.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def log_new(self, event) -> None:
        self.wakeup.set()

    async def deployment_status(self, event) -> None:
        self.wakeup.set()

    @database_sync_to_async
    def _allowed(self) -> bool:
        try:
            deployment_for(self.user, self.deployment_id)
        except Http404:
            return False
        return True

    @database_sync_to_async
    def _fetch(self) -> tuple[list, dict]:
        # Status first: a terminal status is written only after the last line,
        # so lines read after it are complete.
        status = Deployment.objects.get(pk=self.deployment_id).status_payload()
        lines = logstream.lines_after(self.deployment_id, self.after, limit=BATCH_LINES * 5)
        return lines, status

    async def _follow(self) -> None:
        last_status = None
        last_check = time.monotonic()
        # With pushes, the poll is only a safety net.
        poll = settings.LOG_POLL_INTERVAL if not self.push else max(1.0, settings.LOG_POLL_INTERVAL)
        try:
            while True:
                lines, status = await self._fetch()
                for i in range(0, len(lines), BATCH_LINES):
                    batch = lines[i : i + BATCH_LINES]
                    await self.send_json({"type": "lines", "lines": batch})
                    self.after = batch[-1][0]
                if status != last_status:
                    await self.send_json({"type": "status", **status})
                    last_status = status
                if lines and len(lines) >= BATCH_LINES * 5:
                    continue  # more to replay: do not wait
                if status["status"] in Deployment.TERMINAL and not lines:
                    # Final status is only written after the last line is persisted.
                    await self.send_json({"type": "end", "last_seq": self.after})
                    return
                if time.monotonic() - last_check > RECHECK_PERMISSION_EVERY:
                    last_check = time.monotonic()
                    if not await self._still_allowed():
                        await self.close(code=4403)
                        return
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=poll)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("log follower for deployment %s failed", self.deployment_id)
            await self.close(code=1011)

    @database_sync_to_async
    def _still_allowed(self) -> bool:
        try:
            deployment_for(self._current_user(), self.deployment_id)
        except Http404:
            return False
        return True

    def _current_user(self):
        """The user the socket's session stands for now (a fresh object: grants may have been revoked).

        With a session (every browser socket; ``AuthMiddlewareStack``), the session is read again from
        its store, as the next HTTP request would: logged out (the session is gone), a deactivated user
        or a changed password (the session's auth hash no longer matches) give the anonymous user.
        """
        from django.contrib.auth import get_user, get_user_model

        session = self.scope.get("session")
        session_key = getattr(session, "session_key", None) if session is not None else None
        if session_key:
            store = import_module(settings.SESSION_ENGINE).SessionStore
            return get_user(_SessionOnly(store(session_key=session_key)))
        return get_user_model().objects.filter(pk=getattr(self.user, "pk", None)).first()


class _SessionOnly:
    """What ``django.contrib.auth.get_user`` reads of a request: its session."""

    def __init__(self, session):
        self.session = session
