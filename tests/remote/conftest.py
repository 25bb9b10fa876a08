"""The throwaway sshd the deployments.remote tests talk to (see sshd.py)."""

from __future__ import annotations

import pytest

from .sshd import missing_tools, running_sshd


@pytest.fixture(scope="package")
def node(tmp_path_factory):
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as sshd:
        yield sshd
