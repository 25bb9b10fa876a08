"""Rollouts: one action at one revision over many nodes, a few at a time, with canaries and a failure policy.

    (request) ──> running ──(a canary did not succeed | max_failures reached)──> stopping ──┐
                     │  └──────────────(cancel)──────────────> cancelling ──┐               │
                     │                                                      │ (its last running node ends)
                     └──(its last node ends)──> succeeded | failed         cancelled       failed

Each node's run is an ordinary ``Deployment`` (own log, audit events, the node's
one-active lock), written ``queued`` at request time with a ``rollout_position``
(canaries first); a node busy with another deployment is written ``cancelled``
with the reason and never runs (``lifecycle.queue_in_rollout``).  Holding the
queued rows from the start reserves the nodes: nothing else is deployed to them
while the rollout waits for a slot.

``advance_rollout`` hands positions to the worker.  It runs after the request,
whenever one of the rollout's deployments ends (``lifecycle`` calls
``node_ended`` after commit), and every minute as a safety net; any number of
copies may run at once.  What it hands out is the task ``run_node``: it runs its
node's deployment and then, while the rollout has a free slot, takes the next
position itself and runs it in the same worker (``advance_rollout(keep=n)``),
instead of a trip through the broker and a new task per node: a slot freed by
one node is taken by the next within milliseconds.  One task carries up to
``ROLLOUT_THREADS`` positions and runs each in its own thread (``_Slots``), so
one worker process, not one per node, runs that many nodes at once.  Positions are handed out by a compare-and-swap on
``Rollout.dispatched`` (``UPDATE … SET dispatched=d+k WHERE dispatched=d AND
status='running'``): ``k`` is the free slots counted *before* the swap, and a
slot can only free up in between (starting takes a swap), so parallelism is
never exceeded and no position is handed out twice; the worker's own claim
(``lifecycle.claim``) makes a second delivery harmless anyway.

The rollout's status changes live here, each as in ``lifecycle``: a conditional
UPDATE from the expected status, its audit event in the same transaction; the
rollout page polls, so there is nothing to notify.  Deployment statuses are
written only by ``lifecycle``.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from . import lifecycle, logstream, repos
from .access import gate
from .audit.writer import record
from .errors import RequestError
from .models import Deployment, Node, Rollout
from .validators import validate_node_name, validate_revision, validate_tag

log = logging.getLogger(__name__)
Status = Rollout.Status
DStatus = Deployment.Status

DEFAULT_PARALLELISM = 10
MAX_PARALLELISM = 500
MAX_TAGS = 50
MAX_NODES = 10_000
# A node's count bucket on the rollout page: what did not succeed and was not cancelled is a failure.
FAILURES = (DStatus.FAILED, DStatus.ERROR, DStatus.INTERRUPTED, DStatus.UNHEALTHY, DStatus.ROLLED_BACK)
BUCKETS = {
    DStatus.QUEUED: "queued",
    DStatus.RUNNING: "running",
    DStatus.SUCCEEDED: "succeeded",
    DStatus.FAILED: "failed",
    DStatus.ERROR: "failed",
    DStatus.INTERRUPTED: "failed",
    DStatus.UNHEALTHY: "failed",  # activated, but a health check failed
    DStatus.ROLLED_BACK: "failed",  # the node went back: the rollout's revision is not what it runs
    DStatus.CANCELLED: "cancelled",
}
COUNT_NAMES = ("queued", "running", "succeeded", "failed", "cancelled")
# Lines of a failed node's log shown inline on the rollout page.
TAIL_LINES = 20

# Set while this thread advances a rollout: the cancels it makes must not advance it again from inside.
_advancing: contextvars.ContextVar[int | None] = contextvars.ContextVar("advancing_rollout", default=None)
# Set while ``run_node`` runs one of the rollout's deployments: when it ends, ``run_node`` advances (and
# takes the next node itself), so ``node_ended`` leaves it be.
_in_slot: contextvars.ContextVar[int | None] = contextvars.ContextVar("rollout_slot", default=None)
# Time left in a run_node task before it takes another node: the most that node may run, and this margin.
CHAIN_MARGIN = 300


@dataclass
class Options:
    """What a rollout request asks, as typed (``validate`` checks it against the selected nodes)."""

    action: str = "switch"
    revision: str = ""
    tags: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    all_nodes: bool = False
    confirm_all: bool = False
    parallelism: int = DEFAULT_PARALLELISM
    max_failures: int | None = None
    canary: int = 0
    canary_tag: str = ""
    timeout: int | None = None
    node_timeouts: dict[str, int] = field(default_factory=dict)

    def check_shape(self) -> None:
        """Everything that can be judged without the database; RequestError says what is wrong."""
        if self.action not in Deployment.Action.values:
            raise RequestError(f"Unknown action {self.action!r}: use one of {', '.join(Deployment.Action.values)}.")
        try:
            if self.revision:
                validate_revision(self.revision)
            for tag in [*self.tags, *([self.canary_tag] if self.canary_tag else [])]:
                validate_tag(tag)
            for name in [*self.nodes, *self.node_timeouts]:
                validate_node_name(name)
        except ValidationError as exc:
            raise RequestError(exc.messages[0]) from None
        if len(self.tags) > MAX_TAGS or len(self.nodes) > MAX_NODES:
            raise RequestError(f"Name at most {MAX_TAGS} tags and {MAX_NODES} nodes.")
        if self.all_nodes and (self.tags or self.nodes):
            raise RequestError("Choose nodes by tags and names, or all nodes, not both.")
        if not (self.all_nodes or self.tags or self.nodes):
            raise RequestError("Choose the nodes: tags, node names, or all nodes.")
        if not 1 <= self.parallelism <= MAX_PARALLELISM:
            raise RequestError(f"Parallelism must be between 1 and {MAX_PARALLELISM}.")
        if self.max_failures is not None and self.max_failures < 1:
            raise RequestError("The failure limit must be at least 1 (leave it out to continue whatever fails).")
        if self.canary < 0:
            raise RequestError("The canary count cannot be negative.")
        if self.canary and self.canary_tag:
            raise RequestError("Name canaries by count or by tag, not both.")
        for name, seconds in [("timeout", self.timeout), *self.node_timeouts.items()]:
            if seconds is not None and not 1 <= seconds <= settings.DEPLOY_TIMEOUT:
                raise RequestError(
                    f"{'The timeout' if name == 'timeout' else f'The timeout of {name}'} must be between 1 and "
                    f"{settings.DEPLOY_TIMEOUT} seconds (PANEL_DEPLOY_TIMEOUT)."
                )

    def selection(self) -> dict:
        return {"tags": sorted(self.tags), "nodes": sorted(self.nodes), "all": self.all_nodes}


def _selected(user, options: Options) -> QuerySet[Node]:
    """The nodes the options name, among those ``user`` may see (the whole inventory for the system)."""
    seen = gate.visible_nodes(user) if user is not None else Node.objects.all()
    if options.all_nodes:
        return gate.nodes_for(user, gate.DEPLOY) if user is not None else Node.objects.all()
    q = Q()
    if options.tags:
        q |= Q(pk__in=Node.tags.through.objects.filter(tag__name__in=options.tags).values("node_id"))
    if options.nodes:
        names = set(options.nodes)
        found = set(seen.filter(name__in=names).values_list("name", flat=True))
        unknown = sorted(names - found)
        if unknown:
            raise RequestError(f"No node named {', '.join(unknown[:10])}{', …' if len(unknown) > 10 else ''}.")
        q |= Q(name__in=names)
    return seen.filter(q)


def request_rollout(options: Options, *, user=None, trigger: str = Deployment.Trigger.WEB, approval=None) -> Rollout:
    """Write a rollout of ``options`` and its node deployments in one transaction, then start it.

    The gate decides first: whoever may deploy nowhere is refused before anything is read, and a
    selection naming one node ``user`` may not deploy is refused whole (403, one ``rollout.requested``
    event with outcome denied), before anything starts.  Then RequestError for bad options, an empty
    selection, an unconfirmed "all", unpinned host keys or a revision a repository lacks.
    ``user=None`` is the command line itself (or the GitOps auto-deploy, trigger ``gitops``).
    A selection touching a protected node is held as an approval request (``AwaitingApproval``,
    nothing written here); ``approval`` is that request once approved: its pinned commits are deployed.
    """
    actor_kind = "cli" if trigger == Deployment.Trigger.CLI else None
    gate.require_somewhere(user, gate.DEPLOY, event="rollout.requested", actor_kind=actor_kind)
    options.check_shape()
    selected = _selected(user, options)
    gate.require_every(user, gate.DEPLOY, selected, event="rollout.requested", actor_kind=actor_kind)
    nodes = list(selected.select_related("repository").prefetch_related("tags").order_by("name"))
    if not nodes:
        raise RequestError("No node matches this selection.")
    if options.all_nodes and not options.confirm_all:
        raise RequestError(
            f"A rollout to all {len(nodes)} nodes you may deploy needs an explicit confirmation "
            "(confirm_all, or --yes-all on the command line)."
        )
    names = {n.name for n in nodes}
    stray = sorted(set(options.node_timeouts) - names)
    if stray:
        raise RequestError(f"Timeouts for nodes outside the rollout: {', '.join(stray[:10])}.")
    unpinned = [n.name for n in nodes if not n.host_key]
    if unpinned:
        raise RequestError(
            f"No pinned host key on {', '.join(unpinned[:10])}{', …' if len(unpinned) > 10 else ''}: "
            "pin them first or leave them out."
        )
    # A bastion on the way without a pinned key would fail every node behind it: said now, by name.
    bastions = sorted({hop.name for n in nodes if n.jump_host_id for hop in n.jump_path() if not hop.host_key})
    if bastions:
        raise RequestError(
            f"No pinned host key on jump host {', '.join(bastions[:10])}{', …' if len(bastions) > 10 else ''}: "
            "pin it first, or leave out the nodes behind it."
        )
    if options.canary_tag:
        canaries = [n for n in nodes if any(t.name == options.canary_tag for t in n.tags.all())]
        if not canaries:
            raise RequestError(f"No node of this rollout carries the canary tag {options.canary_tag!r}.")
        if len(canaries) == len(nodes):
            raise RequestError(f"Every node of this rollout carries the canary tag {options.canary_tag!r}.")
    else:
        if options.canary >= len(nodes):
            raise RequestError(f"{options.canary} canaries leave none of the {len(nodes)} nodes to follow them.")
        canaries = nodes[: options.canary]
    # Imported here: the GitOps app builds on this module, not the other way round.
    from .gitops import approvals

    commits = {}
    for repository in {n.repository_id: n.repository for n in nodes}.values():
        if approval is not None:
            commits[repository.name] = approvals.pinned_commit(approval, repository)
            continue
        try:
            commits[repository.name] = repos.resolve(repository, options.revision)
        except repos.RepositoryError as exc:
            raise RequestError(f"{repository.name}: {exc}") from None
    if approval is None:
        approvals.hold_rollout(options, nodes, commits=commits, user=user, trigger=trigger)
    canary_ids = {n.pk for n in canaries}
    ordered = canaries + [n for n in nodes if n.pk not in canary_ids]
    acting = user if user is not None and user.is_authenticated else None

    with transaction.atomic():
        rollout = Rollout.objects.create(
            action=options.action,
            requested_revision=options.revision,
            commits=commits,
            selection=options.selection(),
            node_count=len(nodes),
            parallelism=options.parallelism,
            max_failures=options.max_failures,
            canary_tag=options.canary_tag,
            timeout_seconds=options.timeout,
            requested_by=acting,
            requested_by_name=acting.get_username() if acting else trigger,
            trigger=trigger,
        )
        record(
            "rollout.requested",
            user=user,
            actor_kind=actor_kind,
            obj=rollout,
            details={
                "action": rollout.action,
                "revision": rollout.requested_revision,
                "commits": commits,
                "selection": rollout.selection,
                "nodes": len(nodes),
                "parallelism": rollout.parallelism,
                "max_failures": rollout.max_failures,
                "canaries": [n.name for n in canaries],
                "timeout_seconds": rollout.timeout_seconds,
                "trigger": trigger,
            },
        )
        timeouts = {n.pk: options.node_timeouts.get(n.name, options.timeout) for n in ordered}
        written = lifecycle.queue_in_rollout(rollout, ordered, timeouts=timeouts, user=user, actor_kind=actor_kind)
        canary_count = sum(1 for d in written if d.status == DStatus.QUEUED and d.node_id in canary_ids)
        if canaries and not canary_count:
            # Every canary was busy: a rollout asked to prove itself first must not go on without it.
            raise RequestError("Every canary node is busy with another deployment: try again when they are free.")
        Rollout.objects.filter(pk=rollout.pk).update(canary_count=canary_count)
        rollout.canary_count = canary_count
        transaction.on_commit(lambda: node_ended(rollout.pk))
    return rollout


def cancel_rollout(rollout: Rollout, *, user=None, actor_kind: str | None = None) -> Rollout:
    """Stop ``rollout``: its queued nodes never start, its running ones are cancelled (the worker kills
    the remote process tree).  Needs DEPLOY on every node of it (403, audited ``rollout.cancel``).
    RequestError if it has already finished; a second cancel changes nothing."""
    gate.require_every(user, gate.DEPLOY, gate.rollout_nodes(rollout), event="rollout.cancel", actor_kind=actor_kind)
    who = user.get_username() if user is not None and user.is_authenticated else (actor_kind or "system")
    changed = _transition(
        rollout,
        expect=(Status.RUNNING, Status.STOPPING),
        to=Status.CANCELLING,
        event="rollout.cancelled",
        reason=f"cancelled by {who}",
        user=user,
        actor_kind=actor_kind,
    )
    rollout.refresh_from_db()
    if not changed and rollout.status in Rollout.TERMINAL:
        raise RequestError(f"Rollout #{rollout.pk} has already finished: {rollout.status}.")
    advance_rollout(rollout.pk)
    rollout.refresh_from_db()
    return rollout


def node_ended(rollout_id: int) -> None:
    """One of the rollout's deployments ended (or it was just requested): advance it now, in this process.

    Inside ``advance_rollout`` itself (its own cancels end deployments) this does nothing: the
    running advance counts again.  Should advancing fail here, the queue retries it in a worker.
    """
    if rollout_id in (_advancing.get(), _in_slot.get()):
        return
    try:
        advance_rollout(rollout_id)
    except Exception:  # noqa: BLE001 - the rollout must not stall because this process could not advance it
        log.exception("advancing rollout %s failed here; queued for a worker", rollout_id)
        from django_q.tasks import async_task

        async_task("deployments.rollouts.advance_rollout", rollout_id, task_name=f"rollout-{rollout_id}")


@dataclass
class Tally:
    """A rollout's deployments counted in one query."""

    active: int = 0  # queued or running
    inflight: int = 0  # handed to the worker (position < dispatched) and still active
    failures: int = 0
    succeeded: int = 0
    positions: int = 0  # deployments that may run (the busy ones have no position)
    canary_done: int = 0
    canary_ok: int = 0
    total: int = 0


