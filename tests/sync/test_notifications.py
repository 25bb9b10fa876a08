"""Notifications: audit events after commit reach a real local HTTP server and Django's locmem mail box;
a team hears only about nodes it may view; failures are retried, audited and shown; URLs are masked."""

from __future__ import annotations

import http.server
import json
import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.db import transaction
from django.test import Client
from django.utils import timezone
from django_q.conf import Conf

from deployments import lifecycle
from deployments.access.models import Grant, Team
from deployments.audit.models import AuditEvent
from deployments.audit.writer import record
from deployments.models import Deployment
from deployments.sync import notify, status
from deployments.sync.models import Delivery, Subscription

pytestmark = pytest.mark.django_db(transaction=True)


class Receiver:
    """A real HTTP server on 127.0.0.1 keeping every POST (path, JSON body); ``/fail/…`` answers 500."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((self.path, json.loads(data)))
                self.send_response(500 if self.path.startswith("/fail/") else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def loopback_allowed(settings):
    """The receivers here run on this machine: the operator's allowance for them (the guard's own tests
    below take it away again)."""
    settings.NOTIFY_ALLOWED_NETWORKS = ["127.0.0.0/8"]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def inline_queue(monkeypatch):
    """django-q2's own synchronous mode: async_task runs the task in this process, as a worker would."""
    monkeypatch.setattr(Conf, "SYNC", True)


def subscribe(team, kind, target, events=tuple(notify.KINDS), user=None):
    return notify.save_subscription(
        Subscription(team=team, name=f"{kind}-{team.name}", kind=kind, events=list(events)), target=target, user=user
    )


def failed_deployment(node, status="failed") -> Deployment:
    d = Deployment.objects.create(node=node, action="switch", commit_sha="a" * 40, flake_attr=node.flake_attr)
    assert lifecycle.claim(d.pk)
    return lifecycle.finish(d.pk, status, exit_code=4 if status == "failed" else None, error_message="unit failed")


@pytest.fixture
def teams(inventory):
    """``sees``: views web1; ``blind``: views nothing of web1 (only a node-less tag)."""
    sees = Team.objects.create(name="sees")
    Grant.objects.create(team=sees, role="viewer", scope="node", node=inventory["node"])
    blind = Team.objects.create(name="blind")
    Grant.objects.create(team=blind, role="viewer", scope="tag", tag="db")
    return sees, blind


def test_a_failed_deployment_reaches_every_kind_of_target_after_commit(inventory, teams, receiver, inline_queue):
    sees, _ = teams
    subscribe(sees, "webhook", f"{receiver.url}/generic/s3cr3t-token")
    subscribe(sees, "slack", f"{receiver.url}/services/T000/B000/slacksecret")
    subscribe(sees, "matrix", f"{receiver.url}/webhook/hookshot-secret")
    subscribe(sees, "email", "ops@example.com")
    d = failed_deployment(inventory["node"])

    bodies = dict(receiver.received)
    generic = bodies["/generic/s3cr3t-token"]
    assert generic["kind"] == "deployment.failed"
    assert generic["node"] == "web1"
    assert generic["object"] == {"type": "deployment", "id": str(d.pk), "repr": str(d)}
    assert generic["details"]["exit_code"] == 4
    assert bodies["/services/T000/B000/slacksecret"] == {"text": generic["summary"]}
    assert set(bodies["/webhook/hookshot-secret"]) == {"text", "html"}
    assert f"Deployment #{d.pk} on web1 ended failed (exit code 4)" in generic["summary"]
    assert [m.to for m in mail.outbox] == [["ops@example.com"]]
    assert "web1" in mail.outbox[0].subject
    assert Delivery.objects.filter(status="sent").count() == 4
    sent = AuditEvent.objects.filter(action="notification.sent")
    assert sent.count() == 4
    # The audit trail names targets masked, never their tokens.
    assert not any("secret" in json.dumps(e.details) or "token" in json.dumps(e.details) for e in sent)


def test_a_succeeded_deployment_notifies_no_one(inventory, teams, receiver, inline_queue):
    subscribe(teams[0], "webhook", f"{receiver.url}/generic/x")
    d = Deployment.objects.create(node=inventory["node"], action="switch", commit_sha="a" * 40, flake_attr="devm")
    lifecycle.claim(d.pk)
    lifecycle.finish(d.pk, "succeeded", exit_code=0)
    assert receiver.received == []
    assert not Delivery.objects.exists()


