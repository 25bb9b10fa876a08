"""Is a worker there? django-q2's cluster heartbeats, read from where every process of the panel sees them.

Each qcluster saves its status about twice a second with a 3-second expiry: in
Redis with the Redis broker, in the ``Q_CLUSTER["cache"]`` cache with the ORM
broker. A per-process cache would hide every cluster from every other process,
so controlpanel/settings.py points the ORM broker at a shared one: Redis when
there is one, else :class:`StatusFileCache` in the data directory.
"""

from __future__ import annotations

import os

from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.filebased import FileBasedCache


class StatusFileCache(FileBasedCache):
    """Django's file cache, except that its directory is made by the first write, not on construction.

    The system checks construct every configured cache, and ``manage.py check``
    must write nothing (settings read; start-up writes). Reads of a missing
    directory find nothing, and every write makes the directory first.
    """

    def __init__(self, dir, params):
        BaseCache.__init__(self, params)
        self._dir = os.path.abspath(dir)


def qcluster_running() -> bool | None:
    """True if a cluster of this panel reported itself alive in the last seconds; None if the broker cannot tell."""
    from django_q.conf import Conf
    from django_q.status import Stat

    try:
        stats = Stat.get_all()
    except Exception:  # noqa: BLE001 - Redis down, an unreadable cache: we cannot tell, and say so
        return None
    return any(s.status not in (Conf.STOPPING, Conf.STOPPED) for s in stats)
