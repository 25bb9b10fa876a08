"""Riding out a database blip: transient errors, and a call retried across them.

A restarted or briefly unreachable database raises ``OperationalError`` or
``InterfaceError`` (connection refused, terminated by the administrator, closed
under us; SQLite busy).  Work that must not be lost to such a blip, such as a
deployment's final status written by the worker, is retried with back-off on a
fresh connection.  Only outside a transaction: inside one, the caller's whole
transaction is gone and only the caller can start it again.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

log = logging.getLogger(__name__)

T = TypeVar("T")

# A connection refused, dropped or closed under us, or SQLite busy: worth trying again.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
RETRY_FIRST, RETRY_MAX = 0.05, 2.0  # seconds between attempts, doubling


def drop_connection() -> None:
    """Forget this thread's broken connection so the next query opens a new one."""
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - closing a dead connection may fail; it is gone either way
        pass


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` retried across transient database errors for up to ``PANEL_DB_RETRY_FOR`` seconds.

    ``fn`` must be safe to run again after a failure: a transaction of its own that either committed
    or did not (a conditional UPDATE that finds nothing to do the second time is such a function).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if connection.in_atomic_block:
            return fn(*args, **kwargs)
        deadline = time.monotonic() + settings.DB_RETRY_FOR
        delay = RETRY_FIRST
        while True:
            try:
                return fn(*args, **kwargs)
            except TRANSIENT_DB_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: database unavailable (%s); retrying in %.2f s", fn.__qualname__, exc, delay)
                drop_connection()
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    return wrapper
