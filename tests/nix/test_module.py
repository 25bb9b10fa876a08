"""The NixOS module (nix/module.nix) and package (nix/package.nix), tested without NixOS.

The module is evaluated with the real ``lib.evalModules`` of nixpkgs (vendored in
nix/vendor/nixpkgs-lib) under ``nix-instantiate --eval --strict --json``; the NixOS options it
sets are declared as plain options in stub-nixos-options.nix and ``pkgs`` is fake-pkgs.nix.
Then the units it generates are run: their ExecStartPre/ExecStart commands, with their
Environment= and a credentials directory made the way systemd would, on the package's own
bin/ scripts (nix/bin/*.in) pointed at this checkout and its virtualenv.

What this cannot show (systemd applying the hardening, PostgreSQL peer authentication, the
redis group on its socket) is listed in docs/nixos.md: only a NixOS VM test proves it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NIXPKGS_LIB = Path(os.environ.get("NIXPKGS_LIB", ROOT / "nix" / "vendor" / "nixpkgs-lib" / "lib"))
NIX_INSTANTIATE = shutil.which("nix-instantiate")
FAKE_PACKAGE = "/nix/store/00000000000000000000000000000000-nixos-panel"
UNITS = ("nixos-panel-migrate", "nixos-panel-web", "nixos-panel-worker")

pytestmark = pytest.mark.skipif(
    NIX_INSTANTIATE is None, reason="nix-instantiate not found (Debian's nix-bin; `make test` installs it)"
)


class NixError(Exception):
    pass


@functools.cache
def _instantiate(expr_file: str, args: tuple[tuple[str, str], ...], attr: str | None) -> object:
    cmd = [
        NIX_INSTANTIATE,
        "--readonly-mode",
        "--eval",
        "--strict",
        "--json",
        expr_file,
        "--argstr",
        "libPath",
        str(NIXPKGS_LIB),
    ]
    for name, value in args:
        cmd += ["--argstr", name, value]
    if attr:
        cmd += ["-A", attr]
    # No nixbld group on a Debian nix-bin install; evaluation needs none.
    env = {**os.environ, "NIX_CONFIG": "build-users-group ="}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise NixError(proc.stderr)
    return json.loads(proc.stdout)


def evaluate(options: dict | None = None, attr: str = "units", *, enable: bool = True, **args: str):
    """Evaluate the module with ``services.nixos-panel = {enable; **options}``; return ``attr``."""
    config = {"services": {"nixos-panel": {"enable": enable, **(options or {})}}}
    args.setdefault("panelPath", FAKE_PACKAGE)
    return _instantiate(
        str(HERE / "eval.nix"), (("configJSON", json.dumps(config, sort_keys=True)), *sorted(args.items())), attr
    )


def services(options: dict | None = None, **args: str) -> dict:
    return evaluate(options, **args)["services"]


# -- the units ---------------------------------------------------------------------------


def test_it_runs_migrate_web_and_worker_as_three_units_under_one_target():
    units = evaluate()
    assert sorted(units["services"]) == sorted(UNITS)
    target = units["targets"]["nixos-panel"]
    assert target["wantedBy"] == ["multi-user.target"]
    assert target["wants"] == ["nixos-panel-web.service", "nixos-panel-worker.service"]


def test_each_unit_runs_a_command_of_the_package():
    svc = services()
    assert (
        svc["nixos-panel-migrate"]["serviceConfig"]["ExecStart"]
        == f"{FAKE_PACKAGE}/bin/nixos-panel-manage migrate --no-input"
    )
    assert svc["nixos-panel-migrate"]["serviceConfig"]["Type"] == "oneshot"
    assert svc["nixos-panel-migrate"]["serviceConfig"]["RemainAfterExit"] is True
    assert svc["nixos-panel-web"]["serviceConfig"]["ExecStart"] == f"{FAKE_PACKAGE}/bin/nixos-panel-web"
    assert (
        svc["nixos-panel-worker"]["serviceConfig"]["ExecStartPre"]
        == f"{FAKE_PACKAGE}/bin/nixos-panel-manage reapdeployments"
    )
    assert svc["nixos-panel-worker"]["serviceConfig"]["ExecStart"] == f"{FAKE_PACKAGE}/bin/nixos-panel-manage qcluster"
    for name in ("nixos-panel-web", "nixos-panel-worker"):
        assert svc[name]["serviceConfig"]["Type"] == "exec"
        assert svc[name]["serviceConfig"]["Restart"] == "on-failure"


def test_behind_a_proxy_daphne_may_take_the_client_address_from_its_headers():
    web = services({"web": {"proxyHeaders": True}})["nixos-panel-web"]
    assert web["serviceConfig"]["ExecStart"] == f"{FAKE_PACKAGE}/bin/nixos-panel-web --proxy-headers"


def test_a_package_given_in_the_configuration_replaces_the_default():
    svc = services(panelPath="/nix/store/11111111111111111111111111111111-my-panel")
    assert (
        svc["nixos-panel-web"]["serviceConfig"]["ExecStart"]
        == "/nix/store/11111111111111111111111111111111-my-panel/bin/nixos-panel-web"
    )


def test_the_default_environment_is_the_embedded_setup():
    for name, unit in services().items():
        assert unit["environment"] == {
            "PANEL_DATA_DIR": "/var/lib/nixos-panel",
            "PANEL_HOST": "127.0.0.1",
            "PANEL_PORT": "8000",
            "PANEL_WORKERS": "4",
            "PYTHONUNBUFFERED": "1",
        }, name
        assert unit["path"] == ["/usr", "/usr", "/usr"], "git, openssh and nix"  # fake-pkgs: all are /usr


def test_options_and_settings_reach_the_environment():
    env = services(
        {
            "host": "::",
            "port": 8443,
            "workers": 2,
            "dataDir": "/var/lib/panel",
            "settings": {
                "ALLOWED_HOSTS": "panel.example.org",
                "PANEL_SECURE_COOKIES": True,
                "PANEL_DEPLOY_TIMEOUT": 600,
            },
        }
    )["nixos-panel-web"]["environment"]
    assert env["PANEL_HOST"] == "::"
    assert env["PANEL_PORT"] == "8443"
    assert env["PANEL_WORKERS"] == "2"
    assert env["PANEL_DATA_DIR"] == "/var/lib/panel"
    assert env["ALLOWED_HOSTS"] == "panel.example.org"
    assert env["PANEL_SECURE_COOKIES"] == "true"
    assert env["PANEL_DEPLOY_TIMEOUT"] == "600"


def test_every_unit_is_confined_the_same_way():
    for name, unit in services().items():
        sc = unit["serviceConfig"]
        assert sc["User"] == "nixos-panel" and sc["Group"] == "nixos-panel", name
        assert sc["StateDirectory"] == "nixos-panel" and sc["StateDirectoryMode"] == "0700"
        assert sc["WorkingDirectory"] == "/var/lib/nixos-panel"
        assert sc["ReadWritePaths"] == ["/var/lib/nixos-panel"]
        assert sc["UMask"] == "0077"
        assert sc["ProtectSystem"] == "strict"
        assert sc["ProtectHome"] is True
        assert sc["PrivateTmp"] is True
        assert sc["PrivateDevices"] is True
        assert sc["NoNewPrivileges"] is True
        assert sc["RestrictAddressFamilies"] == ["AF_UNIX", "AF_INET", "AF_INET6"]
        assert sc["CapabilityBoundingSet"] == "" and sc["AmbientCapabilities"] == ""
        assert sc["SystemCallFilter"] == ["@system-service", "~@privileged"]
        assert sc["SystemCallArchitectures"] == "native"
        for flag in (
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "ProtectClock",
            "ProtectHostname",
            "RestrictNamespaces",
            "RestrictRealtime",
            "RestrictSUIDSGID",
            "LockPersonality",
            "RemoveIPC",
        ):
            assert sc[flag] is True, (name, flag)
        assert sc["LoadCredential"] == []


def test_web_and_worker_start_after_the_network_and_the_migrations():
    svc = services()
    migrate = svc["nixos-panel-migrate"]
    assert migrate["after"] == ["network-online.target"]
    assert migrate["wants"] == ["network-online.target"]
    assert migrate["requires"] == [] and migrate["wantedBy"] == []
    for name in ("nixos-panel-web", "nixos-panel-worker"):
        assert svc[name]["after"] == ["network-online.target", "nixos-panel-migrate.service"]
        assert svc[name]["wants"] == ["network-online.target"]
        assert svc[name]["requires"] == ["nixos-panel-migrate.service"]
        assert svc[name]["wantedBy"] == ["multi-user.target"]
    for unit in svc.values():
        assert unit["partOf"] == ["nixos-panel.target"]


def test_it_creates_a_system_user_and_group():
    users = evaluate(attr="users")
    assert users["users"]["nixos-panel"]["isSystemUser"] is True
    assert users["users"]["nixos-panel"]["group"] == "nixos-panel"
    assert users["users"]["nixos-panel"]["home"] == "/var/lib/nixos-panel"
    assert "nixos-panel" in users["groups"]


def test_an_existing_user_given_by_name_is_used_not_created():
    users = evaluate({"user": "ops", "group": "ops"}, attr="users")
    assert users == {"groups": {}, "users": {}}
    assert services({"user": "ops", "group": "ops"})["nixos-panel-web"]["serviceConfig"]["User"] == "ops"


def test_a_disabled_module_adds_nothing():
    assert evaluate(enable=False) == {"services": {}, "targets": {}, "tmpfiles": []}
    assert evaluate(attr="systemPackages", enable=False) == []
    assert evaluate(attr="postgresql", enable=False)["enable"] is False


def test_a_data_dir_outside_var_lib_is_made_by_tmpfiles():
    units = evaluate({"dataDir": "/srv/panel"})
    assert units["tmpfiles"] == ["d /srv/panel 0700 nixos-panel nixos-panel - -"]
    sc = units["services"]["nixos-panel-web"]["serviceConfig"]
    assert "StateDirectory" not in sc
    assert sc["ReadWritePaths"] == ["/srv/panel"] and sc["WorkingDirectory"] == "/srv/panel"


def test_a_port_below_1024_gets_only_the_capability_to_bind_it():
    svc = services({"port": 443})
    assert svc["nixos-panel-web"]["serviceConfig"]["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert svc["nixos-panel-web"]["serviceConfig"]["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert svc["nixos-panel-worker"]["serviceConfig"]["CapabilityBoundingSet"] == ""


def test_open_firewall_opens_the_web_port_only_when_asked():
    assert evaluate({"port": 8080}, attr="networking")["firewall"]["allowedTCPPorts"] == []
    assert evaluate({"port": 8080, "openFirewall": True}, attr="networking")["firewall"]["allowedTCPPorts"] == [8080]


def test_a_worker_only_machine_has_no_web_unit():
    units = evaluate({"web": {"enable": False}, "openFirewall": True})
    assert sorted(units["services"]) == ["nixos-panel-migrate", "nixos-panel-worker"]
    assert units["targets"]["nixos-panel"]["wants"] == ["nixos-panel-worker.service"]
    assert evaluate({"web": {"enable": False}, "openFirewall": True}, attr="networking")["firewall"] == {
        "allowedTCPPorts": []
    }


# -- secrets -------------------------------------------------------------------------------

SECRETS = {
    "secretKeyFile": "/run/secrets/panel/secret-key",
    "credentialKeyFile": "/run/secrets/panel/credential-key",
    "auditSigningKeyFile": "/run/secrets/panel/audit.pem",
    "database": {"urlFile": "/run/secrets/panel/database-url"},
    "redis": {"urlFile": "/run/secrets/panel/redis-url"},
    "secretFiles": {"CSRF_TRUSTED_ORIGINS": "/run/secrets/panel/origins"},
}


def test_secrets_are_systemd_credentials_read_through_name_file():
    for name, unit in services(SECRETS).items():
        assert sorted(unit["serviceConfig"]["LoadCredential"]) == sorted(
            [
                "SECRET_KEY:/run/secrets/panel/secret-key",
                "PANEL_CREDENTIAL_KEY:/run/secrets/panel/credential-key",
                "DATABASE_URL:/run/secrets/panel/database-url",
                "REDIS_URL:/run/secrets/panel/redis-url",
                "CSRF_TRUSTED_ORIGINS:/run/secrets/panel/origins",
                "audit-signing.key:/run/secrets/panel/audit.pem",
            ]
        ), name
        env = unit["environment"]
        assert env["SECRET_KEY_FILE"] == "%d/SECRET_KEY"
        assert env["PANEL_CREDENTIAL_KEY_FILE"] == "%d/PANEL_CREDENTIAL_KEY"
        assert env["DATABASE_URL_FILE"] == "%d/DATABASE_URL"
        assert env["REDIS_URL_FILE"] == "%d/REDIS_URL"
        assert env["CSRF_TRUSTED_ORIGINS_FILE"] == "%d/CSRF_TRUSTED_ORIGINS"
        assert env["PANEL_AUDIT_SIGNING_KEY_FILE"] == "%d/audit-signing.key"
        # The values themselves are never in the environment (nor in the store).
        assert not {"SECRET_KEY", "PANEL_CREDENTIAL_KEY", "DATABASE_URL", "REDIS_URL"} & set(env)


def test_a_secret_in_the_nix_store_is_refused():
    with pytest.raises(NixError, match="not in the Nix store"):
        evaluate({"secretKeyFile": "/nix/store/00000000000000000000000000000000-secret"})


# -- PostgreSQL and Redis ------------------------------------------------------------------

LOCAL = {"database": {"createLocally": True}, "redis": {"createLocally": True}}


def test_create_locally_enables_postgresql_with_a_database_owned_by_the_panel_user():
    pg = evaluate(LOCAL, attr="postgresql")
    assert pg == {
        "enable": True,
        "ensureDatabases": ["nixos-panel"],
        "ensureUsers": [{"name": "nixos-panel", "ensureDBOwnership": True}],
    }


def test_create_locally_runs_a_redis_server_on_a_unix_socket_only():
    redis = evaluate(LOCAL, attr="redis")
    assert redis["nixos-panel"]["enable"] is True
    assert redis["nixos-panel"]["port"] == 0
    assert redis["nixos-panel"]["unixSocket"] == "/run/redis-nixos-panel/redis.sock"


def test_local_services_are_wired_into_every_unit():
    for name, unit in services(LOCAL).items():
        env = unit["environment"]
        # systemd resolves specifiers in Environment=: the URL's %2F is written %%2F.
        assert env["DATABASE_URL"] == "postgres://nixos-panel@%%2Frun%%2Fpostgresql/nixos-panel", name
        assert env["REDIS_URL"] == "unix:///run/redis-nixos-panel/redis.sock"
        assert unit["serviceConfig"]["SupplementaryGroups"] == ["redis-nixos-panel"]
        assert {
            "postgresql.service",
            "postgresql-setup.service",
            "postgresql.target",
            "redis-nixos-panel.service",
        } <= set(unit["after"])
        assert {"postgresql.service", "redis-nixos-panel.service"} <= set(unit["requires"])
        assert "postgresql.target" in unit["wants"]


def test_the_local_urls_mean_what_the_module_intends_to_the_panel_libraries():
    import dj_database_url
    import redis

    unit = services(LOCAL)["nixos-panel-worker"]["environment"]
    env = {
        name: expand_specifiers(value, Path("/run/credentials/nixos-panel-worker.service"))
        for name, value in unit.items()
    }
    assert env["DATABASE_URL"] == "postgres://nixos-panel@%2Frun%2Fpostgresql/nixos-panel"
    db = dj_database_url.parse(env["DATABASE_URL"])
    assert (db["ENGINE"], db["HOST"], db["USER"], db["NAME"], db["PASSWORD"]) == (
        "django.db.backends.postgresql",
        "/run/postgresql",
        "nixos-panel",
        "nixos-panel",
        "",
    )
    pool = redis.Redis.from_url(env["REDIS_URL"]).connection_pool  # what django-q2 and channels-redis call
    assert pool.connection_class is redis.connection.UnixDomainSocketConnection
    assert pool.connection_kwargs["path"] == "/run/redis-nixos-panel/redis.sock"


def test_databases_elsewhere_are_given_by_url():
    env = services(
        {
            "database": {"url": "postgres://panel@db.example.org/panel?options=-c%20search_path%3Dpanel"},
            "redis": {"url": "redis://cache.example.org:6379/0"},
        }
    )["nixos-panel-web"]["environment"]
    assert env["DATABASE_URL"] == "postgres://panel@db.example.org/panel?options=-c%%20search_path%%3Dpanel"
    assert (
        expand_specifiers(env["DATABASE_URL"], Path("/unused"))
        == "postgres://panel@db.example.org/panel?options=-c%20search_path%3Dpanel"
    )
    assert env["REDIS_URL"] == "redis://cache.example.org:6379/0"
    assert (
        evaluate({"database": {"url": "postgres://panel@db.example.org/panel"}}, attr="postgresql")["enable"] is False
    )


def test_the_migrate_unit_may_connect_as_the_owner_role_and_the_others_not():
    svc = services({"database": {"urlFile": "/run/secrets/db-app", "migrationUrlFile": "/run/secrets/db-owner"}})
    assert svc["nixos-panel-migrate"]["serviceConfig"]["LoadCredential"] == ["DATABASE_URL:/run/secrets/db-owner"]
    for name in ("nixos-panel-web", "nixos-panel-worker"):
        assert svc[name]["serviceConfig"]["LoadCredential"] == ["DATABASE_URL:/run/secrets/db-app"]
    for unit in svc.values():
        assert unit["environment"]["DATABASE_URL_FILE"] == "%d/DATABASE_URL"


def test_a_password_in_a_url_warns_that_it_lands_in_the_store():
    warnings = evaluate(
        {"database": {"url": "postgres://panel:hunter2@db/panel"}, "redis": {"url": "redis://:hunter2@cache:6379/0"}},
        attr="warnings",
    )
    assert len(warnings) == 2
    assert all("world-readable Nix store" in w for w in warnings)
    assert evaluate({"database": {"url": "postgres://panel@db/panel"}}, attr="warnings") == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"database": {"createLocally": True, "url": "postgres://x@db/x"}}, "createLocally sets DATABASE_URL itself"),
        ({"database": {"createLocally": True, "urlFile": "/run/secrets/db"}}, "createLocally sets DATABASE_URL itself"),
        ({"database": {"url": "postgres://x@db/x", "urlFile": "/run/secrets/db"}}, "set url or urlFile, not both"),
        ({"database": {"createLocally": True, "name": "panel"}}, "needs name == user"),
        ({"redis": {"createLocally": True, "url": "redis://cache/0"}}, "createLocally sets REDIS_URL itself"),
        ({"redis": {"url": "redis://cache/0", "urlFile": "/run/secrets/redis"}}, "set url or urlFile, not both"),
        ({"web": {"enable": False}, "worker": {"enable": False}}, "enable the web unit, the worker unit or both"),
        ({"database": {"migrationUrlFile": "/run/secrets/db-owner"}}, "migrationUrlFile: set urlFile too"),
        ({"settings": {"DATABASE_URL": "postgres://x@db/x"}}, "settings.DATABASE_URL: set by the module's own options"),
        ({"settings": {"PANEL_PORT": 9000}}, "settings.PANEL_PORT: set by the module's own options"),
        ({"secretFiles": {"SECRET_KEY": "/run/secrets/k"}}, "secretFiles.SECRET_KEY: use the module's own option"),
        (
            {"secretKeyFile": "/run/secrets/k", "settings": {"SECRET_KEY": "inline"}},
            "SECRET_KEY is both in settings and given as a file",
        ),
    ],
)
def test_contradictory_configurations_fail_an_assertion(options, message):
    failed = evaluate(options, attr="failedAssertions")
    assert len(failed) == 1 and message in failed[0], failed


def test_a_sound_configuration_fails_no_assertion():
    assert evaluate({**SECRETS, "database": {"urlFile": "/run/secrets/db"}}, attr="failedAssertions") == []
    assert evaluate(LOCAL, attr="failedAssertions") == []


# -- the administrators' nixos-panel-manage --------------------------------------------------


def test_nixos_panel_manage_runs_manage_py_like_the_units_in_a_transient_unit(tmp_path):
    fake = tmp_path / "systemd"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "systemd-run").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "open(os.environ['FAKE_SYSTEMD_RUN_ARGV'], 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    (fake / "bin" / "systemd-run").chmod(0o755)
    options = {**SECRETS, **LOCAL}  # LOCAL's database and redis replace SECRETS' urlFiles
    [package] = evaluate(options, attr="systemPackages", systemdPath=str(fake))
    assert package["name"] == "nixos-panel-manage"
    script = tmp_path / "nixos-panel-manage"
    script.write_text("#!/bin/bash\n" + package["text"])
    script.chmod(0o755)
    argv_file = tmp_path / "argv.json"
    proc = subprocess.run(
        [str(script), "createsuperuser", "--username", "it's me"],
        capture_output=True,
        text=True,
        env={**os.environ, "FAKE_SYSTEMD_RUN_ARGV": str(argv_file), "SUDO_USER": "carol"},
        stdin=subprocess.DEVNULL,
    )
    if os.geteuid() != 0:
        assert proc.returncode == 1 and "run it as root" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(argv_file.read_text())
    assert argv[:5] == ["--quiet", "--wait", "--collect", "--service-type=exec", "--pipe"]
    unit = next(a for a in argv if a.startswith("--unit=")).removeprefix("--unit=")
    assert re.fullmatch(r"nixos-panel-manage-\d+", unit)
    assert argv[argv.index("--") :] == [
        "--",
        f"{FAKE_PACKAGE}/bin/nixos-panel-manage",
        "createsuperuser",
        "--username",
        "it's me",
    ]
    props = [a.removeprefix("--property=") for a in argv if a.startswith("--property=")]
    assert {
        "User=nixos-panel",
        "Group=nixos-panel",
        "SupplementaryGroups=redis-nixos-panel",
        "StateDirectory=nixos-panel",
        "WorkingDirectory=/var/lib/nixos-panel",
        "UMask=0077",
    } <= set(props)
    # The same credentials and environment as the units, %d spelled out for the transient unit.
    worker = services(options)["nixos-panel-worker"]
    assert sorted(p.removeprefix("LoadCredential=") for p in props if p.startswith("LoadCredential=")) == sorted(
        worker["serviceConfig"]["LoadCredential"]
    )
    setenv = dict(a.removeprefix("--setenv=").split("=", 1) for a in argv if a.startswith("--setenv="))
    credentials = Path(f"/run/credentials/{unit}.service")
    expected = {k: expand_specifiers(v, credentials) for k, v in worker["environment"].items()}
    # ... plus the person behind sudo, whom the audit trail's command-line events name.
    assert setenv == {**expected, "PATH": "/usr/bin:/usr/bin:/usr/bin", "SUDO_USER": "carol"}  # git, openssh, nix
    assert setenv["SECRET_KEY_FILE"] == f"/run/credentials/{unit}.service/SECRET_KEY"


# -- the package and the flake -------------------------------------------------------------


@functools.cache
def package_and_flake() -> dict:
    return _instantiate(str(HERE / "eval-package.nix"), (), None)


def test_the_package_provides_the_commands_the_units_call_from_the_templates():
    pkg = package_and_flake()["package"]
    templates = sorted(p.name.removesuffix(".in") for p in (ROOT / "nix" / "bin").glob("*.in"))
    assert sorted(pkg["bins"]) == templates == ["nixos-panel", "nixos-panel-manage", "nixos-panel-web"]
    assert pkg["mainProgram"] == "nixos-panel"
    assert "substitute /nix/store/" in pkg["installPhase"]


def test_the_package_python_has_every_requirement_and_django_5_2():
    result = package_and_flake()
    pkg = result["package"]
    # eval-package.nix only knows requirements.txt's names: anything else would not evaluate.
    assert pkg["djangoOverride"] == "django_5_2"
    assert sorted("django" if p == "django_5_2" else p for p in pkg["pythonPackages"]) == sorted(
        result["requirementNames"]
    )


def test_the_flake_exports_the_package_and_the_module():
    flake = package_and_flake()["flake"]
    assert flake["packageNames"] == ["default", "nixos-panel"]
    assert flake["defaultPackage"] == {"pname": "nixos-panel", "version": "0123abc"}
    assert flake["defaultModuleIsModuleNix"] is True
    assert flake["nixpkgsUrl"].startswith("github:NixOS/nixpkgs/")


def test_the_package_source_is_the_panel_without_tests_or_local_state():
    paths = {
        "manage.py": True,
        "controlpanel/settings.py": True,
        "deployments/tasks.py": True,
        "templates/base.html": True,
        "static": True,
        "deployments/__pycache__": False,
        "deployments/tasks.cpython-311.pyc": False,
        "tests/test_actions.py": False,
        ".venv": False,
        "var": False,
        "nix/module.nix": False,
        "bench": False,
    }
    kept = _instantiate(
        str(HERE / "eval-package.nix"), (("sourcePathsJSON", json.dumps(list(paths))),), "package.sourceKept"
    )
    assert dict(zip(paths, kept, strict=True)) == paths


# -- running the units ---------------------------------------------------------------------


def make_package(dest: Path) -> Path:
    """What nix/package.nix installs, on this checkout: bin/ from the same templates, the
    virtualenv's python in place of python3.withPackages, the checkout as share/nixos-panel."""
    (dest / "bin").mkdir(parents=True)
    for template in (ROOT / "nix" / "bin").glob("*.in"):
        text = (
            template.read_text()
            .replace("@shell@", "/bin/sh")
            .replace("@python@", sys.executable)
            .replace("@share@", str(ROOT))
        )
        assert "@" not in text.replace('"$@"', ""), f"unsubstituted placeholder in {template.name}"
        target = dest / "bin" / template.name.removesuffix(".in")
        target.write_text(text)
        target.chmod(0o755)
    return dest


