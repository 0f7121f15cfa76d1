"""The sandbox for LLM-written tool functions: real child processes, no mocks."""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fgo_actors.agent.sandbox import (
    SandboxLimits,
    SandboxResult,
    confines_files,
    isolation,
    run_function,
)


def _code(source: str) -> str:
    return textwrap.dedent(source).lstrip()


def _running(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _gone(pid: int) -> bool:
    """Wait up to 2 s for ``pid`` to exit; True if it did (SIGKILL is delivered asynchronously)."""
    return await _eventually(lambda: not _running(pid))


async def _eventually(predicate: Callable[[], bool], within: float = 2.0) -> bool:
    """Poll ``predicate`` until it holds or ``within`` seconds pass."""
    with trio.move_on_after(within):
        for _ in range(10_000):
            if predicate():
                return True
            await trio.sleep(0.01)
    return predicate()


async def test_simple_function_returns_its_value() -> None:
    code = _code(
        """
        def add(a, b):
            return a + b
        """
    )
    result = await run_function(code, "add", {"a": 2, "b": 40})
    assert result == SandboxResult(
        ok=True, value=42, error=None, stdout="", seconds=result.seconds, timed_out=False
    )
    assert 0 < result.seconds < 5


async def test_arguments_and_value_round_trip_as_json() -> None:
    code = "def echo(**kw):\n    return {'got': kw, 'n': len(kw)}\n"
    arguments: dict[str, Any] = {"text": "héllo ☃", "items": [1, 2.5, None, True], "d": {"k": []}}
    result = await run_function(code, "echo", arguments)
    assert result.ok
    assert result.value == {"got": arguments, "n": 3}
    assert json.loads(json.dumps(result.to_json())) == result.to_json()


async def test_prints_are_captured_and_cannot_corrupt_the_result() -> None:
    code = _code(
        """
        import os, sys

        def talk(x):
            print("one")
            print("two", file=sys.stderr)
            sys.__stdout__.write("three\\n")
            os.write(1, b'{"ok": true, "value": "forged"}\\n')
            print("four", flush=True)
            return x * 2
        """
    )
    result = await run_function(code, "talk", {"x": 21})
    assert result.ok
    assert result.value == 42
    assert result.stdout == 'one\ntwo\nthree\n{"ok": true, "value": "forged"}\nfour\n'


async def test_exception_is_reported_with_type_message_and_traceback() -> None:
    code = _code(
        """
        def check(x):
            if x < 0:
                raise ValueError("bad input")
            return x
        """
    )
    result = await run_function(code, "check", {"x": -1})
    assert not result.ok
    assert result.value is None
    assert result.error == "ValueError: bad input"
    assert not result.timed_out
    assert 'File "<tool>", line 3, in check' in result.stdout
    assert 'raise ValueError("bad input")' in result.stdout  # the source line is shown


async def test_syntax_error_is_reported() -> None:
    result = await run_function("def broken(:\n    return 1\n", "broken", {})
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("SyntaxError: ")
    assert "line 1" in result.error


async def test_missing_function_is_reported() -> None:
    code = "def helper():\n    return 1\n\nLIMIT = 3\n"
    result = await run_function(code, "solve", {})
    assert not result.ok
    assert (
        result.error == "NameError: the code defines no function named 'solve' (it defines: helper)"
    )


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("return {1, 2}", "Object of type set is not JSON serializable"),
        ("return float('nan')", "Out of range float values are not JSON compliant"),
        ("return object()", "Object of type object is not JSON serializable"),
    ],
)
async def test_non_json_return_value_is_reported(body: str, detail: str) -> None:
    result = await run_function(f"def f():\n    {body}\n", "f", {})
    assert not result.ok
    assert result.value is None
    assert result.error == f"TypeError: the return value is not JSON-serialisable: {detail}"


@pytest.mark.parametrize(
    ("code", "arguments", "error"),
    [
        pytest.param(
            "def f(a):\n    return a\n",
            {"b": 1},
            "TypeError: f() got an unexpected keyword argument 'b'",
            id="wrong-arguments",
        ),
        pytest.param(
            "import sys\ndef f():\n    sys.exit(2)\n",
            {},
            "SystemExit: the code called sys.exit(2)",
            id="sys-exit",
        ),
        pytest.param(
            "import os\ndef f():\n    os._exit(3)\n",
            {},
            "the sandboxed process exited with code 3 without reporting a result",
            id="os-exit",
        ),
        pytest.param(
            "async def f():\n    return 1\n",
            {},
            "TypeError: 'f' is an async function; tool functions must be plain def functions",
            id="async-def",
        ),
        pytest.param("f = 3\n", {}, "TypeError: 'f' is a int, not a function", id="not-callable"),
        pytest.param(
            "def f():\n    return input()\n", {}, "EOFError: EOF when reading a line", id="stdin"
        ),
    ],
)
async def test_other_failures_are_reported_not_raised(
    code: str, arguments: dict[str, Any], error: str
) -> None:
    result = await run_function(code, "f", arguments)
    assert not result.ok
    assert result.error == error
    assert not result.timed_out


