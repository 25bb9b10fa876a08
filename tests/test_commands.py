"""Management commands: clear errors for bad input, and --as obeys the permission gate."""

import http.server
import io
import logging
import os
import threading
import uuid

import pytest
from django.core.management import CommandError, call_command
from django_q.conf import Conf

from deployments.audit.models import AuditEvent
from deployments.models import Credential, Deployment, Node, Repository
from deployments.queue_status import qcluster_running
from tests.support.keys import ed25519_private_key
from tests.support.net import refusing_address

pytestmark = pytest.mark.django_db


def run(*args, stdin: str = "") -> str:
    import sys

    out, old = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        call_command(*args, stdout=out, stderr=out)
    finally:
        sys.stdin = old
    return out.getvalue()


def test_addcredential_reads_a_key_file_and_shows_only_the_fingerprint(tmp_path):
    key = tmp_path / "id"
    key.write_text(ed25519_private_key())
    out = run("addcredential", "k1", "--key-file", str(key))
    assert "SHA256:" in out and "PRIVATE KEY" not in out
    assert Credential.objects.get(name="k1").kind == "ssh-key"


def test_addcredential_reads_a_password_from_stdin():
    out = run("addcredential", "pw", "--password-stdin", stdin="s3cret-password\n")
    assert "password (set)" in out and "s3cret" not in out


def test_addcredential_explains_an_unreadable_key(tmp_path):
    key = tmp_path / "id"
    key.write_text("not a key")
    with pytest.raises(CommandError):
        run("addcredential", "bad", "--key-file", str(key))
    with pytest.raises(CommandError, match="No such file"):
        run("addcredential", "bad", "--key-file", str(tmp_path / "missing"))


def addnode(name: str = "web2", host: str = "10.0.0.2", *more: str, **options: str) -> tuple[str, ...]:
    """``addnode`` and its arguments: attr devm, the inventory's repository and credential unless ``options`` say
    otherwise (attr=, repo=, credential=), then ``more``."""
    options = {"attr": "devm", "repo": "fleet", "credential": "deploy-key", **options}
    return ("addnode", name, host, *(arg for key, value in options.items() for arg in (f"--{key}", value)), *more)


def test_addnode_names_what_is_missing_or_malformed(inventory):
    with pytest.raises(CommandError, match="no repository"):
        run(*addnode(repo="nope"))
    with pytest.raises(CommandError, match="flake_attr"):
        run(*addnode(attr="devm;reboot"))
    with pytest.raises(CommandError, match="host"):
        run(*addnode(host="$(reboot)"))
    assert not Node.objects.filter(name="web2").exists()


def test_addnode_registers_a_node_with_tags_and_says_its_key_is_not_pinned(inventory):
    out = run(*addnode("web2", "10.0.0.2", "--tag", "web", "--tag", "prod"))
    assert "host key not pinned" in out
    assert sorted(Node.objects.get(name="web2").tags.values_list("name", flat=True)) == ["prod", "web"]


def test_inventory_commands_acting_for_a_plain_user_are_refused(inventory, bob, tmp_path):
    key = tmp_path / "id"
    key.write_text(ed25519_private_key())
    with pytest.raises(CommandError, match="Only superusers") as exc:
        run("addcredential", "k9", "--key-file", str(key), "--as", "bob")
    assert exc.value.returncode == 2
    with pytest.raises(CommandError, match="Only superusers"):
        run("addrepo", "other", "/tmp/x", "--as", "bob")
    with pytest.raises(CommandError, match="Only superusers"):
        run(*addnode("web3", "10.0.0.3", "--as", "bob"))
    assert not Repository.objects.filter(name="other").exists()
    # Each refusal is one audit event, in bob's name.
    refused = AuditEvent.objects.filter(outcome="denied", actor_name="bob").order_by("seq")
    assert list(refused.values_list("action", flat=True)) == [
        "credential.created",
        "repository.created",
        "node.created",
    ]


def test_inventory_commands_refuse_unknown_names_and_invalid_input_with_2(inventory, tmp_path):
    (tmp_path / "junk").write_text("not a key")
    for args, stdin, says in [
        (addnode(repo="nope"), "", "no repository 'nope'"),
        (addnode(credential="nope"), "", "no credential 'nope'"),
        (addnode("web2", "10.0.0.2", "--tag", "a b"), "", "tag 'a b'"),
        (addnode(attr="devm;reboot"), "", "flake_attr"),
        (("addcredential", "k2", "--key-file", str(tmp_path / "missing")), "", "No such file"),
        (("addcredential", "k2", "--key-file", str(tmp_path / "junk")), "", "not a valid private key"),
        (("addcredential", "pw2", "--password-stdin"), "\n", "no password on standard input"),
        (("addrepo", "other", "/tmp/x", "--deploy-key", "nope"), "", "no credential 'nope'"),
    ]:  # fmt: skip
        with pytest.raises(CommandError, match=says) as exc:
            run(*args, stdin=stdin)
        assert exc.value.returncode == 2, args
    assert not Node.objects.filter(name="web2").exists() and not Repository.objects.filter(name="other").exists()


