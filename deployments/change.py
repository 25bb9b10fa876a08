"""Safe change: where a node's system is built, off-target builds brought to the node, diffs and their
confirmation.

* **Build location** (``effective_location``): the node's own setting, else the first of its tags (by
  name) that has one, else ``target`` (nixos-rebuild on the node, as always). ``panel`` builds with the
  panel host's Nix, ``host`` on a build host (another registered node, reached with its own credential
  and pinned host key). ``set_build_location`` changes it (node admins for a node, ``MANAGE_INVENTORY``
  for a tag; the build host needs DEPLOY of whoever chooses it), atomic and audited.
* **The run** (``runner_for``): a deployment of kind ``rebuild`` built on its target is today's
  ``run_rebuild``; anything else is a ``ChangeRun``: build where the node builds (once per
  (location, commit, attribute): ``BuiltSystem``, so a rollout's nodes wait for one build), copy the
  closure to the node (only the missing paths), then activate it (kind ``rebuild``), compare it with what
  the node runs (kind ``diff``: ``Deployment.diff`` and a ``deployment.diffed`` event), or activate a
  confirmed diff's system (kind ``activate``: no second evaluation).
* **Confirm** (``confirm_diff``): DEPLOY on the node, once, within ``DIFF_KEEP``: a new deployment of kind
  ``activate`` whose ``diff_of`` is the diff.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from .access import gate
from .audit.writer import record
from .errors import RequestError
from .models import BuildLocation, BuiltSystem, Deployment, Node, Tag
from .remote import Cancelled, RebuildResult, RemoteError, SystemState, Target
from .remote.build import STALE_ROOT_MINUTES, build_local, root_path, run_activate, run_build
from .remote.closure import LocalStore, RemoteStore, copy_closure, diff_closure, still_there
from .remote.connection import Connection
from .remote.stream import read_output
from .remote.system import parse_state, state_script

Kind = Deployment.Kind
# How long a diff's built system waits on the node for its confirmation (its GC root goes after that).
DIFF_KEEP = timedelta(minutes=STALE_ROOT_MINUTES)
# How often a node waiting for another deployment's build looks at it.
BUILD_WAIT_POLL = 0.2
# At most this many entries of each list of a diff go into its audit event (the deployment keeps all).
AUDIT_DIFF_ENTRIES = 100


@dataclass
class Location:
    """Where a node builds: ``kind`` (``BuildLocation``), the build host for ``host``, and why (``source``)."""

    kind: str
    host: Node | None
    source: str  # "node", "tag <name>" or "default"

    def describe(self) -> str:
        if self.kind == BuildLocation.HOST:
            return f"on build host {self.host.name}"
        return "on the panel host" if self.kind == BuildLocation.PANEL else "on the node"

    @property
    def key(self) -> str:
        """``BuiltSystem.location``: one build per (this, commit, attribute)."""
        return f"host:{self.host.pk}" if self.kind == BuildLocation.HOST else self.kind


def effective_location(node: Node) -> Location:
    """Where ``node`` builds: its own setting beats its tags' (the first by name that has one)."""
    if node.build_location:
        host = node.build_host if node.build_location == BuildLocation.HOST else None
        return Location(node.build_location, host, "node")
    tag = node.tags.exclude(build_location="").select_related("build_host").order_by("name").first()
    if tag is not None:
        return Location(
            tag.build_location, tag.build_host if tag.build_location == BuildLocation.HOST else None, f"tag {tag.name}"
        )
    return Location(BuildLocation.TARGET, None, "default")


def _describe_setting(obj) -> dict:
    return {"location": obj.build_location, "build_host": obj.build_host.name if obj.build_host_id else None}


