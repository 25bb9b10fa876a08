"""End to end: a signed GitHub push to a real panel (daphne + qcluster) auto-deploys the new commit to a
testbed node (real SSH, real Nix) within seconds; a wrong signature deploys nothing."""

from __future__ import annotations

import time

import pytest

from tests.support.panel import Panel
from tests.support.testbed import commit_change, make_flake_repo
from tests.support.wait import wait_for

from .payloads import arm_auto_deploy, github, send


@pytest.fixture(scope="module")
def gitops_panel(tmp_path_factory, testbed):
    fleet = tmp_path_factory.mktemp("gitops-fleet") / "flake"
    make_flake_repo(fleet)
    node = testbed.add_node(f"gitops-{testbed.token}")
    panel = Panel(tmp_path_factory.mktemp("gitops-panel"))
    try:
        panel.register_nodes([("gitops-node", "devm", node)], repo_path=fleet)
        secret = arm_auto_deploy(panel, "gitops-node")
        panel.start()
        yield panel, node, fleet, secret
    finally:
        panel.stop()


def latest(panel) -> str:
    return (
        panel.manage(
            "shell",
            "-c",
            "from deployments.models import Deployment\n"
            "d = Deployment.objects.order_by('-pk').first()\n"
            "print(f'{d.status} {d.commit_sha} {d.trigger}' if d else 'none')",
        )
        .stdout.strip()
        .splitlines()[-1]
    )


def _ended(state: str) -> str:
    return "" if state.split()[0] in ("queued", "running") else state


def test_a_push_auto_deploys_the_new_commit_within_seconds(gitops_panel):
    panel, node, fleet, secret = gitops_panel
    head = commit_change(fleet, "devm")
    runs_before = len(node.rebuild_runs())
    sent = time.time()
    status, answer = send(panel, "github", *github(str(fleet), after=head, secret=secret))
    assert status == 202, answer
    runs = wait_for(lambda: node.rebuild_runs()[runs_before:], timeout=60, what="the node's nixos-rebuild run")
    assert runs[0][0] >= sent - 1 and runs[0][3] == "switch"
    done = wait_for(lambda: _ended(latest(panel)), timeout=120, what="the deployment to end")
    assert done == f"succeeded {head} gitops", panel.logs()[-3000:]


def test_a_wrong_signature_deploys_nothing(gitops_panel):
    panel, node, fleet, secret = gitops_panel
    head = commit_change(fleet, "devm")
    before = latest(panel)
    status, answer = send(panel, "github", *github(str(fleet), after=head, secret="wrong"))
    assert status == 401 and "refused" in answer["error"]
    time.sleep(2)  # time for a (wrongly) queued task to start: nothing may
    assert latest(panel) == before
