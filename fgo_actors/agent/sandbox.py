"""Run LLM-written tool functions in a separate, limited Python process.

LLM-written code never runs in our own process. ``run_function`` starts a
fresh ``sys.executable -I`` for every call, hands it the code, the function's
name and its arguments as JSON on stdin, and reads back one JSON line saying
what happened.

Threat model, honestly: this is process isolation with namespaces, resource
limits and an empty environment. It is meant for code that is buggy, greedy
or confused, and it closes the escapes a curious one tries first. What it
does protect:

- **our process's memory and state**: the code runs in another process, so it
  cannot read our objects, patch our modules or crash our interpreter;
- **our environment variables and secrets**: the child starts with an empty
  environment (no ``FGO_API_KEY``, no ``HOME``, no ``PATH``), in isolated mode
  (``-I``: no ``PYTHON*`` variables, no user site-packages, no script
  directory on ``sys.path``), and it inherits only stdin, stdout and stderr,
  none of our other file descriptors (sockets, log files). Where util-linux's
  ``unshare`` works (:func:`isolation`; as root, or without root through a
  user namespace), it runs in its own PID namespace with its own ``/proc``,
  so our processes and their environments (``/proc/<pid>/environ``) are out
  of its sight;
- **the network**: in its own network namespace it has only a loopback that
  is down, so it cannot call out or reach our loopback servers;
- **processes it leaves behind**: the runner is init of the PID namespace,
  and when it exits the kernel kills everything the code started, also a
  ``setsid`` grandchild; without namespaces, the process group is killed,
  and with a cgroup (below) everything in it, ``setsid`` or not;
- **the result**: the code runs in a child of the runner that has no
  descriptor for the result channel, only a pipe for its own outcome; the
  runner judges the child's exit (a signal, a non-zero status) itself, so
  code cannot report success and then die, or write a second report;
- **our working directory**: the child's cwd is a fresh scratch directory that
  is deleted after the call;
- **our files**: where a mount namespace can be had too
  (:func:`confines_files`), the runner makes an empty tmpfs its root and
  binds in only the scratch directory (and ``writable`` ones), read-only the
  Python installation, its virtual environment and the system's libraries,
  and a few devices; then it drops every capability and sets no_new_privs,
  so the code can neither read the rest of the machine nor undo the mounts;
- **runaway CPU, memory, files and time**: rlimits on address space
  (``RLIMIT_AS``), CPU seconds, open files and file size, a wall-clock
  timeout after which the whole process tree is killed, and caps on how
  much output and result we read back;
- **the whole process tree of a call**, where a cgroup can be had
  (:func:`limits_process_tree`: as root, or where cgroup v2's memory and
  pids controllers are ours to hand out): each call gets a cgroup of its
  own, a child of ours, which the runner joins before anything of the code
  runs (``sandbox_child`` says how). All the call's processes together may
  use ``memory_mb`` of memory (no swap) and have ``max_processes``
  processes and threads, so six forks of 200 MB under 256 MB, or a fork
  bomb, fail the call with a ``MemoryError`` or ``BlockingIOError`` saying
  so, however the code handled it. When the call ends, also on a timeout or
  a cancellation, every process in the cgroup is killed (``cgroup.kill``;
  on v1 each member through a pidfd, until none is left) and the cgroup
  removed. On cgroup v2 a cgroup with processes cannot hand controllers to
  children, so where we are alone in ours we move ourselves into a leaf
  child of it first (``sandbox_cgroup_moved_self``); where others share
  it, there is no cgroup. Joining cost about 9 ms a call where it was
  measured (cgroup v1: the kernel's migration lock waits for an RCU grace
  period; the mount option ``favordynmods`` makes that cheaper).

- **system calls that reach past all of that**: a seccomp filter
  (:mod:`.seccomp`, built with libseccomp) refuses new sockets (so no
  network, and no daemon's Unix socket, even without a network namespace),
  ``ptrace`` and the other ways into another process, new namespaces,
  mounts, ``io_uring``, ``bpf`` and the kernel interfaces containers refuse
  too. It holds for everything the code starts. Without libseccomp (logged
  once as ``sandbox_no_seccomp``) there is no filter.

What it does *not* do: the filter is a deny-list, so the system calls it
does not name are open to the code. Without a mount namespace (``sandbox_files_not_confined`` is
logged), the code runs as our user and can read any file we can read
(``~/.ssh``, the project) and write anywhere we can write; as root it can
then also write itself out of its cgroup. Without a cgroup (logged once as
``sandbox_no_cgroup``, with the reason), the limits are per process: code
that forks gets them again in each child, and forks as often as it likes,
for as long as the timeout lets it run. Even with one, CPU time is limited
per process (``RLIMIT_CPU``, no cpu controller): N processes may each use
``cpu_seconds``, within the timeout; disk and network I/O bandwidth are not
limited. Without ``unshare`` (logged once as ``sandbox_not_isolated``), it
can also see our processes (and open network connections where there is no
filter either), and without a
cgroup too, outlive the call with ``setsid``. For code from an adversary,
put this inside a real sandbox (a container with no network, gVisor, nsjail,
a separate VM).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any

import attrs
import structlog
import trio

from . import seccomp
from .cgroup import CallCgroup, CgroupSetup, prepare_v2
from .cgroup import locate as locate_cgroups
from .cgroup import sweep_stale as sweep_stale_cgroups

# Extra room on the result channel beyond ``output_bytes``: the JSON envelope
# around the value, or an error message (the runner cuts those to 1000
# characters, which ``ensure_ascii`` may escape to six bytes each).
_RESULT_ENVELOPE_BYTES = 8192
# After the child exits we keep reading its pipes only this long: a process
# that escaped the group kill could otherwise hold them open for ever.
_DRAIN_GRACE_SECONDS = 1.0
_CHUNK = 65536


@attrs.frozen
class SandboxLimits:
    """How much one sandboxed call may use. All values must be positive.

    ``timeout`` is wall-clock seconds from starting the process (interpreter
    start-up, about 30 ms, included). ``memory_mb`` caps the address space
    (``RLIMIT_AS``, so it counts reserved virtual memory, not just resident
    pages), ``cpu_seconds`` the CPU time (``RLIMIT_CPU``), ``max_files`` the
    number of open file descriptors (``RLIMIT_NOFILE``) and ``file_size_mb``
    the size of any file the code writes (``RLIMIT_FSIZE``). ``output_bytes``
    caps both the captured output and the JSON of the return value.

    Where the call gets a cgroup of its own (:func:`limits_process_tree`),
    ``memory_mb`` also caps the memory of all the call's processes together
    (no swap), and ``max_processes`` how many processes and threads it may
    have at once, the runner's own included; without one, ``max_processes``
    does not hold.
    """

    timeout: float = 5.0
    memory_mb: int = 256
    cpu_seconds: int = 5
    output_bytes: int = 65536
    max_files: int = 32
    file_size_mb: int = 16
    max_processes: int = 16

    def __attrs_post_init__(self) -> None:
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"SandboxLimits.timeout must be a positive number of seconds, got {t!r}"
            )
        fields = (
            "memory_mb",
            "cpu_seconds",
            "output_bytes",
            "max_files",
            "file_size_mb",
            "max_processes",
        )
        for field in fields:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{field} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = SandboxLimits()


@attrs.frozen
class SandboxResult:
    """The outcome of one sandboxed call.

    ``ok`` is True only when the function returned a JSON-serialisable value,
    which is then ``value`` (else ``value`` is None). ``error`` is None on
    success, else one line such as ``"ValueError: bad input"``,
    ``"TimeoutError: no result within 5 s"``, ``"killed by signal 24
    (SIGXCPU): ..."`` or, where the call's cgroup enforced a limit,
    ``"MemoryError: out of memory (...)"``. ``stdout`` is everything the code
    wrote to stdout and stderr, interleaved in order, followed on an
    exception by its traceback; it is cut to ``output_bytes`` (with a note
    saying so). ``seconds`` is the wall time from start to exit.
    """

    ok: bool
    value: Any
    error: str | None
    stdout: str
    seconds: float
    timed_out: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "value": self.value,
            "error": self.error,
            "stdout": self.stdout,
            "seconds": self.seconds,
            "timed_out": self.timed_out,
        }


# The child's program (``sandbox_child.py``, a module of its own so that it is
# linted and type-checked), passed with ``-c``; argv carries the limits. Its
# docstring says how the result channel and the limits work.
_RUNNER = resources.files("fgo_actors.agent").joinpath("sandbox_child.py").read_text("utf-8")


@attrs.define
class _Capture:
    """Bytes read from one pipe: the first ``cap`` kept, the rest only counted."""

    cap: int
    data: bytearray = attrs.Factory(bytearray)
    total: int = 0

    async def drain(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(_CHUNK):
            self.total += len(chunk)
            room = self.cap - len(self.data)
            if room > 0:
                self.data += chunk[:room]

    def text(self) -> str:
        if self.total <= self.cap:
            return self.data.decode("utf-8", errors="replace")
        note = f"\n[output truncated: {self.total} bytes written, the sandbox keeps {self.cap}]"
        keep = max(0, self.cap - len(note))
        if keep == 0:
            return bytes(self.data[: self.cap]).decode("utf-8", errors="replace")
        return bytes(self.data[:keep]).decode("utf-8", errors="replace") + note


async def run_function(
    code: str,
    name: str,
    arguments: dict[str, Any],
    limits: SandboxLimits = DEFAULT_LIMITS,
    *,
    writable: Sequence[str] = (),
) -> SandboxResult:
    """Define ``code`` in a fresh sandboxed process and call ``name(**arguments)`` there.

    Where namespaces allow (:func:`confines_files`), the code sees only its
    scratch directory (its cwd, writable), ``writable`` (directories it may
    also write), and read-only the Python it runs on and the system's
    libraries.

    Whatever the code does (raise, loop, exhaust memory, print, exit, return
    something odd) comes back as a ``SandboxResult`` with ``ok=False`` and a
    one-line ``error``; this function raises only for our own misuse: wrong
    argument types, arguments that are not JSON-serialisable, or invalid
    ``limits``. The child process and its scratch directory are gone when it
    returns, also when the caller is cancelled; so is its cgroup, and with it
    every process the code started, where it had one
    (:func:`limits_process_tree`).
    """
    if not isinstance(code, str) or not isinstance(name, str):
        raise TypeError("run_function: code and name must be str")
    if not isinstance(arguments, dict):
        raise TypeError(f"run_function: arguments must be a dict, got {type(arguments).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"run_function: limits must be SandboxLimits, got {type(limits).__name__}")
    if any(not isinstance(w, str) or not w.startswith("/") for w in writable):
        raise ValueError(f"run_function: writable paths must be absolute, got {list(writable)}")
    if not sys.executable:
        raise RuntimeError("run_function: sys.executable is unknown, so no Python can be started")
    try:
        request = json.dumps({"code": code, "name": name, "arguments": arguments})
    except (TypeError, ValueError) as e:
        raise TypeError(f"run_function: arguments must be JSON-serialisable: {e}") from e
    scratch = tempfile.mkdtemp(prefix="fgo-sandbox-")
    root = tempfile.mkdtemp(prefix="fgo-sandbox-root-")  # stays empty out here
    cgroup: CallCgroup | None = None
    try:
        try:
            cgroup = await trio.to_thread.run_sync(_new_cgroup, limits)
        except OSError as e:  # the probe found cgroups working: not the code's doing
            structlog.get_logger().warning("sandbox_cgroup_failed", reason=str(e))
            error = f"RuntimeError: the sandbox could not make the call's cgroup: {e}"
            return SandboxResult(False, None, error, "", 0.0, timed_out=False)
        return await _run_in(scratch, root, request.encode("utf-8"), limits, list(writable), cgroup)
    finally:
        with trio.CancelScope(shield=True):
            if cgroup is not None:  # kills whatever is still running, then removes it
                await trio.to_thread.run_sync(cgroup.remove)
            await trio.to_thread.run_sync(_remove_tree, scratch)
            await trio.to_thread.run_sync(_remove_tree, root)


# util-linux's unshare puts the child in new namespaces: no network but a
# loopback that is down, a PID namespace with its own /proc (our processes,
# and their environments, are out of sight, and everything the code starts
# dies with the runner, which is init there), and its own IPC and hostname.
# Without root it also makes a user namespace, which needs no privilege.
_UNSHARE = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts")


@functools.cache
def isolation() -> tuple[str, ...]:
    """The command prefix that isolates a sandboxed process, or () where
    namespaces are not available here (then only the rlimits, the empty
    environment and the process group hold; this is logged once).

    A user namespace is asked for first, also as root: its root holds no
    privilege over the machine (no devices, no mounts of real file systems).
    """
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None
    )
    log = structlog.get_logger()
    if unshare is None:
        log.warning("sandbox_not_isolated", reason="no unshare (util-linux) on this machine")
        return ()
    candidates: list[tuple[str, ...]] = [(unshare, "--map-root-user", *_UNSHARE, "--")]
    if os.geteuid() == 0:
        candidates.append((unshare, *_UNSHARE, "--"))
    reason = ""
    for prefix in candidates:
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", "pass"],
                env={},
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = f"unshare failed: {e}"
            continue
        if probe.returncode == 0:
            return prefix
        reason = "unshare refused: " + probe.stderr.decode("utf-8", "replace").strip()[:300]
    log.warning("sandbox_not_isolated", reason=reason)
    return ()


def _read_only_paths() -> list[str]:
    """What the code may read: the Python it runs on (its installation and its
    virtual environment) and the system's programs and libraries. Nothing else
    of the machine: no /etc, /home, /root, /tmp, no project files."""
    paths = [sys.base_prefix, sys.prefix, "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"]
    return list(dict.fromkeys(paths))


@functools.cache
def confines_files() -> bool:
    """Whether the runner can confine the code's file system here (a mount
    namespace from :func:`isolation`); probed once, logged when not."""
    prefix = isolation()
    if not prefix:
        return False
    with tempfile.TemporaryDirectory(prefix="fgo-sandbox-probe-") as top:
        scratch, root = os.path.join(top, "scratch"), os.path.join(top, "root")
        os.mkdir(scratch)
        os.mkdir(root)
        jail = json.dumps({"root": root, "read_only": _read_only_paths(), "writable": []})
        request = json.dumps({"code": "def f():\n    return 1\n", "name": "f", "arguments": {}})
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", _RUNNER, "256", "5", "64", "1", "1000", jail],
                input=request.encode(),
                env={},
                cwd=scratch,
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            structlog.get_logger().warning("sandbox_files_not_confined", reason=str(e))
            return False
    if probe.returncode != 0 or json.loads(probe.stdout or b"{}").get("value") != 1:
        reason = probe.stderr.decode("utf-8", "replace").strip()[-300:]
        structlog.get_logger().warning("sandbox_files_not_confined", reason=reason)
        return False
    return True


_cgroup_lock = threading.Lock()

_PROBE_CODE = "def where():\n    return open('/proc/self/cgroup').read()\n"


def _try_cgroup(setup: CgroupSetup) -> str | None:
    """Run the runner once, the way calls run it, in a call's cgroup: None
    when it joined it there, else why not."""
    try:
        cgroup = setup.create(DEFAULT_LIMITS)
    except OSError as e:
        return f"cannot make a cgroup in {', '.join(setup.parents)}: {e}"
    try:
        with tempfile.TemporaryDirectory(prefix="fgo-sandbox-probe-") as top:
            scratch, root = os.path.join(top, "scratch"), os.path.join(top, "root")
            os.mkdir(scratch)
            os.mkdir(root)
            options: dict[str, Any] = {"cgroup": cgroup.procs_files()}
            if confines_files():
                options.update(root=root, read_only=_read_only_paths(), writable=[])
            request = json.dumps({"code": _PROBE_CODE, "name": "where", "arguments": {}})
            probe = subprocess.run(
                _runner_argv(isolation(), DEFAULT_LIMITS, options),
                input=request.encode(),
                env={},
                cwd=scratch,
                capture_output=True,
                timeout=30,
                check=False,
            )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the runner failed: {e}"
    finally:
        cgroup.remove()
    try:
        seen = json.loads(probe.stdout or b"{}").get("value")
    except ValueError:
        seen = None
    if isinstance(seen, str) and seen.count(f"/{cgroup.name}\n") == len(cgroup.dirs):
        return None
    return "the runner could not join it: " + probe.stderr.decode("utf-8", "replace")[-300:]


def _probe_cgroups(self_cgroup: str, mountinfo: str) -> CgroupSetup | None:
    """Where calls get cgroups of their own, found and tried once; None (logged
    once as ``sandbox_no_cgroup``, with the reason) where they cannot."""
    found = locate_cgroups(self_cgroup, mountinfo)
    reason: str | None
    if isinstance(found, str):
        reason = found
    else:
        version, dirs = found
        setup = prepare_v2(dirs[0]) if version == 2 else CgroupSetup(1, dirs)
        reason = setup if isinstance(setup, str) else _try_cgroup(setup)
        if reason is None and isinstance(setup, CgroupSetup):
            return setup
    structlog.get_logger().warning("sandbox_no_cgroup", reason=reason)
    return None


@functools.cache
def _cgroup_setup_once() -> CgroupSetup | None:
    if not sys.platform.startswith("linux"):
        structlog.get_logger().warning("sandbox_no_cgroup", reason="not Linux")
        return None
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            self_cgroup = f.read()
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mountinfo = f.read()
    except OSError as e:
        structlog.get_logger().warning("sandbox_no_cgroup", reason=str(e))
        return None
    try:
        setup = _probe_cgroups(self_cgroup, mountinfo)
    except (OSError, ValueError) as e:  # a cgroup file not as documented
        structlog.get_logger().warning("sandbox_no_cgroup", reason=f"probe failed: {e}")
        return None
    if setup is not None:
        sweep_stale_cgroups(setup)
    return setup


def _cgroup_setup() -> CgroupSetup | None:
    with _cgroup_lock:  # calls start from several threads; probe (and move) once
        return _cgroup_setup_once()


def limits_process_tree() -> bool:
    """Whether each call gets a cgroup of its own here, so that its memory and
    process limits hold for its whole process tree and all of it is killed
    when the call ends. Probed once (as root with cgroup v1, or where cgroup
    v2's memory and pids controllers are ours to hand out), logged as
    ``sandbox_no_cgroup`` when not; then only the per-process limits hold."""
    return _cgroup_setup() is not None


def _new_cgroup(limits: SandboxLimits) -> CallCgroup | None:
    setup = _cgroup_setup()
    return None if setup is None else setup.create(limits)


def _runner_argv(prefix: Sequence[str], limits: SandboxLimits, setup: dict[str, Any]) -> list[str]:
    """The command that runs the runner with ``limits``; ``setup`` names the
    call's cgroup (``"cgroup"``), its jail (``"root"``, ...) and its system-call
    filter (``"seccomp"``), each optional."""
    argv = [
        *prefix,
        sys.executable,
        "-I",
        "-c",
        _RUNNER,
        str(limits.memory_mb),
        str(limits.cpu_seconds),
        str(limits.max_files),
        str(limits.file_size_mb),
        str(limits.output_bytes),
    ]
    if setup:
        argv.append(json.dumps(setup))
    return argv


async def _run_in(
    scratch: str,
    root: str,
    request: bytes,
    limits: SandboxLimits,
    writable: Sequence[str],
    cgroup: CallCgroup | None,
) -> SandboxResult:
    prefix = await trio.to_thread.run_sync(isolation)
    setup: dict[str, Any] = {}
    if cgroup is not None:
        setup["cgroup"] = cgroup.procs_files()
    if await trio.to_thread.run_sync(confines_files):
        setup.update(root=root, read_only=_read_only_paths(), writable=list(writable))
    if (program := await trio.to_thread.run_sync(seccomp.program)) is not None:
        setup["seccomp"] = program
    argv = _runner_argv(prefix, limits, setup)
    breach: str | None = None
    started = trio.current_time()
    proc = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={},
        cwd=scratch,
        start_new_session=True,  # its own process group, so we can kill all of it
    )
    stdin, stdout_pipe, stderr_pipe = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None
    assert stdout_pipe is not None
    assert stderr_pipe is not None
    result = _Capture(limits.output_bytes + _RESULT_ENVELOPE_BYTES)
    output = _Capture(limits.output_bytes)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, stdin, request)
            nursery.start_soon(result.drain, stdout_pipe)
            nursery.start_soon(output.drain, stderr_pipe)
            with trio.move_on_at(started + limits.timeout) as waiting:
                await proc.wait()
            timed_out = waiting.cancelled_caught
            # On a timeout this kills the runner and everything it started; after a
            # normal exit it kills anything the code left running in the group
            # (which would otherwise keep our pipes open).
            _kill_group(proc.pid)
            await proc.wait()
            finished = trio.current_time()
            if cgroup is not None:
                # Also what escaped the group and the namespace (or had none to
                # escape); then the kernel's counts of what the limits refused.
                breach = await trio.to_thread.run_sync(cgroup.settle, limits)
            nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_GRACE_SECONDS
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:  # we are being cancelled: leave nothing behind
                _kill_group(proc.pid)
                await proc.wait()
            for stream in (stdin, stdout_pipe, stderr_pipe):
                await stream.aclose()
    seconds = finished - started
    stdout = output.text()
    if timed_out:
        error = f"TimeoutError: no result within {limits.timeout:g} s"
        if breach is not None:
            error += f"; {breach}"
        return SandboxResult(False, None, error, stdout, seconds, timed_out=True)
    if breach is not None:  # whatever the code made of it, the call broke its limits
        return SandboxResult(False, None, breach, stdout, seconds, timed_out=False)
    reported = _parse_result(result)
    if reported is None or isinstance(reported, int):
        code = proc.returncode if reported is None else -reported
        error = _describe_exit(code, limits, stdout)
        return SandboxResult(False, None, error, stdout, seconds, timed_out=False)
    ok, value, reported_error = reported
    return SandboxResult(ok, value, reported_error, stdout, seconds, timed_out=False)


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    # The child may die (or close stdin) before reading it all; its exit status
    # then says why, so a broken pipe here is not an error of its own.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
        await stream.aclose()


def _kill_group(pgid: int) -> None:
    # The group id is the runner's pid (start_new_session). Once the runner is
    # reaped and its group is empty, the id could in principle be reused, but
    # only by a new session leader created in the microseconds before this call.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _parse_result(result: _Capture) -> tuple[bool, Any, str | None] | int | None:
    """The runner's report, or the signal that killed the code, or None when
    the runner wrote nothing."""
    if result.total == 0:
        return None
    malformed = (False, None, "RuntimeError: the sandbox runner's report was malformed")
    if result.total > result.cap:
        return malformed
    try:
        outcome = json.loads(result.data)
    except ValueError:
        return malformed
    if not isinstance(outcome, dict) or not isinstance(outcome.get("ok"), bool):
        return malformed
    killed_by = outcome.get("signal")
    if isinstance(killed_by, int) and not isinstance(killed_by, bool) and killed_by > 0:
        return killed_by
    if outcome["ok"]:
        return True, outcome.get("value"), None
    error = outcome.get("error")
    if not isinstance(error, str):
        return malformed
    return False, None, error


def _describe_exit(returncode: int | None, limits: SandboxLimits, stdout: str) -> str:
    """Why a child that wrote no report ended."""
    if returncode is not None and returncode < 0:
        number = -returncode
        try:
            sig = signal.Signals(number)
        except ValueError:
            return f"killed by signal {number}"
        hints = {
            signal.SIGXCPU: f"the CPU time limit of {limits.cpu_seconds} s was reached",
            signal.SIGKILL: "killed from outside (perhaps the system ran out of memory)",
            signal.SIGSEGV: "the interpreter crashed (memory exhausted or recursion too deep?)",
            signal.SIGXFSZ: f"a file grew past the limit of {limits.file_size_mb} MB",
        }
        hint = hints.get(sig)
        return f"killed by signal {number} ({sig.name})" + (f": {hint}" if hint else "")
    last = stdout.strip().splitlines()[-1:] if stdout.strip() else []
    tail = f"; its last output: {last[0][:300]}" if last else ""
    return f"the sandboxed process exited with code {returncode} without reporting a result{tail}"


def _remove_tree(path: str) -> None:
    """Delete the scratch directory, even where the code took its own permissions away."""
    # Give every directory back its owner's rwx first (top-down, so each one is
    # readable before os.walk lists it). Symlinks are skipped: chmod follows
    # them, and a link may point anywhere.
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            sub = os.path.join(root, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)
