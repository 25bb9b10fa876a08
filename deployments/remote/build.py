"""Building a system off its target, and activating a system that was built elsewhere.

No Django here.

``nixos-rebuild --build-host B --target-host T`` in three steps the panel can
follow and audit: ``run_build`` ships the source to a node (a build host, or
the target itself for a diff) and runs ``nix build`` of the toplevel there,
detached and followed by byte offset exactly as a rebuild is (``rebuild.
run_rebuild`` with another command); ``build_local`` does the same with the
panel host's own Nix; ``closure.copy_closure`` brings the result to the target;
``run_activate`` sets the system profile and runs ``switch-to-configuration``
on the target, detached too. A built system is held by a GC root under
``GCROOTS`` (on the build location, and on the target between the copy and
the activation) so a garbage collection in between cannot take it.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable

from .connection import Cancelled, Target
from .rebuild import FLAKE_ATTR_RE, RebuildResult, resolve_path, run_rebuild
from .stream import OutputCallback
from .system import SYSTEM_PROFILE

__all__ = [
    "ACTIVATE_ACTIONS",
    "GCROOTS",
    "STORE_PATH_RE",
    "build_local",
    "installable",
    "root_path",
    "run_activate",
    "run_build",
]

# Where the panel keeps its GC roots on a node (and on the panel host): a symlink here is a root.
GCROOTS = "/nix/var/nix/gcroots/nixos-panel"
# The nix command with the features a flake build needs (a NixOS node may not enable them).
NIX = "nix --extra-experimental-features 'nix-command flakes'"
# A store path as Nix names them; it reaches remote shells.
STORE_PATH_RE = re.compile(r"\A/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]{1,211}\Z")
# A GC root's name under GCROOTS.
_ROOT_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,150}\Z")
# The actions that activate a system built elsewhere (build needs no activation).
ACTIVATE_ACTIONS = ("switch", "boot", "test", "dry-activate")
# The activation command's exit code when the system is not (any more) in the node's store.
MISSING_EXIT = 66
# A GC root of the panel older than this is stale: a build nobody copied, an activation that failed, a diff
# nobody confirmed. Builds and activations remove the stale roots of their kind (so the store may be
# collected); a diff is refused confirmation after this long (``change.DIFF_KEEP``).
STALE_ROOT_MINUTES = 24 * 60


def sweep_roots(pattern: str) -> str:
    """Shell that removes the panel's GC roots named ``pattern`` older than ``STALE_ROOT_MINUTES``."""
    return (
        f"find {shlex.quote(GCROOTS)} -maxdepth 1 -name {shlex.quote(pattern)} -type l "
        f"-mmin +{STALE_ROOT_MINUTES} -exec rm -f {{}} + 2>/dev/null"
    )


def check_store_path(path: str) -> str:
    if not isinstance(path, str) or not STORE_PATH_RE.match(path):
        raise ValueError(f"not a store path: {path!r}")
    return path


def root_path(name: str) -> str:
    """The GC root ``GCROOTS/<name>``."""
    if not isinstance(name, str) or not _ROOT_NAME_RE.match(name):
        raise ValueError(f"invalid GC root name {name!r}")
    return f"{GCROOTS}/{name}"


def installable(src: str, attr: str) -> str:
    """``path:<src>#nixosConfigurations."<attr>".config.system.build.toplevel``, as nixos-rebuild builds it."""
    if not FLAKE_ATTR_RE.match(attr):
        raise ValueError(f"invalid flake attribute {attr!r}")
    return f'path:{src}#nixosConfigurations."{attr}".config.system.build.toplevel'


def _empty_tar() -> bytes:
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    return buf.getvalue()


def run_build(
    target: Target,
    *,
    deployment_id: int,
    archive: bytes,
    attr: str,
    root: str,
    on_output: OutputCallback,
    should_cancel: Callable[[], bool] | None = None,
    on_workdir: Callable[[str], None] | None = None,
) -> RebuildResult:
    """Ship ``archive`` to ``target`` and ``nix build`` the toplevel of ``attr`` there into GC root ``root``.

    Detached and followed like a rebuild (``run_rebuild``'s contract: RemoteError, Cancelled); the build's
    log (``-L``) is the run's output. ``toplevel`` is the built store path when the build exited 0.
    """
    link = root_path(root)

    def command(workdir: str, privileged: bool) -> str:
        build = (
            f"mkdir -p {shlex.quote(GCROOTS)} || exit; {sweep_roots('built-*')}; exec {NIX} build -L --out-link {shlex.quote(link)} "
            f"{shlex.quote(installable(workdir + '/src', attr))}"
        )
        prefix = target.privileged_prefix() if privileged else ""
        return f"{prefix}sh -c {shlex.quote(build)}"

    return run_rebuild(
        target,
        deployment_id=deployment_id,
        archive=archive,
        attr=attr,
        action="build",
        on_output=on_output,
        should_cancel=should_cancel,
        on_workdir=on_workdir,
        command=command,
        resolve=lambda workdir: link,
    )