def test_hostkey_for_a_user_who_cannot_see_the_node_does_not_reveal_it(inventory, bob):
    with pytest.raises(CommandError, match="no node 'web1'"):
        run("hostkey", "web1", "--as", "bob")


def test_an_unknown_acting_user_is_an_error(inventory):
    with pytest.raises(CommandError, match="no active user"):
        run("hostkey", "web1", "--as", "nobody")


def test_hostkey_pins_a_given_key_and_refuses_junk(inventory):
    out = run(
        "hostkey", "web1", "--key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    )
    assert "pinned SHA256:" in out
    with pytest.raises(CommandError, match="Not an SSH public key"):
        run("hostkey", "web1", "--key", "ssh-ed25519 $(reboot)")


# -- exit codes: 0 done, 1 tried and did not succeed, 2 refused -------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("deploy", "nope"),
        ("deploy", "nope", "--follow"),
        ("hostkey", "nope"),
        ("cancel", "999999"),
        ("deploy", "web1", "--as", "nobody"),
        ("cancel", "1", "--as", "nobody"),
    ],
)
def test_an_unknown_node_deployment_or_user_is_refused_with_2(inventory, args):
    with pytest.raises(CommandError, match=r"no (node|deployment|active user)") as exc:
        run(*args)
    assert exc.value.returncode == 2


def test_invalid_input_to_hostkey_is_refused_with_2(inventory):
    with pytest.raises(CommandError, match="Not an SSH public key") as exc:
        run("hostkey", "web1", "--key", "ssh-ed25519 $(reboot)")
    assert exc.value.returncode == 2
    with pytest.raises(CommandError, match="not a fingerprint") as exc:
        run("hostkey", "web1", "--pin", "aa:bb:cc")
    assert exc.value.returncode == 2


def test_a_node_that_cannot_be_scanned_is_1(inventory):
    node = inventory["node"]
    with refusing_address() as (node.host, node.port):
        node.save()
        with pytest.raises(CommandError, match="refused") as exc:
            run("hostkey", "web1")
    assert exc.value.returncode == 1


def test_hostkey_on_a_web_server_says_what_answered_in_one_line(inventory, caplog):
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    node = inventory["node"]
    node.host, node.port = server.server_address[:2]
    node.save()
    try:
        with pytest.raises(CommandError) as exc:
            run("hostkey", "web1")
    finally:
        server.shutdown()
        server.server_close()
    assert exc.value.returncode == 1
    assert str(exc.value).startswith(f"{node.host}:{node.port} did not speak SSH: it sent '")
    assert "\n" not in str(exc.value)
    # paramiko's own report of it (an ERROR and its traceback) is not shown at the default levels.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- deploy without a worker; Ctrl-C; the summary ---------------------------------------------------------


@pytest.fixture
def live_cluster():
    """A cluster status as a running qcluster saves it (django-q2's own format and place), removed afterwards."""
    from django_q.brokers import get_broker
    from django_q.signing import SignedPackage
    from django_q.status import Stat, Status

    broker = get_broker()
    status = Status(pid=os.getpid(), cluster_id=uuid.uuid4())
    status.status = Conf.IDLE

    def save(state=Conf.IDLE):
        status.status = state
        broker.set_stat(Stat.get_key(status.cluster_id), SignedPackage.dumps(status, True), 3)

    save()
    yield save
    broker.cache.delete(Stat.get_key(status.cluster_id))


def test_deploy_without_a_running_qcluster_says_it_stays_queued_and_how_to_cancel(inventory):
    out = run("deploy", "web1")
    d = Deployment.objects.get()
    assert d.status == "queued"
    assert (
        f"warning: no qcluster is running: deployment #{d.pk} stays queued until one starts "
        f"(manage.py qcluster, or runpanel); cancel it with manage.py cancel {d.pk}"
    ) in out


def test_deploy_with_a_live_qcluster_does_not_warn(inventory, live_cluster):
    out = run("deploy", "web1")
    assert "qcluster" not in out
    assert qcluster_running() is True
    live_cluster(Conf.STOPPING)  # a cluster shutting down takes no new work
    assert qcluster_running() is False


