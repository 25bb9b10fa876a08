"""What each forge sends and how it signs it: parsing a push, and checking a signature in constant time.

GitHub signs the body with ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256>``; Gitea and Forgejo with
``X-Gitea-Signature`` / ``X-Forgejo-Signature`` (the bare hex HMAC-SHA256); GitLab sends the shared secret
itself in ``X-Gitlab-Token``; the generic sender signs ``<timestamp>.<body>`` with
``X-Panel-Signature-256: sha256=<hex>`` and ``X-Panel-Timestamp`` (Unix seconds), so a captured request
stops working after ``PANEL_WEBHOOK_TIMESTAMP_WINDOW``.  Every comparison is ``hmac.compare_digest``.
No Django here but the settings read by the caller: this module is the forges' side only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROVIDERS = ("github", "gitlab", "gitea", "forgejo", "generic")
ZERO_SHA = "0" * 40
_SHA_RE = re.compile(r"\A[0-9a-f]{40}\Z")


class BadPayload(Exception):
    """The body is not a push the panel can read (HTTP 400); the message says why."""


@dataclass
class Push:
    """A forge's event, as far as the panel needs it."""

    provider: str
    event: str  # "push", or another event name (acknowledged after verification, ignored)
    delivery_id: str
    urls: list[str] = field(default_factory=list)  # every clone/web URL the payload names
    ref: str = ""
    before: str = ""
    after: str = ""

    @property
    def is_push(self) -> bool:
        return self.event == "push"

    @property
    def branch(self) -> str:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else ""


def _header(headers, *names: str) -> str:
    for name in names:
        value = headers.get(name)
        if value:
            return value.strip()
    return ""


def _str(obj, key: str) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else ""


def _urls(*objects_keys) -> list[str]:
    urls = []
    for obj, keys in objects_keys:
        for key in keys:
            value = _str(obj, key)
            if value and value not in urls:
                urls.append(value)
    return urls


def parse(provider: str, headers, data: dict, body: bytes) -> Push:
    """The push in ``data`` (the decoded JSON body) as ``provider`` sends it.

    The delivery id is the forge's (a body without one gets the SHA-256 of the body, so a verbatim
    replay is still caught)."""
    fallback_id = "sha256-" + hashlib.sha256(body).hexdigest()[:64]
    if provider == "github":
        event = _header(headers, "X-GitHub-Event")
        delivery = _header(headers, "X-GitHub-Delivery")
        repo = data.get("repository")
        urls = _urls((repo, ("clone_url", "ssh_url", "git_url", "html_url", "url")))
    elif provider == "gitlab":
        event = {"Push Hook": "push"}.get(_header(headers, "X-Gitlab-Event"), _header(headers, "X-Gitlab-Event"))
        delivery = _header(headers, "X-Gitlab-Event-UUID", "Idempotency-Key", "X-Gitlab-Webhook-UUID")
        urls = _urls(
            (data.get("project"), ("git_http_url", "git_ssh_url", "http_url", "ssh_url", "web_url")),
            (data.get("repository"), ("git_http_url", "git_ssh_url", "url", "homepage")),
        )
    elif provider in ("gitea", "forgejo"):
        event = _header(headers, "X-Forgejo-Event", "X-Gitea-Event")
        delivery = _header(headers, "X-Forgejo-Delivery", "X-Gitea-Delivery")
        urls = _urls((data.get("repository"), ("clone_url", "ssh_url", "html_url")))
    elif provider == "generic":
        event = "push"
        delivery = _header(headers, "X-Panel-Delivery")
        urls = _urls((data, ("repository",)))
        if not delivery:
            raise BadPayload("The generic webhook needs an X-Panel-Delivery id.")
    else:
        raise BadPayload(f"Unknown provider {provider!r}.")
    push = Push(provider=provider, event=event or "unknown", delivery_id=delivery or fallback_id, urls=urls)
    if push.is_push:
        push.ref = _str(data, "ref") or (f"refs/heads/{_str(data, 'branch')}" if _str(data, "branch") else "")
        push.before = _str(data, "before")
        push.after = _str(data, "after")
        if not push.ref:
            raise BadPayload("A push names its ref (refs/heads/<branch>).")
        for name, sha in (("before", push.before), ("after", push.after)):
            if sha and not _SHA_RE.match(sha):
                raise BadPayload(f"{name!r} is not a full commit SHA.")
    return push


def _hmac_hex(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(provider: str, secret: str, headers, body: bytes, *, now: float, window: int) -> bool:
    """True if ``body`` was sent by someone holding ``secret``, as ``provider`` proves it.

    Always computes the HMAC (or comparison) once, whatever is missing, so a refusal costs the same
    time whether the header, the repository or the secret was wrong."""
    if provider == "github":
        given = _header(headers, "X-Hub-Signature-256")
        expected = "sha256=" + _hmac_hex(secret, body)
    elif provider in ("gitea", "forgejo"):
        given = _header(headers, "X-Forgejo-Signature", "X-Gitea-Signature")
        expected = _hmac_hex(secret, body)
    elif provider == "gitlab":
        given = _header(headers, "X-Gitlab-Token")
        # Hash both sides: compare_digest then compares equal lengths, and the secret's length stays hidden.
        return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(secret.encode()).digest())
    elif provider == "generic":
        given = _header(headers, "X-Panel-Signature-256")
        stamp = _header(headers, "X-Panel-Timestamp")
        expected = "sha256=" + _hmac_hex(secret, stamp.encode() + b"." + body)
        fresh = stamp.isdigit() and len(stamp) <= 12 and abs(now - int(stamp)) <= window
        return hmac.compare_digest(given.encode(), expected.encode()) and fresh
    else:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def sign_generic(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Panel-Signature-256`` value of a generic webhook (for senders' scripts and the tests)."""
    return "sha256=" + _hmac_hex(secret, str(timestamp).encode() + b"." + body)


def normalize_url(url: str) -> str:
    """One spelling per repository: host and path, lower case, without scheme, user, port, ``.git`` or
    trailing slash (``https://github.com/o/r.git`` = ``git@github.com:o/r`` = ``ssh://git@github.com/o/r``);
    local paths as ``file:<path>``."""
    url = url.strip()
    if url.startswith("/") or url.startswith("file://"):
        path = urlsplit(url).path if url.startswith("file://") else url
        return "file:" + path.rstrip("/").removesuffix(".git")
    if "://" in url:
        parts = urlsplit(url)
        host, path = (parts.hostname or ""), parts.path
    else:
        match = re.match(r"\A(?:[^@/]*@)?([^:/]+):(.*)\Z", url)
        if not match:
            return url.lower()
        host, path = match.group(1), match.group(2)
    return f"{host.lower()}/{path.strip('/').removesuffix('.git').lower()}"
