"""The sandbox's per-call cgroups: real processes and the real kernel, no mocks.

Where the machine gives calls no cgroup (not root, no delegation), the tests
that need one are skipped; as root with cgroup v1 or v2 they all run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import structlog
import trio

from fgo_actors.agent import cgroup, sandbox
from fgo_actors.agent.sandbox import SandboxLimits, limits_process_tree, run_function

tree = pytest.mark.skipif(
    not limits_process_tree(), reason="no cgroup for the calls here (not root, no delegation)"
)

HEARTBEAT = (
    "import sys, time\nwhile True:\n    open(sys.argv[1], 'a').write('.')\n    time.sleep(0.02)\n"
)
# The code's own view of its cgroups, written where the test can read it
# before the call ends (a call that is cancelled or times out returns nothing).
WHERE = "def where():\n    return open('/proc/self/cgroup').read()\n"


def _code(source: str) -> str:
    return textwrap.dedent(source).lstrip()


def _call_dirs(self_cgroup: str) -> list[Path]:
    """The call's cgroup directories, from the code's ``/proc/self/cgroup``."""
    names = set(re.findall(r"/(fgo-sandbox-\d+-[0-9a-f]+)$", self_cgroup, re.MULTILINE))
    assert len(names) == 1, self_cgroup
    name = names.pop()
    setup = sandbox._cgroup_setup()
    assert setup is not None
    return [Path(parent) / name for parent in setup.parents]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _stopped(beat: Path) -> bool:
    """Whether whatever appends to ``beat`` every 20 ms has stopped (its size
    holds still for half a second)."""
    for _ in range(20):
        size = _size(beat)
        await trio.sleep(0.5)
        if _size(beat) == size:
            return True
    return False


# --------------------------------------------------------------- the limits

FORKS = """
import os, time

def hog(mb):
    pids = []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            data = b"x" * (mb << 20)  # touched, so resident
            time.sleep(1)
            os._exit(0 if len(data) else 1)
        pids.append(pid)
    return [os.waitpid(p, 0)[1] for p in pids]
"""


@tree
async def test_forked_children_share_one_memory_limit() -> None:
    # Each child alone stays under the 256 MB address-space limit; together
    # they pass it, which per-process limits never saw.
    result = await run_function(FORKS, "hog", {"mb": 200}, SandboxLimits(memory_mb=256))
    assert not result.ok
    assert result.value is None
    assert not result.timed_out
    assert result.error is not None
    assert re.fullmatch(
        r"MemoryError: out of memory \(the sandbox allows 256 MB for all of the call's "
        r"processes together; the kernel killed [1-6] of them\)",
        result.error,
    ), result.error
    # The same code within the limit succeeds, so the limit is what failed it.
    small = await run_function(FORKS, "hog", {"mb": 20}, SandboxLimits(memory_mb=256))
    assert small.ok, small.error
    assert small.value == [0] * 6


@tree
async def test_a_fork_bomb_is_stopped_by_the_process_limit() -> None:
    bomb = "import os\n\ndef bomb():\n    while True:\n        os.fork()\n"
    result = await run_function(bomb, "bomb", {}, SandboxLimits(timeout=20, max_processes=16))
    assert not result.ok
    assert not result.timed_out  # stopped at once, not held by the timeout
    assert result.error is not None
    assert re.fullmatch(
        r"BlockingIOError: too many processes \(the sandbox allows 16 processes and threads "
        r"for the call; \d+ refused\)",
        result.error,
    ), result.error
    assert result.seconds < 10


@tree
async def test_a_call_within_the_process_limit_passes() -> None:
    code = _code(
        """
        import subprocess, sys, threading

        def work(n):
            procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(n)]
            threads = [threading.Thread(target=lambda: None) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return [p.wait() for p in procs]
        """
    )
    result = await run_function(code, "work", {"n": 5}, SandboxLimits(max_processes=16))
    assert result.ok, result.error
    assert result.value == [0] * 5


# ---------------------------------------------------------------- clean-up

SPAWN = """
import os, subprocess, sys, time

HEARTBEAT = {heartbeat!r}

def spawn(beat, info, then):
    subprocess.Popen([sys.executable, "-c", HEARTBEAT, beat], start_new_session=True)
    for _ in range(3):  # sleeping children, each in a session of its own
        if os.fork() == 0:
            os.setsid()
            os.closerange(3, 1024)  # else the code's outcome pipe stays open
            time.sleep(60)
            os._exit(0)
    with open(info + ".tmp", "w") as f:
        f.write(open("/proc/self/cgroup").read())
    os.replace(info + ".tmp", info)
    time.sleep(0.2)
    if then == "return":
        return "left them running"
    while True:
        time.sleep(1)
"""


async def _spawning_call(tmp_path: Path, then: str, limits: SandboxLimits) -> tuple[Path, Path]:
    """Run SPAWN; the heartbeat file and the file holding the code's cgroups."""
    beat, info = tmp_path / "beat", tmp_path / "info"
    code = SPAWN.format(heartbeat=HEARTBEAT)
    arguments = {"beat": str(beat), "info": str(info), "then": then}
    result = await run_function(code, "spawn", arguments, limits, writable=[str(tmp_path)])
    if then == "return":
        assert result.ok, result.error
    else:
        assert result.timed_out, result.error
    return beat, info


@tree
@pytest.mark.parametrize("then", ["return", "time out"])
async def test_every_process_of_the_call_dies_and_its_cgroup_goes(
    tmp_path: Path, then: str
) -> None:
    beat, info = await _spawning_call(tmp_path, then, SandboxLimits(timeout=3))
    dirs = _call_dirs(info.read_text())
    # Gone when run_function returns: the directory could not be removed with
    # a process left in it.
    assert [d for d in dirs if d.exists()] == []
    assert beat.exists(), "the grandchild ran"
    assert await _stopped(beat), "a setsid grandchild outlived the call"


@tree
async def test_without_namespaces_the_cgroup_still_kills_a_setsid_grandchild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No PID namespace to die with: the process group kill misses a setsid
    # grandchild, the cgroup does not.
    monkeypatch.setattr(sandbox, "isolation", lambda: ())
    monkeypatch.setattr(sandbox, "confines_files", lambda: False)
    beat, info = await _spawning_call(tmp_path, "return", SandboxLimits(timeout=5))
    assert [d for d in _call_dirs(info.read_text()) if d.exists()] == []
    assert beat.exists()
    assert await _stopped(beat), "a setsid grandchild outlived the call"


@tree
async def test_cancelling_a_call_kills_its_cgroup(tmp_path: Path) -> None:
    beat, info = tmp_path / "beat", tmp_path / "info"
    code = SPAWN.format(heartbeat=HEARTBEAT)
    arguments = {"beat": str(beat), "info": str(info), "then": "wait"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                run_function,
                code,
                "spawn",
                arguments,
                SandboxLimits(timeout=30),
                writable=[str(tmp_path)],
            )
        )
        for _ in range(500):  # 10 s
            if await trio.Path(info).exists():
                break
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert [d for d in _call_dirs(info.read_text()) if d.exists()] == []
    assert await _stopped(beat)