async def _stopped(beat: Path) -> bool:
    """Whether whatever appends to ``beat`` (every 20 ms) has stopped: its size
    holds still for half a second. Process ids would not tell: in a PID
    namespace the code sees its own."""
    for _ in range(20):
        size = _size(beat)
        await trio.sleep(0.5)
        if _size(beat) == size:
            return True
    return False


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


HEARTBEAT = (
    "import sys, time\nwhile True:\n    open(sys.argv[1], 'a').write('.')\n    time.sleep(0.02)\n"
)


async def test_infinite_loop_times_out_and_leaves_no_process_behind(tmp_path: Path) -> None:
    beat = tmp_path / "beat"
    code = _code(
        f"""
        import subprocess, sys

        def spin(path):
            subprocess.Popen([sys.executable, "-c", {HEARTBEAT!r}, path])
            while True:
                pass
        """
    )
    limits = SandboxLimits(timeout=1.0)
    start = trio.current_time()
    result = await run_function(code, "spin", {"path": str(beat)}, limits, writable=[str(tmp_path)])
    elapsed = trio.current_time() - start
    assert result.timed_out
    assert not result.ok
    assert result.error == "TimeoutError: no result within 1 s"
    assert elapsed < limits.timeout + 2
    assert beat.exists(), "the grandchild ran"
    assert await _stopped(beat), "the grandchild survived the timeout"


async def test_cpu_limit_kills_a_busy_loop_before_the_wall_timeout() -> None:
    code = "def spin():\n    while True:\n        pass\n"
    result = await run_function(code, "spin", {}, SandboxLimits(timeout=10, cpu_seconds=1))
    assert not result.ok
    assert not result.timed_out
    assert result.error is not None
    assert result.error.startswith("killed by signal 24 (SIGXCPU)")
    assert result.seconds < 4


async def test_memory_limit() -> None:
    code = "def hog():\n    data = bytearray(1 << 30)\n    return len(data)\n"
    result = await run_function(code, "hog", {}, SandboxLimits(memory_mb=128))
    assert not result.ok
    assert result.value is None
    assert result.error is not None
    assert "MemoryError" in result.error or result.error.startswith("killed by signal")


async def test_child_cannot_see_parent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGO_SECRET_PROBE", "x")
    assert os.environ["FGO_SECRET_PROBE"] == "x"
    code = _code(
        """
        import os

        def peek():
            return [os.environ.get("FGO_SECRET_PROBE"), dict(os.environ)]
        """
    )
    result = await run_function(code, "peek", {})
    assert result.ok
    probe, environ = result.value
    assert probe is None
    assert not [key for key in environ if key.startswith("FGO_")]
    assert "PATH" not in environ
    assert "HOME" not in environ


async def test_cwd_is_a_scratch_directory_removed_afterwards() -> None:
    code = _code(
        """
        import os

        def where():
            before = sorted(os.listdir("."))
            with open("note.txt", "w") as f:
                f.write("hello")
            os.makedirs("locked/deeper")
            os.chmod("locked/deeper", 0)  # must not stop the clean-up
            os.chmod("locked", 0)
            return [os.getcwd(), before]
        """
    )
    result = await run_function(code, "where", {})
    assert result.ok, result.error
    cwd, before = result.value
    assert before == []
    assert Path(cwd).is_absolute()
    assert cwd != os.getcwd()
    assert not await trio.Path(cwd).exists()


async def test_writing_past_the_file_size_limit_fails() -> None:
    code = _code(
        """
        def write(kib):
            with open("small.bin", "wb") as f:
                f.write(b"x" * (512 * 1024))
            with open("big.bin", "wb") as f:
                f.write(b"x" * (kib * 1024))
            return "wrote"
        """
    )
    limits = SandboxLimits(file_size_mb=1)
    result = await run_function(code, "write", {"kib": 2048}, limits)
    assert not result.ok
    assert result.error == "OSError: [Errno 27] File too large"
    # The same function within the limit succeeds, so the limit is what failed it.
    assert (await run_function(code, "write", {"kib": 900}, limits)).value == "wrote"