def _tally(rollout: Rollout) -> Tally:
    """Count the rollout's deployments (at every node's end: one plain grouped query, built once).

    The ORM's eight filtered ``Count`` aggregates cost more to compile than to run, and a rollout of
    50 nodes tallies after every node, in the worker, beside the running nodes' SSH sessions.
    """
    with connection.cursor() as cursor:
        cursor.execute(_TALLY_SQL, [rollout.dispatched, rollout.canary_count, rollout.pk])
        rows = cursor.fetchall()
    tally = Tally()
    for status, has_position, inflight_place, canary_place, n in rows:
        active = status in Deployment.ACTIVE
        tally.total += n
        tally.active += n if active else 0
        tally.inflight += n if active and inflight_place else 0
        tally.failures += n if status in FAILURES else 0
        tally.succeeded += n if status == DStatus.SUCCEEDED else 0
        tally.positions += n if has_position else 0
        tally.canary_done += n if canary_place and status in Deployment.TERMINAL else 0
        tally.canary_ok += n if canary_place and status == DStatus.SUCCEEDED else 0
    return tally


_TALLY_SQL = (
    "SELECT status, rollout_position IS NOT NULL, "
    "CASE WHEN rollout_position < %s THEN 1 ELSE 0 END, CASE WHEN rollout_position < %s THEN 1 ELSE 0 END, COUNT(*) "
    f"FROM {Deployment._meta.db_table} WHERE rollout_id = %s GROUP BY 1, 2, 3, 4"
)


