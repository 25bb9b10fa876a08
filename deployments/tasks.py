"""django-q2 entry points.  Every task has the same shape: claim, run, finish.

``run_deployment`` claims its row (``lifecycle.claim``, a conditional
UPDATE), so each deployment runs at most once whatever the broker delivers; an
expected failure becomes ``failed`` or ``error`` with a message, anything else
``error`` with the traceback stored.  No task dies silently.  The runner that
does the remote work is an argument, so every outcome can be tested with a
stand-in runner as well as over real SSH.

The worker enforces the deployment's timeout (``Deployment.timeout_seconds``,
else ``PANEL_DEPLOY_TIMEOUT``, which is also the ceiling): past it the runner
is told to stop exactly as for a cancel (the run's process tree on the node is
killed) and the deployment ends ``failed``, "timed out after N s".  Before it
runs, it reconciles the node's earlier interrupted deployments (``lifecycle.
reconcile_deployment``), and does not start a second nixos-rebuild beside one
still going there.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback
from collections.abc import Callable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import change, health, logstream, repos, rollbacks
from .audit.writer import record
from .errors import RequestError
from .lifecycle import claim, finish, reconcile_deployment
from .models import Deployment
from .remote import Cancelled, HostKey, RebuildResult, RemoteError, Target, run_rebuild

log = logging.getLogger(__name__)
Status = Deployment.Status


def target_for(node) -> Target:
    """SSH target of ``node`` with its credential decrypted (kept only in memory), and its jump hosts',
    each with its own credential and pinned key (``Target.via``)."""
    via = None
    for hop in node.jump_path():
        via = _one_target(hop, via)
    return _one_target(node, via)


def _one_target(node, via: Target | None) -> Target:
    cred = node.credential
    is_key = cred.kind == cred.Kind.SSH_KEY
    return Target(
        name=node.name,
        via=via,
        host=node.host,
        port=node.port,
        user=node.ssh_user,
        host_key=HostKey.parse(node.host_key) if node.host_key else None,
        private_key=cred.secret() if is_key else None,
        passphrase=(cred.passphrase() or None) if is_key else None,
        password=None if is_key else cred.secret(),
        sudo=node.use_sudo,
        sudo_password=cred.sudo_password() or (None if is_key else cred.secret()),
        link_timeout=settings.LINK_TIMEOUT,
        reconnect_for=settings.UNREACHABLE_LIMIT,
    )


class Heartbeat:
    """Beats the deployment's heartbeat and watches its cancel flag (called from the log writer thread).

    ``remote_dir`` set by the runner is stored at the next flush (within ``LOG_FLUSH_INTERVAL``), off the
    path of the SSH reader."""

    def __init__(self, deployment_id: int) -> None:
        self.deployment_id = deployment_id
        self.cancel = threading.Event()
        self._last_look = self._last_beat = 0.0
        self.remote_dir: str | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        remote_dir, self.remote_dir = self.remote_dir, None
        if remote_dir is None and now - self._last_look < min(1.0, settings.HEARTBEAT_INTERVAL):
            return
        self._last_look = now
        # A write (SQLite's one write lock, shared with every running deployment) only every
        # HEARTBEAT_INTERVAL, or to store the run's folder; the cancel flag is read every second.
        if remote_dir is not None or now - self._last_beat >= settings.HEARTBEAT_INTERVAL:
            extra = {"remote_dir": remote_dir} if remote_dir is not None else {}
            try:
                Deployment.objects.filter(pk=self.deployment_id).update(heartbeat_at=timezone.now(), **extra)
            except BaseException:
                if remote_dir is not None and self.remote_dir is None:
                    self.remote_dir = remote_dir  # stored at the next flush, then
                raise
            self._last_beat = now
        if Deployment.objects.filter(pk=self.deployment_id, cancel_requested=True).exists():
            self.cancel.set()


class Stop:
    """What the runner polls as ``should_cancel``: a user's cancel (the heartbeat's flag) or the timeout.

    ``reason`` is whichever came first: ``"cancel"`` or ``"timeout"``.
    """

    def __init__(self, beat: Heartbeat, seconds: float) -> None:
        self.beat = beat
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.reason: str | None = None

    def __call__(self) -> bool:
        if self.reason is None:
            if self.beat.cancel.is_set():
                self.reason = "cancel"
            elif time.monotonic() >= self.deadline:
                self.reason = "timeout"
        return self.reason is not None


def timeout_for(deployment: Deployment) -> tuple[int, str]:
    """Seconds the deployment may run, and a note for its log when its own timeout was cut to the ceiling."""
    ceiling = settings.DEPLOY_TIMEOUT
    own = getattr(deployment, "timeout_seconds", None)
    if own is None:
        return ceiling, ""
    if own > ceiling:
        return ceiling, f"its timeout of {own} s is cut to the panel's ceiling, PANEL_DEPLOY_TIMEOUT={ceiling} s"
    return own, ""


class EarlierRunGoing(Exception):
    """An earlier deployment's run is still going on the node: a second nixos-rebuild must not start."""


