"""The worker's timeout and the reconcile of an interrupted deployment, with stand-ins for the node (the same
paths over real SSH are in tests/integration/test_detached_runs.py)."""

from __future__ import annotations

import io
import time

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from deployments import lifecycle, logstream, tasks
from deployments.audit.models import AuditEvent
from deployments.errors import RequestError
from deployments.models import Deployment
from deployments.remote import Cancelled, RebuildResult, RemoteError, RunReport, SystemState

pytestmark = pytest.mark.django_db(transaction=True)

FOLDER = "/tmp/nixos-panel-root/deploy-9-0badcafe"
NEW_SYSTEM = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-web1"


def waits_for_stop(target, *, should_cancel, on_output, **kwargs):
    """A runner whose run goes on until it is told to stop, then is killed (as the real one does)."""
    on_output("err", "activating the configuration...")
    while not should_cancel():
        time.sleep(0.05)
    raise Cancelled("stopped")


def _queued(inventory, alice, **fields) -> Deployment:
    d = lifecycle.request_deployment(inventory["node"], action="switch", user=alice)
    if fields:
        Deployment.objects.filter(pk=d.pk).update(**fields)
    return d


def interrupted(inventory, alice) -> Deployment:
    """A deployment whose node stayed away: interrupted, its run folder recorded."""

    def runner(target, *, on_workdir, **kwargs):
        on_workdir(FOLDER)
        raise RemoteError("disconnected", "web1 stayed unreachable for 120 s; reconcile the deployment")

    d = _queued(inventory, alice)
    assert tasks.run_deployment(d.pk, runner=runner) == "interrupted"
    d.refresh_from_db()
    assert d.remote_dir == FOLDER
    return d


def report(**changes) -> RunReport:
    values = dict(
        exists=True,
        running=False,
        exit_status=0,
        ended_at=1_800_000_000,
        out_size=10,
        err_size=20,
        pgid=4242,
        unit="",
        toplevel=NEW_SYSTEM,
        generation=2,
        profile_path=NEW_SYSTEM,
        current_system=NEW_SYSTEM,
    )
    return RunReport(**{**values, **changes})


def node_says(found: RunReport):
    """A stand-in for remote.reconcile_run: the node answers ``found``; records whether the folder went."""
    calls = []

    def reconcile_run(target, workdir, record, resolve):
        final = record(found)
        calls.append({"workdir": workdir, "resolve": resolve, "removed": final and found.exists and found.ended})
        return found

    reconcile_run.calls = calls
    return reconcile_run


# -- timeout -----------------------------------------------------------------------------


def test_past_its_timeout_the_run_is_stopped_and_the_deployment_fails_with_the_reason(inventory, alice):
    d = _queued(inventory, alice, timeout_seconds=1)
    t0 = time.monotonic()
    assert tasks.run_deployment(d.pk, runner=waits_for_stop) == "failed"
    assert time.monotonic() - t0 < 10
    d.refresh_from_db()
    assert d.error_message.startswith("timed out after 1 s") and d.exit_code is None
    finished = AuditEvent.objects.get(action="deployment.finished", object_id=str(d.pk))
    assert finished.details["status"] == "failed" and "timed out" in finished.details["error"]


def test_without_its_own_timeout_the_panel_default_applies_and_caps_it(inventory, alice, settings):
    settings.DEPLOY_TIMEOUT = 1
    d = _queued(inventory, alice)
    assert tasks.run_deployment(d.pk, runner=waits_for_stop) == "failed"
    capped = _queued(inventory, alice, timeout_seconds=3600)
    assert tasks.run_deployment(capped.pk, runner=waits_for_stop) == "failed"
    capped.refresh_from_db()
    assert capped.error_message.startswith("timed out after 1 s")
    lines = [text for _, _, text in logstream.lines_after(capped.pk)]
    assert "its timeout of 3600 s is cut to the panel's ceiling, PANEL_DEPLOY_TIMEOUT=1 s" in lines