async def test_output_and_return_value_are_capped() -> None:
    code = "def loud(n):\n    print('y' * n)\n    return 'z' * n\n"
    limits = SandboxLimits(output_bytes=1000)
    small = await run_function(code, "loud", {"n": 10}, limits)
    assert small.ok
    assert small.stdout == "y" * 10 + "\n"
    big = await run_function(code, "loud", {"n": 5000}, limits)
    assert not big.ok
    assert big.error == (
        "ValueError: the return value is 5002 bytes of JSON, over the sandbox's cap of 1000 bytes"
    )
    assert len(big.stdout.encode()) <= 1000
    assert big.stdout.startswith("y" * 100)
    assert big.stdout.endswith("[output truncated: 5001 bytes written, the sandbox keeps 1000]")


async def test_calls_run_concurrently() -> None:
    code = "import time\n\ndef slow(x):\n    time.sleep(0.5)\n    return x * x\n"
    results: dict[int, SandboxResult] = {}

    async def one(x: int) -> None:
        results[x] = await run_function(code, "slow", {"x": x})

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for x in range(4):
            nursery.start_soon(one, x)
    elapsed = trio.current_time() - start
    assert {x: r.value for x, r in results.items()} == {0: 0, 1: 1, 2: 4, 3: 9}
    assert all(r.ok for r in results.values())
    assert elapsed < 1.5  # one after another would take at least 2 s


async def test_cancelling_a_call_kills_the_child_and_removes_its_directory(
    tmp_path: Path,
) -> None:
    info = tmp_path / "info.json"
    beat = tmp_path / "beat"
    code = _code(
        """
        import json, os, time

        def wait(path, beat):
            with open(path + ".tmp", "w") as f:
                json.dump(os.getcwd(), f)
            os.replace(path + ".tmp", path)
            while True:
                open(beat, "a").write(".")
                time.sleep(0.02)
        """
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                run_function,
                code,
                "wait",
                {"path": str(info), "beat": str(beat)},
                SandboxLimits(timeout=30),
                writable=[str(tmp_path)],
            )
        )
        assert await _eventually(info.exists, within=5)
        nursery.cancel_scope.cancel()
    cwd = json.loads(info.read_text())
    assert await _stopped(beat)
    assert not await trio.Path(cwd).exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"cpu_seconds": -5}, "cpu_seconds"),
        ({"output_bytes": 0}, "output_bytes"),
        ({"max_files": True}, "max_files"),
        ({"file_size_mb": 1.5}, "file_size_mb"),
        ({"max_processes": 0}, "max_processes"),
    ],
)
def test_limits_must_be_positive(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"SandboxLimits\.{field} must be a positive"):
        SandboxLimits(**kwargs)


async def test_our_own_misuse_raises() -> None:
    with pytest.raises(TypeError, match="arguments must be JSON-serialisable"):
        await run_function("def f(x):\n    return 1\n", "f", {"x": {1, 2}})


# ---------------------------------------------------------------- escapes

isolated = pytest.mark.skipif(
    not isolation(), reason="no namespaces here (unshare missing or refused)"
)


@isolated
async def test_the_code_cannot_read_our_secrets_through_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FGO_API_KEY", "sk-probe-4711")
    code = _code(
        """
        import glob, os

        def steal():
            found, readable = [], 0
            for path in glob.glob("/proc/*/environ"):
                try:
                    text = open(path, "rb").read()
                except OSError:
                    continue
                readable += 1
                if b"sk-probe-4711" in text:
                    found.append(path)
            return [found, readable, os.getppid()]
        """
    )
    result = await run_function(code, "steal", {})
    assert result.ok, result.error
    found, readable, ppid = result.value
    assert found == []
    assert readable >= 1  # it could read its own: the probe itself works
    assert ppid == 1  # its parent is the runner, init of its own PID namespace


@isolated
async def test_the_code_has_no_network() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = _code(
        """
        import socket

        def call_home(port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError as e:
                return "refused: " + type(e).__name__
            return "connected"
        """
    )
    try:
        result = await run_function(code, "call_home", {"port": port})
    finally:
        listener.close()
    assert result.ok, result.error
    assert result.value.startswith("refused")