def set_build_location(
    obj: Node | Tag, location: str, build_host: Node | None = None, *, user=None, actor_kind: str | None = None
) -> Node | Tag:
    """Set where ``obj`` (a node, or a tag's nodes by default) builds; "" on a node: its tags' default.

    The gate decides first: ADMIN on the node, or ``MANAGE_INVENTORY`` for a tag; then the build host
    must be deployable by ``user`` (``gate.require_build_host``), have a pinned host key and not be the
    node itself. Atomic, with a ``build_location.changed`` event holding before and after.
    """
    event = "build_location.changed"
    if isinstance(obj, Node):
        gate.require(user, gate.ADMIN, obj, event=event, actor_kind=actor_kind)
        allowed = ("", *BuildLocation.values)
    else:
        gate.require_global(user, gate.MANAGE_INVENTORY, event=event, obj=obj, object_type="tag", actor_kind=actor_kind)
        allowed = ("", *BuildLocation.values)
    if location not in allowed:
        raise RequestError(f"Unknown build location {location!r}: use one of {', '.join(BuildLocation.values)}.")
    if location == BuildLocation.HOST:
        if build_host is None:
            raise RequestError("Building on a build host needs the build host: choose one of the registered nodes.")
        gate.require_build_host(user, build_host, event=event, obj=obj, actor_kind=actor_kind)
        if isinstance(obj, Node) and build_host.pk == obj.pk:
            raise RequestError(f"{obj.name} cannot be its own build host: choose 'on the node itself' instead.")
        if not build_host.host_key:
            raise RequestError(f"Build host {build_host.name} has no pinned host key: scan and pin it first.")
    elif build_host is not None:
        raise RequestError("A build host is only used with the build location 'on a build host'.")
    with transaction.atomic():
        before = _describe_setting(type(obj).objects.select_related("build_host").get(pk=obj.pk))
        obj.build_location, obj.build_host = location, build_host
        obj.save(update_fields=["build_location", "build_host"])
        record(
            event,
            user=user,
            actor_kind=actor_kind,
            obj=obj,
            node=obj if isinstance(obj, Node) else None,
            details={"before": before, "after": _describe_setting(obj)},
        )
    return obj


# -- the run -----------------------------------------------------------------------------------


def runner_for(deployment: Deployment, default):
    """What runs ``deployment``: a ChangeRun for a diff, an activation, or a rebuild built off its node;
    ``default`` (``run_rebuild``) for anything else (a rebuild on its node, kinds of other modules)."""
    if deployment.kind in (Kind.DIFF, Kind.ACTIVATE):
        return ChangeRun(deployment).run
    if deployment.kind == Kind.REBUILD and effective_location(deployment.node).kind != BuildLocation.TARGET:
        return ChangeRun(deployment).run
    return default


def _note(on_output, message: str) -> None:
    on_output("sys", message.encode())


