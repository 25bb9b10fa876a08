"""NixOS-like nodes on one machine, reachable over real SSH.

As root (CI), each node is a network namespace with a veth to a host bridge
and its own address, plus a private mount and UTS namespace in which
per-node directories are bind-mounted over ``/nix`` (own store and system
profile), ``/etc/nix`` (offline nix.conf), ``/run`` (own
``/run/current-system``), ``/root`` (own ``authorized_keys``),
``/usr/local/bin`` (holding only the ``nixos-rebuild`` stand-in, so it is on
the default PATH sshd gives root's sessions), ``/etc/shadow`` (root's password)
and ``/tmp``. In there runs ``sshd -D -f /run/testbed/sshd_config`` with its own
ed25519 host key; every SSH session inherits the namespaces.

Without root (a developer's machine) nodes are ``sshd`` processes on
``127.0.0.1:<free port>`` running as the current user, sharing the host's
store; sshd's ``SetEnv`` puts the stand-in first on PATH and points the
system profile and ``current-system`` into the node's directory. What needs
namespaces raises ``NamespacesUnavailable`` (a test can ``pytest.skip``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..keys import new_ed25519
from ..net import free_port
from ..processes import kill_all, processes_of
from ..sshd import SSHD, sshd_command, sshd_config, start_sshd, stop_sshd
from ..wait import wait_for
from .flakes import NodeConfigSpec, git_archive, make_flake_repo

HERE = Path(__file__).resolve().parent
NIXOS_REBUILD = HERE / "nixos-rebuild"
# What sshd (Debian's build) gives root's sessions as PATH.
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host paths hidden inside a node by its bind mounts.
_NODE_MOUNTS = ("/nix", "/etc/nix", "/run", "/root", "/usr/local/bin", "/tmp")

NIX_CONF = """\
# testbed node: offline, single-user, no build users
build-users-group =
gc-reserved-space = 0
substituters =
flake-registry = {registry}
experimental-features = nix-command flakes
sandbox = false
fsync-metadata = false
warn-dirty = false
"""
EMPTY_REGISTRY = '{"flakes":[],"version":2}\n'


class NamespacesUnavailable(Exception):
    """This feature needs root and Linux namespaces; the reason says what is missing."""


class NixUnavailable(NamespacesUnavailable):
    """Nodes without root share the host's Nix, and this user cannot build with it."""


class TestbedError(RuntimeError):
    """A node could not be started or driven."""

    __test__ = False  # not a test class, despite its name


@functools.cache
def can_use_namespaces() -> bool:
    """True when running as root with unshare, nsenter and ip, and namespaces work."""
    if os.geteuid() != 0:
        return False
    if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip", "mount")):
        return False
    if not os.path.exists(SSHD):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--uts", "--net", "--propagation", "private", "true"],
        capture_output=True,
    )
    return probe.returncode == 0


def namespaces_missing_reason() -> str:
    if os.environ.get("TESTBED_ISOLATED", "") in ("0", "false", "no"):
        return "TESTBED_ISOLATED=0: nodes share the host's namespaces and store"
    if os.geteuid() != 0:
        return "testbed nodes with their own store need root (network and mount namespaces)"
    missing = [t for t in ("unshare", "nsenter", "ip", "mount") if not shutil.which(t)]
    if missing:
        return f"testbed needs {', '.join(missing)} (apt-get install iproute2 util-linux)"
    if not os.path.exists(SSHD):
        return "testbed needs sshd (apt-get install openssh-server)"
    return "unshare --mount --uts --net failed: namespaces are not permitted here"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _hash_password(password: str) -> str:
    return subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    proc = subprocess.run(cmd, **kw)
    if proc.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def fetch_host_key(host: str, port: int, timeout: float = 5.0) -> str:
    """The 'ssh-ed25519 AAAA...' key a server presents (no authentication)."""
    import paramiko

    sock = socket.create_connection((host, port), timeout=timeout)
    transport = paramiko.Transport(sock)
    try:
        transport.get_security_options().key_types = ["ssh-ed25519"]
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    finally:
        transport.close()
        sock.close()


