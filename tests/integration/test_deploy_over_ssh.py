"""Deployments through real SSH to NixOS-like nodes: outcomes, generations, and every failure mode.

The worker function runs in-process here; tests/e2e runs it in a real qcluster.
"""

from __future__ import annotations

import hashlib
import http.server
import shlex
import threading

import pytest
from django.db import connection

from deployments import inventory, lifecycle, logstream, tasks
from deployments.audit.models import AuditEvent
from deployments.errors import NodeBusy
from deployments.models import Credential, Deployment
from deployments.remote.rebuild import OWNER_SUFFIX
from tests.support.keys import ed25519_private_key
from tests.support.net import closing_server, refusing_address
from tests.support.processes import kill_all, matching, sshd_sessions
from tests.support.testbed import commit_change, rotate_host_key
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def deploy(node, action="switch", revision="", user=None) -> Deployment:
    d = lifecycle.request_deployment(node, action=action, revision=revision, user=user, trigger=Deployment.Trigger.CLI)
    tasks.run_deployment(d.pk)
    d.refresh_from_db()
    return d


def run_in_thread(pk: int) -> str:
    """The worker's task, as a qcluster thread runs it (its own database connection, closed after)."""
    try:
        return tasks.run_deployment(pk)
    finally:
        connection.close()


def log_text(d: Deployment) -> list[str]:
    return [text for _, _, text in logstream.lines_after(d.pk)]


def deploy_at(node, host: str, port: int) -> Deployment:
    """Point ``node`` at ``host``:``port`` and deploy it."""
    node.host, node.port = host, port
    node.save()
    return deploy(node)


def activating(add_node):
    """A deployment of the slow configuration whose activation has begun: (node, testbed node, deployment, worker).

    The worker thread runs ``tasks.run_deployment``; the test cancels or joins it.
    """
    node, tb = add_node("slow")
    d = lifecycle.request_deployment(node, action="switch")
    worker = threading.Thread(target=run_in_thread, args=(d.pk,))
    worker.start()
    try:
        wait_for(lambda: any("activating" in t for t in log_text(d)), what="the slow activation to start")
    except BaseException:
        lifecycle.cancel_deployment(d)
        worker.join(60)
        raise
    return node, tb, d, worker


def with_dropped_connections(add_node):
    """A slow deployment whose SSH sessions were killed mid-activation (the link resets), once it has
    ended: (node, testbed node, deployment, the number of sessions killed)."""
    node, tb, d, worker = activating(add_node)
    sessions = sshd_sessions(tb.processes())
    kill_all(sessions)
    assert sessions, "the node had no SSH session to drop"
    worker.join(90)
    d.refresh_from_db()
    return node, tb, d, len(sessions)


def test_switch_twice_makes_two_generations_and_records_them(add_node, flake_repo):
    node, tb = add_node()
    gens_before = tb.generations()
    first = deploy(node)
    assert first.status == "succeeded", first.error_message
    assert first.exit_code == 0
    commit_change(flake_repo[0], "devm")
    second = deploy(node)
    assert second.status == "succeeded", second.error_message
    assert tb.generations() == gens_before + [first.generation_after, second.generation_after]
    assert second.generation_before == first.generation_after
    assert second.generation_after == first.generation_after + 1
    assert second.system_after == tb.current_system() == second.toplevel
    assert first.toplevel != second.toplevel and first.commit_sha != second.commit_sha
    lines = log_text(second)
    assert "building the system configuration..." in lines
    assert "activating the configuration..." in lines


def test_the_recorded_log_hash_and_counts_match_the_stored_log(add_node):
    node, _ = add_node()
    d = deploy(node)
    text = "".join(logstream.iter_log_text(d.pk)).encode()
    assert hashlib.sha256(text).hexdigest() == d.log_sha256
    assert d.byte_count == len(text) and d.line_count == text.count(b"\n")
    finished = AuditEvent.objects.get(action="deployment.finished", object_id=str(d.pk))
    assert finished.details["log_sha256"] == d.log_sha256
    assert finished.details["toplevel"] == d.toplevel and finished.details["commit"] == d.commit_sha


def test_the_shipped_source_is_removed_afterwards(add_node):
    node, tb = add_node()
    d = deploy(node)
    assert d.status == "succeeded"
    shipped = [t.rsplit(" to ", 1)[1] for t in log_text(d) if t.startswith("shipping source")]
    assert shipped and f"/deploy-{d.pk}-" in shipped[0]
    assert tb.run(f"test -e {shlex.quote(shipped[0])}", check=False).returncode == 1
    assert d.archive_sha256 and len(d.archive_sha256) == 64


def test_dry_activate_changes_nothing(add_node):
    node, tb = add_node()
    before = (tb.generations(), tb.current_system())
    d = deploy(node, action="dry-activate")
    assert d.status == "succeeded", d.error_message
    assert (tb.generations(), tb.current_system()) == before
    assert any(line.startswith("would ") for line in log_text(d))


