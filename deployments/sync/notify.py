"""Notifications: audit events a team subscribed to, delivered by webhook (generic JSON, Slack, Matrix) or e-mail.

Nobody calls this module: it listens to every audit event (``audit.writer.recorded``).  An event that is
one of ``KINDS`` is handed to django-q2 after its transaction commits (``dispatch``), which writes one
``Delivery`` per enabled subscription that wants that kind and whose team may view the event's node
(``gate.team_can_view``), and tries each.  A failed attempt is audited (``notification.failed``) and tried
again later (``retry_due``, every minute) after 1, 5, 15, 60 minutes, up to ``NOTIFY_MAX_ATTEMPTS``.
Each attempt is claimed with a conditional UPDATE, so two workers never send the same one twice.
"""

from __future__ import annotations

import html
import http.client
import ipaddress
import json
import logging
import re
import socket
import urllib.error
import urllib.request
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone

from deployments import crypto
from deployments.access import gate
from deployments.audit.models import AuditEvent
from deployments.audit.writer import record
from deployments.models import Node

from .models import Delivery, Subscription

log = logging.getLogger(__name__)

# What a team may subscribe to: a name each, and what it means.
KINDS: dict[str, str] = {
    "deployment.failed": "a deployment ended failed or error",
    "deployment.unhealthy": "a health check failed after a deployment",
    "deployment.rolled_back": "a node went back to its previous generation",
    "node.drifted": "a node runs a system the panel did not deploy",
    "approval.requested": "a deployment or rollout waits for approval",
}
_FAILED_STATUSES = ("failed", "error")
# Seconds before attempt n+1 (n = attempts so far); the last value repeats.
BACKOFF = (60, 300, 900, 3600)


def kind_of(event: AuditEvent) -> str | None:
    """The notification kind of an audit event, or None if no one can subscribe to it."""
    if event.outcome == AuditEvent.Outcome.DENIED:
        return None
    if event.action == "deployment.finished":
        return "deployment.failed" if (event.details or {}).get("status") in _FAILED_STATUSES else None
    return event.action if event.action in KINDS else None


def on_event_recorded(sender, event: AuditEvent, **kwargs) -> None:
    """``audit.writer.recorded``'s receiver: after commit, queue the event's dispatch (only its seq)."""
    if kind_of(event) is None:
        return
    seq = event.seq
    transaction.on_commit(lambda: _enqueue(seq))


def _enqueue(seq: int) -> None:
    from django_q.tasks import async_task

    try:
        if not Subscription.objects.filter(enabled=True).exists():
            return  # nobody listens: no task in the queue (the rollouts' safety net reads an empty broker)
        async_task("deployments.sync.notify.dispatch", seq, task_name=f"notify-{seq}")
    except Exception:  # noqa: BLE001 - the change is committed; a broker hiccup must not turn it into an error
        log.exception("could not queue the notifications of audit event #%s", seq)


# --- targets ---------------------------------------------------------------------------------------

_URL_MAX = 2000
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")


