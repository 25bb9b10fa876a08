"""What the settings only point at, made at start-up: the data directory and the generated keys.

Importing the settings writes nothing (``manage.py check`` on a fresh
checkout leaves no trace).  ``ensure_data_dir()`` creates the data directory
and generates each key that is given neither as ``NAME`` nor as
``NAME_FILE``; ``runpanel`` calls it first, and so does ``migrate``
(``deployments/audit/management/commands/migrate.py``), which every other way
of running the panel (the NixOS module's units, the end-to-end tests) runs
first.  ``check_keys`` is the system check that names a key still missing.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

# setting: (the variable that gives it, its file in the data directory (a setting), how to make one)
GENERATED = {
    "SECRET_KEY": ("SECRET_KEY", "SECRET_KEY_PATH", lambda: secrets.token_urlsafe(50)),
    "CREDENTIAL_KEYS": ("PANEL_CREDENTIAL_KEY", "CREDENTIAL_KEY_PATH", lambda: Fernet.generate_key().decode()),
}


def ensure_data_dir(conf=None) -> list[Path]:
    """Create the data directory and every missing generated key; return the files written.

    ``conf`` is the settings (default ``django.conf.settings``; the test
    settings pass their own module).  A key generated here is also put into
    ``conf``, so the running process uses it at once.
    """
    if conf is None:
        from django.conf import settings as conf
    conf.DATA_DIR.mkdir(parents=True, exist_ok=True)
    conf.STATIC_ROOT.mkdir(exist_ok=True)
    written = []
    for setting, (_, path_setting, make) in GENERATED.items():
        if _value(conf, setting):
            continue
        path = Path(getattr(conf, path_setting))
        value = _create_secret_file(path, make)
        if value is None:
            value = path.read_text().strip()  # another process starting at the same time wrote it first
        else:
            written.append(path)
        setattr(conf, setting, value.split(",") if setting == "CREDENTIAL_KEYS" else value)
    return written


def _value(conf, setting: str):
    try:
        return getattr(conf, setting)
    except ImproperlyConfigured:  # Django refuses to hand out an empty SECRET_KEY
        return ""


def _create_secret_file(path: Path, make) -> str | None:
    """Write a new secret to ``path`` (mode 0600) and return it; None if the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: two processes starting together must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    value = make()
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def check_keys(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """A warning for each key neither given nor generated yet (a fresh data directory)."""
    from django.conf import settings

    return [
        checks.Warning(
            f"{variable} is not set and there is no generated key in {getattr(settings, path_setting)} yet",
            hint=f"Give {variable} (or {variable}_FILE), or run `manage.py migrate` or `manage.py runpanel` "
            f"once to generate it.",
            id="panel.W001",
        )
        for setting, (variable, path_setting, _) in GENERATED.items()
        if not _value(settings, setting)
    ]
