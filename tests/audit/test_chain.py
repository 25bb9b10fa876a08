"""The chain is defined once (deployments/audit/chain.py); every other way of building it agrees.

* ``canonical()`` is the documented JSON (sorted keys, no spaces, UTF-8) and its
  hash of a fixed event never changes: stored events stay verifiable;
* verify's row builder and the writer's ``canonical_parts`` build the same string;
* PostgreSQL's ``audit_append()`` (PL/pgSQL, migration 0004) hashes every field
  as chain.py does (run with ``DATABASE_URL=postgres://…``).
"""

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from django.db import transaction

from deployments.audit import walk
from deployments.audit.chain import (
    CANONICAL_ORDER,
    GENESIS_HASH,
    HASHED_FIELDS,
    canonical,
    canonical_parts,
    chain_hash,
    format_time,
)
from deployments.audit.context import RequestContext, current
from deployments.audit.models import AuditEvent
from deployments.audit.writer import record

from .conftest import is_postgres, tamper

AWKWARD = {
    "seq": 99,
    "created_at": "not the time",
    '"seq":': "\\",
    "é\u2028": ["\x01", 1.5, True, None],
    "nested": {"z": 1, "a": {"created_at": 0}},
}


def awkward_event(seq=7, created_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) -> dict:
    event = {name: "" for name in HASHED_FIELDS}
    event.update(
        seq=seq,
        created_at=created_at,
        actor_id=None,
        node_id=3,
        source_ip=None,
        details=AWKWARD,
        actor_name='a"b\\c',
        object_repr='"created_at":"x","seq":1',
        node_name="wéb-1",
    )
    return event


FIXED = {
    "seq": 42,
    "created_at": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    "actor_kind": "user",
    "actor_id": 7,
    "actor_name": 'zoë "z"',
    "action": "node.updated",
    "object_type": "node",
    "object_id": "3",
    "object_repr": "web-1\n\u2028",
    "node_id": 3,
    "node_name": "web-1",
    "outcome": "denied",
    "details": {"b": [1, 2.5, None, True], "a": {"ü": "\x01"}},
    "source_ip": "2001:db8::1",
    "user_agent": "curl/8",
    "request_id": "r-1",
}


def test_the_hash_of_a_fixed_event_never_changes():
    # Computed by the format's first implementation: every stored event depends on this staying put.
    assert canonical(FIXED) == (
        '{"action":"node.updated","actor_id":7,"actor_kind":"user","actor_name":"zoë \\"z\\"",'
        '"created_at":"2026-01-02T03:04:05.000006Z","details":{"a":{"ü":"\\u0001"},"b":[1,2.5,null,true]},'
        '"node_id":3,"node_name":"web-1","object_id":"3","object_repr":"web-1\\n\u2028","object_type":"node",'
        '"outcome":"denied","request_id":"r-1","seq":42,"source_ip":"2001:db8::1","user_agent":"curl/8"}'
    )
    assert chain_hash(GENESIS_HASH, FIXED) == "759d08650699053ea0526f114feb62ee3518206da249e780456dc9a957c931a3"


@pytest.mark.parametrize("event", [FIXED, awkward_event(), awkward_event(1, "2026-01-02T03:04:05.000000Z"), {}])
def test_the_canonical_form_is_the_documented_json(event):
    doc = {name: event.get(name) for name in HASHED_FIELDS}
    if isinstance(doc["created_at"], datetime):
        doc["created_at"] = format_time(doc["created_at"])
    assert canonical(event) == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("seq", [1, 7, 12345678901])
def test_canonical_parts_rebuild_the_canonical_form(seq):
    event = awkward_event(seq)
    head, middle, tail = canonical_parts(event)
    assert head + format_time(event["created_at"]) + middle + str(seq) + tail == canonical(event)
    # The writer cuts the event before seq and time exist.
    assert canonical_parts({k: v for k, v in event.items() if k not in ("seq", "created_at")}) == (head, middle, tail)


def test_verify_builds_the_same_canonical_form_from_a_row():
    event = awkward_event()
    time = format_time(event["created_at"])
    row = [event[name] for name in CANONICAL_ORDER] + ["", ""]
    row[CANONICAL_ORDER.index("details")] = json.dumps(AWKWARD)  # as the database gives it
    row[CANONICAL_ORDER.index("created_at")] = time
    assert walk._canonical_row(row, time) == canonical(event)
    row[CANONICAL_ORDER.index("details")] = "{}"
    assert walk._canonical_row(row, time) == canonical({**event, "details": {}})