def reconcile_earlier(deployment: Deployment, write: Callable[[str, str], None]) -> None:
    """Reconcile the node's interrupted deployments that hold a run folder; raise EarlierRunGoing if one is
    still running there.  A node that cannot be reached is said once and left: the run itself will say more."""
    earlier = (
        Deployment.objects.filter(node_id=deployment.node_id, status=Status.INTERRUPTED, reconciled_at__isnull=True)
        .exclude(remote_dir="")
        .exclude(pk=deployment.pk)
        .select_related("node__credential")
        .order_by("pk")[:10]
    )
    for d in earlier:
        try:
            done = reconcile_deployment(d, actor_kind="system")
        except RequestError as exc:
            # Most likely the node cannot be reached: the others would only wait for it again.
            write("sys", f"could not reconcile deployment #{d.pk}: {exc}")
            break
        write("sys", f"reconciled deployment #{d.pk}: {done.summary}")
        if done.running:
            raise EarlierRunGoing(
                f"deployment #{d.pk} is still running on the node ({done.summary}): "
                "not starting a second nixos-rebuild beside it; deploy again once it has ended"
            )


def _accepts(runner: Callable, name: str) -> bool:
    """Whether ``runner`` takes keyword ``name`` (stand-in runners of tests may not)."""
    try:
        params = inspect.signature(runner).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# What does the remote work: ``run_rebuild``'s signature (target, keyword arguments) → RebuildResult.
Runner = Callable[..., RebuildResult]


