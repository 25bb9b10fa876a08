"""Health checks: probes against real local servers, retries and timeouts, the outcome of a deployment,
validation, and the pages from the side of a team member who wants more than they hold.

The checks over SSH and magic rollback on real nodes are in tests/integration/test_magic_rollback.py.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from deployments import health
from deployments.audit.models import AuditEvent
from deployments.forms import HealthCheckForm
from deployments.healthchecks import HealthCheck
from deployments.models import Deployment, Tag
from deployments.remote import RebuildResult, SystemState, confirm
from deployments.remote.confirm import ARMED_MARK, ArmedRun, Arming, MagicState, armed_command, parse_magic
from deployments.validators import validate_check_command, validate_check_url, validate_host
from tests.support.personas import grant
from tests.support.world import IN_SCOPE, OUT_OF_SCOPE

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]


@pytest.fixture
def http_server():
    """A real HTTP server: /ok 200, /moved 302 (to /ok), /slow answers after 3 s, anything else 503.
    ``hits`` counts the requests per path."""
    hits: dict[str, int] = {}
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/slow":
                stop.wait(3)
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/ok")
            else:
                self.send_response(200 if self.path in ("/ok", "/slow") else 503)
            self.end_headers()

        def log_message(self, *args):
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.hits = hits
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def check(**fields) -> HealthCheck:
    fields.setdefault("name", "c")
    fields.setdefault("retries", 0)
    fields.setdefault("interval_seconds", 0)
    return HealthCheck(**fields)


def run(c: HealthCheck, node, sleeps: list | None = None) -> tuple[health.CheckResult, list[str]]:
    notes: list[str] = []
    if c.node_id is None and c.tag_id is None:
        c.node = node
    result = health.run_check(c, node, None, notes.append, sleep=sleeps.append if sleeps is not None else time.sleep)
    return result, notes


# --- probes --------------------------------------------------------------------------------------------


def test_a_tcp_check_passes_on_a_listening_port_and_fails_on_a_closed_one(world, listening, closed_port):
    node = world.nodes[IN_SCOPE]
    ok, _ = run(check(kind="tcp", host="127.0.0.1", port=listening), node)
    bad, notes = run(check(kind="tcp", host="127.0.0.1", port=closed_port), node)
    assert ok.healthy and not bad.healthy
    assert "refused" in bad.attempts[0].detail.lower() and "failing" in notes[0]


def test_an_http_check_compares_the_status_and_never_follows_a_redirect(world, http_server):
    node = world.nodes[IN_SCOPE]
    assert run(check(kind="http", url=f"{http_server.base}/ok"), node)[0].healthy
    down, _ = run(check(kind="http", url=f"{http_server.base}/down"), node)
    assert not down.healthy and down.attempts[0].detail == "HTTP 503 (expected 200)"
    moved, _ = run(check(kind="http", url=f"{http_server.base}/moved", expected_status=302), node)
    assert moved.healthy and http_server.hits["/ok"] == 1, "the redirect was not followed"


def test_an_http_check_url_may_name_the_nodes_host(world, http_server):
    node = world.nodes[IN_SCOPE]
    node.host = "127.0.0.1"
    port = http_server.server_address[1]
    assert run(check(kind="http", url=f"http://{{host}}:{port}/ok"), node)[0].healthy


def test_an_answer_slower_than_the_timeout_fails_the_attempt(world, http_server):
    result, notes = run(check(kind="http", url=f"{http_server.base}/slow", timeout_seconds=1), world.nodes[IN_SCOPE])
    assert not result.healthy and "within 1 s" in result.attempts[0].detail
    assert result.attempts[0].seconds < 3


def test_retries_stop_at_the_first_pass_and_wait_the_interval_between_attempts(world, http_server, closed_port):
    node = world.nodes[IN_SCOPE]
    sleeps: list = []
    failing, notes = run(check(kind="tcp", host="127.0.0.1", port=closed_port, retries=3, interval_seconds=2), node,
                         sleeps)  # fmt: skip
    assert [a.number for a in failing.attempts] == [1, 2, 3, 4] and sleeps == [2, 2, 2]
    assert [n.split(" attempt ")[1][:6] for n in notes] == ["1 of 4", "2 of 4", "3 of 4", "4 of 4"]
    sleeps.clear()
    passing, _ = run(check(kind="http", url=f"{http_server.base}/ok", retries=3, interval_seconds=2), node, sleeps)
    assert passing.healthy and len(passing.attempts) == 1 and sleeps == [] and http_server.hits["/ok"] == 1


def test_a_command_check_without_a_connection_fails_instead_of_running_anywhere(world):
    result, _ = run(check(kind="command", command="true"), world.nodes[IN_SCOPE])
    assert not result.healthy and "no connection" in result.attempts[0].detail


def test_every_check_result_is_one_audit_event_with_its_attempts(world, closed_port):
    d = world.finished[IN_SCOPE]
    result, _ = run(check(kind="tcp", host="127.0.0.1", port=closed_port, retries=1), d.node)
    health.record_check(d.pk, result)
    event = AuditEvent.objects.get(action="deployment.health_checked")
    assert event.outcome == "failure" and event.object_id == str(d.pk)
    assert [a["attempt"] for a in event.details["attempts"]] == [1, 2]


# --- the outcome -------------------------------------------------------------------------------------


def _result(magic: MagicState | None) -> RebuildResult:
    state = SystemState(1, "/nix/store/a-old", "/nix/store/a-old")
    return RebuildResult(0, state, state, None, magic)


def test_the_outcome_follows_what_the_node_decided(world):
    d = world.finished[IN_SCOPE]
    d.action = "switch"
    guard = health.Guard(d, lambda s, t: None)
    fields: dict = {}
    assert guard.outcome(_result(None), "succeeded", fields) == "succeeded"
    assert guard.outcome(_result(MagicState("confirmed")), "succeeded", fields) == "succeeded" and not fields
    assert guard.outcome(_result(MagicState("rolled-back", "timeout", 0)), "succeeded", fields) == "rolled_back"
    assert "no confirmation over a new SSH connection within 30 s" in fields["error_message"]
    assert "runs generation 1 (/nix/store/a-old) again" in fields["error_message"]
    failed_back: dict = {}
    assert guard.outcome(_result(MagicState("rolled-back", "timeout", 4)), "succeeded", failed_back) == "failed"
    assert "going back failed on the node (exit 4)" in failed_back["error_message"]


def test_a_failing_check_with_policy_keep_makes_the_deployment_unhealthy(world, closed_port):
    d = world.finished[IN_SCOPE]
    d.action = "switch"
    guard = health.Guard(d, lambda s, t: None)
    guard.results.append(run(check(kind="tcp", host="127.0.0.1", port=closed_port, on_failure="keep"), d.node)[0])
    fields: dict = {}
    assert guard.outcome(_result(MagicState("confirmed")), "succeeded", fields) == "unhealthy"
    assert fields["error_message"].startswith("unhealthy: health check 'c'")


def test_only_switch_and_test_are_armed_and_magic_rollback_is_on_by_default(world):
    node = world.nodes[IN_SCOPE]
    assert node.confirm_timeout == 30
    d = world.finished[IN_SCOPE]
    for action, armed in (("switch", True), ("test", True), ("boot", False), ("build", False), ("dry-activate", False)):
        d.action = action
        arming = health.Guard(d, lambda s, t: None).arming
        assert (arming is not None) == armed, action
        if armed:
            assert arming.contact_seconds == 30 and arming.revert_on_timeout
    node.confirm_timeout = 0
    d.action = "switch"
    assert health.Guard(d, lambda s, t: None).arming is None, "no magic rollback and no checks: not armed"
    HealthCheck.objects.create(node=node, name="port", kind="tcp", port=22, timeout_seconds=3, retries=1,
                               interval_seconds=2)  # fmt: skip
    arming = health.Guard(d, lambda s, t: None).arming
    assert not arming.revert_on_timeout, "checks alone keep the system when the panel never answers"
    assert arming.verdict_seconds == 2 * 3 + 2 + health.VERDICT_MARGIN


def test_a_tags_checks_apply_to_its_nodes_only(world):
    web, db = world.nodes[IN_SCOPE], world.nodes[OUT_OF_SCOPE]
    HealthCheck.objects.create(tag=Tag.objects.get(name="web"), name="page", kind="http", url="http://{host}/")
    HealthCheck.objects.create(node=db, name="port", kind="tcp", port=5432)
    assert [c.name for c in HealthCheck.for_node(web)] == ["page"]
    assert [c.name for c in HealthCheck.for_node(db)] == ["port"]


# --- the node's script ----------------------------------------------------------------------------------


def test_the_armed_script_quotes_every_value_and_arms_only_switch_and_test():
    arming = Arming(30, 60, True, lambda run: None)
    script = armed_command("nixos-rebuild switch --flake 'path:/tmp/x/src#a'", "/tmp/x y/deploy-1-ab", "switch", arming)
    assert script.startswith("sh -c '") and "'\"'\"'/tmp/x y/deploy-1-ab'\"'\"'/confirm" in script
    with pytest.raises(ValueError):
        armed_command("nixos-rebuild boot", "/tmp/x/deploy-1", "boot", arming)
    with pytest.raises(ValueError):
        armed_command("nixos-rebuild switch", "/", "switch", arming)
    with pytest.raises(ValueError):
        Arming(0, 60, True, lambda run: None)


def _session_members(sid: int) -> list[int]:
    """The processes of session ``sid`` (one this test started), and of the process groups they lead."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # the session id
            found.append(int(stat.parent.name))
    return found


