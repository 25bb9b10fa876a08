"""Prometheus metrics at ``/metrics``: read from the database at each scrape, in a few queries.

A custom collector (no counters kept in processes: several daphne and qcluster processes would each hold
their own), registered in a registry of its own.  The endpoint wants ``Authorization: Bearer <token>``
matching ``PANEL_METRICS_TOKEN`` (compared in constant time); with no token configured it does not exist
(404), so a panel never publishes its metrics by accident; a missing or wrong token is 401.
"""

from __future__ import annotations

import hmac
import time

from django.conf import settings
from django.db.models import Count, F, FloatField, Func, Q, Sum
from django.http import Http404, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from deployments.models import Deployment, Node, Rollout

from .models import NodeSync

# Upper bounds (seconds) of the deployment duration histogram's buckets.
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600)


def _by_status(queryset, choices) -> dict[str, int]:
    counts = dict(queryset.values_list("status").annotate(n=Count("pk")).order_by())
    return {status: counts.get(status, 0) for status in choices}


class SecondsBetween(Func):
    """``end - start`` in seconds, in the database's own arithmetic (Django's duration expressions call a
    Python function per row on SQLite: 0.5 s a scrape for 10,000 deployments)."""

    arity = 2
    output_field = FloatField()

    def as_sql(self, compiler, connection, **extra):  # PostgreSQL
        (start, start_params), (end, end_params) = (compiler.compile(e) for e in self.source_expressions)
        return f"EXTRACT(EPOCH FROM ({end} - {start}))", [*end_params, *start_params]

    def as_sqlite(self, compiler, connection, **extra):
        (start, start_params), (end, end_params) = (compiler.compile(e) for e in self.source_expressions)
        return f"((julianday({end}) - julianday({start})) * 86400.0)", [*end_params, *start_params]


class PanelCollector:
    """Deployments, their durations, the queue, the workers, nodes by sync status, rollouts."""

    def collect(self):
        deployments = GaugeMetricFamily("panel_deployments", "Deployments by status.", labels=["status"])
        for status, n in _by_status(Deployment.objects.all(), Deployment.Status.values).items():
            deployments.add_metric([status], n)
        yield deployments
        yield self._durations()

        nodes = GaugeMetricFamily(
            "panel_nodes_sync", "Nodes by sync status (never checked counts as unknown).", labels=["status"]
        )
        by_sync = _by_status(NodeSync.objects.all(), NodeSync.Status.values)
        by_sync[NodeSync.Status.UNKNOWN] += Node.objects.count() - sum(by_sync.values())
        for status, n in by_sync.items():
            nodes.add_metric([status], n)
        yield nodes

        rollouts = GaugeMetricFamily("panel_rollouts", "Rollouts by status.", labels=["status"])
        for status, n in _by_status(Rollout.objects.all(), Rollout.Status.values).items():
            rollouts.add_metric([status], n)
        yield rollouts

        yield from self._queue()

    def _durations(self) -> HistogramMetricFamily:
        """Finished deployments' run time (started to finished), as one aggregate query."""
        ran = Deployment.objects.filter(started_at__isnull=False, finished_at__isnull=False).annotate(
            took=SecondsBetween(F("started_at"), F("finished_at"))
        )
        counts = ran.aggregate(
            total=Count("pk"),
            seconds=Sum("took"),
            **{f"le{b}": Count("pk", filter=Q(took__lte=b)) for b in DURATION_BUCKETS},
        )
        total_seconds = float(counts["seconds"] or 0)
        buckets = [(str(float(b)), counts[f"le{b}"]) for b in DURATION_BUCKETS] + [("+Inf", counts["total"])]
        return HistogramMetricFamily(
            "panel_deployment_duration_seconds",
            "How long finished deployments ran (started to finished).",
            buckets=buckets,
            sum_value=total_seconds,
        )

    def _queue(self):
        from django_q.brokers import get_broker
        from django_q.conf import Conf
        from django_q.status import Stat

        depth = GaugeMetricFamily("panel_queue_depth", "Tasks waiting in the django-q2 queue.")
        up = GaugeMetricFamily("panel_scrape_queue_ok", "1 if the queue and the worker heartbeats could be read.")
        clusters = GaugeMetricFamily(
            "panel_worker_clusters", "qcluster processes that reported a heartbeat, by state.", labels=["state"]
        )
        workers = GaugeMetricFamily("panel_worker_processes", "Worker processes of qclusters alive.")
        age = GaugeMetricFamily(
            "panel_worker_heartbeat_age_seconds", "Seconds since each qcluster's last heartbeat.", labels=["cluster"]
        )
        try:
            depth.add_metric([], get_broker().queue_size())
            stats = Stat.get_all()
        except Exception:  # noqa: BLE001 - Redis down: say so in the scrape rather than failing it
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        states: dict[str, int] = {}
        alive_workers = 0
        now = time.time()
        for stat in stats:
            states[stat.status] = states.get(stat.status, 0) + 1
            if stat.status not in (Conf.STOPPING, Conf.STOPPED):
                alive_workers += len(stat.workers)
            age.add_metric([str(stat.cluster_id)], max(0.0, now - stat.timestamp.timestamp()))
        for state, n in sorted(states.items()):
            clusters.add_metric([state], n)
        workers.add_metric([], alive_workers)
        yield from (depth, up, clusters, workers, age)


registry = CollectorRegistry(auto_describe=False)
registry.register(PanelCollector())


def _authorized(request) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(token.strip().encode(), settings.METRICS_TOKEN.encode())


@require_GET
def metrics_view(request):
    """``/metrics``: 404 without a configured token, 401 without the right one."""
    if not settings.METRICS_TOKEN:
        raise Http404("metrics are off: set PANEL_METRICS_TOKEN")
    if not _authorized(request):
        response = HttpResponse("a bearer token is required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