def validate_target(kind: str, target: str) -> str:
    """The target, checked for its kind (ValidationError with the reason)."""
    target = (target or "").strip()
    if kind == Subscription.Kind.EMAIL:
        validate_email(target)
        return target
    if kind not in Subscription.Kind.values:
        raise ValidationError(f"unknown kind {kind!r}")
    if len(target) > _URL_MAX or _CONTROL_RE.search(target):
        raise ValidationError(f"a webhook URL is at most {_URL_MAX} characters, without spaces or control characters")
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("a webhook URL starts with https:// (or http://) and names a host")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number or out of range
    except ValueError:
        raise ValidationError("a webhook URL's port is a number from 1 to 65535") from None
    host = parts.hostname.rstrip(".").lower()
    address = _literal_address(host)
    if host == "localhost" or host.endswith(".localhost"):
        address = ipaddress.ip_address("127.0.0.1")
    if address is not None and not address_allowed(address):
        raise ValidationError(_inside_message(host, address))
    return target


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """May a webhook be posted to ``address``: a public address, or one in ``NOTIFY_ALLOWED_NETWORKS``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for network in settings.NOTIFY_ALLOWED_NETWORKS:
        if address in ipaddress.ip_network(network, strict=False):
            return True
    return address.is_global and not address.is_multicast


def _inside_message(host: str, address) -> str:
    shown = host if host == str(address) else f"{host} ({address})"
    return (
        f"{shown} is an address of the panel's own network (loopback, private, link-local or reserved): "
        "webhooks go only to public addresses, unless the panel's operator allows that network "
        "(PANEL_NOTIFY_ALLOWED_NETWORKS)"
    )


def mask_target(kind: str, target: str) -> str:
    """What pages show of a target: an e-mail address as is; of a URL the scheme, host and first path
    segment, then the first character of the next and ``***`` (``https://hooks.slack.com/services/T…/***``)."""
    if kind == Subscription.Kind.EMAIL:
        return target
    parts = urlsplit(target)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    segments = [s for s in parts.path.split("/") if s]
    shown = f"{parts.scheme}://{'***@' if parts.username or parts.password else ''}{host}"
    if segments:
        shown += f"/{segments[0]}"
    if len(segments) > 1:
        shown += f"/{segments[1][:1]}…"
    if len(segments) > 2:
        shown += "/***"
    if parts.query:
        shown += "?***"
    return shown


def save_subscription(subscription: Subscription, *, target: str | None, user) -> Subscription:
    """Create or change a subscription (the caller asked the gate); ``target`` None keeps the stored one."""
    bad = [k for k in subscription.events if k not in KINDS]
    if bad or not subscription.events:
        raise ValidationError(f"choose events among {', '.join(KINDS)}")
    created = subscription.pk is None
    with transaction.atomic():
        if target is not None:
            target = validate_target(subscription.kind, target)
            subscription.target_encrypted = crypto.encrypt(target)
            subscription.target_display = mask_target(subscription.kind, target)[:300]
        subscription.save()
        record(
            "subscription.changed",
            user=user,
            obj=subscription,
            details={
                "change": "created" if created else "changed",
                "team": subscription.team.name,
                "kind": subscription.kind,
                "target": subscription.target_display,
                "events": subscription.events,
                "enabled": subscription.enabled,
                "target_replaced": target is not None and not created,
            },
        )
    return subscription


def delete_subscription(subscription: Subscription, *, user) -> None:
    with transaction.atomic():
        record(
            "subscription.changed",
            user=user,
            obj=subscription,
            details={"change": "deleted", "team": subscription.team.name, "target": subscription.target_display},
        )
        subscription.delete()


# --- messages ----------------------------------------------------------------------------------------


def _summary(kind: str, event: AuditEvent) -> str:
    d = event.details or {}
    node = event.node_name or "?"
    if kind == "deployment.failed":
        text = f"Deployment #{event.object_id} on {node} ended {d.get('status')}"
        if d.get("exit_code") is not None:
            text += f" (exit code {d.get('exit_code')})"
        if d.get("error"):
            text += f": {str(d['error'])[:300]}"
        return text
    if kind == "node.drifted":
        return (
            f"Node {node} drifted: it runs {d.get('actual_system') or '?'}, "
            f"the panel last deployed {d.get('expected_system') or '?'}"
        )
    if kind == "deployment.unhealthy":
        return f"Deployment #{event.object_id} on {node} is unhealthy: a health check failed after activation"
    if kind == "deployment.rolled_back":
        return f"Deployment #{event.object_id} on {node} was rolled back to the previous generation"
    if kind == "approval.requested":
        return f"Approval requested by {event.actor_name or 'someone'} for {event.object_repr or node}"
    return f"{event.action} on {node}"


def _link(event: AuditEvent) -> str:
    if not settings.BASE_URL:
        return ""
    if event.object_type == "deployment" and event.object_id:
        return f"{settings.BASE_URL}/deployments/{event.object_id}/"
    if event.node_name:
        return f"{settings.BASE_URL}/nodes/{event.node_name}/"
    return settings.BASE_URL + "/"


def message(kind: str, event: AuditEvent) -> dict:
    """The generic JSON document of one notification (a webhook's body; the other shapes derive from it)."""
    details = {k: v for k, v in (event.details or {}).items() if k not in ("log_sha256", "archive_sha256")}
    return {
        "kind": kind,
        "event": event.action,
        "seq": event.seq,
        "time": event.created_at.isoformat(),
        "node": event.node_name or None,
        "object": {"type": event.object_type, "id": event.object_id, "repr": event.object_repr},
        "outcome": event.outcome,
        "actor": event.actor_name or event.actor_kind,
        "summary": _summary(kind, event),
        "url": _link(event) or None,
        "details": details,
    }


def body(subscription_kind: str, doc: dict) -> dict:
    """The JSON a webhook of ``subscription_kind`` receives: the generic document, Slack's ``{"text"}``,
    or what Matrix webhook bridges (hookshot) read: ``{"text", "html"}``."""
    text = doc["summary"] + (f" — {doc['url']}" if doc["url"] else "")
    if subscription_kind == Subscription.Kind.SLACK:
        return {"text": text}
    if subscription_kind == Subscription.Kind.MATRIX:
        link = f' — <a href="{html.escape(doc["url"])}">open</a>' if doc["url"] else ""
        return {"text": text, "html": f"{html.escape(doc['summary'])}{link}"}
    return doc


# --- delivery -----------------------------------------------------------------------------------------


class DeliveryError(Exception):
    """One attempt failed; the message says why (never the target's secret part)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is an answer, not an instruction: the target is the one configured


class _Inside(OSError):
    """The webhook's host is (or resolves to) an address of the panel's own network."""


def _checked_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
    """``socket.create_connection`` that connects only to allowed addresses (``address_allowed``).

    Every address the name resolves to is checked, and the socket connects to one of those checked
    addresses itself, so a name that resolves differently the second time (DNS rebinding) cannot slip an
    internal address in between.  The operator's proxies (``http_proxy``...) are trusted as they are."""
    host, port = address
    if host in _proxy_hosts():
        return socket.create_connection(address, timeout, source_address, **kwargs)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host}: {exc.strerror}") from None
    for *_, sockaddr in infos:
        resolved = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not address_allowed(resolved):
            raise _Inside(_inside_message(host, resolved))
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"cannot connect to {host}")