def test_the_armed_wait_looks_when_the_panel_wakes_it_not_at_its_next_look(tmp_path, monkeypatch):
    """The node's wait ends at the panel's wake-up line, not at its next look (made a minute away here):
    the contact and the confirmation are each seen at once, and the node decides ``confirmed``."""
    monkeypatch.setattr(confirm, "_NAP", 60)
    folder = tmp_path / "deploy-7-ab"
    folder.mkdir()
    arming = Arming(120, 120, True, lambda run: None)
    node = subprocess.Popen(
        ["sh", "-c", armed_command("true", str(folder), "switch", arming)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    panel = ArmedRun(None, str(folder), lambda msg: None, time.monotonic() + 120)
    said: list[str] = []

    def said_next(text: str) -> None:
        while not said or text not in said[-1]:
            line = node.stderr.readline().decode()
            assert line, f"the node ended without saying {text!r}: {said}"
            said.append(line)

    try:
        assert node.stdout.readline().startswith(ARMED_MARK)
        said_next("armed: waiting up to 120 s")
        assert (folder / "wake").is_fifo()
        subprocess.run(["sh", "-c", f": > {folder}/alive; {panel._wake()}"], check=True, timeout=10)
        said_next("the panel reached the node again")
        subprocess.run(["sh", "-c", f": > {folder}/confirm; {panel._wake()}"], check=True, timeout=10)
        assert node.wait(timeout=20) == 0  # without the wake-up: a minute
        assert (folder / "magic").read_text() == "confirmed\n"
        assert "confirmed by the panel" in node.stderr.read().decode()
    finally:
        for pid in _session_members(node.pid):  # its `timeout` leads a group of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.kill()
        node.wait()


def test_the_panels_wake_up_never_blocks_once_nobody_waits(tmp_path):
    """A wake-up written after the node has decided (nobody reads the FIFO any more) returns at once, and a
    node that polls instead (no FIFO) is left alone."""
    folder = tmp_path / "deploy-8-ab"
    folder.mkdir()
    os.mkfifo(folder / "wake", 0o666)
    panel = ArmedRun(None, str(folder), lambda msg: None, time.monotonic() + 5)
    assert subprocess.run(["sh", "-c", panel._wake()], timeout=10).returncode == 0
    (folder / "wake").unlink()
    assert subprocess.run(["sh", "-c", panel._wake()], timeout=10).returncode == 0
    assert not (folder / "wake").exists()


def test_the_nodes_decision_file_is_read_strictly():
    assert parse_magic("confirmed\n") == MagicState("confirmed")
    assert parse_magic("rolled-back timeout 0") == MagicState("rolled-back", "timeout", 0)
    assert parse_magic("kept timeout").outcome == "kept"
    assert parse_magic("") is None and parse_magic("rm -rf /") is None


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://x/`id`", "http://x/$(id)", "http://x;reboot/", "http://x/ a", "http://u:p@x/", "ftp://x/", "http://x/'",
     "http://x/\nGET", "http://x\\y/", "http://{node}/", "https://x:99999/", "http://x/a|b", "-http://x/"],
)  # fmt: skip
def test_metacharacters_and_tricks_in_a_url_are_refused(url):
    with pytest.raises(ValidationError):
        validate_check_url(url)


