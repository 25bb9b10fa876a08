"""Shared fixtures: personas, inventory objects, and the NixOS-like testbed."""

from __future__ import annotations

import pytest

from tests.testbed import make_flake_repo, testbed  # noqa: F401  (the session fixture)


@pytest.fixture
def alice(django_user_model):
    """A superuser."""
    return django_user_model.objects.create_superuser("alice", "alice@example.com", "alice-password-1")


@pytest.fixture
def bob(django_user_model):
    """A logged-in user with no rights at all."""
    return django_user_model.objects.create_user("bob", "bob@example.com", "bob-password-12")


@pytest.fixture
def flake_repo(tmp_path):
    """A git repository of a flake with configurations devm, failing and slow; returns (path, head sha)."""
    path = tmp_path / "flake"
    return path, make_flake_repo(path)


@pytest.fixture
def inventory(db, flake_repo):
    """A repository, a key credential and a node (not reachable) ready to be deployed."""
    from deployments import inventory
    from deployments.models import Credential, Node, Repository

    from .helpers import ed25519_private_key

    repo = Repository.objects.create(name="fleet", url=str(flake_repo[0]), branch="main")
    cred = Credential(name="deploy-key", kind=Credential.Kind.SSH_KEY)
    inventory.save_credential(cred, secret=ed25519_private_key(), actor_kind="cli")
    node = Node.objects.create(
        name="web1",
        host="192.0.2.10",
        port=22,
        flake_attr="devm",
        repository=repo,
        credential=cred,
        host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        host_key_fingerprint="SHA256:test",
    )
    return {"repo": repo, "credential": cred, "node": node, "sha": flake_repo[1], "repo_path": flake_repo[0]}
