"""Request a deployment from the command line, optionally following its log: one node (``deploy NODE``)
or a rollout to many (``deploy --tag web [--node a …] [--all --yes-all] --parallel 10 --canary 1``);
``deploy NODE --diff`` builds and shows the difference only, ``deploy --confirm N`` switches to what diff N built.

Exit status: 0 when the deployment (every node of the rollout) succeeded, or it
was queued without --follow; 1 when it (any node) did not succeed; 2 when the
request was refused (see _base.py); 3 when it touches a protected node and waits for
approval (nothing started); 130 when Ctrl-C stopped following (the
deployment or rollout goes on).
"""

import sys
import time

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand
from django.db.models import Q

from deployments import change, lifecycle, logstream, rollouts
from deployments.errors import AwaitingApproval, RequestError
from deployments.models import Deployment, LogChunk, Rollout

from ._base import (
    AWAITING,
    NOT_SUCCEEDED,
    REFUSED,
    CtrlC,
    acting_user,
    lookup_deployment,
    lookup_node,
    no_qcluster_warning,
    refused,
)

# The shell's status for a command stopped by SIGINT (128 + 2).
INTERRUPTED = 130


class Command(BaseCommand):
    help = "Deploy NODE: nixos-rebuild ACTION at REV (default: the tracked branch's head)."

    def add_arguments(self, parser):
        parser.add_argument("node", nargs="?", help="one node; or choose many with --tag, --node, --all")
        parser.add_argument("--action", default="switch", choices=Deployment.Action.values)
        parser.add_argument("--rev", default="", help="branch, tag or commit SHA (resolved once per repository)")
        parser.add_argument("--follow", action="store_true", help="stream the log and wait for the outcome")
        parser.add_argument("--as", dest="as_user", help="request as this panel user (their permissions apply)")
        parser.add_argument("--timeout", type=int, help="seconds the run may take on each node (default: the panel's)")
        parser.add_argument(
            "--diff",
            action="store_true",
            help="build and show what would change (one node); switch nothing until --confirm",
        )
        parser.add_argument(
            "--confirm", type=int, metavar="N", help="switch to exactly the system difference #N built (no NODE)"
        )
        rollout = parser.add_argument_group("rollouts (many nodes, a few at a time)")
        rollout.add_argument("--tag", dest="tags", action="append", default=[], help="every node with this tag")
        rollout.add_argument("--node", dest="nodes", action="append", default=[], help="this node (repeatable)")
        rollout.add_argument("--all", dest="all_nodes", action="store_true", help="every node you may deploy")
        rollout.add_argument("--yes-all", dest="confirm_all", action="store_true", help="confirm --all")
        rollout.add_argument("--parallel", type=int, default=rollouts.DEFAULT_PARALLELISM, help="nodes at once")
        rollout.add_argument("--canary", type=int, default=0, help="the first N nodes must succeed before the rest")
        rollout.add_argument("--canary-tag", default="", help="the nodes with this tag go first and must succeed")
        rollout.add_argument("--max-failures", type=int, help="start no further node after N failures")
        rollout.add_argument(
            "--node-timeout", action="append", default=[], metavar="NODE=SECONDS", help="a timeout for one node"
        )

    def handle(self, node, action, rev, follow, as_user, timeout, diff=False, confirm=None, **opts):
        user = acting_user(as_user)
        if confirm is not None:
            if node or diff or opts["tags"] or opts["nodes"] or opts["all_nodes"]:
                raise refused("--confirm N takes no NODE and no other choice of nodes")
            return self.confirm(user, confirm, follow)
        if diff and (opts["tags"] or opts["nodes"] or opts["all_nodes"]):
            raise refused("--diff: for one NODE (rollouts switch without a confirmation)")
        if opts["tags"] or opts["nodes"] or opts["all_nodes"]:
            if node:
                raise refused("give one NODE, or choose nodes with --tag, --node or --all, not both")
            return self.rollout(user, action=action, rev=rev, follow=follow, timeout=timeout, **opts)
        if not node:
            raise refused("name a NODE, or choose nodes with --tag, --node or --all")
        defaults = {"parallel": rollouts.DEFAULT_PARALLELISM, "canary": 0, "canary_tag": "", "max_failures": None}
        stray = [f"--{k.replace('_', '-')}" for k, v in defaults.items() if opts[k] != v] + (
            ["--node-timeout"] if opts["node_timeout"] else []
        )
        if stray or opts["confirm_all"]:
            raise refused(f"{', '.join(stray or ['--yes-all'])}: only for rollouts (--tag, --node, --all)")
        target = lookup_node(user, node)
        try:
            deployment = lifecycle.request_deployment(
                target,
                action=action,
                revision=rev,
                user=user,
                trigger=Deployment.Trigger.CLI,
                timeout_seconds=timeout,
                kind=Deployment.Kind.DIFF if diff else Deployment.Kind.REBUILD,
            )
        except AwaitingApproval as exc:
            self.stderr.write(f"{exc} ({exc.approval.get_absolute_url()})")
            sys.exit(AWAITING)
        except (RequestError, PermissionDenied) as exc:
            self.stderr.write(f"refused: {exc}")
            sys.exit(REFUSED)
        self.watch(deployment, target, action, follow)

    def confirm(self, user, pk: int, follow: bool) -> None:
        """``--confirm N``: the activation of diff #N (``change.confirm_diff``), followed like a deploy."""
        diff = lookup_deployment(user, pk)
        try:
            deployment = change.confirm_diff(diff, user=user, trigger=Deployment.Trigger.CLI)
        except (RequestError, PermissionDenied) as exc:
            self.stderr.write(f"refused: {exc}")
            sys.exit(REFUSED)
        self.watch(deployment, diff.node, diff.action, follow)

    def watch(self, deployment: Deployment, target, action: str, follow: bool) -> None:
        pk = deployment.pk
        # From here on the deployment exists: Ctrl-C, whenever it comes, leaves it be and says so.
        try:
            self.stderr.write(f"deployment #{pk}: {action} {target.name} at {deployment.commit_sha}")
            warning = no_qcluster_warning(pk, following=follow)
            if warning:
                self.stderr.write(warning)
            if not follow:
                return
            with CtrlC() as ctrl_c:
                status = self.follow(pk, ctrl_c)
        except KeyboardInterrupt:
            d = Deployment.objects.get(pk=pk)
            if not d.is_active:  # it ended as the key was pressed
                self.stderr.write(self.summary(d))
                status = d.status
            else:
                self.stderr.write(
                    f"\n{'stopped following; ' if follow else ''}deployment #{pk} is still {d.status} "
                    f"(Ctrl-C does not stop it): cancel it with manage.py cancel {pk}"
                )
                sys.exit(INTERRUPTED)
        if status == Deployment.Status.SUCCEEDED and deployment.kind == Deployment.Kind.DIFF:
            d = Deployment.objects.get(pk=pk)
            for line in change.describe_diff(d.diff):
                self.stdout.write(line)
            self.stderr.write(f"switch to exactly this system with: manage.py deploy --confirm {pk}")
        sys.exit(0 if status == Deployment.Status.SUCCEEDED else NOT_SUCCEEDED)

    def follow(self, pk: int, ctrl_c: CtrlC) -> str:
        after, out = -1, sys.stdout
        while True:
            ctrl_c.check()
            # Status before lines: a terminal status means every line is already stored.
            d = Deployment.objects.get(pk=pk)
            lines = logstream.lines_after(pk, after, limit=20000)
            for seq, stream, text in lines:
                if stream == "s":
                    out.write(f"[panel] {text}\n")
                else:
                    (self.stderr if stream == "e" else out).write(text + "\n")
                after = seq
            out.flush()
            if d.status in Deployment.TERMINAL and not lines:
                break
            if not lines:
                time.sleep(0.2)
        self.stderr.write(self.summary(d))
        return d.status

    @staticmethod
    def summary(d: Deployment) -> str:
        """``deployment #N <status> (exit code E): <first error line>; generation …`` (no "None" anywhere)."""
        summary = f"deployment #{d.pk} {d.status}"
        if d.exit_code is not None:
            summary += f" (exit code {d.exit_code})"
        if d.error_message and d.status != Deployment.Status.SUCCEEDED:
            summary += f": {d.error_message.splitlines()[0]}"
        before, after = d.generation_before, d.generation_after
        if after is not None:
            if before is None:
                summary += f"; generation {after} (none before)"
            elif before == after:
                summary += f"; generation {after} (unchanged)"
            else:
                summary += f"; generation {before} -> {after}"
        return summary

    # --- rollouts ---------------------------------------------------------------------------------

    def rollout(self, user, *, action, rev, follow, timeout, **opts) -> None:
        node_timeouts = {}
        for item in opts["node_timeout"]:
            name, _, seconds = item.partition("=")
            if not seconds.isdigit():
                raise refused(f"--node-timeout {item!r}: write NODE=SECONDS")
            node_timeouts[name] = int(seconds)
        options = rollouts.Options(
            action=action,
            revision=rev,
            tags=opts["tags"],
            nodes=opts["nodes"],
            all_nodes=opts["all_nodes"],
            confirm_all=opts["confirm_all"],
            parallelism=opts["parallel"],
            max_failures=opts["max_failures"],
            canary=opts["canary"],
            canary_tag=opts["canary_tag"],
            timeout=timeout,
            node_timeouts=node_timeouts,
        )
        try:
            rollout = rollouts.request_rollout(options, user=user, trigger=Deployment.Trigger.CLI)
        except AwaitingApproval as exc:
            self.stderr.write(f"{exc} ({exc.approval.get_absolute_url()})")
            sys.exit(AWAITING)
        except (RequestError, PermissionDenied) as exc:
            self.stderr.write(f"refused: {exc}")
            sys.exit(REFUSED)
        try:
            commits = ", ".join(f"{repo} at {sha[:12]}" for repo, sha in rollout.commits.items())
            canary = f", {rollout.canary_count} canar{'y' if rollout.canary_count == 1 else 'ies'} first"
            self.stderr.write(
                f"rollout #{rollout.pk}: {action} to {rollout.node_count} node{'s' if rollout.node_count != 1 else ''} "
                f"({commits}), {rollout.parallelism} at a time{canary if rollout.canary_count else ''}"
            )
            from deployments.queue_status import qcluster_running

            if qcluster_running() is False:
                self.stderr.write(
                    f"warning: no qcluster is running: rollout #{rollout.pk} waits until one starts "
                    f"(manage.py qcluster, or runpanel); cancel it with manage.py cancel --rollout {rollout.pk}"
                )
            if not follow:
                return
            with CtrlC() as ctrl_c:
                status = self.follow_rollout(rollout.pk, ctrl_c)
        except KeyboardInterrupt:
            rollout.refresh_from_db()
            self.stderr.write(
                f"\n{'stopped following; ' if follow else ''}rollout #{rollout.pk} is still {rollout.status} "
                f"(Ctrl-C does not stop it): cancel it with manage.py cancel --rollout {rollout.pk}"
            )
            sys.exit(INTERRUPTED)
        sys.exit(0 if status == Rollout.Status.SUCCEEDED else NOT_SUCCEEDED)

    def follow_rollout(self, pk: int, ctrl_c: CtrlC) -> str:
        """Print every node's lines as ``node | line`` until the rollout has finished, then the summary."""
        names = dict(Deployment.objects.filter(rollout_id=pk).values_list("pk", "node__name"))
        width = max(map(len, names.values()), default=0)
        after = dict.fromkeys(names, -1)
        open_ids = set(names)
        while True:
            ctrl_c.check()
            # Statuses before lines: a deployment already ended has every line stored.
            rollout = Rollout.objects.get(pk=pk)
            ended = set(
                Deployment.objects.filter(rollout_id=pk, status__in=Deployment.TERMINAL).values_list("pk", flat=True)
            )
            printed = 0
            if open_ids:
                wanted = Q()
                for d in open_ids:
                    wanted |= Q(deployment_id=d, seq_end__gt=after[d] + 1)
                chunks = LogChunk.objects.filter(wanted).order_by("deployment_id", "seq_start")
                for chunk in chunks.iterator(chunk_size=50):
                    prefix = f"{names[chunk.deployment_id]:<{width}} | "
                    for seq, stream, text in chunk.lines():
                        if seq <= after[chunk.deployment_id]:
                            continue
                        if stream == "e":
                            self.stderr.write(prefix + text)
                        else:
                            sys.stdout.write(prefix + ("[panel] " if stream == "s" else "") + text + "\n")
                        after[chunk.deployment_id] = seq
                        printed += 1
                sys.stdout.flush()
            open_ids -= ended
            if rollout.status in Rollout.TERMINAL and not open_ids:
                break
            if not printed:
                time.sleep(0.2)
        self.summary_table(rollout)
        return rollout.status

    def summary_table(self, rollout: Rollout) -> None:
        rows = [("NODE", "STATUS", "EXIT", "DURATION")]
        for d in rollout.deployments.select_related("node").order_by("node__name"):
            duration = (
                f"{(d.finished_at - d.started_at).total_seconds():.1f} s" if d.started_at and d.finished_at else "-"
            )
            rows.append((d.node.name, d.status, "-" if d.exit_code is None else str(d.exit_code), duration))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        out = sys.stdout
        out.write("\n")
        for r in rows:
            out.write("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n")
        counts = rollouts.counts(rollout.deployments.all())
        summary = f"rollout #{rollout.pk} {rollout.status}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        if rollout.stop_reason:
            summary += f" ({rollout.stop_reason})"
        self.stderr.write(summary)