def test_a_team_never_hears_about_a_node_it_cannot_view(inventory, teams, receiver, inline_queue):
    sees, blind = teams
    subscribe(blind, "webhook", f"{receiver.url}/blind/x")
    subscribe(blind, "email", "blind@example.com")
    failed_deployment(inventory["node"], status="error")
    assert receiver.received == []
    assert mail.outbox == []
    assert not Delivery.objects.exists()
    # Its member may see the node through another team: the team still hears only what the team sees.
    Grant.objects.create(team=Team.objects.create(name="other"), role="viewer", scope="all")
    failed_deployment(inventory["node"], status="error")
    assert receiver.received == []


def test_drift_is_notified_through_the_sync_status(inventory, teams, receiver, inline_queue):
    subscribe(teams[0], "webhook", f"{receiver.url}/drift/x", events=["node.drifted"])
    state = status.State("drifted", "by hand", "b" * 40, "/nix/store/e", "/nix/store/actual", "/nix/store/deployed")
    status.record_states({inventory["node"].pk: state})
    [(path, doc)] = receiver.received
    assert doc["kind"] == "node.drifted"
    assert doc["details"]["actual_system"] == "/nix/store/actual"
    assert doc["details"]["expected_system"] == "/nix/store/deployed"


def test_a_rolled_back_change_announces_nothing(inventory, teams, receiver, inline_queue):
    subscribe(teams[0], "webhook", f"{receiver.url}/generic/x")
    with pytest.raises(RuntimeError), transaction.atomic():
        record("node.drifted", obj=inventory["node"], actor_kind="system", details={})
        raise RuntimeError("the change failed")
    assert receiver.received == []


def test_a_failing_target_is_retried_with_back_off_audited_and_fails_for_good(
    inventory, teams, receiver, inline_queue, settings
):
    settings.NOTIFY_MAX_ATTEMPTS = 2
    subscribe(teams[0], "webhook", f"{receiver.url}/fail/hook-secret")
    failed_deployment(inventory["node"])
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert "HTTP 500" in delivery.error and "hook-secret" not in delivery.error
    assert delivery.next_attempt_at > timezone.now() + timedelta(seconds=50)
    assert notify.retry_due() == 0  # not due yet
    Delivery.objects.update(next_attempt_at=timezone.now())
    assert notify.retry_due() == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("failed", 2)
    failures = list(AuditEvent.objects.filter(action="notification.failed").order_by("seq"))
    assert [(e.details["attempt"], e.details["final"], e.outcome) for e in failures] == [
        (1, False, "failure"),
        (2, True, "failure"),
    ]
    assert len(receiver.received) == 2
    # Visible on the notifications page (for the team's managers).
    page = Client()
    from tests.support.personas import person

    page.force_login(person("alice"))
    html = page.get("/notifications/").content.decode()
    assert "HTTP 500" in html and "Failed" in html
    assert "hook-secret" not in html


def test_an_unreachable_target_fails_with_the_reason(inventory, teams, inline_queue):
    subscribe(teams[0], "webhook", "http://127.0.0.1:9/hook/secret-path")  # discard port: nothing listens
    failed_deployment(inventory["node"])
    delivery = Delivery.objects.get()
    assert delivery.status == "pending" and "refused" in delivery.error.lower()
    assert "secret-path" not in delivery.error


def test_e_mail_without_a_mail_server_fails_saying_so(inventory, teams, inline_queue, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = ""
    subscribe(teams[0], "email", "ops@example.com")
    failed_deployment(inventory["node"])
    assert "PANEL_EMAIL_HOST" in Delivery.objects.get().error


@pytest.mark.parametrize(
    ("kind", "target", "shown"),
    [
        ("slack", "https://hooks.slack.com/services/T0123/B0456/XyZsecret", "https://hooks.slack.com/services/T…/***"),
        ("matrix", "https://hookshot.example.org/webhook/5f1c-secret", "https://hookshot.example.org/webhook/5…"),
        ("webhook", "https://user:pw@example.org:8443/h?token=abc", "https://***@example.org:8443/h?***"),
        ("email", "ops@example.com", "ops@example.com"),
    ],
)
def test_targets_are_masked_on_pages(kind, target, shown):
    assert notify.mask_target(kind, target) == shown


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("webhook", "ftp://example.org/x"),
        ("webhook", "https://example.org/a b"),
        ("webhook", "javascript:alert(1)"),
        ("slack", "https:///nohost"),
        ("email", "not-an-address"),
        ("email", "a@b.c; rm -rf /"),
    ],
)
def test_bad_targets_are_refused(kind, target):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        notify.validate_target(kind, target)