def run_deployment(deployment_id: int, runner: Runner = run_rebuild) -> str:
    """Claim, run and finish one deployment with ``runner``; return its final status."""
    if not claim(deployment_id):
        log.info("deployment %s was not queued any more; nothing to do", deployment_id)
        return "skipped"
    deployment = Deployment.objects.select_related("node__credential", "node__repository").get(pk=deployment_id)
    node = deployment.node
    beat = Heartbeat(deployment_id)
    writer = logstream.LogWriter(deployment_id, start_seq=logstream.next_seq(deployment_id), on_flush=beat)
    seconds, cut = timeout_for(deployment)
    stop = Stop(beat, seconds)
    status, fields = Status.ERROR, {}
    try:
        rollback = deployment.kind == Deployment.Kind.ROLLBACK
        if rollback:
            what = rollbacks.describe(deployment)
        elif deployment.kind == Deployment.Kind.DIFF:
            what = "build and compare (diff)"
        elif deployment.kind == Deployment.Kind.ACTIVATE:
            what = (
                f"switch-to-configuration {deployment.action} of the system deployment #{deployment.diff_of_id} built"
            )
        else:
            what = f"nixos-rebuild {deployment.action}"
        writer.write(
            "sys",
            f"deployment #{deployment_id}: {what} {node.name} ({deployment.flake_attr})"
            + ("" if rollback else f" at {deployment.commit_sha}"),
        )
        if cut:
            writer.write("sys", cut)
        reconcile_earlier(deployment, writer.write)
        extra = {}
        if _accepts(runner, "on_workdir"):
            extra["on_workdir"] = lambda folder: setattr(beat, "remote_dir", folder)
        guard = health.Guard(deployment, writer.write)  # health checks and magic rollback
        if rollback:  # back to an earlier generation: no source, no build (deployments/rollbacks.py)
            result, rolled = rollbacks.run_on_node(
                deployment, target_for(node), on_output=writer.write, should_cancel=stop, **extra
            )
            fields.update(rolled)
        else:
            archive = repos.archive(node.repository, deployment.commit_sha)
            fields["archive_sha256"] = archive.sha256
            if runner is run_rebuild:
                runner = change.runner_for(deployment, run_rebuild)  # off-target builds, diffs, activations
            if guard.arming is not None and _accepts(runner, "arm"):
                extra["arm"] = guard.arming
            result = runner(
                target_for(node),
                deployment_id=deployment_id,
                archive=archive.data,
                attr=deployment.flake_attr,
                action=deployment.action,
                on_output=writer.write,
                should_cancel=stop,
                **extra,
            )
        fields.update(
            exit_code=result.exit_code,
            generation_before=result.before.generation,
            generation_after=result.after.generation,
            system_before=result.before.current_system,
            system_after=result.after.current_system,
            toplevel=result.toplevel or "",
        )
        if result.exit_code == 0:
            status = guard.outcome(result, Status.SUCCEEDED, fields)
        else:
            status = Status.FAILED
            fields["error_message"] = getattr(result, "failure", "") or f"{what} exited with code {result.exit_code}"
    except Cancelled:
        if stop.reason == "timeout":
            status = Status.FAILED
            fields["error_message"] = (
                f"timed out after {seconds} s (the deployment's timeout): the run was stopped on the node"
            )
        else:
            status, fields["error_message"] = Status.CANCELLED, "cancelled on request"
    except EarlierRunGoing as exc:
        status, fields["error_message"] = Status.ERROR, str(exc)
    except RemoteError as exc:
        if exc.kind == "disconnected":
            # The node may still be activating on its own: we only lost sight of it.
            status = Status.INTERRUPTED
            fields["error_message"] = exc.message + (
                "" if "reconcile" in exc.message else "; the run may still complete on the node: reconcile it"
            )
        elif exc.kind == "killed":
            status, fields["error_message"] = Status.FAILED, exc.message
        else:
            status, fields["error_message"] = Status.ERROR, exc.message
        if exc.kind == "host-key-mismatch":
            # Security-relevant on its own, not only as a failed deployment: someone may be in the middle.
            # A bastion's mismatch is recorded on the bastion, whose key it is.
            at = next((hop for hop in node.jump_path() if hop.name == exc.hop), node) if exc.hop else node
            with transaction.atomic():
                record(
                    "hostkey.mismatch",
                    actor_kind="system",
                    obj=at,
                    outcome="failure",
                    details={
                        "pinned": at.host_key_fingerprint,
                        "error": exc.message,
                        "deployment": deployment_id,
                        **({"behind": node.name} if at is not node else {}),
                    },
                )
    except repos.RepositoryError as exc:
        status, fields["error_message"] = Status.ERROR, f"flake source: {exc}"
    except Exception:  # noqa: BLE001 - a panel bug must still end the deployment, with its traceback
        log.exception("deployment %s crashed", deployment_id)
        status, fields["error_message"] = Status.ERROR, "internal error:\n" + traceback.format_exc(limit=20)
    finally:
        if fields.get("error_message"):
            try:
                writer.write("sys", f"{status}: {fields['error_message'].splitlines()[0]}")
            except RuntimeError:
                pass
        try:
            summary = writer.close()
            fields.update(line_count=summary.line_count, byte_count=summary.byte_count, log_sha256=summary.sha256)
        except RuntimeError as exc:
            status = Status.ERROR
            fields["error_message"] = (
                fields.get("error_message", "") + f"\nlog could not be stored: {exc.__cause__}"
            ).strip()
        finish(deployment_id, status, **fields)
    return status
