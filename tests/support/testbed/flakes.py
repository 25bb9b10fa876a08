"""Flake git repositories whose NixOS configurations build in a fraction of a second.

The flake has no inputs (no nixpkgs): each ``nixosConfigurations.<attr>``
holds only ``config.system.build.toplevel``, a plain ``derivation`` built with
the host's ``/bin/sh``. Its output looks like a NixOS system where the panel
can tell: ``nixos-version``, ``sw`` (the system path, linking versioned
packages ``<name>-<version>``), ``kernel``, ``initrd`` and ``systemd`` links
into store paths of their own (so ``nix store diff-closures`` prints what it
prints for NixOS: version changes, added and removed packages, size changes)
and an executable ``bin/switch-to-configuration`` with NixOS's usage,
messages and exit codes (see ``switch-to-configuration.sh``).

The per-configuration knobs live in ``testbed.json`` beside ``flake.nix``, so
``commit_change`` only edits JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STC_BODY = HERE / "switch-to-configuration.sh"

# Characters Nix allows in store path names; the tag ends up in one.
_TAG_RE = re.compile(r"^[A-Za-z0-9+._?=-]{1,64}$")
_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

# A flake without inputs locks to this; shipping it means Nix never needs to
# write a lock file into the (possibly read-only, possibly non-git) source.
FLAKE_LOCK = {"nodes": {"root": {}}, "root": "root", "version": 7}

FLAKE_NIX = r"""{
  description = "Testbed NixOS-like configurations (no inputs, builds offline)";

  outputs = { self }:
    let
      system = "x86_64-linux";
      specs = builtins.fromJSON (builtins.readFile ./testbed.json);
      # A NixOS-like part of the closure: "<name>-<version>", so `nix store diff-closures` tells versions.
      part = name: script: derivation {
        inherit name system;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        args = [ "-c" "set -e; mkdir -p $out; cd $out; ${script}" ];
      };
      mkPackage = name: version: part "${name}-${version}"
        "mkdir bin; printf '#!/bin/sh\\necho ${name} ${version}\\n' > bin/${name}; chmod 0555 bin/${name}";
      mkSw = spec: derivation {
        name = "system-path";
        inherit system;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        packages = builtins.attrValues (builtins.mapAttrs mkPackage spec.packages);
        payloadKib = toString spec.payload_kib;
        args = [ "-c" ''
          set -e
          mkdir -p $out/share/testbed $out/bin
          echo testbed system path > $out/share/testbed/README
          for p in $packages; do ln -s $p/bin/* $out/bin/; done
          if [ "$payloadKib" -gt 0 ]; then head -c "$payloadKib"K /dev/urandom > $out/share/testbed/payload; fi
        '' ];
      };
      mkSystem = attr: spec: {
        config.system.build.toplevel = derivation {
          name = "nixos-system-${attr}-24.05.testbed-${spec.version_tag}";
          inherit system attr;
          sw = mkSw spec;
          kernel = part "linux-${spec.kernel_version}" "echo kernel ${spec.kernel_version} > bzImage";
          initrd = part "initrd-linux-${spec.kernel_version}" "echo initrd ${spec.kernel_version} > initrd";
          systemd = part "systemd-${spec.systemd_version}" "mkdir bin; echo systemd > bin/systemctl";
          builder = "/bin/sh";
          PATH = "/usr/bin:/bin";
          stcBody = ./switch-to-configuration.sh;
          versionTag = spec.version_tag;
          activationExit = toString spec.activation_exit;
          extraLines = toString spec.extra_lines;
          linesPerSecond = toString spec.lines_per_second;
          sleepTicks = toString spec.sleep_ticks;
          network = spec.network or "up";
          health = if (spec.healthy or true) then "ok" else "failing";
          buildExit = toString spec.build_exit;
          buildWork = toString spec.build_work;
          args = [ "-c" ''
            set -e
            if [ "$buildExit" != 0 ]; then
              echo "error: builder for the testbed system failed on purpose (build_exit $buildExit)" >&2
              exit "$buildExit"
            fi
            i=0; while [ "$i" -lt "$buildWork" ]; do i=$((i + 1)); done
            mkdir -p $out/bin
            echo "24.05.testbed-$versionTag (Uakari)" > $out/nixos-version
            echo "$health" > $out/health
            ln -s $sw $out/sw
            ln -s $kernel/bzImage $out/kernel
            ln -s $initrd/initrd $out/initrd
            ln -s $systemd $out/systemd
            {
              echo '#!/bin/sh'
              echo "toplevel=$out"
              echo "attr=$attr"
              echo "activation_exit=$activationExit"
              echo "extra_lines=$extraLines"
              echo "lines_per_second=$linesPerSecond"
              echo "sleep_ticks=$sleepTicks"
              echo "network=$network"
              cat $stcBody
            } > $out/bin/switch-to-configuration
            chmod 0555 $out/bin/switch-to-configuration
          '' ];
        };
      };
    in {
      nixosConfigurations = builtins.mapAttrs mkSystem specs;
    };
}
"""


@dataclass
class NodeConfigSpec:
    """What one ``nixosConfigurations.<attr>`` does when activated.

    activation_exit: switch-to-configuration's exit code (0, 1, 2, 3, 4, 100);
        4 prints ``warning: the following units failed: foo.service``.
    extra_lines: lines of exactly 75 bytes (with newline) printed on stdout
        during activation.
    lines_per_second: if set, ``extra_lines`` are paced at this rate and each
        starts with ``<epoch seconds>.<nanoseconds>``.
    sleep: seconds activation takes, printing a line every 0.5 s.
    version_tag: part of the store path name; change it for a new toplevel.
    network: ``up`` (activation brings the node's ``eth0`` up, as NixOS's network setup does) or
        ``down`` (activation takes it down: a broken network or firewall change that cuts the node
        off; packets are dropped, nothing is reset). Only on nodes with their own network namespace.
    healthy: the system's ``health`` file says ``ok`` (else ``failing``): what a health check reads
        (``grep -qx ok /run/current-system/health``), as a service's status would say.
    packages: name -> version of the packages in ``sw`` (each ``<name>-<version>`` in the closure).
    kernel_version, systemd_version: the ``kernel``/``initrd`` and ``systemd`` links' store paths.
    payload_kib: KiB of random data in ``sw`` (a big closure, e.g. for a full disk).
    build_exit: the toplevel's builder exits with this (non-zero: the build fails, saying so on stderr).
    build_work: iterations of a busy shell loop in the toplevel's builder (CPU time, as a compile costs;
        about a million a second here).
    """

    activation_exit: int = 0
    extra_lines: int = 0
    lines_per_second: int = 0
    sleep: float = 0
    version_tag: str = "1"
    network: str = "up"
    healthy: bool = True
    packages: dict[str, str] = dataclasses.field(default_factory=lambda: {"hello": "2.12.1", "nginx": "1.24.0"})
    kernel_version: str = "6.6.30"
    systemd_version: str = "255.4"
    payload_kib: int = 0
    build_exit: int = 0
    build_work: int = 0

    def to_json(self) -> dict:
        if self.network not in ("up", "down"):
            raise ValueError(f"network must be 'up' or 'down', not {self.network!r}")
        for tag in (self.version_tag, self.kernel_version, self.systemd_version, *self.packages.values()):
            if not _TAG_RE.match(tag):
                raise ValueError(f"version {tag!r} is not a valid store path name part")
        for name in self.packages:
            if not _ATTR_RE.match(name):
                raise ValueError(f"invalid package name {name!r}")
        return {
            "activation_exit": int(self.activation_exit),
            "extra_lines": int(self.extra_lines),
            "lines_per_second": int(self.lines_per_second),
            "sleep": float(self.sleep),
            "sleep_ticks": math.ceil(self.sleep * 2),
            "version_tag": self.version_tag,
            "network": self.network,
            "healthy": bool(self.healthy),
            "packages": dict(self.packages),
            "kernel_version": self.kernel_version,
            "systemd_version": self.systemd_version,
            "payload_kib": int(self.payload_kib),
            "build_exit": int(self.build_exit),
            "build_work": int(self.build_work),
        }

    @classmethod
    def from_json(cls, data: dict) -> NodeConfigSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def default_configs() -> dict[str, NodeConfigSpec]:
    """``devm`` activates fine, ``failing`` exits 4, ``slow`` takes 30 s."""
    return {
        "devm": NodeConfigSpec(),
        "failing": NodeConfigSpec(activation_exit=4),
        "slow": NodeConfigSpec(sleep=30),
    }


def _git(path: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
    }
    proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def write_flake(path: Path, configs: dict[str, NodeConfigSpec] | None = None) -> None:
    """Write the flake's files into ``path`` (no git)."""
    configs = default_configs() if configs is None else configs
    for attr in configs:
        if not _ATTR_RE.match(attr):
            raise ValueError(f"invalid configuration name {attr!r}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "flake.nix").write_text(FLAKE_NIX)
    (path / "flake.lock").write_text(json.dumps(FLAKE_LOCK, indent=2) + "\n")
    (path / "switch-to-configuration.sh").write_text(STC_BODY.read_text())
    specs = {attr: spec.to_json() for attr, spec in configs.items()}
    (path / "testbed.json").write_text(json.dumps(specs, indent=2, sort_keys=True) + "\n")


def make_flake_repo(path: Path, configs: dict[str, NodeConfigSpec] | None = None) -> str:
    """Create a git repo (branch ``main``) holding the flake; return HEAD's sha."""
    path = Path(path)
    write_flake(path, configs)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "config", "user.name", "Testbed")
    _git(path, "config", "user.email", "testbed@example.invalid")
    _git(path, "config", "commit.gpgsign", "false")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "Add testbed configurations")
    return _git(path, "rev-parse", "HEAD")


def read_configs(path: Path) -> dict[str, NodeConfigSpec]:
    data = json.loads((Path(path) / "testbed.json").read_text())
    return {attr: NodeConfigSpec.from_json(spec) for attr, spec in data.items()}


def commit_change(path: Path, attr: str, **changes) -> str:
    """Give ``attr`` a new version tag (and optional other changes), commit; return the sha.

    The toplevel's store path changes, so deploying the new commit makes a new
    generation.
    """
    path = Path(path)
    configs = read_configs(path)
    if attr not in configs:
        raise KeyError(attr)
    spec = configs[attr]
    if "version_tag" not in changes:
        m = re.match(r"^(.*?)(\d+)$", spec.version_tag)
        changes["version_tag"] = f"{m[1]}{int(m[2]) + 1}" if m else f"{spec.version_tag}.1"
    configs[attr] = dataclasses.replace(spec, **changes)
    specs = {a: s.to_json() for a, s in configs.items()}
    (path / "testbed.json").write_text(json.dumps(specs, indent=2, sort_keys=True) + "\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", f"Change {attr} to {configs[attr].version_tag}")
    return _git(path, "rev-parse", "HEAD")


def git_archive(path: Path, rev: str = "HEAD") -> bytes:
    """A tar of the repo at ``rev``, as the panel ships it to a node."""
    return subprocess.run(
        ["git", "-C", str(path), "archive", "--format=tar", rev], check=True, capture_output=True
    ).stdout