def test_the_target_is_encrypted_at_rest(teams):
    sub = subscribe(teams[0], "slack", "https://hooks.slack.com/services/T0123/B0456/XyZsecret")
    stored = Subscription.objects.values_list("target_encrypted", "target_display").get(pk=sub.pk)
    assert "XyZsecret" not in stored[0] and "XyZsecret" not in stored[1]
    assert sub.target() == "https://hooks.slack.com/services/T0123/B0456/XyZsecret"


@pytest.fixture
def orm_broker(settings):
    if settings.BROKER != "orm":
        pytest.skip("reads the ORM broker's queue (PANEL_BROKER=orm)")


def test_without_subscriptions_nothing_is_queued(inventory, orm_broker):
    from django_q.models import OrmQ

    failed_deployment(inventory["node"])
    assert not OrmQ.objects.exists()


def test_with_a_subscription_only_the_events_seq_is_queued_after_commit(inventory, teams, orm_broker):
    from django_q.models import OrmQ
    from django_q.signing import SignedPackage

    subscribe(teams[0], "webhook", "https://example.org/hook")
    failed_deployment(inventory["node"])
    [task] = [SignedPackage.loads(q.payload) for q in OrmQ.objects.all()]
    seq = AuditEvent.objects.get(action="deployment.finished").seq
    assert (task["func"], task["args"]) == ("deployments.sync.notify.dispatch", (seq,))


# --- webhooks never reach the panel's own network ------------------------------------------------------
# A team admin may choose a webhook's URL; they must not make the panel probe or post to internal services
# (its database, Redis, a cloud metadata service) or tell open from closed ports by the delivery errors.


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:6379/",
        "http://localhost:5432/x",
        "http://LOCALHOST./x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/hook",
        "http://[::1]:8000/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://192.168.0.1/",
        "https://100.64.0.1/",
        "http://224.0.0.1/",
    ],
)
def test_a_webhook_to_the_panels_own_network_is_refused_when_saved(target, settings):
    from django.core.exceptions import ValidationError

    settings.NOTIFY_ALLOWED_NETWORKS = []
    with pytest.raises(ValidationError, match="PANEL_NOTIFY_ALLOWED_NETWORKS"):
        notify.validate_target("webhook", target)


def test_the_operator_may_allow_an_inside_network(settings):
    settings.NOTIFY_ALLOWED_NETWORKS = ["10.20.0.0/16"]
    assert notify.validate_target("slack", "http://10.20.3.4/hooks/x") == "http://10.20.3.4/hooks/x"
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        notify.validate_target("slack", "http://10.21.3.4/hooks/x")


def test_a_name_that_resolves_inside_is_refused_at_delivery_and_nothing_is_sent(
    inventory, teams, receiver, inline_queue, settings, monkeypatch
):
    """A name is checked when it is used, on every address it resolves to, and the socket connects to the
    address checked: a name that points inside later (DNS rebinding) reaches nothing."""
    import socket as socket_module

    port = receiver.server.server_port
    subscribe(teams[0], "webhook", f"http://hooks.example.test:{port}/hook/secret")
    real_getaddrinfo = socket_module.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "hooks.example.test":
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)  # the name now points at the panel's machine
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", resolve)
    settings.NOTIFY_ALLOWED_NETWORKS = []
    failed_deployment(inventory["node"])
    delivery = Delivery.objects.get()
    assert delivery.status == "pending"
    assert "hooks.example.test (127.0.0.1) is an address of the panel's own network" in delivery.error
    assert receiver.received == [], "nothing reached the inside address"
    assert "secret" not in delivery.error
    # The same name, allowed by the operator, is delivered: the guard, not the test's resolver, refused it.
    settings.NOTIFY_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    Delivery.objects.update(next_attempt_at=timezone.now())
    assert notify.attempt(delivery.pk) == "sent"
    assert [path for path, _ in receiver.received] == ["/hook/secret"]


def test_a_target_saved_before_the_guard_is_still_refused_when_delivered(
    inventory, teams, receiver, inline_queue, settings
):
    subscribe(teams[0], "webhook", receiver.url + "/hook/secret")  # allowed then (the fixture's allowance)
    settings.NOTIFY_ALLOWED_NETWORKS = []
    failed_deployment(inventory["node"])
    delivery = Delivery.objects.get()
    assert "127.0.0.1 is an address of the panel's own network" in delivery.error
    assert receiver.received == []
