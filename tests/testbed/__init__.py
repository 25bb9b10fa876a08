"""Moved to tests/support/testbed (and tests/support/net.py); this stays only until no test imports it."""

from tests.support.net import closing_server, free_port, refusing_address
from tests.support.processes import processes_of as node_processes
from tests.support.testbed import *  # noqa: F403
from tests.support.testbed import __all__ as _moved

__all__ = [*_moved, "closing_server", "free_port", "node_processes", "refusing_address"]
