"""Store an SSH private key or password as a credential (encrypted at rest).

The secret is read from a file or standard input, never from the command line
(where it would land in shell history and the process list).
"""

import sys
from pathlib import Path

from django.core.management.base import BaseCommand

from deployments import inventory
from deployments.models import Credential

from ._base import acting_user, clean, refused, require_capability


class Command(BaseCommand):
    help = "Add or replace a credential: --key-file PATH, or --password-stdin."

    def add_arguments(self, parser):
        parser.add_argument("name")
        src = parser.add_mutually_exclusive_group(required=True)
        src.add_argument("--key-file", type=Path, help="SSH private key file (Ed25519, RSA, ECDSA)")
        src.add_argument("--password-stdin", action="store_true", help="read a login password from stdin")
        parser.add_argument("--passphrase-stdin", action="store_true", help="read the key's passphrase from stdin")
        parser.add_argument("--as", dest="as_user", help="act as this panel user (audited as them)")

    def handle(self, name, key_file, password_stdin, passphrase_stdin, as_user, **opts):
        user = acting_user(as_user)
        require_capability(user, event="credential.created", object_type="credential")
        cred = Credential.objects.filter(name=name).first() or Credential(name=name)
        passphrase = ""
        if key_file:
            try:
                secret = key_file.read_text()
            except OSError as exc:
                raise refused(f"{key_file}: {exc.strerror}") from None
            cred.kind = Credential.Kind.SSH_KEY
            if passphrase_stdin:
                passphrase = sys.stdin.readline().rstrip("\n")
        else:
            secret = sys.stdin.readline().rstrip("\n")
            if not secret:
                raise refused("no password on standard input")
            cred.kind = Credential.Kind.PASSWORD
        try:
            cred.set_secret(secret, passphrase)
        except ValueError as exc:
            raise refused(str(exc)) from None
        clean(cred)
        inventory.save_credential(
            cred, secret=secret, passphrase=passphrase, user=user, actor_kind=None if user else "cli"
        )
        self.stdout.write(f"credential {cred.name}: {cred.display_fingerprint}")
