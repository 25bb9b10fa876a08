"""A node's system generations as the node has them: read on demand over SSH, the last read kept, and
which panel deployment (and so which commit) made each.

Reading is never part of rendering a page: the node page shows the last read (``NodeGenerations``) with
its time, and a person asks for a new one (``read_node_generations``, a POST), which connects with the
pinned host key and runs one command (``remote.generations.list_script``).  Seeing a node is enough
(VIEW): the read changes nothing on the node.  Each read is audited (``node.generations_read``): it is a
login to the node with the panel's credential on someone's behalf.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import transaction
from django.utils import timezone

from .access import gate
from .audit.writer import record
from .models import Deployment, Node, NodeGenerations
from .remote import RemoteError
from .remote.generations import Generation, Generations, read_generations

Status = Deployment.Status


def read_node_generations(node: Node, *, user=None, actor_kind: str | None = None, reader=None) -> NodeGenerations:
    """Read ``node``'s generations now and keep them (or, if the read fails, keep why, beside the last good
    read).  The gate decides first (VIEW; a refusal is 403 and the event with outcome ``denied``).

    ``reader`` stands in for ``remote.generations.read_generations`` in tests.  Never raises for what the
    node does: an unreachable node, a changed host key or a refused login is the row's ``error``.
    """
    from .tasks import target_for  # tasks imports the models this module does

    gate.require(user, gate.VIEW, node, event="node.generations_read", actor_kind=actor_kind)
    node = Node.objects.select_related("credential").get(pk=node.pk)
    gens, error, kind = None, "", ""
    if not node.host_key:
        error = f"{node.name} has no pinned host key: the panel does not connect to it until one is pinned"
    else:
        try:
            gens = (reader or read_generations)(target_for(node))
        except RemoteError as exc:
            error, kind = exc.message, exc.kind
    acting = user if user is not None and user.is_authenticated else None
    now = timezone.now()
    with transaction.atomic():
        row, _ = NodeGenerations.objects.get_or_create(node=node)
        row.tried_at = now
        row.read_by_name = acting.get_username() if acting else (actor_kind or "system")
        row.error = error
        if gens is not None:
            row.data, row.read_at = gens.as_dict(), now
        row.save()
        details = {"error": error[:500]} if error else _summary(gens)
        record(
            "node.generations_read",
            user=user,
            actor_kind=None if acting else (actor_kind or "system"),
            obj=node,
            node=node,
            outcome="failure" if error else "success",
            details=details,
        )
        if kind == "host-key-mismatch":
            # As for a deployment: a changed key is an event of its own (someone may be in the middle).
            record(
                "hostkey.mismatch",
                actor_kind="system",
                obj=node,
                outcome="failure",
                details={"pinned": node.host_key_fingerprint, "error": error},
            )
    return row


def _summary(gens: Generations) -> dict:
    return {
        "generations": [g.number for g in gens.generations],
        "profile_generation": gens.profile_generation,
        "current_system": gens.current_system,
        "booted_system": gens.booted_system,
    }


def makers(node: Node, generations: list[Generation]) -> dict[int, tuple[Deployment, bool]]:
    """For each generation a panel deployment accounts for: (that deployment, whether it made exactly
    this generation).  One query.

    A generation is made by the node's succeeded rebuild whose system (``toplevel``) is the generation's
    store path and whose ``generation_after`` is its number; failing that, the first succeeded rebuild of
    that same system (same store path: same configuration, so the same commit's build) is named, not
    exact.  Rollbacks make no generation and are not counted.
    """
    paths = {g.path for g in generations if g.path}
    if not paths:
        return {}
    candidates = list(
        Deployment.objects.filter(
            node=node, kind=Deployment.Kind.REBUILD, status=Status.SUCCEEDED, toplevel__in=paths
        ).order_by("finished_at", "pk")
    )
    found = {}
    for g in generations:
        same = [d for d in candidates if d.toplevel == g.path]
        exact = next((d for d in same if d.generation_after == g.number), None)
        if exact is not None:
            found[g.number] = (exact, True)
        elif same:
            found[g.number] = (same[0], False)
    return found


def commit_of(node: Node, number: int, path: str = "") -> str:
    """The commit of the deployment that made generation ``number`` (holding ``path``, if known) on
    ``node``; '' when no panel deployment accounts for it."""
    if path:
        made = makers(node, [Generation(number, None, path)]).get(number)
        return made[0].commit_sha if made else ""
    d = (
        Deployment.objects.filter(
            node=node, kind=Deployment.Kind.REBUILD, status=Status.SUCCEEDED, generation_after=number
        )
        .exclude(toplevel="")
        .order_by("-finished_at", "-pk")
        .first()
    )
    return d.commit_sha if d else ""


@dataclass
class Row:
    """One generation as pages and the API show it."""

    generation: Generation
    deployment: Deployment | None
    exact: bool  # the deployment made this very generation (else: the same system)

    @property
    def created(self) -> datetime | None:
        g = self.generation
        return datetime.fromtimestamp(g.created_at, UTC) if g.created_at is not None else None

    def as_json(self) -> dict:
        g, d = self.generation, self.deployment
        return {
            "number": g.number,
            "created_at": self.created.isoformat() if self.created else None,
            "path": g.path,
            "default": g.default,
            "current": g.current,
            "booted": g.booted,
            "deployment": d.pk if d else None,
            "commit": d.commit_sha if d else "",
            "made_by_deployment": self.exact if d else False,
        }


@dataclass
class Shown:
    """The last read of a node's generations, ready to show (newest generation first)."""

    read: NodeGenerations | None
    generations: Generations | None
    rows: list[Row]

    def as_json(self) -> dict:
        r, g = self.read, self.generations
        return {
            "read_at": r.read_at.isoformat() if r and r.read_at else None,
            "tried_at": r.tried_at.isoformat() if r else None,
            "read_by": r.read_by_name if r else "",
            "error": r.error if r else "",
            "profile_generation": g.profile_generation if g else None,
            "current_system": g.current_system if g else "",
            "booted_system": g.booted_system if g else "",
            "generations": [row.as_json() for row in self.rows],
        }


def shown(node: Node) -> Shown:
    """What the node page and ``GET /api/nodes/<name>/generations/`` show: the last read and its makers."""
    read = NodeGenerations.objects.filter(node=node).first()
    if read is None or read.read_at is None:
        return Shown(read, None, [])
    gens = Generations.from_dict(read.data)
    made = makers(node, gens.generations)
    rows = [Row(g, *made.get(g.number, (None, False))) for g in reversed(gens.generations)]
    return Shown(read, gens, rows)
