"""The trail cannot be laundered by someone with write access to the database (and to files in the data directory).

Each test is an attack: raw SQL with the triggers lifted, a tail cut and grown
back, a whole tail re-hashed, checkpoint files copied, removed or forged, key
files removed or replaced, an export with its first lines cut.  The trail must
say so, and the next checkpoint must refuse to sign over it.  (Rewrites the
database itself refuses, SQLite's REPLACE included, are in test_append_only.py;
account changes in test_accounts.py.)
"""

import base64
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from deployments.audit import checkpoint
from deployments.audit.chain import CHECKPOINT_FORMAT_V1, chain_hash, checkpoint_digest, checkpoint_message
from deployments.audit.models import AuditEvent
from deployments.audit.verify import verify_chain, verify_since

from .conftest import add_events, tamper, verify
from .test_export import offline_verify

pytestmark = pytest.mark.django_db

_COLUMNS = ["actor_name", "object_repr", "details", "prev_hash", "hash"]


def rewrite(seq: int, **changes) -> None:
    """Change event ``seq`` and re-hash it and every event after it, so every link holds again."""
    prev_hash = AuditEvent.objects.get(seq=seq).prev_hash
    for row in AuditEvent.objects.filter(seq__gte=seq).order_by("seq").values():
        if row["seq"] == seq:
            row.update(changes)
        row["prev_hash"] = prev_hash
        row["hash"] = prev_hash = chain_hash(prev_hash, row)
        tamper(
            "UPDATE audit_auditevent SET " + ", ".join(f"{c} = %s" for c in _COLUMNS) + " WHERE seq = %s",
            [json.dumps(row[c]) if c == "details" else row[c] for c in _COLUMNS] + [row["seq"]],
        )


def remove(path) -> None:
    path.chmod(0o644)
    path.unlink()


def refusals() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="audit.checkpoint_refused").order_by("seq"))


# --- 1. a checkpoint verifies the events since the last one before it signs -------------------------


def test_a_rewritten_and_rehashed_tail_passes_every_link_but_is_never_signed(events, caplog):
    checkpoint.write_checkpoint()
    rewrite(5, actor_name="innocent")
    assert verify_chain().problem.message.startswith("event #8 does not match checkpoint")
    with caplog.at_level(logging.ERROR), pytest.raises(checkpoint.CheckpointRefused, match="event #8 does not match"):
        checkpoint.write_checkpoint()
    assert len(checkpoint.checkpoint_files()) == 1  # nothing signed over it: verify keeps failing
    assert "audit checkpoint refused" in caplog.text
    (alert,) = refusals()
    assert (alert.outcome, alert.actor_kind) == ("failure", "system")
    assert "event #8 does not match" in alert.details["problem"]
    assert verify()[0] == 1


def test_a_cut_tail_grown_back_is_never_signed(events):
    checkpoint.write_checkpoint()
    tamper("DELETE FROM audit_auditevent WHERE seq >= 6")
    add_events(5, action="test.replacement")  # #6-#10, every link sound
    with pytest.raises(checkpoint.CheckpointRefused, match="event #8 does not match"):
        checkpoint.write_checkpoint()
    assert len(checkpoint.checkpoint_files()) == 1


def test_a_cut_tail_is_never_signed(events):
    checkpoint.write_checkpoint()
    tamper("DELETE FROM audit_auditevent WHERE seq >= 6")
    with pytest.raises(checkpoint.CheckpointRefused, match="events #6-#8 removed"):
        checkpoint.write_checkpoint()


def test_the_refusal_repeats_at_every_run_and_from_the_command_line(events):
    checkpoint.write_checkpoint()
    tamper("DELETE FROM audit_auditevent WHERE seq = 8")
    with pytest.raises(checkpoint.CheckpointRefused):
        checkpoint.write_checkpoint()
    with pytest.raises(CommandError, match="checkpoint refused") as exc:
        call_command("audit", "checkpoint", stdout=io.StringIO())
    assert exc.value.returncode == 1
    assert [(e.actor_kind, e.details["kind"]) for e in refusals()] == [("system", "periodic"), ("cli", "manual")]
    assert "os_user" in refusals()[1].details


def test_the_scheduled_task_refuses_too(events):
    from django.utils.module_loading import import_string

    from deployments.audit.apps import SCHEDULE_FUNC

    task = import_string(SCHEDULE_FUNC)  # what django-q2 runs every 15 minutes
    task()
    rewrite(7, object_repr="nothing to see")
    with pytest.raises(checkpoint.CheckpointRefused):
        task()