@pytest.mark.parametrize(
    ("stored", "canonical_text"),
    [
        ("2026-01-02 03:04:05.000006", "2026-01-02T03:04:05.000006Z"),  # SQLite's text
        ("2026-01-02 03:04:05", "2026-01-02T03:04:05.000000Z"),  # ... which drops zero microseconds
        (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05.000000Z"),  # SQLite's converter: naive UTC
        (datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "2026-01-02T03:04:05.000006Z"),
        ("2026-01-02T03:04:05.000006Z", "2026-01-02T03:04:05.000006Z"),  # PostgreSQL's to_char
    ],
)
def test_stored_times_read_back_in_the_canonical_form(stored, canonical_text):
    assert walk.canonical_time(stored) == canonical_text


# --- PostgreSQL's audit_append() and chain.py ------------------------------------------------------

# Each is one record() call: (its keyword arguments, the request context it runs in).
AGREEMENT_CASES = {
    "unicode": (
        dict(actor_name="zoë ✓ 日本", object_repr="wéb-1 \u2028\u2029 𝄞", details={"ü": "é", "日": ["✓"]}),
        RequestContext("req-ü", "192.0.2.1", "Mözilla/5.0 (✓)"),
    ),
    "quotes": (
        dict(
            actor_name="a\"b\\c'd",
            object_repr='"created_at":"x","seq":1}',
            object_id="'1'",
            details={'"seq":': "\\", "k'": "'", "\\": '"'},
        ),
        RequestContext('"r"', None, '"ua"'),
    ),
    "control characters": (
        dict(
            object_repr="tab\there\nnew\rline\x01\x1f\x7f",
            object_type="t\x02",
            details={"c": "\x08\x0c\x1b[31m", "nul": "a\x00b"},
        ),
        RequestContext("r\n1", "2001:db8::1", "ua\tx"),
    ),
    "nested details": (
        dict(
            details={
                "a": [{"b": {"c": [1, 2.5, -1.25, 0.1, -0.0, 1.10, None, True, False, ""]}}],
                "": "",
                "z": {},
                "big": 2**70,
                "float": 1e20,
                "neg": -7,
                "list": [[], [{}]],
            }
        ),
        RequestContext(),
    ),
    "empty details": (dict(details={}), RequestContext("", "::ffff:192.0.2.1", "")),
    "null node": (dict(node=None, object_type="", object_id="", object_repr=""), RequestContext()),
    "a node": (dict(node=SimpleNamespace(pk=2**40, name="wéb-1")), RequestContext()),  # node_id is a plain id
    "failure": (dict(outcome=AuditEvent.Outcome.FAILURE, details={"exit_code": 1}), RequestContext()),
    "denied": (
        dict(outcome=AuditEvent.Outcome.DENIED, actor_kind="anonymous", actor_name="mallory"),
        RequestContext("r", "10.0.0.1", ""),
    ),
    "long fields": (dict(object_repr="é" * 400, actor_name="x" * 200), RequestContext("r" * 80, None, "u" * 600)),
}


def postgres_only():
    if not is_postgres():
        pytest.skip("audit_append() is PostgreSQL's; run with DATABASE_URL=postgres://…")


def assert_agrees(event: AuditEvent) -> None:
    stored = AuditEvent.objects.values().get(seq=event.seq)
    assert stored["hash"] == event.hash == chain_hash(stored["prev_hash"], stored), canonical(stored)
    assert (stored["created_at"], stored["prev_hash"]) == (event.created_at, event.prev_hash)


@pytest.mark.postgres
@pytest.mark.django_db
def test_postgresql_hashes_every_field_as_chain_py_does(django_user_model):
    postgres_only()
    zoe = django_user_model.objects.create_user("zoë", "zoe@example.com", "zoe-password-1")
    for name, (kwargs, context) in AGREEMENT_CASES.items():
        for user in (None, zoe):
            token = current.set(context)
            try:
                with transaction.atomic():
                    event = record(
                        f"test.{name.replace(' ', '_')}",
                        user=user,
                        **{"actor_kind": "system", **kwargs} if user is None else kwargs,
                    )
            finally:
                current.reset(token)
            assert_agrees(event)
    from deployments.audit.verify import verify_chain

    assert verify_chain().ok


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize(
    "time",
    [
        datetime(2999, 12, 31, 23, 59, 59, tzinfo=UTC),  # no microseconds: still six digits
        datetime(3000, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2996, 2, 29, 12, 0, 0, 500000, tzinfo=UTC),
    ],
)
def test_postgresql_formats_the_time_as_chain_py_does(time):
    postgres_only()
    with transaction.atomic():
        record("test.first", actor_kind="system")
    # The function never goes before the head's time: a head in the future sets the next event's time.
    tamper("UPDATE audit_auditevent SET created_at = %s WHERE seq = 1", [time])
    with transaction.atomic():
        event = record("test.second", actor_kind="system")
    assert event.created_at == time
    assert event.hash == chain_hash(event.prev_hash, {**AuditEvent.objects.values().get(seq=2), "created_at": time})
    assert_agrees(event)
