"""Register a node (or update it)."""

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from deployments import inventory
from deployments.access import gate
from deployments.models import Credential, Node, Repository
from deployments.validators import validate_tag

from ._base import acting_user, clean, lookup_node, refused, require_capability


class Command(BaseCommand):
    help = "Add or update a node: NAME HOST --attr ATTR --repo REPO --credential CRED."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("host")
        parser.add_argument("--port", type=int, default=22)
        parser.add_argument("--user", default="root")
        parser.add_argument("--sudo", action="store_true")
        parser.add_argument("--attr", required=True, help="nixosConfigurations.<attr>")
        parser.add_argument("--repo", required=True)
        parser.add_argument("--credential", required=True)
        parser.add_argument("--tag", action="append", default=[], help="repeatable")
        parser.add_argument(
            "--jump-host", default=None, help="reach it through this registered node (a bastion); '' for none"
        )
        parser.add_argument("--as", dest="as_user")

    def handle(self, name, host, port, user, sudo, attr, repo, credential, tag, as_user, jump_host, **opts):
        acting = acting_user(as_user)
        if Node.objects.filter(name=name).exists():
            node = lookup_node(acting, name, "admin")
        else:
            require_capability(acting, event="node.created", object_type="node")
            node = Node(name=name)
        try:
            node.repository = Repository.objects.get(name=repo)
            node.credential = Credential.objects.get(name=credential)
        except Repository.DoesNotExist:
            raise refused(f"no repository {repo!r}") from None
        except Credential.DoesNotExist:
            raise refused(f"no credential {credential!r}") from None
        if jump_host == "":
            node.jump_host = None
        elif jump_host is not None:
            bastion = Node.objects.filter(name=jump_host).first()
            if bastion is None or (acting is not None and not gate.can(acting, gate.VIEW, bastion)):
                raise refused(f"no node {jump_host!r} to use as jump host")
            node.jump_host = bastion
        node.host, node.port, node.ssh_user, node.use_sudo, node.flake_attr = host, port, user, sudo, attr
        clean(node)
        for t in tag:
            try:
                validate_tag(t)
            except Exception as exc:  # noqa: BLE001 - ValidationError, shown as text
                raise refused(f"tag {t!r}: {' '.join(getattr(exc, 'messages', [str(exc)]))}") from None
        try:
            inventory.save_object(
                node, user=acting, actor_kind=None if acting else "cli", tags=sorted(set(tag)) or None
            )
        except PermissionDenied as exc:  # a credential, repository or jump host the user may not use (audited)
            raise CommandError(f"refused: {exc}", returncode=2) from None
        self.stdout.write(
            f"node {node.name}: {node.address} {node.flake_attr}"
            + (f" via {' -> '.join(h.name for h in node.jump_path())}" if node.jump_host_id else "")
            + ("" if node.host_key else " (host key not pinned: run `manage.py hostkey " + node.name + "`)")
        )