def test_deploy_says_so_when_the_broker_cannot_tell_whether_a_qcluster_runs(inventory, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Redis is down")

    monkeypatch.setattr("django_q.status.Stat.get_all", unreachable)
    out = run("deploy", "web1")
    d = Deployment.objects.get()
    assert (
        "warning: cannot tell whether a qcluster is running (the broker did not answer): "
        f"deployment #{d.pk} stays queued until one starts"
    ) in out


def test_ctrl_c_while_following_leaves_the_deployment_queued_and_says_how_to_cancel(inventory, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C came while it waited for lines

    monkeypatch.setattr("deployments.logstream.lines_after", interrupt)
    with pytest.raises(SystemExit) as exc:
        out = io.StringIO()
        call_command("deploy", "web1", "--follow", stdout=out, stderr=out)
    d = Deployment.objects.get()
    assert exc.value.code == 130 and d.status == "queued"
    text = out.getvalue()
    assert "Ctrl-C leaves it queued, cancel it with manage.py cancel" in text
    assert (
        f"stopped following; deployment #{d.pk} is still queued (Ctrl-C does not stop it): "
        f"cancel it with manage.py cancel {d.pk}"
    ) in text


@pytest.mark.parametrize(
    ("before", "after", "says"),
    [
        (None, 1, "; generation 1 (none before)"),
        (3, 4, "; generation 3 -> 4"),
        (4, 4, "; generation 4 (unchanged)"),
        (4, None, ""),
    ],
)
def test_the_follow_summary_never_shows_none(before, after, says):
    from deployments.management.commands.deploy import Command

    d = Deployment(pk=7, status="succeeded", exit_code=0, generation_before=before, generation_after=after)
    summary = Command.summary(d)
    assert summary == "deployment #7 succeeded (exit code 0)" + says
    assert "None" not in summary


# -- cancel -----------------------------------------------------------------------------------------------


def queued(inventory) -> Deployment:
    from deployments import lifecycle

    return lifecycle.request_deployment(inventory["node"], action="switch", trigger=Deployment.Trigger.CLI)


def test_cancel_cancels_a_queued_deployment_in_the_command_line_s_name(inventory):
    d = queued(inventory)
    assert run("cancel", str(d.pk)) == f"deployment #{d.pk} cancelled\n"
    d.refresh_from_db()
    assert d.status == "cancelled"
    event = AuditEvent.objects.get(action="deployment.cancelled", object_id=str(d.pk))
    assert event.actor_kind == "cli"
    # Once more: it has finished, which is "did not succeed", not a refusal.
    with pytest.raises(CommandError, match=f"deployment #{d.pk} has already finished: cancelled") as exc:
        run("cancel", str(d.pk))
    assert exc.value.returncode == 1


def test_cancel_asks_the_worker_to_stop_a_running_deployment(inventory):
    from deployments import lifecycle

    d = queued(inventory)
    assert lifecycle.claim(d.pk)
    out = run("cancel", str(d.pk))
    assert f"deployment #{d.pk}: cancel requested" in out
    assert "no qcluster is running" in out and "reapdeployments" in out
    d.refresh_from_db()
    assert d.status == "running" and d.cancel_requested
    assert "cancel was already requested" in run("cancel", str(d.pk))


def test_cancel_acting_for_a_user_obeys_the_gate(inventory, bob, django_user_model):
    from tests.support.personas import grant

    d = queued(inventory)
    # bob sees nothing: the deployment does not exist for him.
    with pytest.raises(CommandError, match=f"no deployment #{d.pk}") as exc:
        run("cancel", str(d.pk), "--as", "bob")
    assert exc.value.returncode == 2
    # A viewer sees it but may not cancel it: refused, and recorded.
    viewer = django_user_model.objects.create_user("vera", "vera@example.com", "vera-password-1")
    grant(viewer, "viewer", node=inventory["node"])
    with pytest.raises(CommandError, match="refused: You may not deploy") as exc:
        run("cancel", str(d.pk), "--as", "vera")
    assert exc.value.returncode == 2
    denied = AuditEvent.objects.get(action="deployment.cancel", outcome="denied")
    assert denied.actor_name == "vera"
    # A deployer may.
    deployer = django_user_model.objects.create_user("dora", "dora@example.com", "dora-password-1")
    grant(deployer, "deployer", node=inventory["node"])
    assert "cancelled" in run("cancel", str(d.pk), "--as", "dora")
    assert AuditEvent.objects.get(action="deployment.cancelled").actor_name == "dora"


def test_the_django_q_logger_the_settings_quiet_is_the_one_django_q2_writes_to():
    from django.conf import settings
    from django_q.conf import logger

    assert logger.name in settings.LOGGING["loggers"]
    assert logging.getLogger(logger.name).getEffectiveLevel() == logging.WARNING
