"""`manage.py rollback` as an operator runs it: real processes, a real qcluster, a testbed node.

The rollback goes through the queue and the worker like any deployment; `--follow` prints its log and
ends with the summary, exit 0; a generation the node does not have is exit 1 and changes nothing.
"""

from __future__ import annotations

import pytest

from tests.support.panel import Panel
from tests.support.testbed import commit_change

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture
def panel(tmp_path, testbed, flake_repo):
    if not testbed.isolated:
        pytest.skip("the node's own /nix profile needs the testbed's namespaces (root)")
    p = Panel(tmp_path / "panel")
    try:
        tb = testbed.add_node(f"rb-{testbed.token}")
        p.register_node(tb, name="rb", attr="devm", repo_path=flake_repo[0])
        p.start(daphne=False)
        yield p, tb
    finally:
        p.stop()


def test_rollback_follows_through_the_worker_and_a_missing_generation_changes_nothing(panel, flake_repo):
    p, tb = panel
    initial = tb.current_system()
    commit_change(flake_repo[0], "devm")
    deployed = p.manage("deploy", "rb", "--follow", check=False)
    assert deployed.returncode == 0, p.logs() + deployed.stderr
    assert tb.generations() == [1, 2] and tb.current_system() != initial

    back = p.manage("rollback", "rb", "--follow", check=False)
    assert back.returncode == 0, p.logs() + back.stderr
    assert back.stderr.startswith("deployment #2: rollback to the previous generation (switch) on rb\n")
    assert "switching profile from version 2 to 1" in back.stderr
    assert back.stderr.strip().splitlines()[-1] == "deployment #2 succeeded (exit code 0); generation 2 -> 1"
    assert tb.current_system() == initial == tb.system_profile() and tb.generations() == [1, 2]

    missing = p.manage("rollback", "rb", "--generation", "7", "--follow", check=False)
    assert missing.returncode == 1
    assert "generation 7 does not exist" in missing.stderr and "nothing was changed" in missing.stderr
    assert tb.current_system() == initial and tb.generations() == [1, 2]