class ChangeRun:
    """One deployment that builds off its node, diffs, or activates a diff's system (see the module)."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.node = deployment.node

    def run(
        self,
        target: Target,
        *,
        deployment_id: int,
        archive: bytes,
        attr: str,
        action: str,
        on_output,
        should_cancel=None,
        on_workdir=None,
        arm=None,
    ) -> RebuildResult:
        d = self.deployment
        if d.kind == Kind.ACTIVATE:
            return self._activate_diff(target, action, on_output, should_cancel, on_workdir, arm)
        where = effective_location(self.node)
        _note(on_output, f"building {where.describe()} ({where.source}'s build location)")
        if where.kind == BuildLocation.TARGET:
            # Only a diff gets here: build on the node itself, into a root the confirmation finds.
            self._built_on("target")
            root = f"diff-{d.pk}"
            result = run_build(
                target,
                deployment_id=deployment_id,
                archive=archive,
                attr=attr,
                root=root,
                on_output=on_output,
                should_cancel=should_cancel,
                on_workdir=on_workdir,
            )
            if result.exit_code != 0:
                result.failure = f"nix build exited with code {result.exit_code} on the node (nothing was switched)"
                _note(on_output, f"the build failed: {result.failure}")
                return result
            with Connection(target) as conn:
                return self._diff(conn, result.toplevel, on_output)
        self._built_on("panel" if where.kind == BuildLocation.PANEL else f"host:{where.host.name}")
        code, toplevel, source = self._obtain(where, archive, attr, on_output, should_cancel)
        if code != 0:
            nothing = SystemState(None, "", "")
            return RebuildResult(code, nothing, nothing, None, failure=self._failure)
        root = f"diff-{d.pk}" if d.kind == Kind.DIFF else f"deploy-{d.pk}"
        try:
            _note(on_output, f"copying the closure of {toplevel} to {target.address}")
            with Connection(target) as conn:
                copy_closure(
                    source(), conn, toplevel, root=root, note=lambda m: _note(on_output, m), should_cancel=should_cancel
                )
                if d.kind == Kind.DIFF:
                    return self._diff(conn, toplevel, on_output)
                if action == "build":
                    state = _state(conn)
                    return RebuildResult(0, state, state, toplevel)
        finally:
            self._close_source()
        return run_activate(
            target,
            deployment_id=deployment_id,
            toplevel=toplevel,
            action=action,
            root=root,
            on_output=on_output,
            should_cancel=should_cancel,
            on_workdir=on_workdir,
            arm=arm,  # health checks and magic rollback, as for a rebuild on the node
        )

    # -- building once per (location, commit, attribute) ----------------------------------------

    _source_conn: Connection | None = None
    _failure = ""  # why the build failed, for the deployment's error message

    def _close_source(self) -> None:
        conn, self._source_conn = self._source_conn, None
        if conn is not None:
            conn.close()

    def _source(self, where: Location):
        """A factory of the copy's source: the panel's store, or a connection to the build host."""
        if where.kind == BuildLocation.PANEL:
            return LocalStore

        def remote() -> RemoteStore:
            self._source_conn = _on_build_host(where.host, lambda: _open(where.host))
            return RemoteStore(self._source_conn)

        return remote

    def _obtain(self, where: Location, archive: bytes, attr: str, on_output, should_cancel):
        """Build the system at ``where``, or wait for the deployment that builds it; (exit code, toplevel,
        source factory). A system built earlier is used if it is still in the build location's store."""
        d = self.deployment
        source = self._source(where)
        noted_wait = False
        while True:
            row = _built_row(where.key, d.commit_sha, attr, d.pk)
            if row.built_by_id == d.pk and row.status == BuiltSystem.Status.BUILDING:
                return self._build(row, where, archive, attr, on_output, should_cancel), row.toplevel, source
            if row.status == BuiltSystem.Status.BUILT:
                if self._still_built(where, row):
                    _note(on_output, f"using {row.toplevel}, built {where.describe()} by deployment #{row.built_by_id}")
                    return 0, row.toplevel, source
                _note(on_output, f"{row.toplevel} is no longer {where.describe()}: building it again")
                _take_over(row, d.pk, status=BuiltSystem.Status.BUILT)
                continue
            if row.status == BuiltSystem.Status.FAILED:
                if row.finished_at and row.finished_at >= d.created_at:
                    # The build this deployment waited for (or one after its request) failed: so does it.
                    self._failure = f"the build by deployment #{row.built_by_id} failed: {row.error_message}"
                    _note(on_output, self._failure)
                    return 1, "", source
                _take_over(row, d.pk, status=BuiltSystem.Status.FAILED)
                continue
            builder = row.built_by
            if builder is None or builder.status not in Deployment.ACTIVE:
                _take_over(row, d.pk, status=BuiltSystem.Status.BUILDING)
                continue
            if not noted_wait:
                _note(on_output, f"waiting for deployment #{builder.pk}, which builds this system {where.describe()}")
                noted_wait = True
            if should_cancel is not None and should_cancel():
                raise Cancelled("stopped while waiting for the build")
            time.sleep(BUILD_WAIT_POLL)

    def _still_built(self, where: Location, row: BuiltSystem) -> bool:
        if where.kind == BuildLocation.PANEL:
            return subprocess.run(["nix-store", "--check-validity", row.toplevel], capture_output=True).returncode == 0
        with _BuildHostConnection(where.host) as conn:
            return still_there(conn, row.toplevel)

    def _build(self, row: BuiltSystem, where: Location, archive: bytes, attr: str, on_output, should_cancel) -> int:
        d = self.deployment
        root = f"built-{row.pk}"
        try:
            if where.kind == BuildLocation.PANEL:
                code, toplevel = build_local(archive, attr, root=root, on_output=on_output, should_cancel=should_cancel)
            else:
                result = _on_build_host(
                    where.host,
                    lambda: run_build(
                        _target_of(where.host),
                        deployment_id=d.pk,
                        archive=archive,
                        attr=attr,
                        root=root,
                        on_output=on_output,
                        should_cancel=should_cancel,
                    ),
                )
                code, toplevel = result.exit_code, result.toplevel or ""
        except BaseException as exc:
            _finish_build(row, "", str(exc) or type(exc).__name__)
            raise
        if code != 0:
            message = f"nix build exited with code {code} {where.describe()}"
            self._failure = f"{message} (nothing reached the node)"
            _note(on_output, f"the build failed: {message}")
            _finish_build(row, "", message)
            return code
        _note(on_output, f"built {toplevel} {where.describe()} (held by GC root {root_path(root)})")
        _finish_build(row, toplevel, "")
        row.toplevel = toplevel
        return 0

    # -- diff and activation ---------------------------------------------------------------------

    def _diff(self, conn: Connection, toplevel: str, on_output) -> RebuildResult:
        d = self.deployment
        _note(on_output, f"comparing {toplevel} with what {conn.target.address} runs")
        diff = diff_closure(conn, toplevel)
        for line in describe_diff(diff):
            _note(on_output, line)
        record_diff(d.pk, diff)
        state = SystemState(diff["generation"], "", diff["from"])
        return RebuildResult(0, state, state, toplevel)

    def _activate_diff(
        self, target: Target, action: str, on_output, should_cancel, on_workdir, arm=None
    ) -> RebuildResult:
        diff = self.deployment.diff_of
        toplevel = diff.toplevel
        self._built_on(diff.built_on)
        _note(on_output, f"activating {toplevel}, built and compared by deployment #{diff.pk} (no new evaluation)")
        with Connection(target) as conn:
            if not still_there(conn, toplevel):
                raise RemoteError(
                    "gone",
                    f"the system deployment #{diff.pk} built ({toplevel}) is no longer in the store of "
                    f"{self.node.name} (collected since): request the difference again",
                )
        return run_activate(
            target,
            deployment_id=self.deployment.pk,
            toplevel=toplevel,
            action=action,
            root=f"diff-{diff.pk}",
            on_output=on_output,
            should_cancel=should_cancel,
            on_workdir=on_workdir,
            arm=arm,
        )

    def _built_on(self, where: str) -> None:
        Deployment.objects.filter(pk=self.deployment.pk).update(built_on=where)