def test_a_cancel_before_the_timeout_is_a_cancel(inventory, alice):
    d = _queued(inventory, alice, timeout_seconds=60)

    def runner(target, **kwargs):
        lifecycle.cancel_deployment(Deployment.objects.get(pk=d.pk), user=alice)
        return waits_for_stop(target, **kwargs)

    assert tasks.run_deployment(d.pk, runner=runner) == "cancelled"


def test_a_run_killed_on_the_node_by_someone_else_is_failed(inventory, alice):
    d = _queued(inventory, alice)

    def runner(target, **kwargs):
        raise RemoteError("killed", "the run on web1 ended without an exit status: something on the node killed it")

    assert tasks.run_deployment(d.pk, runner=runner) == "failed"
    d.refresh_from_db()
    assert "without an exit status" in d.error_message


# -- reconcile ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "status", "final", "says"),
    [
        (report(), "succeeded", True, "exit code 0: succeeded"),
        (report(exit_status=4, toplevel=""), "failed", True, "exit code 4: failed"),
        (
            report(exit_status=None, running=True),
            "interrupted",
            False,
            "still running on the node (process group 4242)",
        ),
        (report(exit_status=None), "failed", True, "killed on the node before it finished"),
        (report(exit_status=None, pgid=None), "error", True, "never started on the node"),
        (report(exists=False, exit_status=None), "interrupted", True, "no longer holds the run's folder"),
    ],
    ids=["succeeded", "failed", "running", "killed", "never-started", "folder-gone"],
)
def test_reconcile_records_what_the_node_says(inventory, alice, found, status, final, says):
    d = interrupted(inventory, alice)
    run = node_says(found)
    done = lifecycle.reconcile_deployment(d, user=alice, reconcile_run=run)
    assert says in done.summary and done.final is final and done.running is (found.running and not final)
    d.refresh_from_db()
    assert d.status == status
    assert run.calls == [{"workdir": FOLDER, "resolve": "/run/current-system", "removed": final and found.exists}]
    assert (d.reconciled_at is not None) is final
    if status == "succeeded":
        assert (d.exit_code, d.generation_after, d.system_after, d.toplevel) == (0, 2, NEW_SYSTEM, NEW_SYSTEM)
        assert d.error_message == ""
    if status == "failed" and found.exit_status:
        assert d.exit_code == 4 and "exited with code 4" in d.error_message
    event = AuditEvent.objects.get(action="deployment.reconciled", object_id=str(d.pk))
    assert event.actor_name == "alice" and event.outcome == "success"
    assert event.details["before"]["status"] == "interrupted" and event.details["after"]["status"] == status
    assert event.details["run"]["folder"] == FOLDER and event.details["node"]["generation"] == 2
    assert says in event.details["summary"]


def test_reconcile_is_for_deployers_of_the_node_and_audits_a_refusal(inventory, alice, bob):
    d = interrupted(inventory, alice)
    from django.core.exceptions import PermissionDenied

    with pytest.raises(PermissionDenied):
        lifecycle.reconcile_deployment(d, user=bob, reconcile_run=node_says(report()))
    refused = AuditEvent.objects.get(action="deployment.reconcile")
    assert refused.outcome == "denied" and refused.actor_name == "bob"
    assert Deployment.objects.get(pk=d.pk).status == "interrupted"


def test_only_an_interrupted_deployment_with_a_run_folder_is_reconciled(inventory, alice):
    d = _queued(inventory, alice)
    with pytest.raises(RequestError, match="is queued: only an interrupted deployment"):
        lifecycle.reconcile_deployment(d, user=alice, reconcile_run=node_says(report()))
    Deployment.objects.filter(pk=d.pk).update(status="interrupted")
    with pytest.raises(RequestError, match="no run folder on the node recorded"):
        lifecycle.reconcile_deployment(d, user=alice, reconcile_run=node_says(report()))


