"""Webhook deliveries as the forges send them: the headers and the push bodies of their documentation
(GitHub "push" event, GitLab "Push Hook", Gitea/Forgejo "push"), trimmed to the fields that matter and
pointed at a repository URL of the test's choosing."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid

from deployments.gitops.hooks import sign_generic

BEFORE = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"


def github(url: str, *, ref="refs/heads/main", before=BEFORE, after="", secret="", delivery=None):
    body = json.dumps(
        {
            "ref": ref,
            "before": before,
            "after": after,
            "created": False,
            "deleted": False,
            "forced": False,
            "compare": "https://github.com/octo-org/fleet/compare/6113728f27ae...0d1a26e67d8f",
            "commits": [{"id": after, "message": "Update web1", "author": {"name": "Monalisa Octocat"}}],
            "head_commit": {"id": after, "message": "Update web1"},
            "repository": {
                "id": 186853002,
                "name": "fleet",
                "full_name": "octo-org/fleet",
                "private": False,
                "html_url": "https://github.com/octo-org/fleet",
                "clone_url": url,
                "git_url": "git://github.com/octo-org/fleet.git",
                "ssh_url": "git@github.com:octo-org/fleet.git",
                "default_branch": "main",
            },
            "pusher": {"name": "Codertocat", "email": "21031067+Codertocat@users.noreply.github.com"},
            "sender": {"login": "Codertocat", "id": 21031067, "type": "User"},
        }
    ).encode()
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "292430182",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }
    return headers, body


def gitlab(url: str, *, ref="refs/heads/main", before=BEFORE, after="", secret="", delivery=None):
    body = json.dumps(
        {
            "object_kind": "push",
            "event_name": "push",
            "before": before,
            "after": after,
            "ref": ref,
            "ref_protected": True,
            "checkout_sha": after,
            "user_id": 4,
            "user_name": "John Smith",
            "user_username": "jsmith",
            "project_id": 15,
            "project": {
                "id": 15,
                "name": "fleet",
                "web_url": "https://gitlab.example.com/ops/fleet",
                "git_ssh_url": "git@gitlab.example.com:ops/fleet.git",
                "git_http_url": url,
                "namespace": "ops",
                "path_with_namespace": "ops/fleet",
                "default_branch": "main",
            },
            "commits": [{"id": after, "message": "Update web1", "author": {"name": "John Smith"}}],
            "total_commits_count": 1,
            "repository": {
                "name": "fleet",
                "url": "git@gitlab.example.com:ops/fleet.git",
                "homepage": "https://gitlab.example.com/ops/fleet",
                "git_http_url": url,
                "git_ssh_url": "git@gitlab.example.com:ops/fleet.git",
            },
        }
    ).encode()
    event_uuid = delivery or str(uuid.uuid4())
    headers = {
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": secret,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": str(uuid.uuid4()),
        "X-Gitlab-Event-UUID": event_uuid,
        "Idempotency-Key": event_uuid,
        "User-Agent": "GitLab/17.6.0",
    }
    return headers, body


def gitea(url: str, *, ref="refs/heads/main", before=BEFORE, after="", secret="", delivery=None, forgejo=False):
    body = json.dumps(
        {
            "ref": ref,
            "before": before,
            "after": after,
            "compare_url": "https://gitea.example.com/ops/fleet/compare/6113728f27ae...0d1a26e67d8f",
            "commits": [{"id": after, "message": "Update web1\n", "author": {"name": "ops"}}],
            "total_commits": 1,
            "head_commit": {"id": after, "message": "Update web1\n"},
            "repository": {
                "id": 1,
                "owner": {"login": "ops"},
                "name": "fleet",
                "full_name": "ops/fleet",
                "html_url": "https://gitea.example.com/ops/fleet",
                "ssh_url": "git@gitea.example.com:ops/fleet.git",
                "clone_url": url,
                "default_branch": "main",
            },
            "pusher": {"login": "ops"},
            "sender": {"login": "ops"},
        }
    ).encode()
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    delivery = delivery or str(uuid.uuid4())
    if forgejo:
        headers = {
            "X-Forgejo-Event": "push",
            "X-Forgejo-Event-Type": "push",
            "X-Forgejo-Delivery": delivery,
            "X-Forgejo-Signature": signature,
            "User-Agent": "Go-http-client/1.1",
        }
    else:
        headers = {
            "X-Gitea-Event": "push",
            "X-Gitea-Event-Type": "push",
            "X-Gitea-Delivery": delivery,
            "X-Gitea-Signature": signature,
            "X-Gogs-Event": "push",
            "User-Agent": "Go-http-client/1.1",
        }
    return headers, body


def generic(url: str, *, ref="refs/heads/main", before=BEFORE, after="", secret="", delivery=None, timestamp=None):
    body = json.dumps({"repository": url, "ref": ref, "before": before, "after": after}).encode()
    stamp = int(time.time()) if timestamp is None else timestamp
    headers = {
        "X-Panel-Delivery": delivery or str(uuid.uuid4()),
        "X-Panel-Timestamp": str(stamp),
        "X-Panel-Signature-256": sign_generic(secret, body, stamp),
    }
    return headers, body


FORGES = {
    "github": github,
    "gitlab": gitlab,
    "gitea": gitea,
    "forgejo": lambda url, **kw: gitea(url, forgejo=True, **kw),
    "generic": generic,
}


def post(client, provider: str, headers: dict, body: bytes, **extra):
    """POST a delivery with the Django test client, headers as the forge names them."""
    meta = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}
    return client.post(f"/hooks/{provider}/", data=body, content_type="application/json", **meta, **extra)


def arm_auto_deploy(panel, node_name: str, repository: str = "fleet") -> str:
    """In a real panel (tests/support/panel.py): give ``repository`` a webhook secret and ``node_name``
    the auto policy, as an operator's shell would (the system acts); return the secret."""
    proc = panel.manage(
        "shell",
        "-c",
        "from deployments.gitops import changes\n"
        "from deployments.models import Node, Repository\n"
        f"repo = Repository.objects.get(name={repository!r})\n"
        f"changes.set_policy(Node.objects.get(name={node_name!r}), mode='auto', user=None)\n"
        "print('SECRET=' + changes.rotate_webhook_secret(repo, user=None))\n",
    )
    return next(line[7:] for line in proc.stdout.splitlines() if line.startswith("SECRET="))


def send(panel, provider: str, headers: dict, body: bytes) -> tuple[int, dict]:
    """POST a delivery to a real panel over HTTP, as a forge does (no session, no CSRF token)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{panel.url}/hooks/{provider}/",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