def test_the_first_checkpoint_verifies_the_whole_chain(events):
    tamper("UPDATE audit_auditevent SET actor_name = 'mallory' WHERE seq = 2")
    with pytest.raises(checkpoint.CheckpointRefused, match="the start of the chain do not verify: event #2"):
        checkpoint.write_checkpoint()
    assert checkpoint.checkpoint_files() == []


def test_a_checkpoint_walks_only_the_events_since_the_last_one(events):
    checkpoint.write_checkpoint()
    add_events(3)
    report = verify_since(checkpoint.load_chain(checkpoint.verification_key()[0]))
    assert report.ok and (report.first_seq, report.count, report.last_seq) == (8, 4, 11)


def test_events_after_a_sound_checkpoint_are_signed(events):
    first = checkpoint.read_checkpoint(checkpoint.write_checkpoint())
    add_events(2)
    second = checkpoint.read_checkpoint(checkpoint.write_checkpoint())
    assert (first.seq, second.seq, second.number) == (8, 10, 2)
    assert not refusals() and verify()[0] == 0


# --- 2. checkpoints form their own chain -------------------------------------------------------


def test_each_checkpoint_names_the_one_before(events):
    first = checkpoint.read_checkpoint(checkpoint.write_checkpoint())
    add_events(1)
    second = checkpoint.read_checkpoint(checkpoint.write_checkpoint("manual"))
    assert first.data["prev_checkpoint"] == "0" * 64 and first.number == 1
    assert second.data["prev_checkpoint"] == checkpoint_digest(first.data)
    assert (second.number, second.data["prev_checkpoint_seq"]) == (2, 8)


def test_an_old_checkpoint_copied_under_a_newer_name_hides_no_cut(events, audit_dirs):
    old = checkpoint.write_checkpoint()
    add_events(2)
    checkpoint.write_checkpoint()
    tamper("DELETE FROM audit_auditevent WHERE seq >= 9")
    for name in ("checkpoint-n99999999.json", "checkpoint-999999999999-29991231T000000000000Z-periodic.json"):
        shutil.copy(old, old.with_name(name))
    status, output = verify()
    assert status == 1 and "events #9-#10 removed" in output
    assert "is a copy of" in output
    with pytest.raises(checkpoint.CheckpointRefused, match="removed"):
        checkpoint.write_checkpoint()


@pytest.mark.parametrize(
    "written,removed,says",
    [
        pytest.param(3, 1, "checkpoint #2 missing: the checkpoint chain skips from #1", id="from-the-middle"),
        pytest.param(2, 0, "checkpoint #1 missing", id="the-first"),
    ],
)
def test_a_removed_checkpoint_is_refused(events, written, removed, says):
    paths = []
    for n in range(written):
        if n:
            add_events(1)
        paths.append(checkpoint.write_checkpoint())
    remove(paths[removed])
    status, output = verify()
    assert status == 1 and says in output
    with pytest.raises(checkpoint.CheckpointRefused, match="checkpoints do not verify"):
        checkpoint.write_checkpoint(force=True)


def test_an_unreadable_checkpoint_is_a_failure_not_a_skip(events):
    path = checkpoint.write_checkpoint()
    path.with_name("checkpoint-n00000002.json").write_text("{ not json")
    status, output = verify()
    assert status == 1 and "checkpoint-n00000002.json is unreadable" in output


def _signed(**fields) -> dict:
    """A checkpoint as only the signing key's holder could write it (to test the chain's own rules)."""
    return checkpoint.sign(fields)


def _place(doc: dict, name: str) -> None:
    (checkpoint.checkpoint_files()[0].parent / name).write_text(json.dumps(doc))


def test_a_checkpoint_chain_that_goes_backwards_or_forks_is_refused(events):
    second_event = AuditEvent.objects.get(seq=2)
    first = checkpoint.read_checkpoint(checkpoint.write_checkpoint())
    base = dict(kind="manual", created_at="2999-01-01T00:00:00.000000Z", prev_checkpoint=first.digest)
    _place(_signed(number=2, seq=2, hash=second_event.hash, prev_checkpoint_seq=8, **base), "checkpoint-n00000002.json")
    status, output = verify()
    assert status == 1 and "names event #2, behind #8" in output and "the chain was cut between them" in output

    remove(checkpoint.checkpoint_files()[1])
    for name in ("checkpoint-n00000002.json", "checkpoint-n00000002b.json"):
        _place(_signed(number=2, seq=8, hash=first.hash, prev_checkpoint_seq=8, note=name, **base), name)
    status, output = verify()
    assert status == 1 and "are both #2: the checkpoint chain forks" in output


