"""Fixtures that put testbed nodes into the panel's inventory."""

from __future__ import annotations

import itertools

import pytest

from deployments import inventory
from deployments.models import Credential, Node

_names = itertools.count(1)


@pytest.fixture
def add_node(testbed, repository):
    """Start a testbed node and register it in the panel with its host key pinned.

    ``add_node(attr="devm", password=False)`` → (panel Node, testbed Node). ``behind=(panel Node, testbed
    Node)`` of a bastion: the new node is reachable only through it (the testbed's private network behind
    the bastion), and its panel node has that bastion as jump host.
    """

    def make(attr: str = "devm", *, password: bool = False, pin: bool = True, behind=None):
        name = f"n{next(_names)}-{testbed.token}"
        tb_node = testbed.add_node(
            name,
            password="correct-horse-battery" if password else None,
            behind=behind[1] if behind is not None else None,
        )
        if password:
            cred = Credential(name=f"{name}-pw", kind=Credential.Kind.PASSWORD)
            inventory.save_credential(cred, secret=tb_node.password, actor_kind="cli")
        else:
            cred = Credential(name=f"{name}-key", kind=Credential.Kind.SSH_KEY)
            inventory.save_credential(cred, secret=tb_node.client_key_private, actor_kind="cli")
        node = Node.objects.create(
            name=name,
            host=tb_node.host,
            port=tb_node.port,
            ssh_user=tb_node.user,
            flake_attr=attr,
            repository=repository,
            credential=cred,
            jump_host=behind[0] if behind is not None else None,
        )
        if pin:
            inventory.pin_host_key(node, tb_node.host_key_public)
        return node, tb_node

    return make