def _state(conn: Connection) -> SystemState:
    return parse_state(read_output(conn, state_script()).split("\n")[:3])


def _target_of(node: Node) -> Target:
    from .tasks import target_for

    return target_for(node)


def _open(node: Node) -> Connection:
    conn = Connection(_target_of(node))
    conn.open()
    return conn


class _BuildHostConnection:
    """``with``: a connection to the build host, its errors said as the build host's."""

    def __init__(self, host: Node) -> None:
        self.host = host

    def __enter__(self) -> Connection:
        self.conn = _on_build_host(self.host, lambda: _open(self.host))
        return self.conn

    def __exit__(self, *exc) -> None:
        self.conn.close()


def _on_build_host(host: Node, call):
    """``call()``, with a RemoteError of the build host said as one (kind ``build-host``): the target is
    untouched, and a changed host key is the build host's ``hostkey.mismatch``."""
    try:
        return call()
    except RemoteError as exc:
        if exc.kind == "host-key-mismatch":
            with transaction.atomic():
                record(
                    "hostkey.mismatch",
                    actor_kind="system",
                    obj=host,
                    outcome="failure",
                    details={"pinned": host.host_key_fingerprint, "error": exc.message, "build_host": True},
                )
        raise RemoteError(
            "build-host", f"build host {host.name}: {exc.message} (nothing was changed on the target)"
        ) from None


def _built_row(location: str, commit: str, attr: str, deployment_id: int) -> BuiltSystem:
    """The (location, commit, attribute) row: inserted as ``building`` by this deployment if there is none.

    Read first: the nodes waiting for a build look at the row several times a second, and an INSERT
    that fails on the unique index would still take SQLite's write lock each time."""
    found = BuiltSystem.objects.select_related("built_by").filter(location=location, commit_sha=commit, flake_attr=attr)
    row = found.first()
    if row is not None:
        return row
    try:
        with transaction.atomic():
            return BuiltSystem.objects.create(
                location=location, commit_sha=commit, flake_attr=attr, built_by_id=deployment_id
            )
    except IntegrityError:
        return found.get()


