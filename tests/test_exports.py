"""Pin the public surface, so the API cannot drift by accident."""

from __future__ import annotations

import types

import fgo_actors

# The public API, pinned: dropping or adding a name must be a decision, made
# here as well as in the package.
EXPORTS = [
    "AsyncioOptimizer",
    "BudgetExhaustedError",
    "DaemonConfig",
    "DaemonStatistics",
    "FGOError",
    "Failure",
    "ForestStatistics",
    "FunctionSpec",
    "GatewayConfig",
    "GatewayStatistics",
    "IngestResult",
    "InputError",
    "LLMGateway",
    "LLMUnavailableError",
    "MergeForest",
    "MergeJob",
    "MergeNode",
    "Module",
    "Outcome",
    "RenderedTrajectory",
    "ReplyRejectedError",
    "Rule",
    "RunConfig",
    "RunFailedError",
    "RunReport",
    "RunResult",
    "RunState",
    "RunStatistics",
    "SandboxLimits",
    "SandboxResult",
    "Step",
    "StoreError",
    "StreamingOptimizer",
    "Subset",
    "TokenCounter",
    "Trajectory",
    "UnitFailedError",
    "Version",
    "atomic_write_json",
    "default_counter",
    "load_module",
    "load_trajectories",
    "open_optimizer",
    "open_optimizer_asyncio",
    "run",
    "run_function",
]


def test_the_public_api_is_the_pinned_list() -> None:
    assert sorted(fgo_actors.__all__) == EXPORTS


def test_all_matches_public_names() -> None:
    public = {
        name
        for name, value in vars(fgo_actors).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(fgo_actors.__all__) == public
    assert len(fgo_actors.__all__) == len(set(fgo_actors.__all__))


def test_exported_objects_claim_the_package() -> None:
    for name in fgo_actors.__all__:
        obj = getattr(fgo_actors, name)
        assert getattr(obj, "__module__", "").startswith("fgo_actors"), name
