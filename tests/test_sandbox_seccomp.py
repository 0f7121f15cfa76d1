"""The sandbox's system-call filter, tried by real code in real sandboxed processes.

Each escape is tried twice: with the namespaces this machine allows, and
without them (as on a machine whose container refuses ``unshare``), where
the filter is the only thing between the code and a server of ours on
loopback.
"""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator

import pytest

from fgo_actors.agent import sandbox, seccomp
from fgo_actors.agent.sandbox import SandboxLimits, run_function

pytestmark = pytest.mark.skipif(
    seccomp.program() is None, reason="libseccomp cannot be loaded here (sandbox_no_seccomp)"
)


def _code(source: str) -> str:
    return textwrap.dedent(source).lstrip()


@pytest.fixture(params=["namespaces", "no namespaces"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "no namespaces":
        monkeypatch.setattr(sandbox, "isolation", lambda: ())
        monkeypatch.setattr(sandbox, "confines_files", lambda: False)
    return str(request.param)


@pytest.fixture
def listener() -> Iterator[int]:
    """A real TCP server of ours on loopback; the port it listens on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


CONNECT = _code(
    """
    def dial(port):
        import socket
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return "connected"
        except OSError as e:
            return f"{type(e).__name__}: {e}"
    """
)


async def test_no_socket_reaches_our_loopback_server(where: str, listener: int) -> None:
    result = await run_function(CONNECT, "dial", {"port": listener})
    assert result.ok, result.error
    assert result.value == "PermissionError: [Errno 1] Operation not permitted"


async def test_without_the_filter_and_namespaces_the_same_code_connects(
    listener: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control: what the filter is for, where libseccomp is missing too.
    monkeypatch.setattr(sandbox, "isolation", lambda: ())
    monkeypatch.setattr(sandbox, "confines_files", lambda: False)
    monkeypatch.setattr(seccomp, "program", lambda: None)
    result = await run_function(CONNECT, "dial", {"port": listener})
    assert result.ok, result.error
    assert result.value == "connected"


REFUSED = _code(
    """
    def attempts():
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)

        def errno_of(result):
            return ctypes.get_errno() if result == -1 else 0

        out = {}
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            out["unix socket"] = 0
        except OSError as e:
            out["unix socket"] = e.errno
        # Harmless targets, should the filter ever fail: the runner, the scratch dir.
        out["ptrace attach"] = errno_of(libc.ptrace(16, os.getppid(), 0, 0))
        out["new user namespace"] = errno_of(libc.unshare(0x10000000))
        out["new network namespace"] = errno_of(libc.unshare(0x40000000))
        out["mount tmpfs"] = errno_of(libc.mount(b"none", os.getcwd().encode(), b"tmpfs", 0, None))
        out["chroot"] = errno_of(libc.chroot(b"/"))
        return out
    """
)


async def test_the_other_ways_out_are_refused(where: str) -> None:
    result = await run_function(REFUSED, "attempts", {})
    assert result.ok, result.error
    eperm = 1
    assert result.value == {
        "unix socket": eperm,
        "ptrace attach": eperm,
        "new user namespace": eperm,
        "new network namespace": eperm,
        "mount tmpfs": eperm,
        "chroot": eperm,
    }


ORDINARY = _code(
    """
    def ordinary():
        import os, socket, subprocess, threading
        a, b = socket.socketpair()
        a.send(b"x")
        out = [b.recv(1).decode()]
        t = threading.Thread(target=lambda: out.append("thread"))
        t.start()
        t.join()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        out.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        echo = subprocess.run(["/bin/echo", "spawned"], capture_output=True)
        out.append(echo.stdout.decode().strip())
        return out
    """
)


async def test_what_ordinary_code_does_still_works(where: str) -> None:
    # Threads (clone3 refused, so clone), fork, subprocess, socketpair.
    result = await run_function(ORDINARY, "ordinary", {}, SandboxLimits(timeout=20))
    assert result.ok, result.error
    assert result.value == ["x", "thread", 7, "spawned"]


async def test_a_corrupt_program_fails_the_call_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(seccomp, "program", lambda: "00" * 12)  # not whole records
    result = await run_function("def f():\n    return 1\n", "f", {})
    assert not result.ok
    assert "cannot install the system-call filter" in (result.error or "")


def test_the_program_is_whole_records_and_built_once() -> None:
    program = seccomp.program()
    assert program is not None
    assert len(bytes.fromhex(program)) % 8 == 0
    assert seccomp.program() is program


async def test_children_inherit_the_filter(where: str, listener: int) -> None:
    code = _code(
        f"""
        def f():
            import subprocess, sys
            child = (
                "import socket\\n"
                "try:\\n"
                "    socket.create_connection(('127.0.0.1', {listener}), timeout=2)\\n"
                "    print('connected')\\n"
                "except OSError as e:\\n"
                "    print(type(e).__name__)\\n"
            )
            return subprocess.run([sys.executable, "-I", "-c", child],
                                  capture_output=True, text=True).stdout.strip()
        """
    )
    result = await run_function(code, "f", {}, SandboxLimits(timeout=20))
    assert result.ok, result.error
    assert result.value == "PermissionError"