def activation_command(toplevel: str, action: str, root: str | None) -> str:
    """Shell that activates ``toplevel`` as nixos-rebuild does after its build: the system profile set for
    switch and boot, then ``switch-to-configuration <action>``; the GC root ``root`` removed once the
    profile (or the running system) holds it. Exit ``MISSING_EXIT`` if the system is not in the store."""
    check_store_path(toplevel)
    if action not in ACTIVATE_ACTIONS:
        raise ValueError(f"invalid activation action {action!r}: must be one of {', '.join(ACTIVATE_ACTIONS)}")
    t = shlex.quote(toplevel)
    steps = [
        f"{{ {sweep_roots('deploy-*')}; }}",
        f"nix-store --check-validity {t} 2>/dev/null || "
        f"{{ echo 'error: {toplevel} is not in the store of this node' >&2; exit {MISSING_EXIT}; }}",
    ]
    if action in ("switch", "boot"):
        steps.append(f"nix-env -p {shlex.quote(SYSTEM_PROFILE)} --set {t} || exit")
    steps.append(
        f"{t}/bin/switch-to-configuration {shlex.quote(action)} || "
        "{ c=$?; echo 'warning: error(s) occurred while switching to the new configuration' >&2; exit $c; }"
    )
    if root is not None and action != "dry-activate":
        steps.append(f"rm -f {shlex.quote(root_path(root))}")
    return "; ".join(steps)  # one line: the log shows the command as one line


def run_activate(
    target: Target,
    *,
    deployment_id: int,
    toplevel: str,
    action: str,
    root: str | None,
    on_output: OutputCallback,
    should_cancel: Callable[[], bool] | None = None,
    on_workdir: Callable[[str], None] | None = None,
    arm=None,
) -> RebuildResult:
    """Activate ``toplevel`` (already in the node's store) with ``action``, detached and followed like a
    rebuild; before and after are the node's system state. Nothing is shipped (an empty archive)."""
    script = activation_command(toplevel, action, root)

    def command(workdir: str, privileged: bool) -> str:
        prefix = target.privileged_prefix() if privileged else ""
        return f"{prefix}sh -c {shlex.quote(script)}"

    return run_rebuild(
        target,
        deployment_id=deployment_id,
        archive=_empty_tar(),
        attr="activate",
        action=action,
        on_output=on_output,
        should_cancel=should_cancel,
        on_workdir=on_workdir,
        command=command,
        resolve=lambda workdir: resolve_path(action, workdir),
        arm=arm,  # confirm.Arming: health checks and magic rollback
    )


def _sweep_local_roots(prefix: str) -> None:
    """``sweep_roots`` on the panel host."""
    limit = time.time() - STALE_ROOT_MINUTES * 60
    for name in os.listdir(GCROOTS):
        path = os.path.join(GCROOTS, name)
        try:
            if name.startswith(prefix) and os.path.islink(path) and os.lstat(path).st_mtime < limit:
                os.unlink(path)
        except OSError:
            continue  # removed by another build meanwhile


def build_local(
    archive: bytes,
    attr: str,
    *,
    root: str,
    on_output: OutputCallback,
    should_cancel: Callable[[], bool] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Build the toplevel of ``attr`` from ``archive`` with the panel host's Nix, into GC root ``root``
    (``GCROOTS/<root>`` on this host). Returns (exit code, built store path or '').

    The build runs in its own process group, its stdout and stderr delivered as lines as they come;
    ``should_cancel`` is polled every 0.2 s and kills the group (then :class:`Cancelled`).
    """
    link = root_path(root)
    with tempfile.TemporaryDirectory(prefix="nixos-panel-build-") as tmp:
        src = os.path.join(tmp, "src")
        os.mkdir(src)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            tar.extractall(src, filter="data")
        os.makedirs(GCROOTS, exist_ok=True)
        _sweep_local_roots("built-")
        argv = [*shlex.split(NIX), "build", "-L", "--out-link", link, installable(src, attr)]
        on_output("sys", f"running on the panel host: {shlex.join(argv)}".encode())
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        lock = threading.Lock()

        def pump(pipe, name: str) -> None:
            for line in iter(pipe.readline, b""):
                with lock:
                    on_output(name, line.rstrip(b"\n"))

        readers = [
            threading.Thread(target=pump, args=(p, n), daemon=True)
            for p, n in ((proc.stdout, "out"), (proc.stderr, "err"))
        ]
        for r in readers:
            r.start()
        cancelled = False
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if not cancelled and should_cancel is not None and should_cancel():
                    cancelled = True
                    os.killpg(proc.pid, signal.SIGKILL)
        for r in readers:
            r.join()
        if cancelled:
            raise Cancelled("the build on the panel host was stopped")
        toplevel = os.path.realpath(link) if code == 0 and os.path.lexists(link) else ""
        return code, toplevel