def counts(deployments: QuerySet[Deployment]) -> dict[str, int]:
    """queued / running / succeeded / failed / cancelled among ``deployments`` (one query)."""
    out = dict.fromkeys(COUNT_NAMES, 0)
    for status, n in deployments.order_by().values_list("status").annotate(n=Count("id")):
        out[BUCKETS[status]] += n
    return out


def _transition(
    rollout: Rollout,
    *,
    expect: tuple[str, ...],
    to: str,
    event: str,
    reason: str = "",
    user=None,
    actor_kind: str | None = None,
    outcome: str = "success",
    fields: dict | None = None,
    where: dict | None = None,
) -> bool:
    """UPDATE the rollout to ``to`` if its status is still one of ``expect`` (and ``where`` holds); if it
    was, record ``event`` with the counts of its nodes."""
    set_fields = {"status": to, **(fields or {})}
    if reason:
        set_fields["stop_reason"] = reason
    if to in Rollout.TERMINAL:
        set_fields["finished_at"] = timezone.now()
    with transaction.atomic():
        if not Rollout.objects.filter(pk=rollout.pk, status__in=expect, **(where or {})).update(**set_fields):
            return False
        record(
            event,
            user=user,
            actor_kind=None if user else (actor_kind or "system"),
            obj=rollout,
            outcome=outcome,
            details={
                "status": to,
                **({"reason": reason} if reason else {}),
                "counts": counts(Deployment.objects.filter(rollout_id=rollout.pk)),
            },
        )
    return True


