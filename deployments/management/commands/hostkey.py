"""Scan a node's SSH host key, and pin it when its fingerprint is confirmed.

Exit status (see _base.py): 0 done; 1 the node could not be scanned, or it
presents another key than the fingerprint given; 2 refused (an unknown node,
no permission, a key or fingerprint that is not one).
"""

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from deployments import inventory
from deployments.errors import RequestError

from ._base import NOT_SUCCEEDED, acting_user, lookup_node, refused


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
        if pin is not None and not pin.startswith("SHA256:"):
            raise refused(f"{pin!r} is not a fingerprint: give it as ssh-keygen -l shows it, SHA256:…")
        try:
            if key:
                try:
                    inventory.pin_host_key(node, key, user=user)
                except RequestError as exc:  # not a key
                    raise refused(str(exc)) from None
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
        except RequestError as exc:  # the node could not be scanned, or presents another key
            raise CommandError(str(exc), returncode=NOT_SUCCEEDED) from None
        except PermissionDenied as exc:
            raise refused(f"refused: {exc}") from None