@pytest.mark.parametrize("url", ["http://10.0.0.2:8080/health", "https://{host}/status?full=1", "http://[::1]:80/"])
def test_plain_urls_pass(url):
    validate_check_url(url)


@pytest.mark.parametrize("host", ["x;reboot", "$(id)", "a b", "-oProxyCommand=x", "x\n"])
def test_metacharacters_in_a_tcp_host_are_refused(host):
    with pytest.raises(ValidationError):
        validate_host(host)


def test_a_command_is_one_line_of_bounded_size():
    validate_check_command("systemctl is-active nginx && curl -fsS localhost")
    for bad in ("", "   ", "true\nreboot", "true\x00", "x" * 1001):
        with pytest.raises(ValidationError):
            validate_check_command(bad)


def test_the_form_asks_for_the_fields_of_the_kind_and_drops_the_others(world):
    node = world.nodes[IN_SCOPE]
    form = HealthCheckForm({"name": "p", "kind": "tcp", "timeout_seconds": 5, "retries": 0, "interval_seconds": 0,
                            "expected_status": 200, "on_failure": "keep"}, instance=HealthCheck(node=node))  # fmt: skip
    assert not form.is_valid() and "port" in form.errors
    form = HealthCheckForm({"name": "p", "kind": "tcp", "port": 22, "command": "reboot", "timeout_seconds": 5,
                            "retries": 0, "interval_seconds": 0, "expected_status": 200, "on_failure": "keep"},
                           instance=HealthCheck(node=node))  # fmt: skip
    assert form.is_valid(), form.errors
    assert form.save(commit=False).command == ""


