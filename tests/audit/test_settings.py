"""Every audit variable is read by settings.py's ``env()``, so ``NAME_FILE`` works for each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the embedded defaults, plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PANEL_", "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"))}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=120)


AUDIT_VARIABLES = {
    "PANEL_AUDIT_SIGNING_KEY_FILE": ("AUDIT_SIGNING_KEY_FILE", "/run/credentials/panel/audit.pem"),
    "PANEL_AUDIT_CHECKPOINT_DIR": ("AUDIT_CHECKPOINT_DIR", "/srv/audit/checkpoints"),
    "PANEL_AUDIT_CHECKPOINT_URL": ("AUDIT_CHECKPOINT_URL", "https://audit.example.com/in"),
    "PANEL_AUDIT_CHECKPOINT_MINUTES": ("AUDIT_CHECKPOINT_MINUTES", "5"),
    "PANEL_AUDIT_ASYNC_COMMIT": ("AUDIT_ASYNC_COMMIT", "on"),
}
PRINT_AUDIT = ("import json, controlpanel.settings as s; print(json.dumps({n: str(getattr(s, n)) for n in "
               f"{[setting for setting, _ in AUDIT_VARIABLES.values()]!r}}}))")


def test_every_audit_variable_may_come_from_a_file(tmp_path):
    env = {"PANEL_DATA_DIR": str(tmp_path / "data")}
    for variable, (_, value) in AUDIT_VARIABLES.items():
        (tmp_path / variable).write_text(value + "\n")
        env[variable + "_FILE"] = str(tmp_path / variable)
    result = python(PRINT_AUDIT, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "AUDIT_SIGNING_KEY_FILE": "/run/credentials/panel/audit.pem", "AUDIT_CHECKPOINT_DIR": "/srv/audit/checkpoints",
        "AUDIT_CHECKPOINT_URL": "https://audit.example.com/in", "AUDIT_CHECKPOINT_MINUTES": "5",
        "AUDIT_ASYNC_COMMIT": "True",
    }


def test_audit_defaults_live_in_the_data_dir(tmp_path):
    result = python(PRINT_AUDIT, PANEL_DATA_DIR=str(tmp_path))
    assert json.loads(result.stdout) == {
        "AUDIT_SIGNING_KEY_FILE": str(tmp_path / "audit-signing.key"),
        "AUDIT_CHECKPOINT_DIR": str(tmp_path / "audit-checkpoints"),
        "AUDIT_CHECKPOINT_URL": "", "AUDIT_CHECKPOINT_MINUTES": "15", "AUDIT_ASYNC_COMMIT": "False",
    }


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("PANEL_AUDIT_CHECKPOINT_MINUTES", "-1", "must be 0 (off) or more"),
    ("PANEL_AUDIT_CHECKPOINT_MINUTES", "soon", "is not an integer"),
    ("PANEL_AUDIT_ASYNC_COMMIT", "maybe", "is not a boolean"),
])
def test_bad_audit_values_are_refused(tmp_path, variable, value, message):
    result = python("import controlpanel.settings", PANEL_DATA_DIR=str(tmp_path), **{variable: value})
    assert result.returncode == 1 and "ImproperlyConfigured" in result.stderr and message in result.stderr