def test_a_node_that_cannot_be_reached_is_said_and_nothing_changes(inventory, alice):
    d = interrupted(inventory, alice)

    def unreachable(*args):
        raise RemoteError("unreachable", "connection to 192.0.2.10:22 timed out after 10 s")

    with pytest.raises(RequestError, match="Could not ask web1 .* timed out"):
        lifecycle.reconcile_deployment(d, user=alice, reconcile_run=unreachable)
    assert Deployment.objects.get(pk=d.pk).status == "interrupted"
    assert not AuditEvent.objects.filter(action="deployment.reconciled").exists()


def test_the_next_deployment_reconciles_the_interrupted_one_first(inventory, alice, monkeypatch):
    d = interrupted(inventory, alice)
    monkeypatch.setattr(lifecycle, "remote_reconcile_run", node_says(report(exit_status=4)))
    second = _queued(inventory, alice)
    ran = []

    def runner(target, **kwargs):
        ran.append(1)
        state = SystemState(generation=2, profile_path=NEW_SYSTEM, current_system=NEW_SYSTEM)
        return RebuildResult(exit_code=0, before=state, after=state, toplevel=NEW_SYSTEM)

    assert tasks.run_deployment(second.pk, runner=runner) == "succeeded"
    d.refresh_from_db()
    assert d.status == "failed" and d.exit_code == 4
    lines = [text for _, _, text in logstream.lines_after(second.pk)]
    assert any(t.startswith(f"reconciled deployment #{d.pk}: the run ended on the node") for t in lines)
    assert ran == [1]
    event = AuditEvent.objects.get(action="deployment.reconciled", object_id=str(d.pk))
    assert event.actor_kind == "system"


def test_the_next_deployment_does_not_start_beside_a_run_still_going(inventory, alice, monkeypatch):
    d = interrupted(inventory, alice)
    monkeypatch.setattr(lifecycle, "remote_reconcile_run", node_says(report(exit_status=None, running=True)))
    second = _queued(inventory, alice)
    ran = []
    assert tasks.run_deployment(second.pk, runner=lambda target, **kw: ran.append(1)) == "error"
    second.refresh_from_db()
    assert ran == [] and f"deployment #{d.pk} is still running on the node" in second.error_message


# -- the command and the page ----------------------------------------------------------------


def test_the_reconcile_command_says_what_it_recorded_and_exits_by_outcome(inventory, alice, monkeypatch):
    d = interrupted(inventory, alice)
    monkeypatch.setattr(lifecycle, "remote_reconcile_run", node_says(report(exit_status=None, running=True)))
    with pytest.raises(CommandError) as exc:
        call_command("reconcile", str(d.pk), stdout=io.StringIO())
    assert exc.value.returncode == 1 and "reconcile again once the run has ended" in str(exc.value)
    monkeypatch.setattr(lifecycle, "remote_reconcile_run", node_says(report()))
    out = io.StringIO()
    call_command("reconcile", str(d.pk), "--as", "alice", stdout=out)
    assert f"deployment #{d.pk}: the run ended on the node" in out.getvalue() and "status: succeeded" in out.getvalue()
    with pytest.raises(CommandError) as exc:
        call_command("reconcile", str(d.pk))
    assert exc.value.returncode == 1
    with pytest.raises(CommandError) as exc:
        call_command("reconcile", "999999")
    assert exc.value.returncode == 2


def test_the_page_offers_reconcile_to_deployers_of_an_interrupted_deployment(
    inventory, alice, alice_client, monkeypatch
):
    d = interrupted(inventory, alice)
    page = alice_client.get(f"/deployments/{d.pk}/").content.decode()
    assert 'id="reconcile-button"' in page
    monkeypatch.setattr(lifecycle, "remote_reconcile_run", node_says(report()))
    response = alice_client.post(f"/deployments/{d.pk}/reconcile/", follow=True)
    assert response.redirect_chain[-1][0] == f"/deployments/{d.pk}/"
    page = response.content.decode()
    assert f"Reconciled #{d.pk}: the run ended on the node" in page and 'id="reconcile-button"' not in page
    assert Deployment.objects.get(pk=d.pk).status == "succeeded"
