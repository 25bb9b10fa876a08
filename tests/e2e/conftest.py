"""One real panel (daphne + qcluster) with four testbed nodes, shared by the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.support.panel import Browser, Panel
from tests.support.testbed import NodeConfigSpec, make_flake_repo

CHATTY_LINES = 3000


@pytest.fixture(scope="package")
def fleet(tmp_path_factory):
    path = tmp_path_factory.mktemp("fleet") / "flake"
    make_flake_repo(
        path,
        {
            "devm": NodeConfigSpec(),
            "failing": NodeConfigSpec(activation_exit=4),
            "slow": NodeConfigSpec(sleep=60),
            "chatty": NodeConfigSpec(extra_lines=CHATTY_LINES, lines_per_second=1500),
        },
    )
    return path


@pytest.fixture(scope="package")
def panel(tmp_path_factory, testbed, fleet):
    p = Panel(tmp_path_factory.mktemp("panel"))
    try:
        attrs = ("devm", "failing", "slow", "chatty")
        p.register_nodes([(a, a, testbed.add_node(f"e2e-{a}-{testbed.token}")) for a in attrs], repo_path=fleet)
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture
def browser(panel):
    b = Browser(panel)
    b.login()
    return b