# --- the pages, from the side of someone who wants more -------------------------------------------------

FORM = {"timeout_seconds": 5, "retries": 1, "interval_seconds": 1, "expected_status": 200, "on_failure": "rollback"}


def _client(client, user):
    client.force_login(user)
    return client


def _denied(event: str) -> int:
    return AuditEvent.objects.filter(action=event, outcome="denied").count()


def test_a_deployer_cannot_add_a_command_check(client, world, django_user_model):
    dee = django_user_model.objects.create_user("dee")
    grant(dee, "deployer", node=world.nodes[IN_SCOPE])
    before = _denied("health_check.change")
    response = _client(client, dee).post(
        f"/nodes/{IN_SCOPE}/health/new/", {"name": "pwn", "kind": "command", "command": "id", **FORM}
    )
    assert response.status_code == 403 and not HealthCheck.objects.exists()
    assert _denied("health_check.change") == before + 1


def test_a_node_admin_adds_a_command_check_to_their_node_audited(client, world, django_user_model):
    ada = django_user_model.objects.create_user("ada")
    grant(ada, "admin", node=world.nodes[IN_SCOPE])
    response = _client(client, ada).post(
        f"/nodes/{IN_SCOPE}/health/new/", {"name": "svc", "kind": "command", "command": "systemctl is-active x", **FORM}
    )
    assert response.status_code == 302
    c = HealthCheck.objects.get()
    assert c.node == world.nodes[IN_SCOPE] and c.created_by == ada
    event = AuditEvent.objects.get(action="health_check.created")
    assert event.details["after"]["command"] == "systemctl is-active x" and event.actor_name == "ada"


def test_a_node_admin_of_one_node_cannot_add_or_change_checks_of_another(client, world, django_user_model):
    ada = django_user_model.objects.create_user("ada")
    grant(ada, "admin", node=world.nodes[IN_SCOPE])
    other = HealthCheck.objects.create(node=world.nodes[OUT_OF_SCOPE], name="port", kind="tcp", port=5432)
    c = _client(client, ada)
    data = {"name": "pwn", "kind": "command", "command": "id", **FORM}
    assert c.post(f"/nodes/{OUT_OF_SCOPE}/health/new/", data).status_code == 404, "an unseen node does not exist"
    grant(ada, "viewer", node=world.nodes[OUT_OF_SCOPE], team_name="viewers")
    assert c.post(f"/nodes/{OUT_OF_SCOPE}/health/new/", data).status_code == 403
    assert c.post(f"/nodes/{OUT_OF_SCOPE}/health/{other.pk}/", data).status_code == 403
    assert c.post(f"/nodes/{OUT_OF_SCOPE}/health/{other.pk}/delete/").status_code == 403
    # Another node's check through their own node's URL: not found, not moved.
    assert c.post(f"/nodes/{IN_SCOPE}/health/{other.pk}/", data).status_code == 404
    assert c.post(f"/nodes/{IN_SCOPE}/health/{other.pk}/delete/").status_code == 404
    other.refresh_from_db()
    assert other.kind == "tcp" and other.node == world.nodes[OUT_OF_SCOPE]
    assert list(HealthCheck.objects.values_list("name", flat=True)) == ["port"]


