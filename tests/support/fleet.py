"""A fleet of nodes for rollout tests, and two stand-ins for the worker that take what a rollout hands
to the queue (patched over ``rollouts.hand_out``) and end each deployment through ``lifecycle`` as the
real one does.

- ``make_fleet(repository)``: web-01..web-08 (tag ``web``; web-01 and web-02 also ``canary``) and
  db-01..db-04 (tag ``db``), pinned, not reachable.
- ``StandInWorker``: keeps the handed-out ids; the test claims and ends them, step by step.
- ``ThreadWorker``: runs each handed-out deployment in a thread of its own: claims it, writes a few
  log lines, ends it as ``outcome(node name)`` says (for the command line's ``--follow``).
"""

from __future__ import annotations

import threading
import time

from deployments import inventory, lifecycle, logstream
from deployments.models import Credential, Deployment, Node

from .keys import HOST_KEY


def make_fleet(repository) -> dict[str, Node]:
    cred = Credential(name="fleet-pw", kind=Credential.Kind.PASSWORD)
    cred.set_secret("pw")
    cred.save()
    layout = [(f"web-{i:02d}", ["web", "canary"] if i <= 2 else ["web"]) for i in range(1, 9)]
    layout += [(f"db-{i:02d}", ["db"]) for i in range(1, 5)]
    nodes = {}
    for name, tags in layout:
        node = Node(
            name=name,
            host="192.0.2.1",
            flake_attr="devm",
            repository=repository,
            credential=cred,
            host_key=HOST_KEY,
            host_key_fingerprint="SHA256:test",
        )
        nodes[name] = inventory.save_object(node, tags=tags)
    return nodes


class StandInWorker:
    """What ``rollouts.hand_out`` hands over, kept in order; the test says how each run ends."""

    def __init__(self):
        self.handed: list[int] = []  # deployment ids, in the order the rollout handed them out
        self.tasks: list[tuple[int, ...]] = []  # the ids of each task handed out
        self.lock = threading.Lock()

    def enqueue(self, *pks: int) -> None:
        """One task: the ids it carries (``ROLLOUT_THREADS`` at most), each a node's deployment."""
        with self.lock:
            self.tasks.append(pks)
            self.handed.extend(pks)

    def claim_all(self) -> list[Deployment]:
        """Claim every handed-out deployment still queued (as workers would); the newly claimed, in order."""
        started = [pk for pk in list(self.handed) if lifecycle.claim(pk)]
        return list(Deployment.objects.filter(pk__in=started).select_related("node").order_by("rollout_position"))

    def running(self) -> list[Deployment]:
        """Every handed-out deployment now running (claimed now or earlier), in rollout order."""
        self.claim_all()
        qs = Deployment.objects.filter(pk__in=self.handed, status="running").select_related("node")
        return list(qs.order_by("rollout_position"))

    def end(self, deployment: Deployment, status: str = "succeeded", exit_code: int | None = None) -> None:
        lifecycle.finish(deployment.pk, status, exit_code=0 if status == "succeeded" else exit_code)

    def run_all(self, outcome=lambda d: "succeeded", limit: int = 1000) -> None:
        """Claim and end handed-out deployments until nothing is left to run."""
        for _ in range(limit):
            running = self.running()
            if not running:
                return
            for d in running:
                status = outcome(d)
                self.end(d, status, exit_code=None if status == "succeeded" else 4)


class ThreadWorker:
    """Runs each handed-out deployment in a thread: claim, three log lines, then ``outcome(node name)``."""

    def __init__(self, outcome=lambda name: "succeeded", seconds: float = 0.05):
        self.outcome = outcome
        self.seconds = seconds
        self.threads: list[threading.Thread] = []

    def enqueue(self, *pks: int) -> None:
        for pk in pks:
            thread = threading.Thread(target=self._run, args=(pk,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, pk: int) -> None:
        from django.db import connection

        try:
            if not lifecycle.claim(pk):
                return
            name = Deployment.objects.select_related("node").get(pk=pk).node.name
            writer = logstream.LogWriter(pk, start_seq=0)
            writer.write("sys", f"deployment #{pk}: nixos-rebuild on {name}")
            writer.write("err", "building the system configuration...")
            time.sleep(self.seconds)
            status = self.outcome(name)
            writer.write("out" if status == "succeeded" else "err", f"{name} says {status}")
            summary = writer.close()
            lifecycle.finish(
                pk,
                status,
                exit_code=0 if status == "succeeded" else 4,
                line_count=summary.line_count,
                byte_count=summary.byte_count,
                log_sha256=summary.sha256,
            )
        finally:
            connection.close()

    def join(self, timeout: float = 30) -> None:
        for thread in list(self.threads):
            thread.join(timeout)
