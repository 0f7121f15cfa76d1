"""The sandbox's runner: the program a sandboxed interpreter runs.

FGO never imports this module. ``sandbox.py`` reads its text and passes it to
``python -I -c``, with the limits in argv (memory MB, CPU seconds, open
files, file size MB, result cap in bytes, then optionally a JSON object
naming the call's cgroup, the file-system jail and the system-call filter) and the request (code,
function name, arguments) as JSON on stdin. It uses only the standard library, so the
child imports nothing of ours. It lives in a file of its own so that it is
linted and type-checked like the rest of the package.

The result channel: the parent reads the child's stdout pipe for the result
and its stderr pipe for everything else. The runner's first act is to keep a
private duplicate of fd 1 (``os.dup``, not inherited by grandchildren) and
then point fd 1 at the stderr pipe, so every way the code can print (print,
sys.__stdout__, os.write(1, ...), C extensions, child processes) lands in the
captured output and cannot corrupt the single JSON line the runner writes to
its duplicate at the end.

Joining the call's cgroup comes before everything else: the runner writes
``0`` (the writing process) into each ``cgroup.procs`` file it is given, so
it is in the cgroup before it confines itself (the jail has no ``/sys``), and
the code, which runs in a child forked only after the request is read, and
everything the code starts, are born in it. Nothing of the code runs outside
it, and no process of the call can be forked in between: the runner is the
call's only process then. If a file cannot be written the runner reports
nothing and exits with status 5.

The limits are set next, before the request is read or any of its code
runs, rather than in a ``preexec_fn``: trio starts processes from a worker
thread, and Python code between fork and exec in a threaded process is
documented as unsafe (it can deadlock the child). Soft and hard limits are set
together, so the code cannot raise them again (CPU keeps one second of
headroom so SIGXCPU comes before SIGKILL); a limit we are not allowed to raise
to the asked-for value is only ever lowered.

The system-call filter, when the parent sends one, is installed after the
limits, the runner's last step before it reads the request: it refuses the
mounts that confining needed, and everything the code does comes after it.

The code runs in a child of this runner, which holds the result channel: the
child has no descriptor for it (closed after the fork), only a pipe for its
own outcome, so whatever it writes is at most its own return value. The
runner reports; in a PID namespace it is init there, which its descendants
cannot kill. It leaves with ``os._exit``: the code's threads and atexit
handlers do not get to run on.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import linecache
import os
import platform
import resource
import sys
import traceback
import types
from typing import Any, NoReturn

# Linux mount(2) flags, and the syscalls glibc has no wrapper for, by machine.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SYSCALLS = {
    "x86_64": {"pivot_root": 155, "capset": 126},
    "aarch64": {"pivot_root": 41, "capset": 91},
}
DEVICES = ("null", "zero", "urandom", "random")


class JailError(OSError):
    """The file system could not be confined (the runner then reports nothing: exit 4)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise JailError(errno, f"{what}: {os.strerror(errno)}")


