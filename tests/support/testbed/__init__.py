"""NixOS-like test nodes over real SSH, and flakes that build offline in a blink (README.md).

The root ``tests/conftest.py`` imports the ``testbed`` fixture from here.
"""

from __future__ import annotations

import pytest

from .flakes import NodeConfigSpec, commit_change, default_configs, git_archive, make_flake_repo
from .nodes import (
    NamespacesUnavailable,
    NixUnavailable,
    Node,
    Testbed,
    TestbedError,
    can_use_namespaces,
    fetch_host_key,
    namespaces_missing_reason,
    rotate_host_key,
)

__all__ = [
    "NamespacesUnavailable",
    "NixUnavailable",
    "Node",
    "NodeConfigSpec",
    "Testbed",
    "TestbedError",
    "can_use_namespaces",
    "commit_change",
    "default_configs",
    "fetch_host_key",
    "git_archive",
    "make_flake_repo",
    "namespaces_missing_reason",
    "rotate_host_key",
    "testbed",
]


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """A Testbed for the whole session; nodes are added by the tests that need them."""
    tb = Testbed(tmp_path_factory.mktemp("testbed"))
    try:
        yield tb
    finally:
        tb.close()
