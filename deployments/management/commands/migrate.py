"""``migrate``, after making sure the data directory and the generated keys exist.

Importing the settings writes nothing (controlpanel/bootstrap.py), so the first
command run on a fresh data directory creates it: ``runpanel`` does, and this
``migrate`` does for every other way of starting the panel (the NixOS module's
migrate unit, the end-to-end tests), which all migrate first.
"""

from django.core.management.commands.migrate import Command as MigrateCommand

from controlpanel.bootstrap import ensure_data_dir


class Command(MigrateCommand):
    def execute(self, *args, **options):
        # Before the system checks: they connect to the database, which SQLite keeps in the data
        # directory, and they look for the keys.
        self.generated = ensure_data_dir()
        return super().execute(*args, **options)

    def handle(self, *args, **options):
        if options["verbosity"] >= 1:
            for path in self.generated:
                self.stdout.write(f"Generated {path}")
        return super().handle(*args, **options)