def advance_rollout(rollout_id: int, *, keep: int = 0) -> str | list[int]:
    """Start the rollout's next nodes up to its parallelism, pass or fail its canaries, apply its failure
    policy, and finish it when its last node has ended.  Idempotent; safe to run in many places at once.

    Returns the rollout's status (the django-q2 task's result); with ``keep`` (a number), the deployment ids
    of at most that many started nodes that the caller runs itself instead of handing them out.
    """
    token = _advancing.set(rollout_id)
    try:
        status, kept = _advance(rollout_id, int(keep))
        return kept if keep else status
    finally:
        _advancing.reset(token)


def _advance(rollout_id: int, keep: int) -> tuple[str, list[int]]:
    kept: list[int] = []
    opened = False  # slots opened by this call (canaries passed), not only freed by nodes that ended
    while True:
        rollout = Rollout.objects.filter(pk=rollout_id).first()
        if rollout is None:
            return "gone", kept
        if rollout.status in Rollout.TERMINAL:
            return rollout.status, kept
        tally = _tally(rollout)
        if rollout.status == Status.RUNNING:
            in_canary = rollout.canary_count and rollout.canary_passed_at is None
            if in_canary and tally.canary_done >= rollout.canary_count:
                if tally.canary_ok == rollout.canary_count:
                    _transition(
                        rollout,
                        expect=(Status.RUNNING,),
                        to=Status.RUNNING,
                        event="rollout.canary_passed",
                        fields={"canary_passed_at": timezone.now()},
                        where={"canary_passed_at__isnull": True},
                    )
                    opened = True
                else:
                    bad = rollout.canary_count - tally.canary_ok
                    _transition(
                        rollout,
                        expect=(Status.RUNNING,),
                        to=Status.STOPPING,
                        event="rollout.canary_failed",
                        outcome="failure",
                        reason=f"canary failed: {bad} of {rollout.canary_count} canary node"
                        f"{'s' if rollout.canary_count != 1 else ''} did not succeed; the rest never started",
                    )
                continue
            if rollout.max_failures and tally.failures >= rollout.max_failures:
                _transition(
                    rollout,
                    expect=(Status.RUNNING,),
                    to=Status.STOPPING,
                    event="rollout.stopped_by_policy",
                    outcome="failure",
                    reason=f"stopped after {tally.failures} failed node{'s' if tally.failures != 1 else ''} "
                    f"(limit {rollout.max_failures}); no further node started",
                )
                continue
            limit = rollout.canary_count if in_canary else tally.positions
            start = min(rollout.parallelism - tally.inflight, limit - rollout.dispatched)
            if keep and not opened:
                # A slot freed by a node that ended is taken by that node's own thread when it advances: a
                # running task takes no more than it can run, or the rest would wait in the broker behind it.
                start = min(start, keep - len(kept))
            if start > 0:
                first, last = rollout.dispatched, rollout.dispatched + start
                if Rollout.objects.filter(pk=rollout.pk, status=Status.RUNNING, dispatched=first).update(
                    dispatched=last
                ):
                    started = list(
                        Deployment.objects.filter(
                            rollout_id=rollout.pk,
                            rollout_position__gte=first,
                            rollout_position__lt=last,
                            status=DStatus.QUEUED,
                        ).values_list("pk", flat=True)
                    )
                    take = max(0, keep - len(kept))
                    kept += started[:take]
                    hand_out_all(started[take:])
                    if len(started) == start:
                        return rollout.status, kept  # every slot taken: nothing more to do now
                # Count again: another copy moved first, or some of these had ended (cancelled) already.
                continue
        else:
            # Stopping or cancelling: what has not started never will; running nodes end on their own
            # (stopping) or are cancelled (cancelling).
            _stop_nodes(rollout)
            tally = _tally(rollout)
        if tally.active == 0:
            _finish(rollout, tally)
            continue
        return rollout.status, kept