def expand_specifiers(value: str, credentials: Path) -> str:
    """systemd's specifiers in ExecStart= and Environment=: the module may use %d only."""

    def one(m: re.Match) -> str:
        if m.group(1) == "%":
            return "%"
        if m.group(1) == "d":
            return str(credentials)
        raise AssertionError(f"unexpected specifier %{m.group(1)} in {value!r}")

    return re.sub(r"%(.)", one, value)


class UnitRunner:
    """Runs a generated unit's commands roughly as systemd would: its Environment= (plus PATH
    from `path`, CREDENTIALS_DIRECTORY and HOME, nothing inherited), WorkingDirectory=, UMask=
    and LoadCredential= copied read-only into a credentials directory."""

    def __init__(self, unit: dict, credentials: Path, home: str) -> None:
        sc = unit["serviceConfig"]
        self.unit = unit
        self.cwd = sc["WorkingDirectory"]
        self.umask = int(sc["UMask"], 8)
        self.env = {k: expand_specifiers(v, credentials) for k, v in unit["environment"].items()}
        self.env["PATH"] = ":".join([f"{p}/bin" for p in unit["path"]] + [f"{p}/sbin" for p in unit["path"]])
        self.env["CREDENTIALS_DIRECTORY"] = str(credentials)
        self.env["HOME"] = home
        self.credentials = credentials

    def command(self, key: str) -> list[list[str]]:
        value = self.unit["serviceConfig"].get(key, [])
        lines = value if isinstance(value, list) else [value]
        commands = [shlex.split(expand_specifiers(line, self.credentials)) for line in lines]
        for argv in commands:
            assert argv[0].startswith("/"), f"{key}={argv[0]}: not an absolute path"
        return commands

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            argv,
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=lambda: os.umask(self.umask),
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            # Its own process group, as a unit has its own cgroup; only this leader and its group are stopped.
            return subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: os.umask(self.umask),
            )