def _mount(
    libc: ctypes.CDLL,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    _check(
        libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
        f"mount {source} on {target}",
    )


def _bind(libc: ctypes.CDLL, path: str, target: str, *, writable: bool) -> None:
    """Bind ``path`` at ``target``, read-only unless ``writable``. The flags the
    kernel locks on a mount we did not make (nosuid, nodev, noexec) are kept."""
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    _mount(libc, path, target, None, MS_BIND | MS_REC)
    kept = os.statvfs(path).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    flags = MS_BIND | MS_REMOUNT | kept | (0 if writable else MS_RDONLY)
    _mount(libc, None, target, None, flags)


def confine(root: str, read_only: list[str], writable: list[str]) -> None:
    """Make the empty directory ``root`` this process's whole file system:
    ``read_only`` and ``writable`` paths bound in at their own paths (a path
    that is a symlink is recreated as one), a few devices, a fresh /proc; the
    rest of the machine's files are out of reach. Then drop every capability
    and forbid gaining any (no_new_privs), so the code cannot undo the mounts.
    Needs its own mount namespace (``unshare``); raises JailError otherwise."""
    calls = SYSCALLS.get(platform.machine())
    if calls is None:
        raise JailError(0, f"no syscall table for {platform.machine()}")
    libc = _libc()
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in read_only:
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
        elif os.path.exists(path) and not os.path.exists(target):
            _bind(libc, path, target, writable=False)
    for path in writable:
        _bind(libc, path, root + path, writable=True)
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            _bind(libc, f"/dev/{name}", f"{root}/dev/{name}", writable=True)
    os.makedirs(f"{root}/proc", exist_ok=True)
    _mount(libc, "proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    os.mkdir(".old")
    _check(libc.syscall(calls["pivot_root"], b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "umount the old root")
    os.rmdir("/.old")
    _mount(libc, None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # No capabilities, now or after an exec, and no way back to them.
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: none, twice 32 bits
    _check(libc.syscall(calls["capset"], header, data), "capset")


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog``: how many ``struct sock_filter`` records, and where."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install_filter(program: bytes) -> None:
    """Install a seccomp BPF program (``seccomp.py`` builds it) for this process
    and every process it starts; no_new_privs first, which lets an unprivileged
    process install one and keeps it from ever gaining privileges. Raises
    JailError when the kernel refuses."""
    if not program or len(program) % 8:
        raise JailError(0, f"a seccomp program is whole 8-byte records, not {len(program)} bytes")
    libc = _libc()
    ulong = ctypes.c_ulong
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)), "no_new_privs")
    records = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(records, ctypes.c_void_p))
    mode = ulong(SECCOMP_MODE_FILTER)
    _check(libc.prctl(PR_SET_SECCOMP, mode, ctypes.byref(fprog), ulong(0), ulong(0)), "seccomp")


def join_cgroup(procs_files: list[str]) -> None:
    """Move this process into the call's cgroup: one ``cgroup.procs`` file for
    cgroup v2, one per hierarchy (memory, pids) for v1. ``0`` names the writer."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def lower(which: int, soft: int, hard: int) -> None:
    """Set a limit, never above the hard limit we already have."""
    old_hard = resource.getrlimit(which)[1]
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    resource.setrlimit(which, (soft, hard))


def describe(exc: BaseException, mem_mb: int) -> str:
    """One line naming what went wrong."""
    kind = type(exc).__name__
    try:
        message = str(exc)
    except BaseException:
        message = "<the exception's message could not be printed>"
    if isinstance(exc, MemoryError) and not message:
        message = f"out of memory (the sandbox allows {mem_mb} MB of address space)"
    elif isinstance(exc, SystemExit):
        message = f"the code called sys.exit({exc.code!r})"
    if len(message) > 1000:
        message = message[:1000] + "..."
    return f"{kind}: {message}" if message else kind


def show_traceback(exc: BaseException) -> None:
    """The traceback from the code's first frame on, its innermost 40 frames at most."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<tool>":
        tb = tb.tb_next
    depth, t = 0, tb
    while t is not None:
        depth, t = depth + 1, t.tb_next
    if depth > 40:  # runaway recursion: formatting every frame takes seconds
        for _ in range(depth - 40):
            assert tb is not None
            tb = tb.tb_next
        print(f"[traceback: {depth - 40} outer frames left out]", file=sys.stderr)
    with contextlib.suppress(BaseException):
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def run(request: dict[str, Any], out_cap: int) -> str | dict[str, Any]:
    """Run the request's function: its return value as JSON text, or a failure."""
    code, name = request["code"], request["name"]
    linecache.cache["<tool>"] = (len(code), None, code.splitlines(True), "<tool>")
    namespace: dict[str, Any] = {"__name__": "__tool__"}
    exec(compile(code, "<tool>", "exec"), namespace)
    func = namespace.get(name)
    if func is None:
        defined = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("_"))
        listed = ", ".join(defined[:20]) if defined else "nothing callable"
        return {
            "ok": False,
            "error": f"NameError: the code defines no function named {name!r} "
            f"(it defines: {listed})",
        }
    if not callable(func):
        return {
            "ok": False,
            "error": f"TypeError: {name!r} is a {type(func).__name__}, not a function",
        }
    value = func(**request["arguments"])
    if isinstance(value, types.CoroutineType):
        value.close()
        return {
            "ok": False,
            "error": f"TypeError: {name!r} is an async function; "
            "tool functions must be plain def functions",
        }
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return {
            "ok": False,
            "error": "TypeError: the return value is not JSON-serialisable: " + str(exc),
        }
    if len(text) > out_cap:
        return {
            "ok": False,
            "error": f"ValueError: the return value is {len(text)} bytes "
            f"of JSON, over the sandbox's cap of {out_cap} bytes",
        }
    return text


