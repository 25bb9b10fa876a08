"""`audit archive` exports and seals old events, removes them, and the chain still verifies."""

import io
import json
import subprocess
import sys
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command

from deployments.audit import checkpoint
from deployments.audit.models import AuditEvent

from .conftest import add_events, tamper
from .test_export import offline_verify

pytestmark = pytest.mark.django_db


def archive_before(seq: int, path) -> str:
    cutoff = AuditEvent.objects.get(seq=seq).created_at + timedelta(microseconds=1)
    out = io.StringIO()
    call_command("audit", "archive", "--before", cutoff.isoformat(), "-o", str(path), stdout=out)
    return out.getvalue()


def the_seal() -> checkpoint.Checkpoint:
    (seal,) = [cp for cp in map(checkpoint.read_checkpoint, checkpoint.checkpoint_files()) if cp.kind == "archive"]
    return seal


def verify() -> int:
    try:
        call_command("audit", "verify", stdout=io.StringIO())
    except CommandError as exc:
        return exc.returncode
    return 0


def test_archive_moves_old_events_to_a_sealed_file(events, tmp_path):
    output = archive_before(5, tmp_path / "archive.jsonl")
    assert "archived events #1-#5" in output
    assert AuditEvent.objects.order_by("seq").first().seq == 6
    archived = [json.loads(x) for x in (tmp_path / "archive.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in archived] == [1, 2, 3, 4, 5]
    assert AuditEvent.objects.filter(action="audit.archived").exists()
    assert verify() == 0


def test_the_archive_file_verifies_offline_against_its_seal(events, tmp_path):
    archive_before(5, tmp_path / "archive.jsonl")
    seal = the_seal()
    assert seal.data["archive_sha256"]
    pub = tmp_path / "audit.pub"
    pub.write_bytes(checkpoint.public_key_pem())
    result = offline_verify(tmp_path / "archive.jsonl", "--checkpoint", seal.path, "--public-key", pub)
    assert result.returncode == 0, result.stdout


def test_a_later_export_links_to_the_seal(events, tmp_path):
    archive_before(5, tmp_path / "archive.jsonl")
    seal = the_seal()
    pub = tmp_path / "audit.pub"
    pub.write_bytes(checkpoint.public_key_pem())
    rest = tmp_path / "rest.jsonl"
    call_command("audit", "export", "-o", str(rest), stderr=io.StringIO())
    result = offline_verify(rest, "--checkpoint", seal.path, "--public-key", pub)
    assert result.returncode == 0, result.stdout
    assert "sealed by a signed checkpoint" in result.stdout


def test_without_its_seal_an_archived_head_counts_as_removed(events, tmp_path):
    archive_before(5, tmp_path / "archive.jsonl")
    seal = the_seal().path
    seal.chmod(0o644)
    seal.unlink()
    assert verify() == 1


def test_archive_refuses_a_broken_chain(events, tmp_path):
    tamper("UPDATE audit_auditevent SET action = 'x' WHERE seq = 2")
    with pytest.raises(CommandError, match="broken chain"):
        archive_before(5, tmp_path / "archive.jsonl")
    assert AuditEvent.objects.filter(seq__lte=5).count() == 5


def test_archive_keeps_the_head_so_the_chain_can_continue(events, tmp_path):
    archive_before(8, tmp_path / "archive.jsonl")
    assert AuditEvent.objects.order_by("seq").first().seq == 8
    add_events(1)
    assert verify() == 0


def test_nothing_is_archived_by_default(events):
    # No retention job exists: events stay until an operator archives them explicitly.
    from django_q.models import Schedule

    assert not Schedule.objects.filter(func__contains="archive").exists()
    assert AuditEvent.objects.count() == 8


def test_the_standalone_script_runs_as_documented(events, tmp_path):
    path = tmp_path / "all.jsonl"
    call_command("audit", "export", "-o", str(path), stderr=io.StringIO())
    result = subprocess.run([sys.executable, "deployments/audit/chain.py", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
