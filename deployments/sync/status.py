"""Sync status: is each node running what its tracked branch head builds?

A refresh (the scheduled job ``refresh_fleet``, the node page's button ``refresh_node``) does, for the
nodes it looks at:

1. resolve each repository's branch head once (``repos.resolve``: a fetch of the mirror);
2. the expected system of each distinct (repository, head, attribute), cached (``evaluate``);
3. what the panel last deployed to each node (its latest ``switch``/``test`` that the node kept: succeeded,
   or unhealthy with policy keep), one query;
4. each node's ``/run/current-system`` over SSH (pinned key only), ``SYNC_PARALLELISM`` at a time, each
   within ``SYNC_READ_TIMEOUT``; nodes with a deployment queued or running are left alone;
5. ``classify`` each node, and ``record_states``: a changed status is written with its ``node.sync_changed``
   event (and ``node.drifted`` when it became drifted) in one transaction per node; unchanged rows get
   their check time and paths in bulk.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from deployments import repos
from deployments.audit.writer import record
from deployments.models import RUNNING_SYSTEM_ACTIONS, Deployment, Node
from deployments.remote import RemoteError, Target
from deployments.remote.system import read_state

from .evaluate import expected_system
from .models import NodeSync

log = logging.getLogger(__name__)
Status = NodeSync.Status


@dataclass(frozen=True)
class Reading:
    """What reading one node gave: its current system, or why there is none."""

    current_system: str = ""
    error: str = ""


@dataclass(frozen=True)
class State:
    """A node's sync status as computed now (what ``NodeSync`` stores)."""

    status: str
    reason: str = ""
    commit_sha: str = ""
    expected_system: str = ""
    current_system: str = ""
    deployed_system: str = ""


def classify(
    *, reading: Reading, deployed: str, commit_sha: str, expected: str, expected_error: str, pinned: bool = True
) -> State:
    """The status of one node.  Pure: the rules, in their order.

    - no pinned host key, or the node could not be read: ``unknown`` (the reason says which);
    - the node runs something other than the panel's last successful switch/test: ``drifted``
      (only if the panel ever deployed it; it needs no evaluation);
    - the branch head could not be evaluated: ``unknown``;
    - the node runs the branch head's system: ``in_sync``; else ``behind``.
    """
    paths = {"commit_sha": commit_sha, "expected_system": expected, "deployed_system": deployed}
    if not pinned:
        return State(Status.UNKNOWN, "no pinned host key: scan the node and pin its key", **paths)
    if reading.error:
        return State(Status.UNKNOWN, reading.error, **paths)
    current = reading.current_system
    paths["current_system"] = current
    if not current:
        return State(Status.UNKNOWN, "the node has no /run/current-system", **paths)
    if deployed and current != deployed:
        return State(
            Status.DRIFTED,
            "the node runs a system the panel did not deploy last (switched by hand, or rolled back outside the panel)",
            **paths,
        )
    if expected_error or not expected:
        return State(Status.UNKNOWN, f"the branch head could not be evaluated: {expected_error}", **paths)
    if current == expected:
        return State(Status.IN_SYNC, **paths)
    return State(Status.BEHIND, "the branch moved since the system the node runs", **paths)


# --- reading nodes ------------------------------------------------------------------------


def _target(node: Node) -> Target:
    from deployments.tasks import target_for

    timeout = settings.SYNC_READ_TIMEOUT
    return dataclasses.replace(target_for(node), connect_timeout=timeout, link_timeout=timeout)