def write_all(fd: int, line: str) -> None:
    data = memoryview(line.encode("utf-8"))
    while data:
        data = data[os.write(fd, data) :]


def call_in_child(request: dict[str, Any], result_fd: int, mem_mb: int, out_cap: int) -> bytes:
    """Fork; the child runs the code and writes its outcome to a pipe. Returns
    what the child wrote, or exits at once when the child died or failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.close(result_fd)
        child(request, write_end, mem_mb, out_cap)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):  # killed, reported or not (CPU limit, memory)
        write_all(result_fd, json.dumps({"ok": False, "signal": os.WTERMSIG(status)}) + "\n")
        os._exit(0)
    if os.WEXITSTATUS(status) != 0 or not chunks:
        os._exit(os.WEXITSTATUS(status) or 3)
    return b"".join(chunks)


def child(request: dict[str, Any], write_end: int, mem_mb: int, out_cap: int) -> NoReturn:
    try:
        outcome = run(request, out_cap)
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            exc.__traceback__ = None  # let go of the frames that hold the memory
        elif not isinstance(exc, SystemExit):
            show_traceback(exc)
        outcome = {"ok": False, "error": describe(exc, mem_mb)}
    if isinstance(outcome, str):
        line = '{"ok": true, "value": ' + outcome + "}\n"
    else:
        line = json.dumps(outcome) + "\n"
    try:
        write_all(write_end, line)
    except OSError:
        os._exit(3)
    for stream in (sys.stdout, sys.stderr):  # in case the code swapped in buffered ones
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(0)


def main() -> NoReturn:
    mem_mb, cpu_s, nofile, fsize_mb, out_cap = (int(a) for a in sys.argv[1:6])
    # {"cgroup": [procs files], "root": dir, "read_only": [...], "writable": [...],
    #  "seccomp": BPF program as hex}, each optional
    setup = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    try:
        join_cgroup(setup.get("cgroup", []))
    except OSError as e:
        print(f"sandbox: cannot join the call's cgroup: {e}", file=sys.stderr)
        os._exit(5)
    if "root" in setup:
        jail = setup
        scratch = os.getcwd()
        try:
            confine(jail["root"], jail["read_only"], [scratch, *jail["writable"]])
        except OSError as e:
            print(f"sandbox: cannot confine the file system: {e}", file=sys.stderr)
            os._exit(4)
        os.chdir(scratch)
    result_fd = os.dup(1)
    os.dup2(2, 1)
    # Unbuffered text streams on fds 1 (now the stderr pipe) and 2, also as
    # sys.__stdout__/__stderr__, so code that "restores" them still lands there.
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            write_through=True,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    lower(resource.RLIMIT_CORE, 0, 0)
    lower(resource.RLIMIT_AS, mem_mb << 20, mem_mb << 20)
    lower(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
    lower(resource.RLIMIT_NOFILE, nofile, nofile)
    lower(resource.RLIMIT_FSIZE, fsize_mb << 20, fsize_mb << 20)
    if "seccomp" in setup:  # last: the filter refuses mount, which confine needed
        try:
            install_filter(bytes.fromhex(setup["seccomp"]))
        except (OSError, ValueError) as e:
            print(f"sandbox: cannot install the system-call filter: {e}", file=sys.stderr)
            os._exit(6)

    request = json.loads(sys.stdin.buffer.read())
    reported = call_in_child(request, result_fd, mem_mb, out_cap)
    if reported.count(b"\n") != 1 or not reported.endswith(b"\n"):
        # The epilogue writes one line; more means the code wrote there too.
        reported = (
            json.dumps(
                {
                    "ok": False,
                    "error": "RuntimeError: the code wrote to the sandbox's own result pipe",
                }
            )
            + "\n"
        ).encode()
    try:
        write_all(result_fd, reported.decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        os._exit(3)
    os._exit(0)


if __name__ == "__main__":
    main()
