"""Mark deployments whose worker stopped beating as interrupted (also scheduled every minute)."""

from django.core.management.base import BaseCommand

from deployments.lifecycle import reap_stale


class Command(BaseCommand):
    help = "Mark running deployments with a stale heartbeat as interrupted."

    def add_arguments(self, parser):
        parser.add_argument("--stale-after", type=float, default=None, help="seconds (default from settings)")

    def handle(self, stale_after, **opts):
        self.stdout.write(f"{reap_stale(stale_after)} deployment(s) marked interrupted")
