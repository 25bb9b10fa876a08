"""A small world of nodes, teams and personas for the roles tests (the ``world`` fixture).

``web-1`` carries the tag ``web`` and is what node- and tag-scoped grants
cover; ``db-1`` (tag ``db-main``) is outside them.  Both have a pinned host
key, a finished deployment and the repository ``flakes`` on the real git
repository of ``flake_repo``, so a permitted deploy really is queued.
"""

from __future__ import annotations

from deployments import inventory
from deployments.access.models import Grant, Team
from deployments.models import Credential, Deployment, Node, Repository

from . import personas
from .keys import HOST_KEY

COMMIT = "0" * 40
IN_SCOPE, OUT_OF_SCOPE = "web-1", "db-1"


class World:
    """The inventory every roles test starts from."""

    def __init__(self, git_path):
        credential = Credential(name="root-pw", kind=Credential.Kind.PASSWORD)
        credential.set_secret("correct horse battery staple")
        credential.save()
        self.repository = Repository.objects.create(name="flakes", url=str(git_path), branch="main")
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
        self.zed = personas.person("zed")
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
        """The user playing role persona ``name`` (None for anonymous); its grant covers web-1 (tag ``web``)."""
        return personas.role_persona(name, node=self.nodes[IN_SCOPE], tag="web")


def level(persona: str, node_name: str) -> int:
    """What role persona ``persona`` may do on the world's node ``node_name`` (personas.level)."""
    return personas.level(persona, node_name == IN_SCOPE)