def hand_out(*deployment_ids: int) -> None:
    """Give started nodes to django-q2 as one ``run_node`` task (only the ids; each runs in its own thread of
    the worker), allowed to run on to further nodes of its rollout (``chain_timeout``)."""
    from django_q.tasks import async_task

    async_task(
        "deployments.rollouts.run_node",
        *deployment_ids,
        task_name=f"deployment-{deployment_ids[0]}",
        ack_failure=True,
        timeout=chain_timeout(),
    )


def hand_out_all(deployment_ids: list[int]) -> None:
    """Hand started nodes out, ``ROLLOUT_THREADS`` to a task: one worker process runs that many at once."""
    size = settings.ROLLOUT_THREADS
    for i in range(0, len(deployment_ids), size):
        hand_out(*deployment_ids[i : i + size])


def chain_timeout() -> int:
    """How long a ``run_node`` task may run: two deployments at the panel's ceiling."""
    return 2 * settings.DEPLOY_TIMEOUT


class _Slots:
    """The threads of one ``run_node`` task: at most ``ROLLOUT_THREADS`` running, each a chain of nodes."""

    def __init__(self, started: float):
        self.started = started
        self.lock = threading.Lock()
        self.live = 0  # threads running or reserved
        self.threads: list[threading.Thread] = []
        self.results: dict[int, str] = {}
        self.errors: list[BaseException] = []

    def start(self, deployment_id: int, rollout_id: int | None, *, reserved: bool = False) -> None:
        if not reserved:
            with self.lock:
                self.live += 1
        t = threading.Thread(
            target=self.chain, args=(deployment_id, rollout_id), name=f"rollout-node-{deployment_id}", daemon=True
        )
        self.threads.append(t)
        t.start()

    def join(self) -> None:
        # A thread appends the threads it starts before it ends: once the list is empty, all have ended.
        while self.threads:
            self.threads.pop().join()

    def chain(self, deployment_id: int, rollout_id: int | None, *, own_thread: bool = True) -> None:
        """Run this node, then, while the rollout has a free slot and the task has time left for another
        node's timeout, the next one; when more slots are free than this thread can take, start threads for
        them up to ``ROLLOUT_THREADS``, and hand out the rest."""
        from django.db import connection

        from . import tasks

        token = _in_slot.set(rollout_id)
        next_id: int | None = deployment_id
        try:
            while next_id is not None:
                self.results[next_id] = tasks.run_deployment(next_id)
                next_id = None
                if rollout_id is None:
                    break
                with self.lock:  # reserve the spare threads before taking positions for them
                    spare = max(0, settings.ROLLOUT_THREADS - self.live)
                    self.live += spare
                try:
                    kept = advance_rollout(rollout_id, keep=1 + spare)
                    elapsed = time.monotonic() - self.started
                    runnable = [pk for pk in kept if _time_for(pk, elapsed)]
                    hand_out_all([pk for pk in kept if pk not in runnable])
                    if runnable:
                        next_id = runnable[0]
                    for pk in runnable[1:]:
                        self.start(pk, rollout_id, reserved=True)
                        spare -= 1
                finally:
                    with self.lock:
                        self.live -= spare  # reserved and not used
        except BaseException as exc:  # noqa: BLE001 - re-raised by the task once every thread has ended
            self.errors.append(exc)
        finally:
            _in_slot.reset(token)
            with self.lock:
                self.live -= 1
            if rollout_id is not None and next_id is not None:
                node_ended(rollout_id)  # an error between nodes: the kept one is handed out again later
            if own_thread:
                connection.close()  # this thread's own database connection


