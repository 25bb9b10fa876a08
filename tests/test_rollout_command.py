"""``manage.py deploy --tag …`` and ``cancel --rollout``: lines prefixed with the node, a summary table, exit
0 (every node succeeded), 1 (some did not), 2 (refused; nothing started).  A stand-in worker runs each
handed-out deployment in a thread (tests/support/fleet.py); the same over real SSH is in
tests/integration/test_rollouts_over_ssh.py."""

from __future__ import annotations

import sys

import pytest
from django.core.management import CommandError, call_command

from deployments import rollouts
from deployments.audit.models import AuditEvent
from deployments.models import Deployment, Rollout
from tests.support import personas
from tests.support.fleet import StandInWorker, ThreadWorker, make_fleet

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fleet(repository):
    return make_fleet(repository)


def deploy(capsys, *args) -> tuple[int, str, str]:
    """Run ``deploy`` with ``args``: (exit status, stdout, stderr)."""
    status = 0
    try:
        call_command("deploy", *args)
    except SystemExit as exc:
        status = exc.code
    except CommandError as exc:
        status = exc.returncode
        print(str(exc), file=sys.stderr)
    out, err = capsys.readouterr()
    return status, out, err


def test_a_rollout_by_tag_prints_each_line_with_its_node_and_a_summary_table(fleet, monkeypatch, capsys):
    worker = ThreadWorker()
    monkeypatch.setattr(rollouts, "hand_out", worker.enqueue)
    status, out, err = deploy(capsys, "--tag", "db", "--parallel", "2", "--follow")
    worker.join()
    assert status == 0, err
    assert "rollout #" in err and "to 4 nodes" in err and "2 at a time" in err
    for name in ("db-01", "db-02", "db-03", "db-04"):
        assert f"{name} | {name} says succeeded" in out
        assert f"{name} | building the system configuration..." in err, "stderr lines stay on stderr"
    table = out[out.index("NODE") :].splitlines()
    assert table[0].split() == ["NODE", "STATUS", "EXIT", "DURATION"]
    assert [row.split()[:3] for row in table[1:]] == [[f"db-0{i}", "succeeded", "0"] for i in range(1, 5)]
    assert "succeeded: 4 succeeded" in err


def test_any_node_that_did_not_succeed_makes_the_exit_status_1(fleet, monkeypatch, capsys):
    worker = ThreadWorker(outcome=lambda name: "failed" if name == "web-04" else "succeeded")
    monkeypatch.setattr(rollouts, "hand_out", worker.enqueue)
    status, out, err = deploy(capsys, "--tag", "web", "--canary", "1", "--follow")
    worker.join()
    assert status == 1
    assert "web-04 | web-04 says failed" in err
    rows = {row.split()[0]: row.split()[1:3] for row in out[out.index("NODE") :].splitlines()[1:]}
    assert rows["web-04"] == ["failed", "4"] and rows["web-01"] == ["succeeded", "0"]
    assert "7 succeeded, 1 failed" in err


def test_names_and_tags_combine_and_without_follow_it_exits_0_once_queued(fleet, monkeypatch, capsys):
    worker = StandInWorker()
    monkeypatch.setattr(rollouts, "hand_out", worker.enqueue)
    status, out, err = deploy(capsys, "--tag", "db", "--node", "web-05", "--node", "web-06", "--timeout", "60")
    assert status == 0, err
    rollout = Rollout.objects.get()
    assert rollout.node_count == 6 and rollout.trigger == "cli" and rollout.requested_by_name == "cli"
    assert set(rollout.deployments.values_list("timeout_seconds", flat=True)) == {60}
    assert len(worker.handed) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--all"], "explicit confirmation"),
        (["web-01", "--tag", "web"], "not both"),
        (["web-01", "--parallel", "3"], "--parallel"),
        (["--tag", "web", "--parallel", "0"], "Parallelism"),
        (["--tag", "web", "--node-timeout", "web-01=soon"], "NODE=SECONDS"),
        (["--tag", "nope"], "No node matches"),
        ([], "name a NODE"),
    ],
)
def test_refusals_exit_2_and_start_nothing(fleet, monkeypatch, capsys, args, message):
    worker = StandInWorker()
    monkeypatch.setattr(rollouts, "hand_out", worker.enqueue)
    status, out, err = deploy(capsys, *args)
    assert status == 2 and message in err, err
    assert not Rollout.objects.exists() and not worker.handed


def test_a_forbidden_node_refuses_the_whole_rollout_as_that_user(fleet, monkeypatch, capsys):
    worker = StandInWorker()
    monkeypatch.setattr(rollouts, "hand_out", worker.enqueue)
    user = personas.person("dora")
    personas.grant(user, "deployer", tag="db")
    personas.grant(user, "viewer", tag="web", team_name="web-viewers")
    status, out, err = deploy(capsys, "--tag", "db", "--node", "web-01", "--as", "dora")
    assert status == 2 and "web-01" in err
    assert not Rollout.objects.exists() and not Deployment.objects.exists()
    assert AuditEvent.objects.filter(action="rollout.requested", outcome="denied").count() == 1
    status, out, err = deploy(capsys, "--all", "--yes-all", "--as", "dora")
    assert status == 0 and Rollout.objects.get().node_count == 4


def test_cancel_rollout_stops_it_from_the_command_line(fleet, monkeypatch, capsys):
    worker = StandInWorker()
    monkeypatch.setattr(rollouts, "hand_out", worker.enqueue)
    deploy(capsys, "--tag", "web", "--parallel", "2")
    rollout = Rollout.objects.get()
    worker.claim_all()
    call_command("cancel", "--rollout", str(rollout.pk))
    assert "cancelling" in capsys.readouterr().out
    rollout.refresh_from_db()
    assert rollout.status == "cancelling"
    assert Deployment.objects.filter(rollout=rollout, status="queued").count() == 0
    for d in worker.running():
        worker.end(d, "cancelled")
    rollout.refresh_from_db()
    assert rollout.status == "cancelled"
    with pytest.raises(CommandError) as exc:
        call_command("cancel", "--rollout", str(rollout.pk))
    assert exc.value.returncode == 1
    with pytest.raises(CommandError) as exc:
        call_command("cancel", "--rollout", "99999")
    assert exc.value.returncode == 2