def _proxy_hosts() -> set[str]:
    return {urlsplit(url).hostname for url in urllib.request.getproxies().values() if "://" in url}


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _checked_connection


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _checked_connection


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)


_opener = urllib.request.build_opener(_NoRedirect, _CheckedHTTPHandler, _CheckedHTTPSHandler)


def post_json(url: str, payload: dict, *, timeout: float) -> int:
    """POST ``payload``; the status code of a 2xx answer, DeliveryError otherwise."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "nixos-control-panel"},
    )
    where = mask_target(Subscription.Kind.WEBHOOK, url)
    try:
        with _opener.open(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"{where} answered HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise DeliveryError(f"{where}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise DeliveryError(f"{where}: {exc.__class__.__name__}: {exc}") from None


def send(subscription: Subscription, doc: dict) -> None:
    """One attempt to deliver ``doc`` to ``subscription``'s target; DeliveryError if it failed."""
    target = subscription.target()
    if subscription.kind == Subscription.Kind.EMAIL:
        if settings.EMAIL_BACKEND.endswith("smtp.EmailBackend") and not settings.EMAIL_HOST:
            raise DeliveryError("no mail server is configured (PANEL_EMAIL_HOST)")
        text = doc["summary"] + (f"\n\n{doc['url']}" if doc["url"] else "")
        text += "\n\n" + json.dumps(doc, indent=2, default=str)
        try:
            send_mail(f"[panel] {doc['summary'][:150]}", text, None, [target])
        except OSError as exc:
            raise DeliveryError(f"mail to {target} failed: {exc}") from None
        return
    post_json(target, body(subscription.kind, doc), timeout=settings.NOTIFY_TIMEOUT)


