"""Health checks and magic rollback on the testbed: real SSH, real Nix, nodes with their own network.

A system whose activation takes the node's network down (``NodeConfigSpec(network="down")``: its
``eth0`` goes down inside its namespace, as a broken firewall or network change would) must be reverted
by the node itself within its confirmation deadline, and the panel records ``rolled_back`` once it
reaches the node again. A system whose health check fails is rolled back by policy, or kept and marked
``unhealthy``; a healthy one is confirmed over a new connection and kept. The worker runs in-process (a
thread); TCP and HTTP checks probe real servers this test starts.
"""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from deployments import lifecycle, logstream
from deployments.audit.models import AuditEvent
from deployments.errors import RequestError
from deployments.healthchecks import HealthCheck
from deployments.models import Deployment, Tag
from deployments.remote import detached
from tests.support.testbed import NodeConfigSpec, make_flake_repo
from tests.support.wait import wait_for

from .test_detached_runs import ended, run_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

DEADLINE = 5  # the confirmation deadline of the tests that wait for it to pass (30 s by default)
# Where the panel must confirm in time (a new SSH connection, then the checks), the default: a loaded CI
# machine has taken more than 5 s for that, and the node then went back by itself.
ROOMY = 30
HEALTH = "grep -qx ok /run/current-system/health"  # the testbed system's own health file


@pytest.fixture(scope="module")
def _magic_repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("magic-flake") / "flake"
    configs = {
        "devm": NodeConfigSpec(),
        "good": NodeConfigSpec(version_tag="good1"),
        "cutoff": NodeConfigSpec(network="down", version_tag="cut1"),
        "sick": NodeConfigSpec(healthy=False, version_tag="sick1"),
    }
    return path, make_flake_repo(path, configs)


@pytest.fixture
def flake_repo(_magic_repo):
    return _magic_repo


@pytest.fixture
def isolated(testbed):
    if not testbed.isolated:
        pytest.skip("a node that takes its own network down needs the testbed's network namespaces (root)")


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch, settings):
    monkeypatch.setattr(detached, "RECONNECT_FIRST_DELAY", 0.5)
    settings.LINK_TIMEOUT, settings.UNREACHABLE_LIMIT = 6, 60


def deploy(node, action: str = "switch") -> Deployment:
    d = lifecycle.request_deployment(node, action=action)
    worker = threading.Thread(target=run_in_thread, args=(d.pk,))
    worker.start()
    return ended(d, worker)


def texts(d: Deployment) -> list[str]:
    return [text for _, _, text in logstream.lines_after(d.pk)]


def events(d: Deployment, name: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=name, object_id=str(d.pk)).order_by("seq"))


