"""Per-call cgroups for the sandbox: the mechanics, with no policy.

Where the machine allows it, each sandboxed call gets a cgroup of its own, so
that its memory and process limits hold for the whole tree it starts, and
every process of it can be found and killed at the end, however it hid
(setsid, double fork, no namespaces). cgroup v2 (one directory) is used where
our own cgroup offers the memory and pids controllers, else the v1 memory and
pids hierarchies (one directory in each). A call's cgroup is a child of our
own, named ``fgo-sandbox-<our pid>-<random>``.

:mod:`.sandbox` decides whether calls get one (it finds our cgroups with
:func:`locate`, readies v2 with :func:`prepare_v2`, then tries the runner in
one) and makes one per call (:meth:`CgroupSetup.create`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import structlog

if TYPE_CHECKING:
    from .sandbox import SandboxLimits

_CGROUP_PREFIX = "fgo-sandbox-"
_CONTROLLERS = ("memory", "pids")
# How long to keep killing a call's processes before giving up on its cgroup.
_CGROUP_KILL_SECONDS = 5.0


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name), encoding="utf-8") as f:
        return f.read()


def _write(directory: str, name: str, value: str) -> None:
    """One write(2) of ``value``: cgroup files take a value per write."""
    fd = os.open(os.path.join(directory, name), os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _count(directory: str, name: str, key: str) -> int:
    """The number after ``key`` in a flat-keyed cgroup file, 0 where there is none."""
    with contextlib.suppress(OSError, ValueError):
        for line in _read(directory, name).splitlines():
            field, _, value = line.partition(" ")
            if field == key:
                return int(value)
    return 0


def procs(directory: str) -> set[int]:
    with contextlib.suppress(FileNotFoundError):
        return {int(pid) for pid in _read(directory, "cgroup.procs").split()}
    return set()


def _kill_member(pid: int, name: str) -> None:
    """SIGKILL ``pid`` if it is in the cgroup ``name``, through a pidfd, so a
    process that got the number after ``pid`` died is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        if e.errno != errno.ENOSYS:  # gone already
            return
        pidfd = -1  # a kernel older than 5.3: by number, checked just before
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            if f"/{name}\n" not in f.read():
                return
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:  # it exited meanwhile
        pass
    finally:
        if pidfd >= 0:
            os.close(pidfd)


@attrs.define
class CallCgroup:
    """One call's cgroup: its directory (v2), or its memory and pids directories (v1)."""

    version: int
    dirs: tuple[str, ...]
    made: list[str] = attrs.Factory(list)  # those created and not yet removed

    @property
    def name(self) -> str:
        return os.path.basename(self.dirs[0])

    def procs_files(self) -> list[str]:
        """What the runner writes itself into (see ``sandbox_child``)."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def apply(self, limits: SandboxLimits) -> None:
        memory, pids = self.dirs[0], self.dirs[-1]
        limit = str(limits.memory_mb << 20)
        if self.version == 2:
            _write(memory, "memory.max", limit)
            if os.path.exists(os.path.join(memory, "memory.swap.max")):
                _write(memory, "memory.swap.max", "0")
        else:
            _write(memory, "memory.limit_in_bytes", limit)
            if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
                _write(memory, "memory.memsw.limit_in_bytes", limit)  # memory and swap together
            else:  # no swap accounting: at least do not prefer swapping to killing
                with contextlib.suppress(OSError):
                    _write(memory, "memory.swappiness", "0")
        _write(pids, "pids.max", str(limits.max_processes))

    def kill(self) -> bool:
        """Kill every process in the cgroup; True once it is empty. v2 has
        ``cgroup.kill``; otherwise (and to be sure) each member is killed until
        none is left, which a fork bomb cannot outrun for long: it cannot grow
        past ``pids.max``, and a process with SIGKILL pending forks no more."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self.dirs[0], "cgroup.kill", "1")
        deadline = time.monotonic() + _CGROUP_KILL_SECONDS
        while True:
            members = set().union(*(procs(d) for d in self.made))
            if not members:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in members:
                _kill_member(pid, self.name)
            time.sleep(0.002)

    def settle(self, limits: SandboxLimits) -> str | None:
        """Kill what is left of the call; then which of its limits, if any, the
        kernel enforced: the error the call fails with."""
        self.kill()
        memory, pids = self.dirs[0], self.dirs[-1]
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        killed = _count(memory, events, "oom_kill")
        refused = _count(pids, "pids.events", "max")
        if killed:
            return (
                f"MemoryError: out of memory (the sandbox allows {limits.memory_mb} MB for all "
                f"of the call's processes together; the kernel killed {killed} of them)"
            )
        if refused:
            return (
                f"BlockingIOError: too many processes (the sandbox allows "
                f"{limits.max_processes} processes and threads for the call; "
                f"{refused} refused)"
            )
        return None

    def remove(self) -> None:
        """Kill everything in the cgroup and remove it (again: a no-op); logged
        as ``sandbox_cgroup_left`` where it cannot be."""
        if not self.made:
            return
        emptied = self.kill()
        for d in reversed(self.made):
            for attempt in range(50):  # an emptied cgroup can be busy a moment longer
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EBUSY and attempt < 49:
                        time.sleep(0.01)
                        continue
                    structlog.get_logger().warning(
                        "sandbox_cgroup_left", cgroup=d, emptied=emptied, reason=str(e)
                    )
                break
        self.made.clear()