def test_a_checkpoint_not_naming_its_predecessor_is_refused(events):
    first = checkpoint.read_checkpoint(checkpoint.write_checkpoint())
    doc = _signed(
        number=2,
        kind="manual",
        seq=8,
        hash=first.hash,
        created_at="2999-01-01T00:00:00.000000Z",
        prev_checkpoint="f" * 64,
        prev_checkpoint_seq=8,
    )
    _place(doc, "checkpoint-n00000002.json")
    status, output = verify()
    assert status == 1 and "does not name checkpoint-n00000001.json (#1) as the one before it" in output


def _old_format(seq: int, name: str) -> dict:
    """A checkpoint as the panel wrote them before the checkpoint chain (format /1)."""
    key = checkpoint.signing_key()
    doc = {
        "format": CHECKPOINT_FORMAT_V1,
        "kind": "periodic",
        "seq": seq,
        "hash": AuditEvent.objects.get(seq=seq).hash,
        "created_at": f"2026-01-01T00:00:{seq:02d}.000000Z",
        "key_id": checkpoint.sign({})["key_id"],
    }
    doc["signature"] = base64.b64encode(key.sign(checkpoint_message(doc))).decode()
    directory = Path(settings.AUDIT_CHECKPOINT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(doc))
    return doc


def test_old_format_checkpoints_are_each_checked_and_the_chain_starts_after_them(events):
    _old_format(4, "checkpoint-000000000004-20260101T000004000000Z-periodic.json")
    latest_old = _old_format(8, "checkpoint-000000000008-20260101T000008000000Z-periodic.json")
    add_events(1)
    first = checkpoint.read_checkpoint(checkpoint.write_checkpoint())
    assert first.number == 1 and first.data["prev_checkpoint"] == checkpoint_digest(latest_old)
    assert first.data["prev_checkpoint_seq"] == 8
    status, output = verify()
    assert status == 0 and "2 older-format" in output


def test_an_old_format_checkpoint_copied_under_a_newer_name_hides_no_cut(events):
    _old_format(4, "checkpoint-000000000004-20260101T000004000000Z-periodic.json")
    _old_format(8, "checkpoint-000000000008-20260101T000008000000Z-periodic.json")
    shutil.copy(
        checkpoint.checkpoint_files()[0],
        checkpoint.checkpoint_files()[0].with_name("checkpoint-000000000099-29990101T000000000000Z-periodic.json"),
    )
    tamper("DELETE FROM audit_auditevent WHERE seq >= 6")
    status, output = verify()
    assert status == 1 and "events #6-#8 removed" in output


# --- 3. verification uses a configured public key and never creates one ---------------------------


def test_verify_never_creates_a_key_and_fails_without_one(events, audit_dirs):
    checkpoint.write_checkpoint()
    key = audit_dirs / "keys" / "audit-signing.key"
    key.unlink()
    (audit_dirs / "keys" / "audit-signing.pub").unlink()
    status, output = verify()
    assert status == 1 and "no public key to verify checkpoints with" in output
    assert not key.exists() and not (audit_dirs / "keys" / "audit-signing.pub").exists()
    with pytest.raises(CommandError, match="no public key"):
        call_command("audit", "public-key", stdout=io.StringIO(), stderr=io.StringIO())
    assert not key.exists()


def test_a_removed_signing_key_is_not_replaced_by_a_new_one(events, audit_dirs):
    checkpoint.write_checkpoint()
    key = audit_dirs / "keys" / "audit-signing.key"
    key.unlink()
    add_events(1)
    with pytest.raises(checkpoint.CheckpointRefused, match="restore the key file"):
        checkpoint.write_checkpoint()
    assert not key.exists() and len(refusals()) == 1


def test_verify_uses_the_configured_public_key_without_the_private_one(events, audit_dirs, settings):
    checkpoint.write_checkpoint()
    settings.AUDIT_PUBLIC_KEY = checkpoint.public_key_pem().decode()
    (audit_dirs / "keys" / "audit-signing.key").unlink()
    status, output = verify()
    assert status == 0 and "(PANEL_AUDIT_PUBLIC_KEY)" in output


def test_a_replaced_signing_key_is_caught_by_the_configured_public_key(events, audit_dirs, settings):
    checkpoint.write_checkpoint()
    given = checkpoint.public_key_pem().decode()  # the key reviewers were given, configured out of reach
    # Someone who can write the data directory puts in their own key, rewrites, and starts the checkpoints afresh.
    (audit_dirs / "keys" / "audit-signing.key").unlink()
    for path in checkpoint.checkpoint_files():
        remove(path)
    checkpoint.signing_key(create=True)
    rewrite(6, actor_name="innocent")
    checkpoint.write_checkpoint()
    settings.AUDIT_PUBLIC_KEY = given
    status, output = verify()
    assert status == 1 and "but the public key given is" in output
    add_events(1)
    with pytest.raises(checkpoint.CheckpointRefused, match="is not the one PANEL_AUDIT_PUBLIC_KEY names"):
        checkpoint.write_checkpoint()