def configure(node, attr: str, deadline: int = DEADLINE) -> None:
    node.flake_attr, node.confirm_timeout = attr, deadline
    node.save()


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1 answering each path's status: /ok 200, /down 503, /slow never."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                stop.wait(30)
                return
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()
            self.wfile.write(b"body never logged\n")

        def log_message(self, *args):
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def tcp_port():
    """A real listening TCP port on 127.0.0.1."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def test_a_system_that_cuts_the_node_off_is_reverted_by_the_node_and_recorded_rolled_back(isolated, add_node):
    node, tb = add_node()
    configure(node, "cutoff")
    before = tb.current_system()
    d = deploy(node)
    assert d.status == Deployment.Status.ROLLED_BACK, (d.status, d.error_message)
    assert tb.current_system() == before, "the node runs its previous system again"
    assert tb.generations() == [1, 2] and tb.system_profile() == before
    (down, cut_at), (up, back_at) = tb.network_log()[-2:]
    assert (down, up) == ("down", "up")
    assert back_at - cut_at <= DEADLINE + 5, f"reverted {back_at - cut_at:.1f} s after the network went down"
    assert "no confirmation over a new SSH connection within 5 s" in d.error_message
    log = texts(d)
    assert any("magic rollback: no confirmation from the panel in time" in t for t in log)
    assert any(t.startswith("could not reach") or "decided already" in t or "had ended" in t for t in log)
    assert d.system_after == before and d.generation_after == 1
    assert len(events(d, "deployment.rolled_back")) == 1
    assert not events(d, "deployment.confirmed")


def test_a_failing_health_check_with_policy_rollback_rolls_the_node_back(isolated, add_node):
    node, tb = add_node()
    configure(node, "sick")
    HealthCheck.objects.create(node=node, name="service", kind="command", command=HEALTH, retries=1,
                               interval_seconds=0, timeout_seconds=5, on_failure="rollback")  # fmt: skip
    before = tb.current_system()
    d = deploy(node)
    assert d.status == Deployment.Status.ROLLED_BACK, (d.status, d.error_message)
    assert tb.current_system() == before
    assert "health check 'service'" in d.error_message and "failed after 2 attempts: exit 1" in d.error_message
    log = texts(d)
    assert any("attempt 1 of 2: failing" in t for t in log) and any("attempt 2 of 2: failing" in t for t in log)
    assert any("the panel rejected the new system" in t for t in log)
    (checked,) = events(d, "deployment.health_checked")
    assert checked.outcome == "failure" and len(checked.details["attempts"]) == 2
    assert len(events(d, "deployment.unhealthy")) == 1 and len(events(d, "deployment.rolled_back")) == 1


def test_a_healthy_system_is_confirmed_over_a_new_connection_and_kept(isolated, add_node, http_server, tcp_port):
    node, tb = add_node()
    configure(node, "good", deadline=ROOMY)
    tag = Tag.objects.create(name="web")
    node.tags.add(tag)
    HealthCheck.objects.create(node=node, name="service", kind="command", command=f"{HEALTH} && echo fine")
    HealthCheck.objects.create(node=node, name="port", kind="tcp", host="127.0.0.1", port=tcp_port)
    HealthCheck.objects.create(tag=tag, name="page", kind="http", url=f"{http_server}/ok")
    logins = tb.sshd_log.read_text().count("Accepted publickey")
    d = deploy(node)
    assert d.status == Deployment.Status.SUCCEEDED, (d.status, d.error_message)
    # The node's own sshd saw two logins: the followed connection, and the new one that confirmed.
    assert tb.sshd_log.read_text().count("Accepted publickey") == logins + 2
    assert "good1" in tb.current_system() and d.system_after == tb.current_system()
    log = texts(d)
    assert any(t.startswith("reached ") and "over a new SSH connection" in t for t in log)
    assert "  | fine" in log
    assert any("HTTP 200 (expected 200)" in t for t in log) and not any("body never logged" in t for t in log)
    assert any("magic rollback: confirmed by the panel" in t for t in log)
    assert [e.outcome for e in events(d, "deployment.health_checked")] == ["success"] * 3
    (confirmed,) = events(d, "deployment.confirmed")
    assert confirmed.details["checks"] == {"service": True, "port": True, "page": True}
    # Confirmed means the node decided to keep it: a second look at the node after the fact agrees.
    assert tb.run("cat /run/current-system/health").stdout.strip() == "ok"


def test_a_failing_check_with_policy_keep_marks_the_deployment_unhealthy_and_the_node_keeps_it(
    isolated, add_node, http_server
):
    node, tb = add_node()
    configure(node, "good", deadline=ROOMY)
    HealthCheck.objects.create(node=node, name="page", kind="http", url=f"{http_server}/down", retries=2,
                               interval_seconds=0, on_failure="keep")  # fmt: skip
    d = deploy(node)
    assert d.status == Deployment.Status.UNHEALTHY, (d.status, d.error_message)
    assert "good1" in tb.current_system(), "the node keeps the new system"
    assert "HTTP 503 (expected 200)" in d.error_message
    assert len([t for t in texts(d) if " attempt " in t and "HTTP 503" in t]) == 3, "the first and two retries"
    assert len(events(d, "deployment.unhealthy")) == 1 and not events(d, "deployment.rolled_back")
    assert len(events(d, "deployment.confirmed")) == 1


def test_health_checks_without_magic_rollback_still_roll_back_by_policy(isolated, add_node):
    node, tb = add_node()
    configure(node, "sick", deadline=0)
    HealthCheck.objects.create(node=node, name="service", kind="command", command=HEALTH, retries=0)
    before = tb.current_system()
    d = deploy(node)
    assert d.status == Deployment.Status.ROLLED_BACK and tb.current_system() == before


def test_without_checks_or_magic_rollback_nothing_is_armed(isolated, add_node):
    node, tb = add_node()
    configure(node, "good", deadline=0)
    d = deploy(node)
    assert d.status == Deployment.Status.SUCCEEDED and "good1" in tb.current_system()
    assert not any("magic rollback" in t or "armed" in t for t in texts(d))


def test_a_run_the_panel_lost_sight_of_is_reconciled_as_rolled_back(isolated, add_node, settings):
    settings.LINK_TIMEOUT, settings.UNREACHABLE_LIMIT = 3, 2  # the worker gives up before the node reverts
    node, tb = add_node()
    configure(node, "cutoff", deadline=25)
    before = tb.current_system()
    d = deploy(node)
    assert d.status == Deployment.Status.INTERRUPTED, (d.status, d.error_message)
    wait_for(lambda: tb.current_system() == before, timeout=60, what="the node to go back by itself")
    wait_for(lambda: any(s == "up" for s, _ in tb.network_log()[-1:]), timeout=10, what="its network")
    done = wait_for(lambda: _reconciled(d), timeout=40, interval=1, what="a reconcile that reaches the node")
    assert done.deployment.status == Deployment.Status.ROLLED_BACK, done.summary
    assert "recorded by reconcile" in done.deployment.error_message
    assert len(events(d, "deployment.rolled_back")) == 1


def _reconciled(d):
    try:
        return lifecycle.reconcile_deployment(Deployment.objects.get(pk=d.pk), actor_kind="system")
    except RequestError:  # the node's link may take a moment to come back
        return None


def test_a_command_check_that_outlives_its_timeout_fails_each_attempt_and_is_stopped(isolated, add_node):
    node, tb = add_node()
    configure(node, "good", deadline=ROOMY)
    HealthCheck.objects.create(node=node, name="hangs", kind="command", command="echo started; sleep 30",
                               timeout_seconds=1, retries=1, interval_seconds=0, on_failure="keep")  # fmt: skip
    d = deploy(node)
    assert d.status == Deployment.Status.UNHEALTHY, (d.status, d.error_message)
    log = texts(d)
    assert len([t for t in log if " attempt " in t and "timed out after 1 s" in t]) == 2
    assert log.count("  | started") == 2, "the output of each attempt is in the log"
    assert "good1" in tb.current_system()
    wait_for(lambda: not [c for c in tb.processes().values() if "sleep 30" in c], timeout=10,
             what="the timed-out command to be stopped on the node")  # fmt: skip