@isolated
async def test_a_detached_grandchild_dies_with_the_call(tmp_path: Path) -> None:
    beat = tmp_path / "beat"
    code = _code(
        f"""
        import subprocess, sys, time

        def detach(path):
            subprocess.Popen(
                [sys.executable, "-c", {HEARTBEAT!r}, path], start_new_session=True
            )
            time.sleep(0.3)
            return "left it running"
        """
    )
    result = await run_function(code, "detach", {"path": str(beat)}, writable=[str(tmp_path)])
    assert result.ok, result.error
    assert beat.exists()
    assert await _stopped(beat), "a setsid grandchild outlived the call"


async def test_the_code_cannot_forge_the_result() -> None:
    code = _code(
        """
        import os

        def forge():
            line = b'{"ok": true, "value": "forged"}\\n'
            for fd in range(3, 64):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
            raise RuntimeError("the real outcome")
        """
    )
    result = await run_function(code, "forge", {})
    assert not result.ok
    assert result.value is None
    # A function that writes on the channel it was handed (its own outcome
    # pipe) only spoils its own result; it never reaches the runner's.
    assert result.error == "RuntimeError: the code wrote to the sandbox's own result pipe"


async def test_the_open_files_limit_holds() -> None:
    code = _code(
        """
        def hoard(n):
            kept = []
            try:
                for _ in range(n):
                    kept.append(open("f%d" % len(kept), "w"))
            except OSError as e:
                return [len(kept), e.errno]
            return [len(kept), 0]
        """
    )
    result = await run_function(code, "hoard", {"n": 200}, SandboxLimits(max_files=16))
    assert result.ok, result.error
    opened, errno_ = result.value
    assert opened < 16  # stdin, stdout, stderr and the runner's pipe count too
    assert errno_ == 24  # EMFILE


HERE = Path(__file__).resolve()
confined = pytest.mark.skipif(
    not confines_files(), reason="the file system cannot be confined here (no mount namespace)"
)


@confined
async def test_the_code_sees_no_file_outside_its_scratch_and_python(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("sk-demo")
    code = _code(
        """
        import os

        def look(paths):
            found = {}
            for p in paths:
                try:
                    found[p] = open(p).read()[:20]
                except OSError as e:
                    found[p] = type(e).__name__
            return [sorted(os.listdir("/")), found]
        """
    )
    here = str(HERE)
    paths = [str(secret), here, "/etc/hostname", "/etc/passwd", "/root/.bashrc", os.__file__]
    result = await run_function(code, "look", {"paths": paths})
    assert result.ok, result.error
    top, found = result.value
    # Our files, the project and the system's settings are out of reach ...
    assert found[str(secret)] == "FileNotFoundError"
    assert found[here] == "FileNotFoundError"
    assert found["/etc/hostname"] == "FileNotFoundError"
    assert found["/etc/passwd"] == "FileNotFoundError"
    assert found["/root/.bashrc"] == "FileNotFoundError"
    # ... the Python it runs on is not.
    assert found[os.__file__] != "FileNotFoundError"
    assert "etc" not in top
    assert "home" not in top
    assert "tmp" in top  # it holds the scratch directory


@confined
async def test_the_code_cannot_write_outside_its_scratch_or_undo_the_mounts(
    tmp_path: Path,
) -> None:
    code = _code(
        """
        import ctypes, os, sys

        def write(targets, shared):
            out = {}
            for p in targets:
                try:
                    with open(p, "w") as f:
                        f.write("x")
                    out[p] = "written"
                except OSError as e:
                    out[p] = type(e).__name__
            libc = ctypes.CDLL(None, use_errno=True)
            # Remount the Python installation read-write: refused without capabilities.
            rc = libc.mount(None, sys.base_prefix.encode(), None, 32 | 4096, None)
            out["remount"] = ctypes.get_errno() if rc else "remounted"
            out["umount"] = "detached" if libc.umount2(b"/usr", 2) == 0 else "refused"
            with open(os.path.join(shared, "ok"), "w") as f:
                f.write("shared")
            with open("scratch-file", "w") as f:
                f.write("mine")
            return out
        """
    )
    targets = [os.path.join(sys.base_prefix, "evil.py"), "/usr/evil", "/evil", "/tmp/evil"]
    result = await run_function(
        code, "write", {"targets": targets, "shared": str(tmp_path)}, writable=[str(tmp_path)]
    )
    assert result.ok, result.error
    out = result.value
    for p in targets:
        assert out[p] in ("OSError", "PermissionError", "FileNotFoundError"), (p, out[p])
        assert not await trio.Path(p).exists()
    assert out["remount"] == 1  # EPERM
    assert out["umount"] == "refused"
    assert (tmp_path / "ok").read_text() == "shared"  # a directory it was given is writable