def load_credentials(unit: dict, credentials: Path) -> None:
    """LoadCredential=NAME:FILE → $CREDENTIALS_DIRECTORY/NAME, read-only, as systemd makes it."""
    credentials.mkdir(mode=0o700, exist_ok=True)
    for entry in unit["serviceConfig"]["LoadCredential"]:
        name, source = entry.split(":", 1)
        target = credentials / name
        if not target.exists():
            shutil.copyfile(source, target)
            target.chmod(0o400)


def stop(procs: dict[str, subprocess.Popen]) -> dict[str, float]:
    """SIGTERM to each leader (systemd's stop), SIGKILL to its group after 20 s."""
    import time

    took = {}
    for name, proc in procs.items():
        start = time.monotonic()
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        took[name] = time.monotonic() - start
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    return took


def http_get(url: str) -> tuple[int, str] | None:
    """(status, final URL) after redirects, or None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.url
    except urllib.error.HTTPError as exc:
        return exc.code, url
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, on a unix socket only (as redis.createLocally sets up)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not installed (`make test` installs it)")
    socket_path = Path(tempfile.mkdtemp(prefix="panel-redis-")) / "redis.sock"
    proc = subprocess.Popen(
        [
            server,
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(socket_path.parent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(socket_path.exists, timeout=10, what="redis-server's socket")
        yield f"unix://{socket_path}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(socket_path.parent, ignore_errors=True)


@pytest.mark.parametrize("queue", ["embedded", "redis"])
def test_the_generated_units_start_a_working_panel(tmp_path, request, queue):
    """migrate, then the worker's ExecStartPre and ExecStart, then the web's ExecStart, as
    the module generates them, secrets as credentials, on the embedded SQLite database; with
    the ORM queue and in-memory channel layer, then with Redis on a unix socket (the URL form
    redis.createLocally gives: channels-redis and django-q2's Redis broker)."""
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    package = make_package(tmp_path / "package")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)  # systemd-tmpfiles would, outside /var/lib
    sources = tmp_path / "secrets"
    sources.mkdir(mode=0o700)
    (sources / "secret-key").write_text(secrets.token_urlsafe(50) + "\n")
    (sources / "credential-key").write_text(Fernet.generate_key().decode() + "\n")
    (sources / "audit.pem").write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    port = free_port()
    # The Redis run also passes daphne an argument through the web unit's ExecStart.
    redis_options = (
        {"redis": {"url": request.getfixturevalue("private_redis")}, "web": {"proxyHeaders": True}}
        if queue == "redis"
        else {}
    )
    svc = services(
        {
            **redis_options,
            "dataDir": str(data),
            "port": port,
            "workers": 1,
            "secretKeyFile": str(sources / "secret-key"),
            "credentialKeyFile": str(sources / "credential-key"),
            "auditSigningKeyFile": str(sources / "audit.pem"),
        },
        panelPath=str(package),
    )
    assert set(svc) == set(UNITS)
    assert "DATABASE_URL" not in svc["nixos-panel-web"]["environment"]  # the embedded SQLite set-up
    assert ("REDIS_URL" in svc["nixos-panel-web"]["environment"]) == (queue == "redis")

    runners = {}
    for name in UNITS:
        credentials = tmp_path / "credentials" / name
        credentials.parent.mkdir(exist_ok=True)
        load_credentials(svc[name], credentials)
        runners[name] = UnitRunner(svc[name], credentials, home=str(data))

    migrate = runners["nixos-panel-migrate"]
    [argv] = migrate.command("ExecStart")
    migrate.run(argv)
    assert (data / "panel.sqlite3").exists()

    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in ("nixos-panel-worker", "nixos-panel-web"):
            runner = runners[name]
            for pre in runner.command("ExecStartPre"):
                runner.run(pre)
            [argv] = runner.command("ExecStart")
            procs[name] = runner.start(argv, tmp_path / f"{name}.log")

        def web_answers():
            assert procs["nixos-panel-web"].poll() is None, (tmp_path / "nixos-panel-web.log").read_text()
            return http_get(f"http://127.0.0.1:{port}/")

        status, url = wait_for(web_answers, timeout=30, interval=0.2, what="the web unit to answer")
        assert status == 200 and "/login/" in url, (status, url)

        # The worker unit takes tasks off the queue (ORM or Redis broker) and the migrate unit
        # left the reaper's schedule for it; asked through the same environment as the units.
        probe = runners["nixos-panel-worker"].run(
            [
                str(package / "bin" / "nixos-panel-manage"),
                "shell",
                "-c",
                "from django_q.models import Schedule\n"
                "from django_q.tasks import async_task, result\n"
                "reaper = Schedule.objects.filter(name='reap-stale-deployments').count()\n"
                "print(f\"probe reaper={reaper} task={result(async_task('math.floor', 2.5), wait=20000)}\")\n",
            ],
            timeout=60,
        )
        assert "probe reaper=1 task=2\n" in probe.stdout, probe.stdout + probe.stderr
        assert procs["nixos-panel-worker"].poll() is None, (tmp_path / "nixos-panel-worker.log").read_text()

        # An audit checkpoint is signed with the credential's key, not a generated one.
        runners["nixos-panel-worker"].run([str(package / "bin" / "nixos-panel-manage"), "audit", "checkpoint"])
    finally:
        took = stop(procs)

    # Every secret came from $CREDENTIALS_DIRECTORY: none was generated in the data dir.
    assert not {"secret_key", "credential.key", "audit-signing.key"} & {p.name for p in data.iterdir()}
    assert stat.S_IMODE((data / "panel.sqlite3").stat().st_mode) == 0o600  # UMask=0077
    assert all(t < 20 for t in took.values()), f"a unit did not stop on SIGTERM: {took}"