def dispatch(seq: int) -> int:
    """The task: one Delivery per subscription that wants this event and may see its node; try each.
    Returns the number of deliveries written."""
    event = AuditEvent.objects.filter(seq=seq).first()
    kind = kind_of(event) if event is not None else None
    if kind is None:
        return 0
    node = Node.objects.filter(pk=event.node_id).prefetch_related("tags").first() if event.node_id else None
    if event.node_id and node is None:
        return 0  # the node is gone: no team may view it any more
    written = []
    for subscription in Subscription.objects.filter(enabled=True).select_related("team"):
        if kind not in subscription.events or not gate.team_can_view(subscription.team, node):
            continue
        try:
            with transaction.atomic():
                written.append(
                    Delivery.objects.create(
                        subscription=subscription, event_seq=seq, kind=kind, node_name=event.node_name
                    )
                )
        except IntegrityError:
            continue  # a second delivery of this task: that one is already written
    for delivery in written:
        attempt(delivery.pk)
    return len(written)


def _claim(delivery_id: int) -> Delivery | None:
    """Take a due pending delivery for one attempt (a conditional UPDATE pushes it out of others' reach)."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.NOTIFY_TIMEOUT * 3 + 30)
    claimed = Delivery.objects.filter(pk=delivery_id, status=Delivery.Status.PENDING, next_attempt_at__lte=now).update(
        next_attempt_at=lease
    )
    if not claimed:
        return None
    return Delivery.objects.select_related("subscription__team").get(pk=delivery_id)


def attempt(delivery_id: int) -> str | None:
    """One attempt at a due delivery: sent, retried later or failed for good, each audited.  Its status
    after, or None if it was not due (or another worker has it)."""
    delivery = _claim(delivery_id)
    if delivery is None:
        return None
    subscription = delivery.subscription
    event = AuditEvent.objects.get(seq=delivery.event_seq)
    attempts = delivery.attempts + 1
    try:
        send(subscription, message(delivery.kind, event))
    except DeliveryError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a panel bug in one delivery must not stop the others
        log.exception("notification delivery %s failed", delivery_id)
        error = f"{exc.__class__.__name__}: {exc}"
    else:
        error = ""
    now = timezone.now()
    details = {
        "subscription": subscription.pk,
        "team": subscription.team.name,
        "kind": delivery.kind,
        "target": subscription.target_display,
        "event_seq": delivery.event_seq,
        "attempt": attempts,
    }
    with transaction.atomic():
        if not error:
            fields = {"status": Delivery.Status.SENT, "sent_at": now, "error": ""}
            record("notification.sent", actor_kind="system", obj=subscription, details=details)
        else:
            final = attempts >= settings.NOTIFY_MAX_ATTEMPTS
            fields = {"status": Delivery.Status.FAILED if final else Delivery.Status.PENDING, "error": error[:2000]}
            if not final:
                fields["next_attempt_at"] = now + timedelta(seconds=BACKOFF[min(attempts, len(BACKOFF)) - 1])
            record(
                "notification.failed",
                actor_kind="system",
                obj=subscription,
                outcome="failure",
                details={**details, "error": error[:500], "final": final},
            )
        Delivery.objects.filter(pk=delivery.pk).update(attempts=attempts, **fields)
    return fields["status"]


def retry_due() -> int:
    """The schedule (every minute): attempt every pending delivery whose time has come."""
    due = Delivery.objects.filter(status=Delivery.Status.PENDING, next_attempt_at__lte=timezone.now())
    ids = list(due.order_by("next_attempt_at").values_list("pk", flat=True)[:500])
    return sum(1 for pk in ids if attempt(pk) is not None)