def test_build_builds_without_activating(add_node):
    node, tb = add_node()
    before = (tb.generations(), tb.current_system())
    d = deploy(node, action="build")
    assert d.status == "succeeded", d.error_message
    assert d.toplevel.startswith("/nix/store/")
    assert (tb.generations(), tb.current_system()) == before


def test_boot_sets_the_default_without_activating(add_node, flake_repo):
    node, tb = add_node()
    current = tb.current_system()
    commit_change(flake_repo[0], "devm")
    d = deploy(node, action="boot")
    assert d.status == "succeeded", d.error_message
    assert d.generation_after == d.generation_before + 1
    assert tb.current_system() == current


def test_a_failing_activation_is_failed_with_its_exit_code_and_last_lines(add_node):
    node, _ = add_node("failing")
    d = deploy(node)
    assert d.status == "failed"
    assert d.exit_code == 1, "nixos-rebuild exits 1 when switch-to-configuration fails"
    assert "exited with code 1" in d.error_message
    lines = log_text(d)
    assert "warning: the following units failed: foo.service" in lines
    assert "warning: error(s) occurred while switching to the new configuration" in lines
    streams = {text: stream for _, stream, text in logstream.lines_after(d.pk)}
    assert streams["warning: error(s) occurred while switching to the new configuration"] == "e"


def test_a_missing_flake_attribute_fails_with_nix_s_message(add_node):
    node, _ = add_node("nosuchattr")
    d = deploy(node)
    assert d.status == "failed" and d.exit_code != 0
    assert any("nosuchattr" in line for line in log_text(d))


def test_an_unknown_host_is_an_error_that_names_it(add_node):
    node, _ = add_node()
    node.host = "no-such-node.invalid"
    node.save()
    d = deploy(node)
    assert d.status == "error"
    assert "no-such-node.invalid" in d.error_message


def test_an_unreachable_port_is_an_error_that_says_so(add_node):
    node, _ = add_node()
    with refusing_address() as (host, port):
        d = deploy_at(node, host, port)
    assert d.status == "error"
    assert "refused" in d.error_message.lower() or "unreachable" in d.error_message.lower()


def test_a_server_that_hangs_up_at_once_is_an_error(add_node):
    node, _ = add_node()
    with closing_server() as (host, port):
        d = deploy_at(node, host, port)
    assert d.status == "error"
    assert d.error_message.startswith(f"{host}:{port} closed the connection without a word")


def test_a_web_server_where_sshd_should_be_is_an_error_naming_what_answered(add_node):
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    node, _ = add_node()
    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        d = deploy_at(node, *server.server_address[:2])
    finally:
        server.shutdown()
        server.server_close()
    assert d.status == "error"
    # Python's server answers the client's SSH identification line with an HTML error page.
    assert d.error_message == f"{node.host}:{node.port} did not speak SSH: it sent '<!DOCTYPE HTML>…'"
    assert f"error: {d.error_message}" in log_text(d)


def test_a_refused_login_is_an_error_that_says_so(add_node):
    node, _ = add_node()
    wrong = Credential(name="wrong-key", kind=Credential.Kind.SSH_KEY)
    inventory.save_credential(wrong, secret=ed25519_private_key(), actor_kind="cli")
    node.credential = wrong
    node.save()
    d = deploy(node)
    assert d.status == "error"
    assert "auth" in d.error_message.lower()


def test_a_changed_host_key_stops_the_deploy_and_says_so(add_node):
    node, tb = add_node()
    pinned = node.host_key_fingerprint
    rotate_host_key(tb)
    gens = tb.generations()
    d = deploy(node)
    assert d.status == "error"
    assert "host key" in d.error_message.lower() and pinned in d.error_message
    assert tb.generations() == gens
    mismatch = AuditEvent.objects.get(action="hostkey.mismatch")
    assert mismatch.outcome == "failure" and mismatch.details["pinned"] == pinned
    assert mismatch.node_name == node.name


def test_password_login_works(add_node):
    node, tb = add_node(password=True)
    d = deploy(node)
    assert d.status == "succeeded", d.error_message
    assert tb.current_system() == d.system_after


def test_the_password_never_reaches_the_log_or_the_trail(add_node):
    node, tb = add_node(password=True)
    d = deploy(node)
    text = "".join(logstream.iter_log_text(d.pk))
    assert tb.password not in text
    assert all(tb.password not in str(e.details) for e in AuditEvent.objects.all())


def test_a_second_deploy_to_a_busy_node_is_refused(add_node):
    node, _, d, worker = activating(add_node)
    try:
        with pytest.raises(NodeBusy):
            lifecycle.request_deployment(node, action="switch")
    finally:
        lifecycle.cancel_deployment(d)
        worker.join(60)
    d.refresh_from_db()
    assert d.status == "cancelled"
    assert Deployment.objects.filter(node=node).count() == 1