def run_node(*deployment_ids: int) -> str:
    """The task a rollout hands out: each node's deployment (``tasks.run_deployment``) in its own thread of
    this worker process, each thread then running on to the rollout's next free position while the task has
    time left for another node's timeout (``_Slots.chain``).  Returns the first node's status.

    If anything goes wrong between nodes, the rollout is advanced the ordinary way (its next nodes are
    handed out), so a broken task never stalls it.
    """
    slots = _Slots(time.monotonic())
    rollouts_of = dict(Deployment.objects.filter(pk__in=deployment_ids).values_list("pk", "rollout_id"))
    if not deployment_ids:
        return "skipped"
    for pk in deployment_ids[1:]:
        slots.start(pk, rollouts_of.get(pk))
    with slots.lock:
        slots.live += 1
    slots.chain(deployment_ids[0], rollouts_of.get(deployment_ids[0]), own_thread=False)  # in the task's thread
    slots.join()
    if slots.errors:
        raise slots.errors[0]
    return slots.results.get(deployment_ids[0], "skipped")


def _time_for(deployment_id: int, elapsed: float) -> bool:
    own = Deployment.objects.filter(pk=deployment_id).values_list("timeout_seconds", flat=True).first()
    most = min(own or settings.DEPLOY_TIMEOUT, settings.DEPLOY_TIMEOUT)
    return elapsed + most + CHAIN_MARGIN <= chain_timeout()