def _take_over(row: BuiltSystem, deployment_id: int, *, status: str) -> bool:
    """Make this deployment the builder of ``row``, if it is still as read (a conditional UPDATE)."""
    return bool(
        BuiltSystem.objects.filter(pk=row.pk, status=status, built_by_id=row.built_by_id).update(
            status=BuiltSystem.Status.BUILDING,
            built_by_id=deployment_id,
            toplevel="",
            error_message="",
            finished_at=None,
        )
    )


def _finish_build(row: BuiltSystem, toplevel: str, error: str) -> None:
    BuiltSystem.objects.filter(pk=row.pk, status=BuiltSystem.Status.BUILDING, built_by_id=row.built_by_id).update(
        status=BuiltSystem.Status.BUILT if toplevel else BuiltSystem.Status.FAILED,
        toplevel=toplevel,
        error_message=error[:2000],
        finished_at=timezone.now(),
    )


# -- diffs ---------------------------------------------------------------------------------------


def describe_diff(diff: dict) -> list[str]:
    """The diff as log lines (and the page's summary)."""
    p = diff["packages"]
    lines = [f"{len(p['added'])} added, {len(p['removed'])} removed, {len(p['changed'])} changed"]
    for e in p["added"]:
        lines.append(f"+ {e['name']} {', '.join(e['versions'])}")
    for e in p["removed"]:
        lines.append(f"- {e['name']} {', '.join(e['versions'])}")
    for e in p["changed"]:
        lines.append(f"~ {e['name']} {', '.join(e['from']) or '-'} → {', '.join(e['to']) or '-'}")
    size = diff["size"]
    if size["delta"] is not None:
        lines.append(f"closure size {size['before']} → {size['after']} bytes ({size['delta']:+d})")
    if diff["reboot"]:
        lines.append(f"reboot advised: {', '.join(diff['reboot'])} changed")
    else:
        lines.append("kernel, initrd and systemd unchanged: no reboot needed")
    return lines


def record_diff(deployment_id: int, diff: dict) -> None:
    """Store the diff on its deployment with its ``deployment.diffed`` event, in one transaction."""
    with transaction.atomic():
        Deployment.objects.filter(pk=deployment_id).update(diff=diff, toplevel=diff["to"])
        deployment = Deployment.objects.select_related("node").get(pk=deployment_id)
        p = diff["packages"]
        record(
            "deployment.diffed",
            actor_kind="system",
            obj=deployment,
            node=deployment.node,
            details={
                "from": diff["from"],
                "to": diff["to"],
                "added": p["added"][:AUDIT_DIFF_ENTRIES],
                "removed": p["removed"][:AUDIT_DIFF_ENTRIES],
                "changed": p["changed"][:AUDIT_DIFF_ENTRIES],
                "counts": {k: len(v) for k, v in p.items()},
                "size": diff["size"],
                "reboot": diff["reboot"],
            },
        )


def confirm_diff(diff: Deployment, *, user=None, trigger: str = Deployment.Trigger.WEB) -> Deployment:
    """Switch the node to exactly the system ``diff`` built: a deployment of kind ``activate``.

    DEPLOY on the node (403, audited); the diff must have succeeded, be younger than ``DIFF_KEEP`` and
    not be confirmed already (the one-to-one ``diff_of`` holds that against a race too).
    """
    from .lifecycle import request_deployment

    gate.require(user, gate.DEPLOY, diff.node, event="deployment.requested")
    if diff.kind != Kind.DIFF:
        raise RequestError(f"Deployment #{diff.pk} is not a difference to confirm.")
    if diff.status != Deployment.Status.SUCCEEDED or not diff.toplevel:
        raise RequestError(f"Deployment #{diff.pk} did not build a system to switch to ({diff.status}).")
    if Deployment.objects.filter(diff_of=diff).exists():
        raise RequestError(f"Deployment #{diff.pk} was confirmed already.")
    if diff.finished_at and timezone.now() - diff.finished_at > DIFF_KEEP:
        raise RequestError(
            f"Deployment #{diff.pk} is older than {DIFF_KEEP.total_seconds() / 3600:g} hours: its system may be "
            "gone from the node. Request the difference again."
        )
    return request_deployment(
        diff.node,
        action=diff.action,
        revision=diff.commit_sha,
        user=user,
        trigger=trigger,
        kind=Kind.ACTIVATE,
        diff_of=diff,
    )
