"""WebSocket follower of one deployment's log.

On connect: permission through the gate (closed on denial, 4404 for an
unseen deployment).  Then replay from the database after the client's last
sequence number (``?after=N``; or only the last lines, ``?tail=N``), then follow
the deployment's shared feed (``logfeed``: one reader per deployment per
process, fed by pushes or a database poll, its messages encoded once for every
socket).  ``lines`` messages go as binary frames of UTF-8 JSON (encoded once,
shared by every socket), compressed as a zlib stream when the socket asked for
``?compress=deflate`` (compressed once, shared too: the page asks, 5-10 times
fewer bytes); ``status``, ``end``, ``skipped`` and ``pong`` as text frames of
JSON.  The database is the source: every line is sent once, in order,
across reconnects.  Permission is checked again while following (once per
session and period for all its sockets), so a revoked user's socket is closed;
so is the socket of a session that has since logged out (or whose user was
deactivated or changed password).  The panel's own close codes are 4000-4999:
4403 no longer allowed, 4404 unseen, 4500 the follower failed.
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

from . import logfeed, logstream
from .access.gate import deployment_for
from .dbretry import TRANSIENT_DB_ERRORS

log = logging.getLogger(__name__)

BATCH_LINES = logfeed.BATCH_LINES  # lines per WebSocket message
RECHECK_PERMISSION_EVERY = 2.0  # seconds
CLOSE_FORBIDDEN, CLOSE_UNSEEN, CLOSE_FAILED = 4403, 4404, 4500
_recheck = logfeed.SharedCheck()


class DeploymentLogConsumer(AsyncJsonWebsocketConsumer):
    # No channel-layer inbox per socket: the deployment's feed is this process's one member of its
    # group, so a viewer costs Redis nothing (and never hits its receive timeout or connection limit).
    channel_layer_alias = None

    async def connect(self) -> None:
        self.deployment_id = int(self.scope["url_route"]["kwargs"]["pk"])
        self.user = self.scope.get("user")
        query = self._query()
        try:
            self.after = int(query.get("after", "-1"))
            tail = int(query["tail"]) if "tail" in query else None
        except ValueError:
            self.after, tail = -1, None
        self.compressed = query.get("compress") == "deflate"
        if not await self._allowed():
            await self.close(code=CLOSE_UNSEEN)
            return
        skipped = 0
        if tail is not None and self.after < 0:
            # A page showing only the last ``tail`` lines need not download a million first.
            skipped = max(0, await database_sync_to_async(logstream.next_seq)(self.deployment_id) - max(tail, 0))
            self.after = skipped - 1
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

    async def receive_json(self, content, **kwargs) -> None:
        # The page may only ask to resume from a sequence number; everything else is ignored.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    @database_sync_to_async
    def _allowed(self) -> bool:
        try:
            deployment_for(self.user, self.deployment_id)
        except Http404:
            return False
        return True

    async def _follow(self) -> None:
        feed = logfeed.join(self.deployment_id)
        status_sent = 0
        last_check = time.monotonic()
        try:
            while True:
                logfeed.raise_if_cancelled()  # a cancel 3.11's wait_for swallowed below still ends the follower
                changed = feed.changed
                if feed.next_seq is not None:
                    while (message := await feed.next_message(self.after, compressed=self.compressed)) is not None:
                        data, self.after = message
                        await self.send(bytes_data=data)
                    if feed.status_version != status_sent:
                        status_sent = feed.status_version
                        await self.send(text_data=feed.status_text)
                    if feed.complete and self.after + 1 >= feed.next_seq:
                        await self.send_json({"type": "end", "last_seq": self.after})
                        return
                if time.monotonic() - last_check >= RECHECK_PERMISSION_EVERY:
                    last_check = time.monotonic()
                    try:
                        allowed = await _recheck(self._recheck_key(), self._still_allowed, RECHECK_PERMISSION_EVERY)
                    except TRANSIENT_DB_ERRORS as exc:
                        # Nothing can change a grant while the database is away; ask again next period.
                        log.warning("deployment %s: permission re-check deferred: %s", self.deployment_id, exc)
                        allowed = True
                    if not allowed:
                        await self.close(code=CLOSE_FORBIDDEN)
                        return
                wait = max(0.0, RECHECK_PERMISSION_EVERY - (time.monotonic() - last_check))
                try:
                    await asyncio.wait_for(changed.wait(), timeout=wait)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("log follower for deployment %s failed", self.deployment_id)
            await self.close(code=CLOSE_FAILED)
        finally:
            logfeed.leave(feed)

    def _recheck_key(self) -> tuple:
        """Sockets with the same answer share a re-check: the same session (or user) and deployment."""
        session = self.scope.get("session")
        session_key = getattr(session, "session_key", None) if session is not None else None
        return (self.deployment_id, session_key or ("user", getattr(self.user, "pk", None)))

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
