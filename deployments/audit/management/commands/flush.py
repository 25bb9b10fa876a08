"""``flush``, able to empty the append-only audit table.

Django's own ``flush`` (which the test runner calls between transactional
tests) would be refused by the audit triggers.  This one lifts them for the
flush and puts them back.  On PostgreSQL that takes the table owner's
rights, which the application's role should not have in production
(docs/audit.md), so there ``flush`` fails as it should.
"""

from django.core.management.commands.flush import Command as FlushCommand
from django.db import connections

from deployments.audit.db import triggers_lifted


class Command(FlushCommand):
    def handle(self, **options):
        with triggers_lifted(connections[options["database"]]):
            return super().handle(**options)
