"""Shared fixtures: the personas, the flake repository and the inventory on it, the roles tests' world, the testbed.

What they stand on lives in tests/support/ (one module each: personas, world, keys, testbed, ...).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import threading

import pytest

from tests.support import personas
from tests.support.keys import HOST_KEY, ed25519_private_key
from tests.support.testbed import make_flake_repo, testbed  # noqa: F401  (the session fixture)

EXIT_GRACE = 60  # seconds the test process may take to exit after the last test


def pytest_unconfigure(config):
    """A thread stuck for ever (an event loop that cannot close) would keep the finished run from exiting,
    and CI would see a timeout instead of the result.  Past ``EXIT_GRACE`` the stacks are printed and the
    process exits with status 3: a failure, whatever the tests said."""

    def stuck():
        print(f"\nthe test process could not exit within {EXIT_GRACE} s: a thread is stuck", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    watchdog = threading.Timer(EXIT_GRACE, stuck)
    watchdog.daemon = True
    watchdog.start()


def _person(name: str):
    """The fixture of persona ``name``: the user as tests/support/personas.py describes them."""

    def fixture(db):
        return personas.person(name)

    fixture.__doc__ = f"{name}: {personas.PEOPLE[name]}."
    return pytest.fixture(name=name)(fixture)


alice = _person("alice")
bob = _person("bob")
charlie = _person("charlie")
carol = _person("carol")
wendy = _person("wendy")


@pytest.fixture
def alice_client(alice):
    """A Django test client of its own (not ``client``), signed in as alice."""
    from django.test import Client

    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def users(alice, bob, charlie):
    """(alice, bob, charlie)."""
    return alice, bob, charlie


@pytest.fixture(scope="session")
def _flake_repo_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("flake-template") / "flake"
    return path, make_flake_repo(path)


@pytest.fixture
def flake_repo(tmp_path, _flake_repo_template):
    """A git repository of a flake with configurations devm, failing and slow; returns (path, head sha).

    Each test gets its own copy (it may commit to it), of one repository made once a session.
    """
    template, sha = _flake_repo_template
    path = tmp_path / "flake"
    shutil.copytree(template, path, symlinks=True)
    return path, sha


@pytest.fixture
def repository(db, flake_repo):
    """The panel's repository ``fleet``: flake_repo, tracking ``main``."""
    from deployments.models import Repository

    return Repository.objects.create(name="fleet", url=str(flake_repo[0]), branch="main")


@pytest.fixture
def inventory(repository, flake_repo):
    """A repository, a key credential and a node (not reachable) ready to be deployed."""
    from deployments import inventory
    from deployments.models import Credential, Node

    cred = Credential(name="deploy-key", kind=Credential.Kind.SSH_KEY)
    inventory.save_credential(cred, secret=ed25519_private_key(), actor_kind="cli")
    node = Node.objects.create(
        name="web1",
        host="192.0.2.10",
        port=22,
        flake_attr="devm",
        repository=repository,
        credential=cred,
        host_key=HOST_KEY,
        host_key_fingerprint="SHA256:test",
    )
    return {"repo": repository, "credential": cred, "node": node, "sha": flake_repo[1], "repo_path": flake_repo[0]}


@pytest.fixture
def world(db, flake_repo):
    """The roles tests' nodes, teams and role personas (tests/support/world.py)."""
    from tests.support.world import World

    return World(flake_repo[0])
