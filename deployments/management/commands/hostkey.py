"""Scan a node's SSH host key, and pin it when its fingerprint is confirmed."""

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from deployments import inventory
from deployments.errors import RequestError

from ._base import acting_user, lookup_node


class Command(BaseCommand):
    help = (
        "Show the host key NODE presents now. With --pin SHA256:..., pin it if it has that "
        "fingerprint (check it out of band first). --key 'ssh-ed25519 AAAA…' pins a key you already have."
    )

    def add_arguments(self, parser):
        parser.add_argument("node")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--pin", metavar="FINGERPRINT", help="pin the scanned key if it has this fingerprint")
        group.add_argument("--key", help="pin this OpenSSH public key line without scanning")
        parser.add_argument("--as", dest="as_user")

    def handle(self, node, pin, key, as_user, **opts):
        user = acting_user(as_user)
        node = lookup_node(user, node)
        try:
            if key:
                inventory.pin_host_key(node, key, user=user)
                self.stdout.write(f"pinned {node.host_key_fingerprint} for {node.name}")
                return
            scanned = inventory.scan_host_key(node, user=user)
            self.stdout.write(
                f"{node.name} ({node.host}:{node.port}) presents {scanned.key_type} {scanned.fingerprint}"
            )
            if node.host_key:
                same = node.host_key == scanned.openssh
                self.stdout.write(f"pinned: {node.host_key_fingerprint} ({'matches' if same else 'DIFFERENT'})")
            if pin:
                inventory.pin_host_key(node, scanned.openssh, user=user, expected_fingerprint=pin)
                self.stdout.write(f"pinned {node.host_key_fingerprint} for {node.name}")
            elif not node.host_key:
                self.stdout.write(f"to pin it: manage.py hostkey {node.name} --pin {scanned.fingerprint}")
        except RequestError as exc:
            raise CommandError(str(exc)) from None
        except PermissionDenied as exc:
            raise CommandError(f"refused: {exc}", returncode=2) from None