@tree
async def test_the_code_runs_in_the_calls_cgroup_and_each_call_has_its_own() -> None:
    first, second = await run_function(WHERE, "where", {}), await run_function(WHERE, "where", {})
    assert first.ok, first.error
    assert second.ok, second.error
    assert _call_dirs(first.value) != _call_dirs(second.value)


# ----------------------------------------------------------------- fallback


async def test_without_a_cgroup_calls_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_cgroup_setup", lambda: None)
    result = await run_function(WHERE, "where", {})
    assert result.ok, result.error
    assert "fgo-sandbox-" not in result.value
    small = await run_function(FORKS, "hog", {"mb": 20}, SandboxLimits(memory_mb=256))
    assert small.ok, small.error
    assert small.value == [0] * 6


def test_no_cgroup_mounted_is_logged_with_the_reason() -> None:
    with structlog.testing.capture_logs() as logs:
        assert sandbox._probe_cgroups("0::/\n", "") is None
    assert logs == [
        {
            "event": "sandbox_no_cgroup",
            "log_level": "warning",
            "reason": "no cgroup v1 memory or pids hierarchy of ours is mounted",
        }
    ]


def _mountinfo(fstype: str, point: Path, options: str) -> str:
    return f"41 31 0:38 / {point} rw,relatime - {fstype} {fstype} {options}\n"


def test_a_v2_cgroup_without_memory_and_pids_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "cgroup.controllers").write_text("cpu io\n")
    with structlog.testing.capture_logs() as logs:
        found = sandbox._probe_cgroups("0::/app\n", _mountinfo("cgroup2", tmp_path, "rw"))
    assert found is None
    assert [e["reason"] for e in logs] == [
        f"our cgroup v2 {tmp_path}/app offers no memory or pids controller; "
        "no cgroup v1 memory or pids hierarchy of ours is mounted"
    ]


def test_a_directory_that_is_no_cgroup_is_not_used(tmp_path: Path) -> None:
    # Plain files where cgroup files should be: a new directory there has no
    # limit files, so the trial fails, and leaves nothing behind.
    own = tmp_path / "app"
    own.mkdir()
    (own / "cgroup.controllers").write_text("memory pids\n")
    (own / "cgroup.subtree_control").write_text("memory pids\n")
    with structlog.testing.capture_logs() as logs:
        found = sandbox._probe_cgroups("0::/app\n", _mountinfo("cgroup2", tmp_path, "rw"))
    assert found is None
    assert len(logs) == 1
    assert logs[0]["reason"].startswith(f"cannot make a cgroup in {own}: ")
    assert "memory.max" in logs[0]["reason"]
    assert [p.name for p in own.iterdir() if p.name.startswith("fgo-sandbox-")] == []


