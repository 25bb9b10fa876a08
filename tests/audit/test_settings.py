"""Importing the settings writes nothing; start-up makes the data directory and its keys.

Also: every audit variable is read by settings.py's ``env()``, so ``NAME_FILE`` works for each.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core.exceptions import ImproperlyConfigured

from controlpanel.bootstrap import check_keys, ensure_data_dir

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the embedded defaults, plus ``env``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PANEL_", "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"))
    }
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def test_importing_the_settings_writes_nothing(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for data in (missing, empty):
        result = python(
            "import controlpanel.settings as s; assert s.SECRET_KEY == '' and s.CREDENTIAL_KEYS == []",
            PANEL_DATA_DIR=str(data),
        )
        assert result.returncode == 0, result.stderr
    assert not missing.exists() and not any(empty.iterdir())


def test_manage_py_check_passes_on_a_fresh_data_dir_and_names_the_missing_keys(tmp_path):
    data = tmp_path / "data"
    result = python(
        "import sys; from django.core.management import execute_from_command_line; "
        "execute_from_command_line(['manage.py', 'check'])",
        PANEL_DATA_DIR=str(data),
        DJANGO_SETTINGS_MODULE="controlpanel.settings",
    )
    assert result.returncode == 0, result.stderr
    assert "SECRET_KEY is not set" in result.stderr and "PANEL_CREDENTIAL_KEY is not set" in result.stderr
    assert not data.exists()


def test_migrate_creates_the_data_dir_and_keys_once(tmp_path):
    data = tmp_path / "data"
    migrate = (
        "from django.core.management import execute_from_command_line; "
        "execute_from_command_line(['manage.py', 'migrate', '--verbosity', '0'])"
    )
    result = python(migrate, PANEL_DATA_DIR=str(data), DJANGO_SETTINGS_MODULE="controlpanel.settings")
    assert result.returncode == 0, result.stderr
    keys = {name: (data / name).read_text() for name in ("secret_key", "credential.key")}
    for name in keys:
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    assert (data / "panel.sqlite3").exists() and (data / "static").is_dir()
    # A second start reads them; it never generates new ones.
    assert python(migrate, PANEL_DATA_DIR=str(data), DJANGO_SETTINGS_MODULE="controlpanel.settings").returncode == 0
    assert {name: (data / name).read_text() for name in keys} == keys


def fresh_conf(tmp_path, **values) -> SimpleNamespace:
    data = tmp_path / "data"
    return SimpleNamespace(
        DATA_DIR=data,
        STATIC_ROOT=data / "static",
        SECRET_KEY_PATH=data / "secret_key",
        CREDENTIAL_KEY_PATH=data / "credential.key",
        **{"SECRET_KEY": "", "CREDENTIAL_KEYS": [], **values},
    )


def test_start_up_generates_the_keys_and_the_process_uses_them_at_once(tmp_path):
    conf = fresh_conf(tmp_path)
    assert ensure_data_dir(conf) == [conf.SECRET_KEY_PATH, conf.CREDENTIAL_KEY_PATH]
    assert conf.SECRET_KEY == conf.SECRET_KEY_PATH.read_text().strip()
    assert conf.CREDENTIAL_KEYS == [conf.CREDENTIAL_KEY_PATH.read_text().strip()]
    assert ensure_data_dir(fresh_conf(tmp_path)) == []  # another process: reads what the first one wrote


def test_keys_given_in_the_environment_are_never_generated(tmp_path):
    conf = fresh_conf(tmp_path, SECRET_KEY="given", CREDENTIAL_KEYS=["given"])
    assert ensure_data_dir(conf) == []
    assert sorted(p.name for p in conf.DATA_DIR.iterdir()) == ["static"]


def test_the_system_check_names_each_missing_key(settings):
    assert check_keys() == []
    settings.SECRET_KEY = ""
    settings.CREDENTIAL_KEYS = []
    messages = check_keys()
    assert [m.id for m in messages] == ["panel.W001", "panel.W001"]
    assert "SECRET_KEY is not set" in messages[0].msg and "PANEL_CREDENTIAL_KEY is not set" in messages[1].msg
    assert "SECRET_KEY_FILE" in messages[0].hint


def test_without_a_credential_key_encrypting_says_which_variable(settings):
    from deployments import crypto

    settings.CREDENTIAL_KEYS = []
    with pytest.raises(ImproperlyConfigured, match="PANEL_CREDENTIAL_KEY is not set"):
        crypto.encrypt("secret")


AUDIT_VARIABLES = {
    "PANEL_AUDIT_SIGNING_KEY_FILE": ("AUDIT_SIGNING_KEY_FILE", "/run/credentials/panel/audit.pem"),
    "PANEL_AUDIT_CHECKPOINT_DIR": ("AUDIT_CHECKPOINT_DIR", "/srv/audit/checkpoints"),
    "PANEL_AUDIT_CHECKPOINT_URL": ("AUDIT_CHECKPOINT_URL", "https://audit.example.com/in"),
    "PANEL_AUDIT_CHECKPOINT_MINUTES": ("AUDIT_CHECKPOINT_MINUTES", "5"),
    "PANEL_AUDIT_ASYNC_COMMIT": ("AUDIT_ASYNC_COMMIT", "on"),
}
PRINT_AUDIT = (
    "import json, controlpanel.settings as s; print(json.dumps({n: str(getattr(s, n)) for n in "
    f"{[setting for setting, _ in AUDIT_VARIABLES.values()]!r}}}))"
)


def test_every_audit_variable_may_come_from_a_file(tmp_path):
    env = {"PANEL_DATA_DIR": str(tmp_path / "data")}
    for variable, (_, value) in AUDIT_VARIABLES.items():
        (tmp_path / variable).write_text(value + "\n")
        env[variable + "_FILE"] = str(tmp_path / variable)
    result = python(PRINT_AUDIT, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "AUDIT_SIGNING_KEY_FILE": "/run/credentials/panel/audit.pem",
        "AUDIT_CHECKPOINT_DIR": "/srv/audit/checkpoints",
        "AUDIT_CHECKPOINT_URL": "https://audit.example.com/in",
        "AUDIT_CHECKPOINT_MINUTES": "5",
        "AUDIT_ASYNC_COMMIT": "True",
    }


def test_audit_defaults_live_in_the_data_dir(tmp_path):
    result = python(PRINT_AUDIT, PANEL_DATA_DIR=str(tmp_path))
    assert json.loads(result.stdout) == {
        "AUDIT_SIGNING_KEY_FILE": str(tmp_path / "audit-signing.key"),
        "AUDIT_CHECKPOINT_DIR": str(tmp_path / "audit-checkpoints"),
        "AUDIT_CHECKPOINT_URL": "",
        "AUDIT_CHECKPOINT_MINUTES": "15",
        "AUDIT_ASYNC_COMMIT": "False",
    }


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PANEL_AUDIT_CHECKPOINT_MINUTES", "-1", "must be 0 (off) or more"),
        ("PANEL_AUDIT_CHECKPOINT_MINUTES", "soon", "is not an integer"),
        ("PANEL_AUDIT_ASYNC_COMMIT", "maybe", "is not a boolean"),
        ("PANEL_AUDIT_PUBLIC_KEY", "c2hvcnQ=", "PANEL_AUDIT_PUBLIC_KEY: not an Ed25519 public key"),
        ("PANEL_AUDIT_PUBLIC_KEY", "not base64!", "PANEL_AUDIT_PUBLIC_KEY"),
    ],
)
def test_bad_audit_values_are_refused(tmp_path, variable, value, message):
    result = python("import controlpanel.settings", PANEL_DATA_DIR=str(tmp_path), **{variable: value})
    assert result.returncode == 1 and "ImproperlyConfigured" in result.stderr and message in result.stderr


def test_the_audit_public_key_may_come_from_a_file(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    (tmp_path / "audit.pub").write_text(pem)
    result = python(
        "import controlpanel.settings as s; print(s.AUDIT_PUBLIC_KEY)",
        PANEL_DATA_DIR=str(tmp_path / "data"),
        PANEL_AUDIT_PUBLIC_KEY_FILE=str(tmp_path / "audit.pub"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pem.strip()
