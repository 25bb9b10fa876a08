"""`audit verify` names the first event that was modified, removed or reordered, and exits 1."""

import json
import shutil

import pytest

from deployments.audit import checkpoint
from deployments.audit.chain import chain_hash
from deployments.audit.models import AuditEvent
from deployments.audit.verify import verify_chain

from .conftest import add_events, tamper, verify

pytestmark = pytest.mark.django_db


def test_verify_passes_an_untouched_chain(events):
    status, output = verify()
    assert status == 0
    assert "OK: 8 events, #1-#8, chain intact" in output


@pytest.mark.parametrize(
    "statements,named",
    [
        pytest.param(
            [
                "UPDATE audit_auditevent SET actor_name = 'mallory' WHERE seq = 3",
                "UPDATE audit_auditevent SET outcome = 'denied' WHERE seq = 6",
            ],
            "event #3 was modified",
            id="the-first-of-two-edited-events",
        ),
        pytest.param(["DELETE FROM audit_auditevent WHERE seq = 5"], "event #5 removed", id="a-deleted-event"),
        pytest.param(
            ["DELETE FROM audit_auditevent WHERE seq <= 2"], "events #1-#2 removed", id="deleted-first-events"
        ),
        pytest.param(
            # Renumber #3 and #4 into each other's places.
            [
                "UPDATE audit_auditevent SET seq = -3 WHERE seq = 3",
                "UPDATE audit_auditevent SET seq = 3 WHERE seq = 4",
                "UPDATE audit_auditevent SET seq = 4 WHERE seq = -3",
            ],
            "event #3 was modified",
            id="reordered-events",
        ),
    ],
)
def test_verify_names_the_first_event_changed_behind_the_triggers(events, statements, named):
    for sql in statements:
        tamper(sql)
    status, output = verify()
    assert status == 1
    assert named in output


def test_verify_names_an_edited_event_whose_hash_was_recomputed(events):
    row = AuditEvent.objects.values().get(seq=4)
    row["object_repr"] = "innocent"
    tamper(
        "UPDATE audit_auditevent SET object_repr = %s, hash = %s WHERE seq = 4",
        ["innocent", chain_hash(row["prev_hash"], row)],
    )
    status, output = verify()
    assert status == 1
    assert "event #4 was rewritten" in output


def test_verify_names_the_first_of_two_swapped_events(events):
    cols = ["actor_name", "action", "object_id", "object_repr", "details", "prev_hash", "hash"]
    a, b = (AuditEvent.objects.values(*cols).get(seq=s) for s in (2, 6))
    for seq, row in ((2, b), (6, a)):
        row = {
            **row,
            "hash": "tmp" + row["hash"][3:] if seq == 2 else row["hash"],
            "details": json.dumps(row["details"]),
        }
        tamper(
            "UPDATE audit_auditevent SET " + ", ".join(f"{c} = %s" for c in cols) + " WHERE seq = %s",
            [row[c] for c in cols] + [seq],
        )
    status, output = verify()
    assert status == 1
    assert "event #2 was modified" in output


def test_a_cut_tail_shows_only_against_a_checkpoint(events):
    path = checkpoint.write_checkpoint("manual")
    tamper("DELETE FROM audit_auditevent WHERE seq >= 6")
    status, output = verify()
    assert status == 1
    assert "events #6-#8 removed" in output and path.name in output


def test_a_cut_tail_grown_back_does_not_match_the_checkpoint(events):
    checkpoint.write_checkpoint("manual")
    tamper("DELETE FROM audit_auditevent WHERE seq >= 6")
    add_events(4, action="test.replacement")
    status, output = verify()
    assert status == 1
    assert "event #8 does not match checkpoint" in output


def test_verify_also_checks_the_checkpoints_it_is_given(events, tmp_path):
    # Every checkpoint was also shipped to a second place; the newest local one is then removed with the tail.
    second_place = tmp_path / "second-place"
    second_place.mkdir()
    shutil.copy(checkpoint.write_checkpoint("manual"), second_place)
    add_events(2)
    latest = checkpoint.write_checkpoint("manual")
    shutil.copy(latest, second_place)
    tamper("DELETE FROM audit_auditevent WHERE seq >= 9")
    latest.chmod(0o644)
    latest.unlink()
    assert verify_chain().ok  # the local directory alone cannot tell: why the second place exists
    status, output = verify("--checkpoint", str(second_place / latest.name))
    assert status == 1 and "events #9-#10 removed" in output
    status, output = verify("--checkpoint-dir", str(second_place))  # (#9 is now the last verify's own event)
    assert status == 1 and "event #10 removed" in output and "says the chain reached #10" in output


def test_a_forged_checkpoint_is_refused(events, tmp_path):
    doc = json.loads(checkpoint.write_checkpoint("manual").read_text())
    doc["seq"] = 3
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(doc))
    status, output = verify("--checkpoint", str(forged))
    assert status == 1
    assert "forged.json is not validly signed" in output and "forged or altered" in output


def test_verify_runs_are_audited(events):
    verify()
    tamper("UPDATE audit_auditevent SET action = 'x' WHERE seq = 2")
    verify()
    ok, failed = AuditEvent.objects.filter(action="audit.verified").order_by("seq")
    assert (ok.outcome, ok.actor_kind) == ("success", "cli")
    assert failed.outcome == "failure" and failed.details["first_bad_seq"] == 2