@dataclass(eq=False)
class Node:
    """One NixOS-like machine: an sshd with its own host key (and, as root, own namespaces)."""

    name: str
    host: str
    port: int
    user: str
    host_key_public: str
    client_key_path: Path
    client_key_private: str
    password: str | None
    dir: Path = field(repr=False)
    isolated: bool = field(repr=False, default=True)
    netns: str | None = field(repr=False, default=None)
    veth: str | None = field(repr=False, default=None)
    _proc: subprocess.Popen | None = field(repr=False, default=None)
    _stopped: bool = field(repr=False, default=False)

    # -- paths as the host sees them ------------------------------------------
    @property
    def _run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def _sshd_dir(self) -> Path:
        return self.dir / "run" / "testbed"

    @property
    def pid_file(self) -> Path:
        return self._sshd_dir / "sshd.pid"

    @property
    def sshd_log(self) -> Path:
        return self._sshd_dir / "sshd.log"

    @property
    def _profiles_dir(self) -> Path:
        if self.isolated:
            return self.dir / "nix" / "var" / "nix" / "profiles"
        return self.dir / "profiles"

    @property
    def sshd_pid(self) -> int:
        # nsenter, unshare and sh exec into sshd -D: the child we started is sshd.
        if self._proc is not None:
            return self._proc.pid
        return int(self.pid_file.read_text().strip())

    @property
    def home(self) -> str:
        """A directory of the node's own for files tests put there (root's home as root)."""
        return "/root" if self.isolated else str(self.dir / "home")

    @property
    def known_hosts_line(self) -> str:
        where = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return f"{where} {self.host_key_public}"

    def _env(self) -> dict[str, str]:
        if self.isolated:
            return {"PATH": NODE_PATH, "HOME": "/root", "USER": "root", "LANG": "C.UTF-8"}
        return {**os.environ, **_local_session_env(self.dir)}

    # -- the API the project's tests use --------------------------------------
    def run(
        self,
        cmd: str,
        check: bool = True,
        *,
        input: str | bytes | None = None,
        timeout: float | None = 120,
    ) -> subprocess.CompletedProcess:
        """Run a shell command inside the node as root (as the user without root)."""
        if self._stopped:
            raise TestbedError(f"node {self.name} is stopped")
        if self._proc is not None and self._proc.poll() is not None:
            raise TestbedError(f"sshd of node {self.name} has exited ({self._proc.returncode})")
        if self.isolated:
            argv = [
                "nsenter", "-t", str(self.sshd_pid), "-m", "-u", "-n", "--wdns=/root",
                "--", "/bin/sh", "-c", cmd,
            ]  # fmt: skip
        else:
            argv = ["/bin/sh", "-c", cmd]
        text = not isinstance(input, bytes)
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=text,
            env=self._env(),
            cwd=None if self.isolated else self.home,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def generations(self) -> list[int]:
        """System profile generation numbers, ascending."""
        try:
            names = os.listdir(self._profiles_dir)
        except FileNotFoundError:
            return []
        found = (re.fullmatch(r"system-(\d+)-link", n) for n in names)
        return sorted(int(m[1]) for m in found if m)

    def current_system(self) -> str:
        """Target of the node's /run/current-system ('' if none)."""
        try:
            return os.readlink(self._run_dir / "current-system")
        except (FileNotFoundError, OSError):
            return ""

    def booted_system(self) -> str:
        """Target of the node's /run/booted-system: the system it booted ('' if none). Set when the node
        starts (to its initial system) and by ``reboot``; switching never changes it, as on NixOS."""
        try:
            return os.readlink(self._run_dir / "booted-system")
        except OSError:
            return ""

    def reboot(self) -> None:
        """What a reboot does to the node's systems, as NixOS boots: the boot default (the system profile's
        generation) is booted, so ``/run/booted-system`` and ``/run/current-system`` both become it.
        Processes and connections are left alone (only the two links change)."""
        system = self.system_profile()
        if not system:
            raise TestbedError(f"node {self.name} has no system profile to boot")
        for name in ("booted-system", "current-system"):
            link = self._run_dir / name
            tmp = self._run_dir / f".{name}.new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(system, tmp)
            os.replace(tmp, link)

    def rebuild_runs(self) -> list[tuple[float, float | None, int | None, str]]:
        """Every ``nixos-rebuild`` run on the node, from its own log: (start, end or None, exit code or
        None, action), epoch seconds on the node's clock (the host's: nodes share its kernel)."""
        try:
            lines = (self._sshd_dir / "nixos-rebuild.runs").read_text().splitlines()
        except FileNotFoundError:
            return []
        runs: dict[str, list] = {}
        for line in lines:
            kind, pid, at, rest = (line.split() + [""])[:4]
            if kind == "start":
                runs[pid] = [float(at), None, None, rest]
            elif kind == "end" and pid in runs:
                runs[pid][1], runs[pid][2] = float(at), int(rest)
        return [tuple(r) for r in runs.values()]

    def network_log(self) -> list[tuple[str, float]]:
        """Every time an activation set the node's ``eth0`` up or down: (``up``|``down``, epoch seconds),
        from the node's own log (``NodeConfigSpec.network``)."""
        try:
            lines = (self._sshd_dir / "network.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(w[1], float(w[2])) for w in (line.split() for line in lines) if len(w) == 3]

    def system_profile(self) -> str:
        """Store path the system profile points at ('' if none)."""
        try:
            target = os.readlink(self._profiles_dir / "system")  # system-<n>-link
            if not target.startswith("/"):
                target = os.readlink(self._profiles_dir / target)
            return target
        except OSError:
            return ""

    def store_paths(self) -> list[str]:
        """Names in the node's own /nix/store (root only)."""
        if not self.isolated:
            raise NamespacesUnavailable(namespaces_missing_reason())
        try:
            return sorted(os.listdir(self.dir / "nix" / "store"))
        except FileNotFoundError:
            return []

    def ship_flake(self, repo: Path, dest: str, rev: str = "HEAD") -> None:
        """Unpack ``git archive <rev>`` of ``repo`` into ``dest`` on the node (no SSH)."""
        from shlex import quote

        self.run(f"mkdir -p {quote(dest)} && tar -x -C {quote(dest)}", input=git_archive(repo, rev))

    def ssh_client(self, *, password: bool = False, timeout: float = 10):
        """A connected paramiko SSHClient with the host key pinned (RejectPolicy)."""
        import paramiko

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_type, key_b64 = self.host_key_public.split()[:2]
        where = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        client.get_host_keys().add(where, key_type, paramiko.PKey.from_type_string(key_type, _b64(key_b64)))
        kwargs = dict(hostname=self.host, port=self.port, username=self.user, timeout=timeout,
                      allow_agent=False, look_for_keys=False)  # fmt: skip
        if password:
            kwargs["password"] = self.password
        else:
            kwargs["pkey"] = paramiko.Ed25519Key.from_private_key_file(str(self.client_key_path))
        client.connect(**kwargs)
        return client

    def processes(self) -> dict[int, str]:
        """Command lines (arguments joined by spaces) of the node's own processes, by pid.

        Only this node's, so other tests or other work on the machine never
        count: as root, the processes in its network namespace; without root,
        those below its sshd plus those carrying its session environment (an
        orphan reparented to init still does).
        """
        if self.isolated and self.netns:
            return processes_of(netns=f"/run/netns/{self.netns}")
        marker = f"TESTBED_SYSTEM_PROFILE={_local_session_env(self.dir)['TESTBED_SYSTEM_PROFILE']}"
        below = self._proc.pid if self._proc is not None else None
        return processes_of(below=below, environ=marker)

    def ssh_connections(self) -> int:
        """How many TCP connections the node's sshd accepted so far, from its own log (``LogLevel VERBOSE``
        writes one ``Connection from …`` line for each)."""
        try:
            text = self.sshd_log.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if line.startswith("Connection from "))

    def link_down(self) -> None:
        """Cut the node's network link, as a pulled cable would: the host side of its veth goes down, so
        packets to and from the node are dropped silently (nothing is reset). Root only."""
        self._set_link("down")

    def link_up(self) -> None:
        """Plug the node's link back in (``link_down`` undone); connections that survived carry on."""
        self._set_link("up")

    def _set_link(self, state: str) -> None:
        if not (self.isolated and self.veth):
            raise NamespacesUnavailable(namespaces_missing_reason())
        _run(["ip", "link", "set", self.veth, state])

    def stop(self) -> None:
        """Kill every process of the node and remove its network namespace."""
        if self._stopped:
            return
        self._stopped = True
        if self.isolated and self.netns:
            _kill_netns(self.netns)
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            if self.veth:
                subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        if self._proc is not None:
            stop_sshd(self._proc)


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _local_session_env(node_dir: Path) -> dict[str, str]:
    return {
        "PATH": f"{node_dir / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "TESTBED_SYSTEM_PROFILE": str(node_dir / "profiles" / "system"),
        "TESTBED_CURRENT_SYSTEM": str(node_dir / "run" / "current-system"),
        "TESTBED_RUNS_LOG": str(node_dir / "run" / "testbed" / "nixos-rebuild.runs"),
        "XDG_CONFIG_HOME": str(node_dir / "xdg"),
    }


