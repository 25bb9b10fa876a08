"""The server the deployments.remote tests talk to (server.py, on the suite's test sshd)."""

from __future__ import annotations

import pytest

from tests.support.sshd import missing_tools

from .server import running_server


@pytest.fixture(scope="package")
def node(tmp_path_factory):
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    with running_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server