def _stop_nodes(rollout: Rollout) -> None:
    statuses = (DStatus.QUEUED, DStatus.RUNNING) if rollout.status == Status.CANCELLING else (DStatus.QUEUED,)
    reason = f"not started: rollout #{rollout.pk} {rollout.stop_reason}"
    for d in Deployment.objects.filter(rollout_id=rollout.pk, status__in=statuses).select_related("node"):
        if d.status == DStatus.RUNNING and d.cancel_requested:
            continue
        try:
            lifecycle.cancel_deployment(d, reason=reason)
        except RequestError:
            pass  # it ended meanwhile


def _finish(rollout: Rollout, tally: Tally) -> None:
    if rollout.status == Status.CANCELLING:
        to = Status.CANCELLED
    elif tally.succeeded == tally.total and rollout.status == Status.RUNNING:
        to = Status.SUCCEEDED
    else:
        to = Status.FAILED
    _transition(
        rollout,
        expect=(rollout.status,),
        to=to,
        event="rollout.finished",
        outcome="success" if to == Status.SUCCEEDED else "failure",
    )


def advance_active_rollouts() -> int:
    """Advance every unfinished rollout (a schedule, every minute): a rollout whose trigger was lost —
    its process died between a node's end and the advance — still goes on.  A node handed out but still
    queued while nothing of its rollout has started for ``ROLLOUT_REHAND_AFTER`` seconds and the broker holds no
    waiting task (its task or worker was lost) is handed out again: the worker's claim makes a second
    delivery harmless.  Returns how many rollouts it advanced."""
    ids = list(Rollout.objects.filter(status__in=Rollout.ACTIVE).values_list("pk", flat=True))
    quiet = timezone.now() - timedelta(seconds=settings.ROLLOUT_REHAND_AFTER)
    for pk in ids:
        advance_rollout(pk)
        rollout = Rollout.objects.get(pk=pk)
        waiting = Deployment.objects.filter(
            rollout_id=pk, status=DStatus.QUEUED, rollout_position__lt=rollout.dispatched
        )
        latest = Deployment.objects.filter(rollout_id=pk, started_at__isnull=False).order_by("-started_at")
        last_start = latest.values_list("started_at", flat=True).first() or rollout.created_at
        if rollout.status == Status.RUNNING and last_start < quiet and waiting.exists() and _queue_empty():
            hand_out_all(list(waiting.values_list("pk", flat=True)))
    return len(ids)