def _netns_pids(netns: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()]


def _kill_netns(netns: str) -> None:
    """SIGKILL every process in the namespace until none is left (5 s at most; the caller deletes it anyway)."""

    def emptied() -> bool:
        pids = _netns_pids(netns)
        kill_all(pids)
        return not pids

    with contextlib.suppress(AssertionError):
        wait_for(emptied, timeout=5, interval=0.02, what=f"the processes of {netns} to die")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> None:
    """Remove namespaces and bridges left by testbeds whose process died without closing."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        m = re.match(r"^(tb-[0-9a-f]{4}-(\d+)-\S+)", line)
        if m and not _pid_alive(int(m[2])):
            _kill_netns(m[1])
            subprocess.run(["ip", "netns", "del", m[1]], capture_output=True)
    routes = subprocess.run(["ip", "-4", "-j", "route", "show", "type", "unreachable"], capture_output=True, text=True)
    for route in json.loads(routes.stdout or "[]"):
        # A private network's route (Testbed._private_network): its metric is the testbed's pid.
        metric, dst = route.get("metric"), route.get("dst", "")
        if dst.startswith("10.") and metric and metric > 1 and not _pid_alive(metric):
            subprocess.run(["ip", "route", "del", "unreachable", dst, "metric", str(metric)], capture_output=True)
    links = subprocess.run(["ip", "-j", "link", "show", "type", "bridge"], capture_output=True, text=True)
    for link in json.loads(links.stdout or "[]"):
        m = re.fullmatch(r"testbed-pid-(\d+)", link.get("ifalias", ""))
        if m and not _pid_alive(int(m[1])):
            subprocess.run(["ip", "link", "del", link["ifname"]], capture_output=True)


def rotate_host_key(node: Node, timeout: float = 10) -> str:
    """Give the node a new ed25519 host key, make its sshd reload, return the new public key."""
    private, public = new_ed25519()
    key_path = node._sshd_dir / "ssh_host_ed25519_key"
    _write(key_path, private, 0o600)
    _write(key_path.with_suffix(".pub"), public + "\n")
    # SIGHUP makes sshd re-exec itself with the same pid and re-read its keys;
    # the new sshd writes its pid file once it listens again. (Children of the
    # old one may already show the new key, so the key alone is no sign.)
    node.pid_file.unlink(missing_ok=True)
    os.kill(node.sshd_pid, signal.SIGHUP)
    wait_for(node.pid_file.exists, timeout, interval=0.002, what=f"sshd of node {node.name} to come back after SIGHUP")

    def presents_new_key() -> bool:
        try:
            return fetch_host_key(node.host, node.port, timeout=1) == public
        except Exception:  # noqa: BLE001 - sshd is restarting; try again
            return False

    wait_for(presents_new_key, timeout, interval=0.02, what=f"node {node.name} to present its new host key")
    node.host_key_public = public
    return public


class Testbed:
    """Owns a host bridge (as root) and every node it started; a context manager."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, workdir: Path, *, isolated: bool | None = None):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if isolated is None:
            forced = os.environ.get("TESTBED_ISOLATED", "")
            isolated = can_use_namespaces() if forced == "" else forced not in ("0", "false", "no")
        if isolated and not can_use_namespaces():
            raise NamespacesUnavailable(namespaces_missing_reason())
        self.isolated = isolated
        self.nodes: dict[str, Node] = {}
        self.token = secrets.token_hex(2)
        self._lock = threading.Lock()
        self._next_index = 0
        self._closed = False
        self._initial: str | None = None
        self.bridge: str | None = None
        self.network: ipaddress.IPv4Network | None = None
        self.gateway: str | None = None
        self._private: dict[str, tuple[str, ipaddress.IPv4Network]] = {}  # bastion name -> its private bridge
        self._private_links: list[str] = []
        atexit.register(self.close)
        if self.isolated:
            self._check_workdir()
            cleanup_stale()
            self._make_bridge()

    # -- setup ------------------------------------------------------------------
    def _check_workdir(self) -> None:
        for mount in _NODE_MOUNTS:
            if self.workdir == Path(mount) or Path(mount) in self.workdir.parents:
                if mount != "/tmp":
                    raise TestbedError(f"testbed workdir {self.workdir} is hidden in nodes by {mount}")
        # Debian's nix-bin alone ships no /etc/nix (and /nix only once something ran Nix), and a bind
        # mount needs its mount point: an empty directory changes nothing for the host's Nix.
        os.makedirs("/nix", mode=0o755, exist_ok=True)
        os.makedirs("/etc/nix", mode=0o755, exist_ok=True)

    def _used_networks(self) -> list[ipaddress.IPv4Network]:
        out = subprocess.run(["ip", "-4", "-j", "route", "show", "table", "all"], capture_output=True, text=True)
        nets = []
        for route in json.loads(out.stdout or "[]"):
            dst = route.get("dst", "")
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.ip_network(dst, strict=False))
        return nets

    def _free_network(self) -> ipaddress.IPv4Network:
        used = self._used_networks()
        rng = random.Random(secrets.randbits(64))
        for _ in range(200):
            net = ipaddress.ip_network(f"10.{rng.randint(77, 199)}.{rng.randint(0, 255)}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise TestbedError("no free 10.77-199.x.0/24 subnet for the testbed bridge")

    def _make_bridge(self) -> None:
        net = self._free_network()
        self.network = net
        self.gateway = str(net.network_address + 1)
        self.bridge = f"tbbr{self.token}"
        # The alias names our pid, so cleanup_stale() can remove the bridge
        # after a run that was killed before it could close.
        batch = (
            f"link add {self.bridge} type bridge\n"
            f"link set {self.bridge} alias testbed-pid-{os.getpid()}\n"
            f"addr add {self.gateway}/24 dev {self.bridge}\n"
            f"link set {self.bridge} up\n"
        )
        _run(["ip", "-batch", "-"], input=batch)

    def _initial_system(self) -> str:
        """Build, once, a template /nix whose system profile has one generation."""
        with self._lock:
            if self._initial:
                return self._initial
            base = self.workdir / "template"
            flake = base / "flake"
            make_flake_repo(flake, {"devm": NodeConfigSpec(version_tag="initial")})
            for d in ("nix", "etc-nix", "home"):
                (base / d).mkdir(parents=True, exist_ok=True)
            _write(base / "etc-nix" / "nix.conf", NIX_CONF.format(registry="/etc/nix/registry.json"))
            _write(base / "etc-nix" / "registry.json", EMPTY_REGISTRY)
            installable = f'path:{flake}#nixosConfigurations."devm".config.system.build.toplevel'
            script = (
                'set -e; mount --bind "$1/nix" /nix; mount --bind "$1/etc-nix" /etc/nix; '
                'out=$(nix build --no-link --json "$2"); '
                'path=$(printf %s "$out" | sed -n \'s/.*"out":"\\([^"]*\\)".*/\\1/p\'); '
                'nix-env -p /nix/var/nix/profiles/system --set "$path" >&2; '
                'printf %s "$path"'
            )
            proc = _run(
                ["unshare", "--mount", "--propagation", "private", "--",
                 "/bin/sh", "-c", script, "sh", str(base), installable],
                env={"PATH": NODE_PATH, "HOME": str(base / "home")},
            )  # fmt: skip
            self._initial = proc.stdout.strip()
            if not self._initial.startswith("/nix/store/"):
                raise TestbedError(f"building the initial system gave {proc.stdout!r} {proc.stderr!r}")
            return self._initial

    def _initial_system_local(self, node_dir: Path) -> str | None:
        if not shutil.which("nix"):
            return None
        with self._lock:
            if self._initial is None:
                self._initial = ""  # tried once; "" means this host's nix cannot build it
                flake = self.workdir / "template-flake"
                make_flake_repo(flake, {"devm": NodeConfigSpec(version_tag="initial")})
                env = {**os.environ, **_local_session_env(node_dir)}
                proc = subprocess.run(
                    ["nix", "build", "--no-link", "--json",
                     f'path:{flake}#nixosConfigurations."devm".config.system.build.toplevel'],
                    capture_output=True, text=True, env=env,
                )  # fmt: skip
                if proc.returncode == 0:
                    self._initial = json.loads(proc.stdout)[0]["outputs"]["out"]
        return self._initial or None

    # -- nodes ------------------------------------------------------------------
    def add_node(
        self, name: str, *, password: str | None = None, initial_system: bool = True, behind: Node | None = None
    ) -> Node:
        """Start a node and return it once its sshd accepts connections.

        ``behind``: a node of this testbed (the bastion) that alone can reach the new one: the new node sits
        on a private bridge of the bastion's (its ``eth1``), which the host has no address on and no route
        to (root only).
        """
        if self._closed:
            raise TestbedError("testbed is closed")
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name):
            raise ValueError(f"node name {name!r}: use lowercase letters, digits and '-'")
        with self._lock:
            if name in self.nodes:
                raise ValueError(f"node {name!r} exists")
            index = self._next_index
            self._next_index += 1
            self.nodes[name] = None  # type: ignore[assignment]  # reserve the name
        try:
            if self.isolated:
                node = self._start_isolated(name, index, password, initial_system, behind)
            elif behind is not None:
                raise NamespacesUnavailable(namespaces_missing_reason())
            else:
                node = self._start_local(name, index, password, initial_system)
        except BaseException:
            with self._lock:
                self.nodes.pop(name, None)
            raise
        with self._lock:
            self.nodes[name] = node
        return node

    def _node_files(self, name: str, node_dir: Path) -> tuple[str, Path, str]:
        """Write the node's keys; return (host public key, client key path, client private key)."""
        sshd_dir = node_dir / "run" / "testbed"
        sshd_dir.mkdir(parents=True)
        host_private, host_public = new_ed25519()
        _write(sshd_dir / "ssh_host_ed25519_key", host_private, 0o600)
        _write(sshd_dir / "ssh_host_ed25519_key.pub", host_public + "\n")
        client_private, client_public = new_ed25519()
        client_key_path = node_dir / "client_ed25519"
        _write(client_key_path, client_private, 0o600)
        _write(node_dir / "client_ed25519.pub", client_public + "\n")
        bin_dir = node_dir / "bin"
        bin_dir.mkdir()
        shutil.copy(NIXOS_REBUILD, bin_dir / "nixos-rebuild")
        os.chmod(bin_dir / "nixos-rebuild", 0o755)
        return host_public, client_key_path, client_private

    def _private_network(self, bastion: Node) -> tuple[str, ipaddress.IPv4Network]:
        """The private bridge behind ``bastion`` and its subnet, made on first use.

        The bridge has no address on the host, and the host gets an ``unreachable`` route for the subnet
        (its metric is our pid, so ``cleanup_stale`` can tell a dead testbed's), so connecting there from
        the host fails at once (EHOSTUNREACH); the bastion has ``<subnet>.1`` on its ``eth1`` and does not
        forward (a new network namespace has ip_forward 0), so only a session on the bastion gets through.
        """
        with self._lock:
            if bastion.name in self._private:
                return self._private[bastion.name]
            if bastion.netns is None or self.nodes.get(bastion.name) is not bastion:
                raise TestbedError(f"{bastion.name} is not a node of this testbed")
            k = len(self._private)
            net = self._free_network()
            bridge, veth = f"tbpv{self.token}{k}", f"tb{self.token}p{k}"
            _run(["ip", "-batch", "-"], input=(
                f"link add {bridge} type bridge\n"
                f"link set {bridge} alias testbed-pid-{os.getpid()}\n"
                f"link set {bridge} up\n"
                f"link add {veth} type veth peer name eth1 netns {bastion.netns}\n"
                f"link set {veth} master {bridge}\n"
                f"link set {veth} up\n"
                f"route add unreachable {net} metric {os.getpid()}\n"
            ))  # fmt: skip
            _run(["ip", "-n", bastion.netns, "-batch", "-"], input=(
                f"addr add {net.network_address + 1}/24 dev eth1\n"
                "link set eth1 up\n"
            ))  # fmt: skip
            self._private[bastion.name] = (bridge, net)
            self._private_links += [veth, bridge]
            return bridge, net

    def _start_isolated(
        self, name: str, index: int, password: str | None, initial_system: bool, behind: Node | None = None
    ) -> Node:
        if index > 250:
            raise TestbedError("a testbed holds at most 251 nodes")
        node_dir = self.workdir / "nodes" / name
        node_dir.mkdir(parents=True)
        host_public, client_key_path, client_private = self._node_files(name, node_dir)
        client_public = (node_dir / "client_ed25519.pub").read_text()

        root = node_dir / "root"
        (root / ".ssh").mkdir(parents=True)
        os.chmod(root, 0o700)
        os.chmod(root / ".ssh", 0o700)
        _write(root / ".ssh" / "authorized_keys", client_public, 0o600)
        (node_dir / "etc-nix").mkdir()
        _write(node_dir / "etc-nix" / "nix.conf", NIX_CONF.format(registry="/etc/nix/registry.json"))
        _write(node_dir / "etc-nix" / "registry.json", EMPTY_REGISTRY)
        (node_dir / "tmp").mkdir()
        os.chmod(node_dir / "tmp", 0o1777)
        sshd_priv = node_dir / "run" / "sshd"  # sshd's privilege separation directory
        sshd_priv.mkdir()
        os.chmod(sshd_priv, 0o755)

        # sshd without PAM checks passwords against /etc/shadow.
        root_hash = _hash_password(password) if password is not None else "*"
        shadow_lines = []
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "root":
                fields[1] = root_hash
            shadow_lines.append(":".join(fields))
        _write(node_dir / "shadow", "\n".join(shadow_lines) + "\n", 0o640)

        if initial_system:
            initial = self._initial_system()
            _run(["cp", "-a", str(self.workdir / "template" / "nix"), str(node_dir / "nix")])
            os.symlink(initial, node_dir / "run" / "current-system")
            os.symlink(initial, node_dir / "run" / "booted-system")
        else:
            (node_dir / "nix").mkdir()

        bridge, network = self._private_network(behind) if behind is not None else (self.bridge, self.network)
        ip = str(network.network_address + 2 + index)
        netns = f"tb-{self.token}-{os.getpid()}-{name}"
        veth = f"tb{self.token}n{index}"
        # Paths as the node sees them: its own /run is bind-mounted over the host's.
        config = sshd_config(
            listen=f"{ip}:22",
            host_key="/run/testbed/ssh_host_ed25519_key",
            pid_file="/run/testbed/sshd.pid",
            authorized_keys=".ssh/authorized_keys",
            root_passwords=password is not None,
        )
        _write(node_dir / "run" / "testbed" / "sshd_config", config)
        # Its eth0 is its own: a system's activation may set it up or down (switch-to-configuration.sh).
        _write(node_dir / "run" / "testbed" / "own-netns", "")

        _run(["ip", "-batch", "-"], input=(
            f"netns add {netns}\n"
            f"link add {veth} type veth peer name eth0 netns {netns}\n"
            f"link set {veth} master {bridge}\n"
            f"link set {veth} up\n"
        ))  # fmt: skip
        node = Node(
            name=name, host=ip, port=22, user="root", host_key_public=host_public,
            client_key_path=client_key_path, client_key_private=client_private, password=password,
            dir=node_dir, isolated=True, netns=netns, veth=veth,
        )  # fmt: skip
        try:
            _run(["ip", "-n", netns, "-batch", "-"], input=(
                f"addr add {ip}/24 dev eth0\n"
                "link set eth0 up\n"
                "link set lo up\n"
            ))  # fmt: skip
            # /tmp goes last: the node's directory lives under the host's /tmp.
            script = (
                "set -e; d=$1; "
                'mount --bind "$d/nix" /nix; '
                'mount --bind "$d/etc-nix" /etc/nix; '
                'mount --bind "$d/run" /run; '
                'mount --bind "$d/root" /root; '
                'mount --bind "$d/bin" /usr/local/bin; '
                'mount --bind "$d/shadow" /etc/shadow; '
                'mount --bind "$d/tmp" /tmp; '
                'hostname "$2"; '
                "exec " + shlex.join(sshd_command("/run/testbed/sshd_config", "/run/testbed/sshd.log"))
            )
            node._proc = start_sshd(
                ["nsenter", f"--net=/run/netns/{netns}", "--",
                 "unshare", "--mount", "--uts", "--propagation", "private", "--",
                 "/bin/sh", "-c", script, "sh", str(node_dir), name],
                pid_file=node.pid_file,
                logs=[node_dir / "start.log", node.sshd_log],
                name=f"sshd of node {name}",
                env={"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8"},
            )  # fmt: skip
        except BaseException:
            node.stop()
            raise
        return node

    def _start_local(self, name: str, index: int, password: str | None, initial_system: bool) -> Node:
        if password is not None:
            raise NamespacesUnavailable("password login needs root: sshd without root cannot check passwords")
        import getpass

        node_dir = self.workdir / "nodes" / name
        node_dir.mkdir(parents=True)
        host_public, client_key_path, client_private = self._node_files(name, node_dir)
        for d in ("profiles", "xdg/nix", "home"):
            (node_dir / d).mkdir(parents=True)
        _write(node_dir / "xdg" / "nix" / "nix.conf", NIX_CONF.format(registry=node_dir / "registry.json"))
        _write(node_dir / "registry.json", EMPTY_REGISTRY)
        env = _local_session_env(node_dir)
        port = free_port()
        sshd_dir = node_dir / "run" / "testbed"
        config = sshd_config(
            listen=f"127.0.0.1:{port}",
            host_key=sshd_dir / "ssh_host_ed25519_key",
            pid_file=sshd_dir / "sshd.pid",
            authorized_keys=node_dir / "client_ed25519.pub",
            set_env=env,
        )
        _write(sshd_dir / "sshd_config", config)
        node = Node(
            name=name, host="127.0.0.1", port=port, user=getpass.getuser(),
            host_key_public=host_public, client_key_path=client_key_path,
            client_key_private=client_private, password=None, dir=node_dir, isolated=False,
        )  # fmt: skip
        node._proc = start_sshd(
            sshd_command(sshd_dir / "sshd_config", node.sshd_log),
            pid_file=node.pid_file,
            logs=[node_dir / "start.log", node.sshd_log],
            name=f"sshd of node {name}",
        )
        try:
            if initial_system:
                initial = self._initial_system_local(node_dir)
                if initial:
                    node.run(f'nix-env -p "$TESTBED_SYSTEM_PROFILE" --set {initial} >/dev/null 2>&1')
                    os.symlink(initial, node_dir / "run" / "current-system")
                    os.symlink(initial, node_dir / "run" / "booted-system")
        except BaseException:
            node.stop()
            raise
        return node

    def require_nix(self) -> None:
        """Raise NixUnavailable unless nixos-rebuild on the nodes can build."""
        if self.isolated:
            return
        probe = self.workdir / "nix-probe"
        probe.mkdir(parents=True, exist_ok=True)
        if not self._initial_system_local(probe):
            raise NixUnavailable(
                "nodes without root use the host's Nix, and this user cannot build with it "
                "(needs a nix-daemon or a writable /nix/store)"
            )

    def require_namespaces(self) -> None:
        """Raise NamespacesUnavailable unless nodes have their own namespaces and store."""
        if not self.isolated:
            raise NamespacesUnavailable(namespaces_missing_reason())

    # -- teardown ---------------------------------------------------------------
    def close(self) -> None:
        """Stop every node, delete the bridge, remove the workdir. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        nodes = [n for n in list(self.nodes.values()) if n is not None]

        def stop(node: Node) -> None:
            with contextlib.suppress(Exception):
                node.stop()

        if nodes:
            with ThreadPoolExecutor(min(16, len(nodes))) as pool:
                list(pool.map(stop, nodes))
        for link in self._private_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for _, net in self._private.values():
            subprocess.run(
                ["ip", "route", "del", "unreachable", str(net), "metric", str(os.getpid())], capture_output=True
            )
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
