"""Helpers the tests import: paths, the ``fgo`` subprocess, synthetic data,
the protocol schemas' validators and hypothesis strategies for JSON records.

pytest fixtures and hooks stay in ``conftest.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fgo_actors import DaemonConfig, GatewayConfig, RunConfig, Trajectory
from fgo_actors.testing import FakeLLMServer, synthetic_trajectory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "trajectories.jsonl"
EXAMPLES_DIR = ROOT / "examples"
PROTOCOLS = ROOT / "protocols"
# The small twc games the environment tests play: one room, two items, no doors.
TWC = "numLocations=1,numItemsToPutAway=2,includeDoors=0"


def expert_tidy() -> dict[str, Any]:
    """The expert module's ``tidy`` function (JSON), for scripted optimizers to learn."""
    module = json.loads((EXAMPLES_DIR / "twc_expert.json").read_text(encoding="utf-8"))
    tidy: dict[str, Any] = module["functions"][0]
    return tidy


def run_fgo(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the ``fgo`` command line as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "fgo_actors._cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


StartLLM = Callable[..., Awaitable[tuple[FakeLLMServer, str]]]


def daemon_config(store: Path, url: str, **kw: Any) -> DaemonConfig:
    """A streaming optimizer for tests: store at ``store``, the LLM at ``url``,
    a 4k context, short waits; ``kw`` overrides any field."""
    options: dict[str, Any] = {
        "store": store,
        "gateway": GatewayConfig(base_url=url, model="m", max_concurrency=4),
        # A 400-token module cap leaves about 900 tokens of each subset for
        # trajectories: six of make_trajectories' fit in one subset.
        "run": RunConfig(context_tokens=4096, subset_tokens=2000, module_tokens=400),
        "max_wait": 0.5,
        "publish_interval": 0.0,
        "retry_pause": 0.2,
        **kw,
    }
    return DaemonConfig(**options)


def make_trajectories(
    n: int, *, steps: int = 4, words: int = 12, groups: int = 3, prefix: str = "t"
) -> list[Trajectory]:
    """Deterministic synthetic trajectories with varied sizes, groups and outcomes."""
    return [
        synthetic_trajectory(i, steps=steps, words=words, groups=groups, prefix=prefix)
        for i in range(n)
    ]


def examples() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# the protocol schemas (protocols/*.schema.json)
# ---------------------------------------------------------------------------

JSONDict = dict[str, Any]


def protocol(name: str) -> JSONDict:
    with (PROTOCOLS / f"{name}.schema.json").open(encoding="utf-8") as f:
        schema: JSONDict = json.load(f)
    return schema


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = protocol(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


TRAJECTORY_V = validator("trajectory")
MODULE_V = validator("module")
REPORT_V = validator("report")


def errors_of(v: jsonschema.Draft202012Validator, instance: object) -> list[str]:
    return [e.message for e in v.iter_errors(instance)]


FUNC: JSONDict = {
    "name": "lookup",
    "description": "look a thing up",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    "code": "def lookup(q):\n    return q\n",
}


# ---------------------------------------------------------------------------
# hypothesis strategies
# ---------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def extras(known: tuple[str, ...]) -> st.SearchStrategy[JSONDict]:
    """Unknown extra fields: any key that is not a known one, any JSON value."""
    key = st.text(min_size=1, max_size=10).filter(lambda k: k not in known)
    return st.dictionaries(key, json_values, max_size=3)


STEP_KNOWN = ("role", "content", "name", "tool_calls", "tool_call_id")
OUTCOME_KNOWN = ("success", "score", "feedback")
TRAJ_KNOWN = ("id", "task", "steps", "outcome", "metadata")


@st.composite
def steps(draw: st.DrawFn) -> JSONDict:
    step: JSONDict = {
        "role": draw(st.sampled_from(["system", "user", "assistant", "tool"])),
        # Step.to_json always writes "content" (null when absent), so generate it.
        "content": draw(st.none() | st.text(max_size=40)),
    }
    if draw(st.booleans()):
        step["name"] = draw(st.text(max_size=10))
    if draw(st.booleans()):
        call = st.fixed_dictionaries(
            {
                "id": st.text(max_size=6),
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": st.text(max_size=8), "arguments": st.text(max_size=20)}
                ),
            },
            optional={"extra": json_values},
        )
        step["tool_calls"] = draw(st.lists(call, max_size=2))
    if draw(st.booleans()):
        step["tool_call_id"] = draw(st.text(max_size=10))
    step.update(draw(extras(STEP_KNOWN)))
    return step


@st.composite
def outcomes(draw: st.DrawFn) -> JSONDict:
    out: JSONDict = {"success": draw(st.booleans())}
    if draw(st.booleans()):
        out["score"] = draw(
            st.floats(allow_nan=False, allow_infinity=False) | st.integers(-100, 100)
        )
    if draw(st.booleans()):
        out["feedback"] = draw(st.text(max_size=30))
    out.update(draw(extras(OUTCOME_KNOWN)))
    return out


@st.composite
def trajectory_dicts(draw: st.DrawFn, ident: str | None = None) -> JSONDict:
    traj: JSONDict = {
        "id": ident if ident is not None else draw(st.text(min_size=1, max_size=12)),
        "task": draw(st.text(max_size=40)),
        "steps": draw(st.lists(steps(), max_size=5)),
        "outcome": draw(outcomes()),
    }
    if draw(st.booleans()):
        meta: JSONDict = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
        if draw(st.booleans()):
            meta["task_type"] = draw(st.text(max_size=10))
        traj["metadata"] = meta
    traj.update(draw(extras(TRAJ_KNOWN)))
    return traj
