"""A small world of nodes, teams and personas for the roles tests.

``web-1`` carries the tag ``web`` and is what node- and tag-scoped grants
cover; ``db-1`` (tag ``db-main``) is outside them.  Both have a pinned host
key, a finished deployment and a real (local) git repository, so a permitted
deploy really is queued.
"""

from __future__ import annotations

import subprocess

import pytest
from django.contrib.auth import get_user_model

from deployments import inventory
from deployments.access.models import Grant, Team
from deployments.models import Credential, Deployment, Node, Repository

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJvbGVzLXRlc3QtaG9zdC1rZXktMDEyMzQ1Njc4OWFi"
COMMIT = "0" * 40

# Persona -> (role, scope) of its one grant; None: no grant at all.
PERSONAS = {
    "anonymous": None,
    "nobody": None,
    "viewer-node": ("viewer", "node"),
    "viewer-tag": ("viewer", "tag"),
    "viewer-all": ("viewer", "all"),
    "deployer-node": ("deployer", "node"),
    "deployer-tag": ("deployer", "tag"),
    "deployer-all": ("deployer", "all"),
    "admin-node": ("admin", "node"),
    "admin-tag": ("admin", "tag"),
    "admin-all": ("admin", "all"),
    "auditor": ("auditor", "all"),
    "superuser": None,
}
RANK = {"viewer": 1, "deployer": 2, "admin": 3, "auditor": 1}
IN_SCOPE, OUT_OF_SCOPE = "web-1", "db-1"


def level(persona: str, node_name: str) -> int:
    """What ``persona`` may do on a node: 0 nothing, 1 view, 2 deploy, 3 administer."""
    if persona == "superuser":
        return 3
    grant = PERSONAS[persona]
    if grant is None:
        return 0
    role, scope = grant
    return RANK[role] if scope == "all" or node_name == IN_SCOPE else 0


@pytest.fixture(scope="session")
def git_repo(tmp_path_factory):
    """A git repository with one commit on ``main``."""
    path = tmp_path_factory.mktemp("flakes")
    run = lambda *args: subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    (path / "flake.nix").write_text("{ outputs = { self }: { }; }\n")
    run("add", "flake.nix")
    run("-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-q", "-m", "init")
    return path


class World:
    """The inventory every roles test starts from."""

    def __init__(self, git_repo):
        credential = Credential(name="root-pw", kind=Credential.Kind.PASSWORD)
        credential.set_secret("correct horse battery staple")
        credential.save()
        self.repository = Repository.objects.create(name="flakes", url=str(git_repo), branch="main")
        self.nodes = {}
        for name, tag in ((IN_SCOPE, "web"), (OUT_OF_SCOPE, "db-main")):
            node = Node(
                name=name,
                host=f"{name}.example.test",
                flake_attr=name,
                repository=self.repository,
                credential=credential,
                host_key=HOST_KEY,
            )
            node.host_key_fingerprint = "SHA256:test"
            inventory.save_object(node, tags=[tag])
            self.nodes[name] = node
        self.finished = {
            name: Deployment.objects.create(
                node=node, action="switch", commit_sha=COMMIT, flake_attr=name, status=Deployment.Status.SUCCEEDED
            )
            for name, node in self.nodes.items()
        }
        # A team the personas are not in, for the team pages.
        self.ops = Team.objects.create(name="ops")
        self.zed = get_user_model().objects.create_user("zed", password="zed-password-1")
        self.ops.members.add(self.zed)
        self.ops_grant = Grant.objects.create(team=self.ops, role="viewer", scope="all")

    def queue(self, node_name: str) -> Deployment:
        """An active deployment on ``node_name``, for the cancel routes."""
        return Deployment.objects.create(
            node=self.nodes[node_name],
            action="switch",
            commit_sha=COMMIT,
            flake_attr=node_name,
            status=Deployment.Status.QUEUED,
        )

    def persona(self, name: str):
        """The user playing ``name`` (None for anonymous), with their one team and grant."""
        if name == "anonymous":
            return None
        User = get_user_model()
        if name == "superuser":
            return User.objects.create_superuser("root", password="root-password-1")
        user = User.objects.create_user(name, password=f"{name}-password-1")
        grant = PERSONAS[name]
        if grant is not None:
            role, scope = grant
            team = Team.objects.create(name=f"team-{name}")
            team.members.add(user)
            Grant.objects.create(
                team=team,
                role=role,
                scope=scope,
                node=self.nodes[IN_SCOPE] if scope == "node" else None,
                tag="web" if scope == "tag" else "",
            )
        return user


@pytest.fixture
def world(db, git_repo):
    return World(git_repo)


def grant(user, role: str, *, node=None, tag: str = "", team_name: str | None = None) -> Grant:
    """Put ``user`` in a team (created if needed) holding ``role`` over a node, a tag, or all nodes."""
    team, _ = Team.objects.get_or_create(name=team_name or f"team-{user.username}")
    team.members.add(user)
    scope = "node" if node is not None else "tag" if tag else "all"
    return Grant.objects.create(team=team, role=role, scope=scope, node=node, tag=tag)


@pytest.fixture
def users(db):
    """alice (superuser), bob and charlie (no grants yet)."""
    User = get_user_model()
    return (
        User.objects.create_superuser("alice", password="alice-password-1"),
        User.objects.create_user("bob", password="bob-password-1"),
        User.objects.create_user("charlie", password="charlie-password-1"),
    )


@pytest.fixture
def consumer_db(db, monkeypatch):
    """Let WebSocket consumers run inside the test's transaction.

    Run under ``async_to_sync`` from the test, the consumer's database calls
    execute in the test's own thread and connection, so they see the test's
    uncommitted rows; only Channels' "close old connections" around each call
    must not close that connection mid-test.  (Transactional tests cannot be
    used: flushing the database is refused by the append-only audit table.)
    """
    import channels.db

    monkeypatch.setattr(channels.db, "close_old_connections", lambda: None)


@pytest.fixture
def consumer_world(consumer_db, world):
    return world