def read_current_systems(nodes: list[Node]) -> dict[int, Reading]:
    """Each node's ``/run/current-system`` over SSH, ``SYNC_PARALLELISM`` nodes at a time."""
    targets = {}
    readings: dict[int, Reading] = {}
    for node in nodes:
        try:
            targets[node.pk] = _target(node)  # decrypted here, kept in memory only
        except ValueError as exc:  # an unreadable pinned key or credential
            readings[node.pk] = Reading(error=f"cannot use the node's keys: {exc}")

    def read(item: tuple[int, Target]) -> tuple[int, Reading]:
        pk, target = item
        try:
            return pk, Reading(current_system=read_state(target, timeout=settings.SYNC_READ_TIMEOUT).current_system)
        except RemoteError as exc:
            return pk, Reading(error=f"{exc.kind}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - one odd node must not stop the fleet's refresh
            log.exception("reading the system of node %s failed", pk)
            return pk, Reading(error=f"reading failed: {exc.__class__.__name__}: {exc}")

    if targets:
        with ThreadPoolExecutor(max_workers=min(settings.SYNC_PARALLELISM, len(targets))) as pool:
            readings.update(pool.map(read, targets.items()))
    return readings


Reader = Callable[[list[Node]], dict[int, Reading]]


# --- computing and recording -------------------------------------------------------------


def _with_deployed(nodes):
    """``nodes`` annotated with what the panel last deployed to each (one query, on an index)."""
    # ``unhealthy``: a health check failed but the node kept the system (policy keep), so it is what the
    # panel deployed; counting only ``succeeded`` would call that node drifted.
    running = Deployment.objects.filter(
        node=OuterRef("pk"),
        status__in=Deployment.DEPLOYED,
        action__in=RUNNING_SYSTEM_ACTIONS,
    ).order_by("-finished_at")
    return nodes.annotate(
        deployed_after=Subquery(running.values("system_after")[:1]),
        deployed_toplevel=Subquery(running.values("toplevel")[:1]),
    )


def compute_states(nodes: list[Node], readings: dict[int, Reading]) -> dict[int, State]:
    """Every node's state: heads resolved once per repository, each (repository, head, attribute) evaluated
    once (cached across refreshes), each node classified.  ``nodes`` come from ``_with_deployed``."""
    heads: dict[int, tuple[str, str]] = {}  # repository id -> (sha, error)
    expected: dict[tuple[int, str, str], tuple[str, str]] = {}  # (repo, sha, attr) -> (path, error)
    states = {}
    for node in nodes:
        repo = node.repository
        if repo.pk not in heads:
            try:
                heads[repo.pk] = (repos.resolve(repo), "")
            except repos.RepositoryError as exc:
                heads[repo.pk] = ("", f"the branch head is unknown: {exc}")
        sha, head_error = heads[repo.pk]
        key = (repo.pk, sha, node.flake_attr)
        if sha and key not in expected:
            found = expected_system(repo, sha, node.flake_attr)
            expected[key] = (found.out_path, found.error)
        path, error = expected.get(key, ("", head_error))
        states[node.pk] = classify(
            reading=readings.get(node.pk, Reading(error="not read")),
            deployed=node.deployed_after or node.deployed_toplevel or "",
            commit_sha=sha,
            expected=path,
            expected_error=error,
            pinned=bool(node.host_key),
        )
    return states


# Changes recorded per transaction: each change and its events stay together, without a commit per node.
_CHUNK = 200


def record_states(states: dict[int, State], *, user=None, started=None) -> dict[int, tuple[str, str]]:
    """Store ``states``; audit each change.  Returns {node id: (status before, after)} of the changes.

    A node whose deployment began or ended after ``started`` (the refresh's start) is left as it was: what
    was read may already be out of date.  Rows whose status and paths did not change only get their
    check time, in one UPDATE per chunk.
    """
    now = timezone.now()
    if started is not None:
        recent = Deployment.objects.filter(Q(created_at__gte=started) | Q(finished_at__gte=started))
        moved = set(recent.values_list("node_id", flat=True))
        states = {pk: s for pk, s in states.items() if pk not in moved}
    pks = list(states)
    existing = {}
    for i in range(0, len(pks), 5000):
        existing.update((r.node_id, r) for r in NodeSync.objects.filter(node_id__in=pks[i : i + 5000]))
    names = list(State.__dataclass_fields__)
    untouched, refreshed, changes = [], [], {}
    for pk, state in states.items():
        row = existing.get(pk)
        if row is None or row.status != state.status:
            changes[pk] = (row.status if row is not None else "", state)
        elif all(getattr(row, name) == getattr(state, name) for name in names):
            untouched.append(pk)
        else:
            for name in names:
                setattr(row, name, getattr(state, name))
            row.checked_at = now
            refreshed.append(row)
    for i in range(0, len(untouched), 5000):
        NodeSync.objects.filter(node_id__in=untouched[i : i + 5000]).update(checked_at=now)
    for i in range(0, len(refreshed), _CHUNK):
        with transaction.atomic():  # the same status with other paths: rewritten, keeping since
            chunk = refreshed[i : i + _CHUNK]
            NodeSync.objects.filter(node_id__in=[r.node_id for r in chunk]).delete()
            NodeSync.objects.bulk_create(chunk)
    changed = list(changes.items())
    for i in range(0, len(changed), _CHUNK):
        chunk = changed[i : i + _CHUNK]
        try:
            _record_changes(chunk, now=now, user=user)
        except IntegrityError:
            if started is None:
                raise
            # Another refresh wrote some of these rows first: judge them again against what it wrote.
            again = record_states({pk: state for pk, (_, state) in chunk}, user=user)
            for pk, (before, _) in again.items():
                changes[pk] = (before, states[pk])
            for pk, _ in chunk:
                if pk not in again:
                    changes.pop(pk, None)
    return {pk: (before, state.status) for pk, (before, state) in changes.items()}


def _record_changes(changed: list, *, now, user) -> None:
    """One transaction: the rows of these changed nodes and, for each, its events."""
    names = dict(Node.objects.filter(pk__in=[pk for pk, _ in changed]).values_list("pk", "name"))
    changed = [c for c in changed if c[0] in names]  # a node deleted meanwhile took its row with it
    actor = {"user": user} if user is not None else {"actor_kind": "system"}
    with transaction.atomic():
        # Rewritten, not updated: Django's bulk_update builds a CASE per field per row (15 s for 2,000 rows here).
        rows = [
            NodeSync(node_id=pk, since=now, checked_at=now, **dataclasses.asdict(state)) for pk, (_, state) in changed
        ]
        NodeSync.objects.filter(node_id__in=[pk for pk, _ in changed]).delete()
        NodeSync.objects.bulk_create(rows)
        for pk, (before, state) in changed:
            node = Node(pk=pk, name=names[pk])
            details = {"before": before or None, "after": state.status, **dataclasses.asdict(state)}
            record("node.sync_changed", obj=node, details=details, **actor)
            if state.status == Status.DRIFTED:
                record(
                    "node.drifted",
                    obj=node,
                    outcome="failure",
                    details={
                        "expected_system": state.deployed_system,  # what the panel deployed last
                        "actual_system": state.current_system,
                        "branch_head": state.commit_sha,
                        "branch_head_system": state.expected_system,
                    },
                    **actor,
                )


def refresh(nodes: Iterable[Node] | None = None, *, user=None, reader: Reader = read_current_systems) -> dict:
    """Refresh the sync status of ``nodes`` (default: every node).  Returns counts for logs and benches."""
    started = timezone.now()
    queryset = Node.objects.all() if nodes is None else Node.objects.filter(pk__in=[n.pk for n in nodes])
    busy = Deployment.objects.filter(status__in=Deployment.ACTIVE).values("node_id")
    todo = list(_with_deployed(queryset.exclude(pk__in=busy)).select_related("repository", "credential"))
    readings = reader([n for n in todo if n.host_key])
    states = compute_states(todo, readings)
    changes = record_states(states, user=user, started=started)
    return {"nodes": len(todo), "changed": len(changes), "skipped_busy": queryset.count() - len(todo)}


def refresh_fleet() -> dict:
    """The scheduled job: every node."""
    return refresh()


def refresh_node(node: Node, *, user) -> NodeSync | None:
    """The node page's button (the caller asked the gate): this node now; None if it is being deployed."""
    refresh([node], user=user)
    return NodeSync.objects.filter(node=node).first()