@attrs.frozen
class CgroupSetup:
    """Where this process makes its calls' cgroups: one directory for cgroup
    v2, the memory and the pids one for v1."""

    version: int
    parents: tuple[str, ...]

    def create(self, limits: SandboxLimits) -> CallCgroup:
        """A new, empty cgroup holding ``limits``; raises OSError, leaving nothing behind."""
        name = f"{_CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        cgroup = CallCgroup(self.version, tuple(os.path.join(p, name) for p in self.parents))
        try:
            for d in cgroup.dirs:
                os.mkdir(d)
                cgroup.made.append(d)
            cgroup.apply(limits)
        except OSError:
            cgroup.remove()
            raise
        return cgroup


def _unescape(field: str) -> str:
    """A path from mountinfo, where space, tab, newline and backslash are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def locate(self_cgroup: str, mountinfo: str) -> tuple[int, tuple[str, ...]] | str:
    """Our own cgroup's directory: v2's where it offers memory and pids, else
    v1's memory and pids ones; or why there is none. Read off the text of
    ``/proc/self/cgroup`` and ``/proc/self/mountinfo``."""
    own: dict[str, str] = {}  # controller ("" for v2): our cgroup in its hierarchy
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                own[controller] = parts[2]
    mounts: list[tuple[str, str, str, set[str]]] = []  # type, root, mount point, options
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and tail and tail[0] in ("cgroup", "cgroup2"):
            options = set(tail[2].split(",")) if len(tail) > 2 else set()
            mounts.append((tail[0], _unescape(fields[3]), _unescape(fields[4]), options))

    def directory(fstype: str, controller: str) -> str | None:
        path = own.get(controller)
        if path is None or ".." in path.split("/"):  # outside our cgroup namespace
            return None
        for kind, root, point, options in mounts:
            if kind != fstype or (controller and controller not in options):
                continue
            if root == "/" or path == root or path.startswith(root + "/"):
                rel = path if root == "/" else path[len(root) :]
                return os.path.normpath(point + "/" + rel)
        return None

    reasons = []
    unified = directory("cgroup2", "")
    if unified is not None:
        try:
            offered = set(_read(unified, "cgroup.controllers").split())
        except OSError as e:
            offered = set()
            reasons.append(f"cannot read {unified}/cgroup.controllers: {e.strerror}")
        missing = [c for c in _CONTROLLERS if c not in offered]
        if not missing:
            return 2, (unified,)
        reasons.append(f"our cgroup v2 {unified} offers no {' or '.join(missing)} controller")
    legacy = [directory("cgroup", c) for c in _CONTROLLERS]
    if all(legacy):
        return 1, tuple(d for d in legacy if d)
    gone = [c for c, d in zip(_CONTROLLERS, legacy, strict=True) if d is None]
    reasons.append(f"no cgroup v1 {' or '.join(gone)} hierarchy of ours is mounted")
    return "; ".join(reasons)


def prepare_v2(
    own: str, needed: Sequence[str] = _CONTROLLERS, me: int | None = None
) -> CgroupSetup | str:
    """Make our cgroup v2 ``own`` hand ``needed`` to the calls' cgroups, its children.

    A cgroup other than the root can enable controllers for its children only
    while no process lives in it ("no internal processes"), and we live in it.
    So where we are alone in it (a service, a container or a ``systemd-run
    --scope -p Delegate=yes`` of our own), we move ourselves, as nsjail does,
    into a leaf child ``fgo-self-<pid>`` first: still under ``own``, so every
    limit that held for us still does. Where other processes share it, we
    leave them, and it, alone: the reason is returned. ``me`` stands for
    another process than ours (tests).
    """
    try:
        enabled = set(_read(own, "cgroup.subtree_control").split())
    except OSError as e:
        return f"cannot read {own}/cgroup.subtree_control: {e.strerror}"
    if all(c in enabled for c in needed):
        return CgroupSetup(2, (own,))
    enable = " ".join(f"+{c}" for c in needed)
    try:
        _write(own, "cgroup.subtree_control", enable)
    except OSError as e:
        if e.errno != errno.EBUSY:
            return f"cannot enable {' and '.join(needed)} below {own}: {e.strerror}"
        pid = os.getpid() if me is None else me
        others = procs(own) - {pid}
        if others:
            return (
                f"our cgroup v2 {own} holds {len(others)} other processes, so it can hand no "
                "controller to a child (no internal processes); give FGO a cgroup of its own "
                "(e.g. systemd-run --scope -p Delegate=yes)"
            )
        leaf = os.path.join(own, f"fgo-self-{pid}")
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf)
            _write(leaf, "cgroup.procs", "0" if me is None else str(me))
            _write(own, "cgroup.subtree_control", enable)
        except OSError as e2:
            return f"cannot move into {leaf} to enable controllers below {own}: {e2.strerror}"
        structlog.get_logger().info("sandbox_cgroup_moved_self", cgroup=leaf)
    return CgroupSetup(2, (own,))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_stale(setup: CgroupSetup) -> list[str]:
    """Kill what is left in, and remove, the call cgroups under ``setup``
    of processes that are gone (a process killed with SIGKILL cannot remove
    its calls' cgroups); the ones removed. A cgroup whose owner's pid is in
    use is left alone: that may be the owner."""
    removed: list[str] = []
    stale: dict[str, list[str]] = {}
    for parent in setup.parents:
        with contextlib.suppress(OSError):
            for entry in os.scandir(parent):
                name = entry.name
                if not (entry.is_dir() and name.startswith(_CGROUP_PREFIX)):
                    continue
                owner = name[len(_CGROUP_PREFIX) :].partition("-")[0]
                if owner.isdigit() and int(owner) != os.getpid() and not _alive(int(owner)):
                    stale.setdefault(name, []).append(entry.path)
    for dirs in stale.values():
        # In the parents' order (v1: memory, then pids), as a call's are.
        cgroup = CallCgroup(setup.version, tuple(dirs), made=list(dirs))
        cgroup.remove()
        if not cgroup.made and not any(os.path.exists(d) for d in dirs):
            removed.extend(dirs)
    if removed:
        structlog.get_logger().info("sandbox_stale_cgroups_removed", cgroups=removed)
    return removed
