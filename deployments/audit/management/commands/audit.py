"""The audit trail from the command line.

    manage.py audit verify [--checkpoint FILE] [--checkpoint-dir DIR]   exit 1 and name the first bad event
    manage.py audit checkpoint                          verify since the last checkpoint, sign the head now
    manage.py audit export --format csv|jsonl [filters] [-o FILE]
    manage.py audit archive --before DATE -o FILE       export, seal and remove old events
    manage.py audit public-key                          the PEM key reviewers verify checkpoints with

Verify, export and archive runs, and refused checkpoints, are themselves
audited (actor: cli, with the OS user and host).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction

from deployments.audit import checkpoint as checkpoints
from deployments.audit import export
from deployments.audit.chain import GENESIS_HASH, key_id
from deployments.audit.db import triggers_lifted
from deployments.audit.models import AuditEvent
from deployments.audit.query import FILTER_NAMES, AuditFilter, parse_time
from deployments.audit.verify import verify_chain
from deployments.audit.writer import record


def _audit(action: str, *, outcome: str = "success", details: dict) -> None:
    # record() adds the OS user and host of every command-line event.
    with transaction.atomic():
        record(action, actor_kind="cli", outcome=outcome, details=details)


class Command(BaseCommand):
    help = "Verify, checkpoint, export and archive the audit trail."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True)
        verify = sub.add_parser("verify", help="walk the chain; exit 1 naming the first bad event")
        verify.add_argument(
            "--checkpoint",
            type=Path,
            action="append",
            default=[],
            help="also check this checkpoint file (e.g. a copy from the second place); repeatable",
        )
        verify.add_argument(
            "--checkpoint-dir",
            type=Path,
            help="check the checkpoints in this directory instead of PANEL_AUDIT_CHECKPOINT_DIR",
        )
        sub.add_parser("checkpoint", help="verify the events since the last checkpoint, then sign the head now")
        sub.add_parser("public-key", help="print the checkpoint signing key's public half (PEM)")
        exp = sub.add_parser("export", help="export events (oldest first) with their hashes")
        exp.add_argument("--format", choices=sorted(export.FORMATS), default="jsonl")
        exp.add_argument("-o", "--output", help="file to write (default: stdout)")
        for name in FILTER_NAMES:
            exp.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                default="",
                help="ISO date or date-time" if name in ("since", "until") else None,
            )
        arc = sub.add_parser("archive", help="export events before DATE to FILE, seal them, remove them")
        arc.add_argument("--before", required=True, help="ISO date or date-time (UTC)")
        arc.add_argument("-o", "--output", required=True, help="JSON Lines file to create (must not exist)")

    def handle(self, *args, subcommand, **options):
        return getattr(self, "do_" + subcommand.replace("-", "_"))(**options)

    # --- verify ------------------------------------------------------------------

    def do_verify(self, checkpoint=(), checkpoint_dir=None, **_):
        report = verify_chain(checkpoint, checkpoint_dir=checkpoint_dir)
        self.stdout.write(report.text())
        _audit(
            "audit.verified",
            outcome="success" if report.ok else "failure",
            details={
                "events": report.count,
                "through_seq": report.last_seq,
                "first_bad_seq": report.problem.seq if report.problem else None,
                "problem": str(report.problem or ""),
                "checkpoint": ", ".join(map(str, checkpoint)),
                "checkpoint_dir": str(checkpoint_dir or ""),
            },
        )
        if not report.ok:
            raise CommandError(f"audit trail does not verify: {report.problem}", returncode=1)

    # --- checkpoint ----------------------------------------------------------------

    def do_checkpoint(self, **_):
        try:
            path = checkpoints.write_checkpoint("manual", force=True, actor_kind="cli")
        except checkpoints.CheckpointRefused as exc:
            raise CommandError(f"checkpoint refused: {exc}", returncode=1) from None
        cp = checkpoints.read_checkpoint(path)
        self.stdout.write(f"checkpoint {cp.number} names event #{cp.seq} {cp.hash}; written to {path}")

    def do_public_key(self, **_):
        try:
            public, source = checkpoints.verification_key()
        except checkpoints.KeyUnavailable as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"key id {key_id(checkpoints._raw(public))} ({source})")
        self.stdout.write(checkpoints.public_key_pem(public).decode(), ending="")

    # --- export --------------------------------------------------------------------

    def do_export(self, format, output=None, **options):
        f, errors = AuditFilter.from_data(options)
        if errors:
            raise CommandError("; ".join(errors))
        through = export.head_seq()
        _audit(
            "audit.exported",
            details={"format": format, "filters": f.as_dict(), "through_seq": through, "output": output or "-"},
        )
        out = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout  # noqa: SIM115
        try:
            for text in export.chunks(f.queryset(), format, through_seq=through):
                out.write(text)
        finally:
            if output:
                out.close()
        if output:
            self.stderr.write(f"exported events through #{through} to {output}")
        self.stderr.write(self._how_to_verify(f, output or "FILE"))

    @staticmethod
    def _how_to_verify(f: AuditFilter, name: str) -> str:
        """Which flag the offline verifier needs for this export: a filtered or partial one fails without it."""
        filters = set(f.as_dict())
        if filters - {"since", "until"}:
            return f"a filtered export (not contiguous): verify it with `python3 chain.py {name} --subset`"
        if filters:
            return f"a slice of the chain (a time range): verify it with `python3 chain.py {name} --slice`"
        first = AuditEvent.objects.order_by("seq").values_list("seq", flat=True).first()
        if first and first > 1:
            return (
                f"the chain starts at #{first} (events before were archived): verify with "
                f"`python3 chain.py {name} --checkpoint SEAL --public-key audit-signing.pub`"
            )
        return f"verify it with `python3 chain.py {name} --checkpoint CHECKPOINT_DIR --public-key audit-signing.pub`"

    # --- archive -------------------------------------------------------------------

    def do_archive(self, before, output, **_):
        try:
            cutoff = parse_time(before)
        except ValueError as exc:
            raise CommandError(str(exc))
        target = Path(output)
        # The head always stays in the table: the next event must have something to link to.
        last = (
            AuditEvent.objects.filter(created_at__lt=cutoff, seq__lt=export.head_seq())
            .order_by("-seq")
            .values_list("seq", "hash")
            .first()
        )
        if last is None:
            self.stdout.write(f"no events before {before}: nothing to archive")
            return
        through, through_hash = last
        first = AuditEvent.objects.order_by("seq").values_list("seq", "prev_hash").first()
        report = verify_chain()
        if not report.ok:
            raise CommandError(f"refusing to archive a broken chain: {report.problem}", returncode=1)

        # 1. Export (a new file, flushed to disk) ...
        digest = hashlib.sha256()
        count = 0
        with open(target, "x", encoding="utf-8", newline="") as fh:
            for chunk in export.rows(AuditEvent.objects.all(), through_seq=through):
                text = export.jsonl_lines(chunk)
                fh.write(text)
                digest.update(text.encode())
                count += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        # 2. ... seal it with a signed checkpoint naming its last event and the file's hash ...
        seal = checkpoints.write_checkpoint(
            "archive",
            actor_kind="cli",
            seq=through,
            hash_=through_hash,
            extra={
                "archive_file": target.name,
                "archive_sha256": digest.hexdigest(),
                "archive_first_seq": first[0],
                "archive_anchor_hash": first[1] if first[0] > 1 else GENESIS_HASH,
            },
        )
        # 3. ... and only then remove the events, with the removal itself on the chain.
        with transaction.atomic():
            with triggers_lifted(connection):
                with connection.cursor() as cur:
                    cur.execute("DELETE FROM audit_auditevent WHERE seq <= %s", [through])
            record(
                "audit.archived",
                actor_kind="cli",
                details={
                    "first_seq": first[0],
                    "through_seq": through,
                    "events": count,
                    "file": str(target),
                    "sha256": digest.hexdigest(),
                    "seal": seal.name,
                },
            )
        self.stdout.write(f"archived events #{first[0]}-#{through} ({count}) to {target}; sealed by {seal}")
