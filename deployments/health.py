"""Health checks and magic rollback of one deployment: arming, the checks, the verdict, the outcome.

``tasks.run_deployment`` makes a :class:`Guard` for each deployment. For a
switch or test on a node with magic rollback (``Node.confirm_timeout`` > 0) or
with health checks (its own and its tags', ``HealthCheck.for_node``), the
guard *arms* the run (``remote.confirm.Arming``): once nixos-rebuild has exited
0, the node waits for the panel's verdict. The guard's ``on_armed`` then runs
on a thread of its own, over a **new** SSH connection (``ArmedRun``):

1. contact: the new login works (``W/alive``). If none can be made by the
   deadline, the node goes back by itself (magic rollback) — or keeps the
   system, when only health checks armed it.
2. the checks, in order, each up to ``retries + 1`` attempts: every attempt's
   result and output in the deployment's log, one ``deployment.health_checked``
   event per check.
3. the verdict: a failing check whose policy is ``rollback`` → reject (the
   node goes back at once, not at the deadline: nothing is gained by waiting);
   otherwise confirm (``deployment.confirmed`` once the node says so).

``Guard.outcome`` turns the node's decision into the deployment's status:
``rolled_back`` (the reason and the check's output are in the log and the
message), ``unhealthy`` (a failing check with policy ``keep``), or the
run's own status. Only ``lifecycle`` writes it.

Trust: a command check is a shell command by design. It runs on the node as
the node's SSH user (never through sudo), so it can do what that login can:
only node admins may set one (``gate.require_check_change``), and every change
is audited. TCP and HTTP checks are probed from the panel host, so they can
reach what the panel reaches: hosts and URLs are validated (no shell or URL
tricks), only node admins (or inventory managers, for tags) set them, and the
log records only the status of an HTTP answer, never its body.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import close_old_connections, connection, transaction

from .audit.writer import record
from .dbretry import retrying
from .healthchecks import HealthCheck
from .models import Deployment, Node
from .remote import RebuildResult, RemoteError
from .remote.confirm import ARMABLE_ACTIONS, ArmedRun, Arming, MagicState

Status = Deployment.Status
# Seconds the node waits for the verdict after contact, beyond the checks' own worst case.
VERDICT_MARGIN = 15
# Lines of a command check's output written to the log per attempt.
OUTPUT_LINES = 40


@dataclass
class Attempt:
    number: int
    healthy: bool
    seconds: float
    detail: str  # one line: exit status, status code, the error
    output: str = ""  # a command's output (stdout, then stderr)


@dataclass
class CheckResult:
    check: HealthCheck
    healthy: bool
    attempts: list[Attempt] = field(default_factory=list)

    def summary(self) -> str:
        last = self.attempts[-1] if self.attempts else None
        n = len(self.attempts)
        return (
            f"health check {self.check.name!r} ({self.check.describe()}) "
            f"{'passed' if self.healthy else 'failed'} after {n} attempt{'s' if n != 1 else ''}"
            + (f": {last.detail}" if last else "")
        )


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _no_redirects() -> urllib.request.OpenerDirector:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # the expected status is the first answer's
            return None

    # No proxies from the environment: the probe goes where the URL says, from the panel host.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)


def probe(check: HealthCheck, node: Node, run: ArmedRun | None) -> tuple[bool, str, str]:
    """One attempt of ``check`` for ``node``: (healthy, one-line detail, output)."""
    t = check.timeout_seconds
    if check.kind == HealthCheck.Kind.COMMAND:
        if run is None:
            return False, "no connection to the node to run the command on", ""
        try:
            code, output = run.run(check.command, t)
        except RemoteError as e:
            return False, f"could not run it on the node: {e.message}", ""
        if code is None:
            return False, f"timed out after {t} s", output
        return code == 0, f"exit {code}", output
    if check.kind == HealthCheck.Kind.TCP:
        host = check.host or node.host
        try:
            with socket.create_connection((host, check.port), timeout=t):
                return True, f"connected to {host}:{check.port}", ""
        except TimeoutError:
            return False, f"no connection to {host}:{check.port} within {t} s", ""
        except OSError as e:
            return False, f"{host}:{check.port}: {e.strerror or e}", ""
    url = check.url.replace("{host}", _host_in_url(node.host))
    try:
        with _no_redirects().open(urllib.request.Request(url, method="GET"), timeout=t) as answer:
            status = answer.status
    except urllib.error.HTTPError as e:
        status = e.code
    except TimeoutError:
        return False, f"no answer from {url} within {t} s", ""
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError):
            return False, f"no answer from {url} within {t} s", ""
        return False, f"{url}: {reason}", ""
    return status == check.expected_status, f"HTTP {status} (expected {check.expected_status})", ""


def run_check(
    check: HealthCheck,
    node: Node,
    run: ArmedRun | None,
    note: Callable[[str], None],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckResult:
    """Attempt ``check`` up to ``retries + 1`` times, ``interval_seconds`` apart, until it passes; every
    attempt's result (and a command's output) goes to ``note``."""
    result = CheckResult(check, False)
    n = check.attempts()
    for i in range(1, n + 1):
        start = time.monotonic()
        healthy, detail, output = probe(check, node, run)
        seconds = round(time.monotonic() - start, 3)
        result.attempts.append(Attempt(i, healthy, seconds, detail, output))
        note(
            f"health check {check.name!r} ({check.owner}: {check.describe()}) attempt {i} of {n}: "
            f"{'healthy' if healthy else 'failing'} in {seconds:.2f} s: {detail}"
        )
        lines = output.splitlines()
        for line in lines[:OUTPUT_LINES]:
            note(f"  | {line}")
        if len(lines) > OUTPUT_LINES:
            note(f"  | … {len(lines) - OUTPUT_LINES} more lines")
        if healthy:
            result.healthy = True
            break
        if i < n:
            sleep(check.interval_seconds)
    return result


@retrying  # across a database blip, like the deployment's own end
def record_confirmed(deployment_id: int, details: dict) -> None:
    """The ``deployment.confirmed`` event: the node said it keeps the new system."""
    with transaction.atomic():
        d = Deployment.objects.select_related("node").get(pk=deployment_id)
        record("deployment.confirmed", actor_kind="system", obj=d, node=d.node, details=details)


@retrying
def record_check(deployment_id: int, result: CheckResult) -> None:
    """The ``deployment.health_checked`` event of one check, with every attempt."""
    with transaction.atomic():
        d = Deployment.objects.select_related("node").get(pk=deployment_id)
        record(
            "deployment.health_checked",
            actor_kind="system",
            obj=d,
            node=d.node,
            outcome="success" if result.healthy else "failure",
            details={
                "check": result.check.details(),
                "healthy": result.healthy,
                "attempts": [
                    {
                        "attempt": a.number,
                        "healthy": a.healthy,
                        "seconds": a.seconds,
                        "detail": a.detail,
                        "output": a.output[:500],
                    }
                    for a in result.attempts
                ],  # fmt: skip
            },
        )


class Guard:
    """The health checks and magic rollback of one deployment (see the module docstring)."""

    def __init__(self, deployment: Deployment, write: Callable[[str, str], None]) -> None:
        self.deployment = deployment
        self.node = deployment.node
        self.write = write
        armable = deployment.action in ARMABLE_ACTIONS
        self.checks: list[HealthCheck] = list(HealthCheck.for_node(self.node)) if armable else []
        self.magic = armable and self.node.confirm_timeout > 0
        self.results: list[CheckResult] = []
        self.unreached = ""  # why no new connection could be made
        self.rejected = ""  # the reason the panel rejected the new system
        self.verdict: MagicState | None = None

    def note(self, msg: str) -> None:
        self.write("sys", msg)

    @property
    def arming(self) -> Arming | None:
        """How the run is armed; None when it is not (no magic rollback, no checks, or not switch/test)."""
        if not (self.magic or self.checks):
            return None
        verdict = min(3600, sum(c.budget() for c in self.checks) + VERDICT_MARGIN)
        if self.magic:
            return Arming(min(3600, self.node.confirm_timeout), verdict, True, self.on_armed)
        return Arming(verdict, verdict, False, self.on_armed)

    def on_armed(self, run: ArmedRun) -> None:
        """On the watch thread: contact over a new connection, the checks, the verdict."""
        try:
            self._on_armed(run)
        finally:
            close_old_connections()
            connection.close()  # this thread's own database connection

    def _on_armed(self, run: ArmedRun) -> None:
        try:
            # Without checks the contact is the verdict: one command says both (a login and a command less).
            decided = run.contact() if self.checks else run.contact_and_confirm()
        except RemoteError as e:
            self.unreached = e.message
            then = "goes back by itself" if self.magic else "keeps the new system"
            self.note(f"could not reach {self.node.name} over a new SSH connection: {e.message}; the node {then}")
            return
        if decided is not None and (self.checks or decided.outcome != "confirmed"):
            self.verdict = decided
            self.note(f"the node had decided already: {decided.outcome}")
            return
        self.note(f"reached {self.node.name} over a new SSH connection in {run.connected_after or 0:.2f} s")
        for check in self.checks:
            self.results.append(run_check(check, self.node, run, self.note))
        # The verdict before the audit events: the node's deadline must not wait out a database blip.
        back = [r for r in self.results if not r.healthy and r.check.on_failure == HealthCheck.OnFailure.ROLLBACK]
        if not self.checks:
            self.verdict = decided
        elif back:
            self.rejected = "; ".join(r.summary() for r in back)
            self.note(f"rolling back (policy of {back[0].check.name!r}): {self.rejected}")
            self.verdict = run.reject(self.rejected)
        else:
            self.verdict = run.confirm()
        if not back:
            if self.verdict.outcome == "confirmed":
                self.note("confirmed: the node keeps the new system")
            else:
                self.note(f"the node had decided already: {self.verdict.outcome} ({self.verdict.reason})")
        for result in self.results:
            record_check(self.deployment.pk, result)
        if self.verdict.outcome == "confirmed":
            record_confirmed(
                self.deployment.pk,
                {
                    "confirm_timeout": self.node.confirm_timeout if self.magic else None,
                    "connected_after_seconds": round(run.connected_after or 0, 3),
                    "checks": {r.check.name: r.healthy for r in self.results},
                },
            )

    def outcome(self, result: RebuildResult, status: str, fields: dict) -> str:
        """The deployment's status after a run that exited 0, from the node's decision and the checks;
        sets ``error_message`` in ``fields`` to say why when it is not the run's own ``status``."""
        magic = getattr(result, "magic", None)  # a rollback deployment is never armed
        if magic is None:
            return status
        failing = [r for r in self.results if not r.healthy]
        if magic.rolled_back:
            fields["error_message"] = rolled_back_message(
                magic, self.node.confirm_timeout, result.after.generation, result.after.current_system,
                rejected=self.rejected, unreached=self.unreached,
            )  # fmt: skip
            return Status.ROLLED_BACK if magic.exit_code == 0 else Status.FAILED
        if failing:
            fields["error_message"] = "unhealthy: " + "; ".join(r.summary() for r in failing)
            return Status.UNHEALTHY
        if magic.outcome == "kept" and self.checks and len(self.results) < len(self.checks):
            fields["error_message"] = "unhealthy: the health checks did not complete before the node's deadline" + (
                f" (no new SSH connection: {self.unreached})" if self.unreached else ""
            )
            return Status.UNHEALTHY
        return status


def rolled_back_message(
    magic: MagicState, deadline: int, generation: int | None, system: str, *, rejected: str = "", unreached: str = ""
) -> str:
    """The deployment's message when the node went back (``magic.rolled_back``)."""
    if magic.reason == "rejected":
        why = rejected or "the panel rejected the new system (a health check failed)"
    else:
        why = f"no confirmation over a new SSH connection within {deadline} s" + (
            f" ({unreached})" if unreached else ""
        )
    where = f"generation {generation if generation is not None else 'none'}" + (f" ({system})" if system else "")
    if magic.exit_code not in (0, None):
        return f"rolled back: {why}; going back failed on the node (exit {magic.exit_code}): it runs {where}"
    return (
        f"rolled back: {why}; the node went back by itself and runs {where} again"
        if magic.reason == "timeout"
        else (f"rolled back: {why}; the node runs {where} again")
    )
