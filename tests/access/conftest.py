"""Fixtures for the roles tests: the WebSocket consumer inside the test's transaction.

The world they start from (``world``) and the personas are in the root conftest
and tests/support/ (world.py, personas.py).
"""

from __future__ import annotations

import pytest


@pytest.fixture
def consumer_db(db, monkeypatch):
    """Let WebSocket consumers run inside the test's transaction.

    Run under ``async_to_sync`` from the test, the consumer's database calls
    execute in the test's own thread and connection, so they see the test's
    uncommitted rows; only Channels' "close old connections" around each call
    must not close that connection mid-test.  (Transactional tests cannot be
    used: flushing the database is refused by the append-only audit table.)
    """
    import channels.db

    monkeypatch.setattr(channels.db, "close_old_connections", lambda: None)


@pytest.fixture
def consumer_world(consumer_db, world):
    return world