def test_a_forged_checkpoint_dropped_into_the_directory_is_refused(events):
    path = checkpoint.write_checkpoint()
    doc = json.loads(path.read_text())
    doc.update(number=2, seq=3, prev_checkpoint=checkpoint_digest(doc))
    _place(doc, "checkpoint-n00000002.json")
    status, output = verify()
    assert status == 1 and "forged or altered" in output


# --- 4. the offline verifier and exports cut at the front --------------------------------------------


def _export(tmp_path, *args, name="export.jsonl"):
    path = tmp_path / name
    err = io.StringIO()
    call_command("audit", "export", "-o", str(path), *args, stderr=err)
    return path, err.getvalue()


def test_an_export_with_its_first_lines_removed_fails_offline(events, tmp_path):
    path, _ = _export(tmp_path)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[3:]))
    result = offline_verify(path)
    assert result.returncode == 1, result.stdout
    assert "events #1-#3 missing: the export starts at #4" in result.stdout and "--slice" in result.stdout


def test_a_deliberate_slice_passes_with_slice_and_says_where_it_starts(events, tmp_path):
    path, _ = _export(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[3:6]))
    result = offline_verify(path, "--slice")
    assert result.returncode == 0, result.stdout
    assert "slice: starts at event #4" in result.stdout and "OK: 3 events, #4-#6, a slice" in result.stdout


def test_a_slice_is_still_checked_inside_and_against_checkpoints_within_it(events, tmp_path, audit_dirs):
    checkpoint.write_checkpoint("manual")  # names #8
    path, _ = _export(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[3:5] + lines[6:]))  # #4, #5, #7, #8: #6 removed inside the slice
    assert "event #6 removed" in offline_verify(path, "--slice").stdout
    pub = tmp_path / "audit.pub"
    pub.write_bytes(checkpoint.public_key_pem())
    rewrite(6, actor_name="innocent")
    rewritten, _ = _export(tmp_path, name="rewritten.jsonl")
    rewritten.write_text("".join(rewritten.read_text().splitlines(keepends=True)[4:8]))  # #5-#8
    result = offline_verify(rewritten, "--slice", "--checkpoint", audit_dirs / "checkpoints", "--public-key", pub)
    assert result.returncode == 1 and "event #8 does not match checkpoint" in result.stdout


def test_a_periodic_checkpoint_does_not_excuse_missing_first_events(events, tmp_path, audit_dirs):
    # Only an archive seal says why events before the export's first one are gone.
    add_events(1)
    cp = checkpoint.write_checkpoint()
    pub = tmp_path / "audit.pub"
    pub.write_bytes(checkpoint.public_key_pem())
    path, _ = _export(tmp_path)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[5:]))
    result = offline_verify(path, "--checkpoint", cp, "--public-key", pub)
    assert result.returncode == 1 and "events #1-#5 missing" in result.stdout


def test_a_time_range_export_tells_to_verify_it_as_a_slice(events, tmp_path):
    since = AuditEvent.objects.get(seq=4).created_at.isoformat()
    path, hint = _export(tmp_path, "--since", since)
    assert "a slice of the chain" in hint and "--slice" in hint
    assert json.loads(path.read_text().splitlines()[0])["seq"] == 4
    assert offline_verify(path).returncode == 1
    assert offline_verify(path, "--slice").returncode == 0


def test_a_filtered_export_tells_to_verify_it_as_a_subset(events, tmp_path):
    _, hint = _export(tmp_path, "--action", "test.event")
    assert "--subset" in hint


def test_a_full_export_tells_to_verify_it_with_the_checkpoints(events, tmp_path):
    _, hint = _export(tmp_path)
    assert "--checkpoint CHECKPOINT_DIR --public-key" in hint


def test_the_offline_verifier_checks_the_checkpoint_chain_it_is_given(events, tmp_path, audit_dirs):
    checkpoint.write_checkpoint()
    add_events(1)
    middle = checkpoint.write_checkpoint()
    add_events(1)
    checkpoint.write_checkpoint()
    pub = tmp_path / "audit.pub"
    pub.write_bytes(checkpoint.public_key_pem())
    path, _ = _export(tmp_path)
    directory = audit_dirs / "checkpoints"
    assert offline_verify(path, "--checkpoint", directory, "--public-key", pub).returncode == 0
    remove(middle)
    result = offline_verify(path, "--checkpoint", directory, "--public-key", pub)
    assert result.returncode == 1 and "checkpoint #2 missing" in result.stdout
