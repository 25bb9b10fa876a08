"""Exports carry their hashes and verify offline with chain.py, standard library only."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from deployments.audit import checkpoint
from deployments.audit.models import AuditEvent

from .conftest import add_events

pytestmark = pytest.mark.django_db
SCRIPT = Path(__file__).resolve().parents[2] / "deployments" / "audit" / "chain.py"


def offline_verify(*args) -> subprocess.CompletedProcess:
    # -I -S: isolated, no site-packages: the script must need nothing but the standard library.
    return subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd="/"
    )


def export(tmp_path, fmt="jsonl", *filters) -> Path:
    path = tmp_path / f"export.{fmt}"
    call_command("audit", "export", "--format", fmt, "-o", str(path), *filters, stderr=io.StringIO())
    return path


def test_a_plain_python3_verifies_an_export_and_rejects_a_tampered_one(events, tmp_path):
    # What a reviewer runs: the system's python3, isolated, in another directory, Django nowhere on its path.
    python3 = shutil.which("python3")
    if python3 is None:
        pytest.skip("no python3 on PATH")
    path = export(tmp_path)

    def run(*args):
        return subprocess.run(
            [python3, "-I", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=tmp_path
        )

    result = run(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 8 events, #1-#8, chain intact" in result.stdout
    path.write_text(path.read_text().replace('"thing 2"', '"thing two"'))
    result = run(path)
    assert result.returncode == 1 and "event #3 was modified" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_full_export_verifies_offline(events, tmp_path, fmt):
    result = offline_verify(export(tmp_path, fmt))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 8 events, #1-#8, chain intact" in result.stdout


def test_each_exported_line_carries_its_hashes(events, tmp_path):
    lines = [json.loads(line) for line in export(tmp_path).read_text().splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 9))
    assert lines[3]["hash"] == AuditEvent.objects.get(seq=4).hash
    assert lines[3]["prev_hash"] == lines[2]["hash"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_edited_export_fails_offline_naming_the_line(events, tmp_path, fmt):
    path = export(tmp_path, fmt)
    path.write_text(path.read_text().replace("thing 4", "thing 9"))
    result = offline_verify(path)
    assert result.returncode == 1
    assert "event #5 was modified" in result.stdout


def test_an_export_with_a_line_removed_fails_offline(events, tmp_path):
    path = export(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + lines[3:]))
    result = offline_verify(path)
    assert result.returncode == 1 and "event #3 removed" in result.stdout


def test_an_export_cut_short_fails_against_a_signed_checkpoint(events, tmp_path):
    cp = checkpoint.write_checkpoint("manual")
    pub = tmp_path / "audit.pub"
    pub.write_bytes(checkpoint.public_key_pem())
    path = export(tmp_path)
    assert offline_verify(path, "--checkpoint", cp, "--public-key", pub).returncode == 0
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:6]))
    result = offline_verify(path, "--checkpoint", cp, "--public-key", pub)
    assert result.returncode == 1 and "events #7-#8 removed" in result.stdout


def test_a_checkpoint_signed_by_another_key_is_refused_offline(events, tmp_path, settings):
    cp = checkpoint.write_checkpoint("manual")
    settings.AUDIT_SIGNING_KEY_FILE = str(tmp_path / "other" / "key")
    other = tmp_path / "other.pub"
    other.write_bytes(checkpoint.public_key_pem(checkpoint.signing_key(create=True).public_key()))
    result = offline_verify(export(tmp_path), "--checkpoint", cp, "--public-key", other)
    assert result.returncode == 1 and "but the public key given is" in result.stdout


def test_a_filtered_export_verifies_as_a_subset(db, tmp_path):
    add_events(3, action="test.a")
    add_events(3, action="test.b")
    add_events(3, action="test.a")
    path = export(tmp_path, "jsonl", "--action", "test.a")
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [1, 2, 3, 7, 8, 9]
    assert offline_verify(path).returncode == 1  # not contiguous: the gap shows ...
    assert offline_verify(path, "--subset").returncode == 0  # ... but every event's own hash holds


def test_exports_are_audited(events, tmp_path):
    export(tmp_path, "csv", "--node", "web1")
    event = AuditEvent.objects.get(action="audit.exported")
    assert event.actor_kind == "cli"
    assert event.details["filters"] == {"node": "web1"} and event.details["through_seq"] == 8


def test_an_export_stops_at_the_head_it_started_from(events, tmp_path):
    # The export's own audit event (#9) comes after the head it exports (#8).
    lines = export(tmp_path).read_text().splitlines()
    assert json.loads(lines[-1])["seq"] == 8