def _queue_empty() -> bool:
    """True when the broker holds no task waiting for a worker (then a handed-out node still queued was lost;
    otherwise it is only waiting for a free worker).  False when the broker cannot tell."""
    try:
        from django_q.brokers import get_broker

        return not get_broker().queue_size()
    except Exception:  # noqa: BLE001 - a broker that does not answer: hand nothing out twice
        return False


# --- what pages, the API and the command line show ------------------------------------------------


def node_rows(deployments: QuerySet[Deployment], *, tails: bool = True) -> list[dict]:
    """One row per node: status, exit code, times, duration; a failed node's last lines (``tails``)."""
    now = timezone.now()
    rows = []
    shown = list(deployments.select_related("node").order_by("rollout_position", "node__name"))
    failed = {d.pk: d.line_count for d in shown if BUCKETS[d.status] == "failed"} if tails else {}
    last = logstream.last_lines_of(failed, TAIL_LINES)
    for d in shown:
        rows.append(
            {
                "deployment": d.pk,
                "node": d.node.name,
                "position": d.rollout_position,
                "status": d.status,
                "status_label": d.get_status_display(),
                "bucket": BUCKETS[d.status],
                "exit_code": d.exit_code,
                "commit_sha": d.commit_sha,
                "started_at": d.started_at.isoformat() if d.started_at else None,
                "finished_at": d.finished_at.isoformat() if d.finished_at else None,
                "duration_seconds": round(((d.finished_at or now) - d.started_at).total_seconds(), 1)
                if d.started_at
                else None,
                "timeout_seconds": d.timeout_seconds,
                "error_message": d.error_message[:500],
                "cancel_requested": d.cancel_requested,
                "line_count": d.line_count,
                "url": d.get_absolute_url(),
                "tail": last.get(d.pk),
            }
        )
    return rows


def payload(rollout: Rollout, deployments: QuerySet[Deployment], *, tails: bool = True) -> dict:
    """The rollout as JSON-able values, with the rows and counts of ``deployments`` (those the viewer sees)."""
    return {
        "id": rollout.pk,
        "status": rollout.status,
        "status_label": rollout.get_status_display(),
        "terminal": rollout.status in Rollout.TERMINAL,
        "action": rollout.action,
        "requested_revision": rollout.requested_revision,
        "commits": rollout.commits,
        "selection": rollout.selection,
        "node_count": rollout.node_count,
        "parallelism": rollout.parallelism,
        "max_failures": rollout.max_failures,
        "canary_count": rollout.canary_count,
        "canary_tag": rollout.canary_tag,
        "canary_passed_at": rollout.canary_passed_at.isoformat() if rollout.canary_passed_at else None,
        "timeout_seconds": rollout.timeout_seconds,
        "stop_reason": rollout.stop_reason,
        "requested_by": rollout.requested_by_name,
        "created_at": rollout.created_at.isoformat(),
        "finished_at": rollout.finished_at.isoformat() if rollout.finished_at else None,
        "counts": counts(deployments),
        "nodes": node_rows(deployments, tails=tails),
        "url": rollout.get_absolute_url(),
    }