def test_a_node_admin_cannot_add_a_tag_check_that_would_run_on_other_nodes(client, world, django_user_model):
    ada = django_user_model.objects.create_user("ada")
    grant(ada, "admin", tag="web")
    response = _client(client, ada).post("/tags/web/health/new/", {"name": "pwn", "kind": "command", "command": "id",
                                                                    **FORM})  # fmt: skip
    assert response.status_code == 403 and not HealthCheck.objects.exists()


def test_a_superuser_manages_a_tags_checks_and_auditors_read_them(client, world, alice, carol):
    c = _client(client, alice)
    response = c.post("/tags/web/health/new/", {"name": "page", "kind": "http", "url": "http://{host}/health", **FORM})
    assert response.status_code == 302
    check_ = HealthCheck.objects.get(tag__name="web")
    response = c.post(
        f"/tags/web/health/{check_.pk}/", {"name": "page", "kind": "http", "url": "http://{host}/", **FORM}
    )
    assert response.status_code == 302
    changed = AuditEvent.objects.get(action="health_check.changed")
    assert (
        changed.details["before"]["url"] == "http://{host}/health"
        and changed.details["after"]["url"] == "http://{host}/"
    )
    assert "http://{host}/" in _client(client, carol).get("/tags/web/health/").content.decode()


def test_the_page_refuses_a_metacharacter_in_a_url_and_stores_nothing(client, world, alice):
    response = _client(client, alice).post(
        f"/nodes/{IN_SCOPE}/health/new/", {"name": "page", "kind": "http", "url": "http://x/$(reboot)", **FORM}
    )
    assert response.status_code == 400 and "shell characters" in response.content.decode()
    assert not HealthCheck.objects.exists()


def test_the_confirmation_deadline_is_set_by_node_admins_only_and_audited(client, world, django_user_model, alice):
    dee = django_user_model.objects.create_user("dee")
    grant(dee, "deployer", node=world.nodes[IN_SCOPE])
    assert _client(client, dee).post(f"/nodes/{IN_SCOPE}/health/", {"confirm_timeout": 0}).status_code == 403
    world.nodes[IN_SCOPE].refresh_from_db()
    assert world.nodes[IN_SCOPE].confirm_timeout == 30
    c = _client(client, alice)
    assert c.post(f"/nodes/{IN_SCOPE}/health/", {"confirm_timeout": 99999}).status_code == 400
    assert c.post(f"/nodes/{IN_SCOPE}/health/", {"confirm_timeout": 45}).status_code == 302
    world.nodes[IN_SCOPE].refresh_from_db()
    assert world.nodes[IN_SCOPE].confirm_timeout == 45
    event = AuditEvent.objects.filter(action="node.changed").latest("seq")
    assert event.details == {"before": {"confirm_timeout": 30}, "after": {"confirm_timeout": 45}}


def test_deleting_a_check_is_audited(client, world, alice):
    c = HealthCheck.objects.create(node=world.nodes[IN_SCOPE], name="port", kind="tcp", port=22)
    assert _client(client, alice).post(f"/nodes/{IN_SCOPE}/health/{c.pk}/delete/").status_code == 302
    assert not HealthCheck.objects.exists()
    assert AuditEvent.objects.get(action="health_check.deleted").details["before"]["port"] == 22


def test_new_statuses_are_terminal():
    assert {"unhealthy", "rolled_back"} <= set(Deployment.TERMINAL)


def test_a_rollouts_counts_take_unhealthy_and_rolled_back_nodes_for_failures():
    from deployments import rollouts

    for status in Deployment.TERMINAL:
        assert status in rollouts.BUCKETS, status
    assert rollouts.BUCKETS["unhealthy"] == rollouts.BUCKETS["rolled_back"] == "failed"
    assert {"unhealthy", "rolled_back"} <= set(rollouts.FAILURES)