def test_cancel_stops_the_remote_process(add_node):
    _, tb, d, worker = activating(add_node)
    lifecycle.cancel_deployment(d)
    worker.join(60)
    d.refresh_from_db()
    assert d.status == "cancelled"
    wait_for(
        lambda: not matching(tb.processes(), "switch-to-configuration"),
        timeout=15,
        what="the remote activation to be gone",
    )
    assert (
        AuditEvent.objects.filter(action="deployment.finished", object_id=str(d.pk)).get().details["status"]
        == "cancelled"
    )


def test_a_deploy_running_twice_from_the_broker_runs_once(add_node):
    node, tb = add_node()
    d = lifecycle.request_deployment(node, action="switch")
    results = []
    threads = [threading.Thread(target=lambda: results.append(run_in_thread(d.pk))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["skipped", "skipped", "succeeded"]
    assert AuditEvent.objects.filter(action="deployment.started", object_id=str(d.pk)).count() == 1


def test_an_attribute_with_shell_syntax_never_reaches_the_node(add_node):
    node, tb = add_node()
    # Forced past the validators, as if written straight into the database.
    d = lifecycle.request_deployment(node, action="switch")
    pwned = f"{tb.home}/pwned"  # the node's own directory: nothing else on the machine counts
    Deployment.objects.filter(pk=d.pk).update(flake_attr=f"devm;touch {pwned}")
    tasks.run_deployment(d.pk)
    d.refresh_from_db()
    assert d.status == "error"
    assert tb.run(f"test -e {shlex.quote(pwned)}", check=False).returncode == 1


def test_a_dropped_connection_mid_run_resumes_and_ends_with_the_real_exit_status(add_node):
    node, tb, d, _ = with_dropped_connections(add_node)
    # The run went on, detached from the session: the worker reconnected, resumed and took its exit status.
    assert d.status == "succeeded", d.error_message
    lines = log_text(d)
    assert any(t.startswith("lost the connection to ") for t in lines)
    assert any(t.startswith("reconnected to ") for t in lines)
    ticks = [t for t in lines if t.startswith("activation in progress: step ")]
    assert ticks == [f"activation in progress: step {n} of 60" for n in range(1, 61)], "every line once, in order"
    assert d.system_after == tb.current_system() == d.toplevel
    assert tb.run(f"test -e {shlex.quote(d.remote_dir)}", check=False).returncode == 1, "read, so removed"
    assert not Deployment.objects.filter(node=node, status__in=Deployment.ACTIVE).exists()


def test_the_next_run_removes_folders_whose_run_is_gone_and_keeps_those_in_use_or_unread(add_node):
    node, tb = add_node()
    parent = "/tmp/nixos-panel-root"
    tag = tb.name[:8].replace("-", "0")
    gone, busy, unread = (f"{parent}/deploy-{n}-{tag}" for n in (71, 77, 78))
    tb.run(f"mkdir -p -m 700 {parent}")
    # A run that ended long ago, its outcome read or never started (no pgid file): its group is gone.
    tb.run(f"mkdir -p {gone}/src && sh -c 'echo $$ > {gone}{OWNER_SUFFIX}'")
    # Another run (another panel, say) that is using its folder right now.
    tb.run(
        f"setsid sh -c 'echo $$ > {busy}{OWNER_SUFFIX}; mkdir -p {busy}; exec sleep 120' </dev/null >/dev/null 2>&1 &"
    )
    wait_for(lambda: tb.run(f"test -d {busy}", check=False).returncode == 0, what="the other run's folder")
    busy_pgid = int(tb.run(f"cat {busy}{OWNER_SUFFIX}").stdout)
    # A detached run that ended while no panel was looking: its status waits to be read (reconcile).
    tb.run(f"mkdir -p {unread}/src && sh -c 'echo $$ > {unread}{OWNER_SUFFIX}; echo $$ > {unread}/pgid' "
           f"&& echo 0 > {unread}/status")  # fmt: skip
    try:
        second = deploy(node)
        assert second.status == "succeeded", second.error_message
        lines = log_text(second)
        assert f"removed {gone}, left behind by an earlier run that is no longer running" in lines
        assert tb.run(f"test -e {gone} || test -e {gone}{OWNER_SUFFIX}", check=False).returncode == 1
        assert any(t.startswith(f"left {busy} in place") and f"process group {busy_pgid}" in t for t in lines)
        assert any(t.startswith(f"left {unread} in place: its run ended") and "deployment #78" in t for t in lines)
        assert tb.run(f"test -d {busy} && test -f {unread}/status", check=False).returncode == 0
    finally:
        tb.run(f"kill -KILL -{busy_pgid}; rm -rf {parent}/deploy-7[178]-{tag}*", check=False)