def test_v1_hierarchies_are_found_below_their_mount_root(tmp_path: Path) -> None:
    self_cgroup = "8:pids:/\n4:memory:/jobs/41dd\n0::/\n"
    mountinfo = _mountinfo("cgroup", tmp_path / "memory", "rw,memory") + _mountinfo(
        "cgroup", tmp_path / "pids", "rw,pids"
    )
    assert cgroup.locate(self_cgroup, mountinfo) == (
        1,
        (f"{tmp_path}/memory/jobs/41dd", f"{tmp_path}/pids"),
    )
    # A container that sees only its own part of the hierarchy, mounted at its root.
    inside = "41 31 0:32 /jobs/41dd /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    found = cgroup.locate(self_cgroup, inside + _mountinfo("cgroup", tmp_path, "pids"))
    assert found == (1, ("/sys/fs/cgroup/memory", str(tmp_path)))


# ---------------------------------------------------- cgroup v2 (kill only)


def _v2_scratch_parent() -> Path | None:
    """Our own cgroup v2 directory where we may make children (as root on a
    v2 or hybrid machine), whatever its controllers; else None."""
    try:
        self_cgroup = Path("/proc/self/cgroup").read_text()
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    own = next((line[3:] for line in self_cgroup.splitlines() if line.startswith("0::")), None)
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if own is not None and right.startswith("cgroup2 ") and left.split()[3] == "/":
            parent = Path(left.split()[4] + own)
            if (parent / "cgroup.procs").exists() and os.access(parent, os.W_OK):
                return parent
    return None


V2_PARENT = _v2_scratch_parent()


@pytest.mark.skipif(V2_PARENT is None, reason="no writable cgroup v2 hierarchy here")
def test_a_v2_cgroup_is_emptied_and_removed(tmp_path: Path) -> None:
    # The v2 clean-up (cgroup.kill, then rmdir) on the real kernel, on a
    # cgroup with no controllers: what a v2-only machine does at each call's end.
    assert V2_PARENT is not None
    beat = tmp_path / "beat"
    call = cgroup.CallCgroup(2, (str(V2_PARENT / f"fgo-sandbox-{os.getpid()}-test"),))
    os.mkdir(call.dirs[0])
    call.made.append(call.dirs[0])
    starter = (
        "import subprocess, sys, time\n"
        "sys.stdin.readline()\n"  # joined by now
        f"subprocess.Popen([sys.executable, '-c', {HEARTBEAT!r}, sys.argv[1]],"
        " start_new_session=True)\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", starter, str(beat)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdin is not None
            assert proc.stdout is not None
            Path(call.procs_files()[0]).write_text(str(proc.pid))
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "started\n"
            members = cgroup.procs(call.dirs[0])
            assert proc.pid in members
            assert len(members) == 2  # the starter and its setsid grandchild
            call.remove()
            assert proc.wait(timeout=5) == -9
            assert not Path(call.dirs[0]).exists()
            assert call.made == []
            size = _size(beat)
            time.sleep(0.3)
            assert _size(beat) == size, "the setsid grandchild survived cgroup.kill"
        finally:
            proc.kill()
            proc.wait()
            call.remove()


@tree
def test_the_cgroups_a_killed_process_left_are_swept() -> None:
    """A process killed with SIGKILL leaves its calls' cgroups (and whatever
    still runs in them); the next process to set up sweeps them away, and
    leaves those of live owners, itself included, alone."""
    setup = sandbox._cgroup_setup()
    assert setup is not None
    gone = subprocess.run(["true"], check=True)
    del gone
    with subprocess.Popen(["true"]) as dead:
        dead.wait()
    stale = [os.path.join(p, f"fgo-sandbox-{dead.pid}-test") for p in setup.parents]
    ours = [os.path.join(p, f"fgo-sandbox-{os.getpid()}-test") for p in setup.parents]
    for d in stale + ours:
        os.mkdir(d)
    with subprocess.Popen(["sleep", "60"], start_new_session=True) as left:
        try:
            for d in stale:
                Path(d, "cgroup.procs").write_text(str(left.pid))
            removed = cgroup.sweep_stale(setup)
            assert sorted(removed) == sorted(stale)
            assert left.wait(timeout=5) == -9
            assert not any(Path(d).exists() for d in stale)
            assert all(Path(d).exists() for d in ours)
        finally:
            left.kill()
            for d in stale + ours:
                with contextlib.suppress(OSError):
                    os.rmdir(d)
