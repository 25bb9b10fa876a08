"""The worker's outcomes, with a stand-in runner in place of SSH (the same paths run over real SSH in
tests/integration): each way a run can end becomes the right status, message, log line and audit event."""

from __future__ import annotations

import hashlib

import pytest

from deployments import lifecycle, logstream, tasks
from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from deployments.remote import Cancelled, RebuildResult, RemoteError, SystemState

pytestmark = pytest.mark.django_db(transaction=True)


def _state(generation, path):
    return SystemState(generation=generation, profile_path=path, current_system=path)


def runner_returning(exit_code: int, lines=(("err", "building the system configuration..."),)):
    calls = []

    def runner(target, *, deployment_id, archive, attr, action, on_output, should_cancel):
        calls.append(
            {"target": target, "deployment_id": deployment_id, "attr": attr, "action": action, "archive": archive}
        )
        for stream, text in lines:
            on_output(stream, text)
        after = _state(2, "/nix/store/new-system") if exit_code == 0 else _state(1, "/nix/store/old-system")
        return RebuildResult(
            exit_code=exit_code,
            before=_state(1, "/nix/store/old-system"),
            after=after,
            toplevel="/nix/store/new-system",
        )

    runner.calls = calls
    return runner


def runner_raising(exc: Exception):
    def runner(target, **kwargs):
        kwargs["on_output"]("err", "activating the configuration...")
        raise exc

    return runner


def _queued(inventory, alice, action="switch"):
    return lifecycle.request_deployment(inventory["node"], action=action, user=alice)


def _events(deployment, event):
    return AuditEvent.objects.filter(object_type="deployment", object_id=str(deployment.pk), action=event)


def test_a_zero_exit_is_succeeded_with_generations_and_the_log_kept(inventory, alice):
    d = _queued(inventory, alice)
    runner = runner_returning(0)
    assert tasks.run_deployment(d.pk, runner=runner) == "succeeded"
    d.refresh_from_db()
    assert (d.status, d.exit_code, d.generation_before, d.generation_after) == ("succeeded", 0, 1, 2)
    assert d.system_after == d.toplevel == "/nix/store/new-system"
    # The runner got the pinned commit's source, the attribute and the action, and a target with the secret.
    (call,) = runner.calls
    assert (call["deployment_id"], call["attr"], call["action"]) == (d.pk, "devm", "switch")
    assert call["archive"] and d.archive_sha256 == hashlib.sha256(call["archive"]).hexdigest()
    assert call["target"].private_key and call["target"].host_key.fingerprint
    lines = logstream.lines_after(d.pk, -1)
    assert (lines[1][1], lines[1][2]) == ("e", "building the system configuration...")
    finished = _events(d, "deployment.finished").get()
    assert finished.outcome == "success" and finished.details["generation_after"] == 2
    assert finished.details["log_sha256"] == d.log_sha256 != ""


def test_a_non_zero_exit_is_failed_with_the_exit_code(inventory, alice):
    d = _queued(inventory, alice)
    assert tasks.run_deployment(d.pk, runner=runner_returning(4)) == "failed"
    d.refresh_from_db()
    assert d.exit_code == 4 and d.error_message == "nixos-rebuild switch exited with code 4"
    assert _events(d, "deployment.finished").get().outcome == "failure"


def test_a_cancel_seen_by_the_runner_ends_cancelled(inventory, alice):
    d = _queued(inventory, alice)
    assert tasks.run_deployment(d.pk, runner=runner_raising(Cancelled())) == "cancelled"
    d.refresh_from_db()
    assert d.status == "cancelled" and d.error_message == "cancelled on request"


def test_a_dropped_connection_is_interrupted_not_failed(inventory, alice):
    d = _queued(inventory, alice)
    status = tasks.run_deployment(d.pk, runner=runner_raising(RemoteError("disconnected", "connection lost")))
    assert status == "interrupted"
    d.refresh_from_db()
    assert "may still complete on the node" in d.error_message


def test_a_changed_host_key_is_an_error_and_its_own_security_event(inventory, alice):
    d = _queued(inventory, alice)
    status = tasks.run_deployment(d.pk, runner=runner_raising(RemoteError("host-key-mismatch", "key changed")))
    assert status == "error"
    mismatch = AuditEvent.objects.get(action="hostkey.mismatch")
    assert mismatch.node_name == "web1" and mismatch.details["deployment"] == d.pk


def test_a_panel_bug_in_the_runner_is_an_error_with_its_traceback(inventory, alice):
    d = _queued(inventory, alice)
    assert tasks.run_deployment(d.pk, runner=runner_raising(ZeroDivisionError("boom"))) == "error"
    d.refresh_from_db()
    assert d.error_message.startswith("internal error:") and "ZeroDivisionError: boom" in d.error_message
    _seq, stream, text = logstream.lines_after(d.pk, -1)[-1]
    assert stream == "s" and text.startswith("error: internal error")


def test_a_deployment_runs_at_most_once(inventory, alice):
    d = _queued(inventory, alice)
    runner = runner_returning(0)
    assert tasks.run_deployment(d.pk, runner=runner) == "succeeded"
    assert tasks.run_deployment(d.pk, runner=runner) == "skipped"
    assert len(runner.calls) == 1
    assert _events(d, "deployment.started").count() == 1


def test_a_deployment_cancelled_while_queued_never_reaches_the_runner(inventory, alice):
    d = _queued(inventory, alice)
    lifecycle.cancel_deployment(d, user=alice)
    runner = runner_returning(0)
    assert tasks.run_deployment(d.pk, runner=runner) == "skipped"
    assert runner.calls == []
    assert Deployment.objects.get(pk=d.pk).status == "cancelled"


def test_the_heartbeat_writes_every_interval_and_reads_the_cancel_flag_every_second(
    inventory, alice, settings, monkeypatch
):
    """The beat is a write (SQLite's one write lock, shared by every running deployment): once per
    HEARTBEAT_INTERVAL. A cancel is a read, and is seen within a second."""
    settings.HEARTBEAT_INTERVAL = 5.0
    deployment = _queued(inventory, alice)
    assert lifecycle.claim(deployment.pk)
    clock = [1000.0]
    monkeypatch.setattr(tasks.time, "monotonic", lambda: clock[0])
    beat = tasks.Heartbeat(deployment.pk)

    def beaten_at():
        return Deployment.objects.get(pk=deployment.pk).heartbeat_at

    beat()
    first = beaten_at()
    clock[0] += 1.5
    Deployment.objects.filter(pk=deployment.pk).update(cancel_requested=True)
    beat()
    assert beat.cancel.is_set(), "the cancel flag is read every second"
    assert beaten_at() == first, "no write before HEARTBEAT_INTERVAL"
    clock[0] += 1.0
    beat.remote_dir = "/tmp/nixos-panel-root/deploy-1-abcd"
    beat()
    stored = Deployment.objects.get(pk=deployment.pk)
    assert stored.remote_dir == "/tmp/nixos-panel-root/deploy-1-abcd", "the folder is stored at once"
    assert stored.heartbeat_at > first
    second = stored.heartbeat_at
    clock[0] += 0.5
    beat()
    assert beaten_at() == second
    clock[0] += 5.0
    beat()
    assert beaten_at() > second
