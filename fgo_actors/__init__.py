"""FGO Actors: Fine-Grained Optimization of LLM agent modules from trajectories.

Divide trajectories into token-budgeted subsets, optimize each concurrently
with an LLM, and merge the optimized modules progressively, pairwise, until
one remains. This module is the public surface; everything else is an
implementation detail.

The layout, lowest layer first (a module imports only its own layer and those
below it; ``tests/test_layout.py`` checks this):

- ``_core``: pure records and decisions: ``model`` (Trajectory, Module,
  MergeNode), ``tokens``, ``partition`` (packing), ``forest`` (merge
  scheduling), ``edits`` (optimizer edits and merge decisions), ``playbook``,
  ``prompts``, ``schemas``, ``stats``, ``io``. No trio, httpx or sqlite.
- ``_llm``: ``gateway`` (the shared HTTP client: retries, ``aimd`` adaptive
  concurrency, the usage ledger and budget), ``strict`` (strict-mode wire
  schemas), ``local`` (the embedded llama.cpp server).
- ``_storage``: ``store`` (the SQLite store: trajectories, versions, responses)
  and ``diskcache`` (the batch response cache and resume journals).
- ``agent``: ``rollout`` (the reference agent), ``sandbox`` (LLM-written code,
  run in a namespaced subprocess), ``fncheck``, ``eval``, ``oracle``, ``envs``.
- ``actors``: ``partitioner``, ``optimizer``, ``merger``; ``run`` (the batch
  pipeline), ``state`` (RunConfig, RunState), ``online`` (rollout epochs).
- ``_daemon``: ``optimizer`` (the streaming optimizer behind ``fgo serve``),
  ``http``, ``serve``, ``bridge`` (asyncio hosts), ``ingest``, ``events``, ``flow``,
  ``defaults``; ``_bench`` (``fgo bench``);
  ``testing`` (the scripted loopback LLM server).
- ``_cli``: the ``fgo`` command. Nothing imports it.
"""

from ._core.errors import BudgetExhaustedError as BudgetExhaustedError
from ._core.errors import FGOError as FGOError
from ._core.errors import InputError as InputError
from ._core.errors import LLMUnavailableError as LLMUnavailableError
from ._core.errors import ReplyRejectedError as ReplyRejectedError
from ._core.errors import UnitFailedError as UnitFailedError
from ._core.forest import ForestStatistics as ForestStatistics
from ._core.forest import MergeForest as MergeForest
from ._core.forest import MergeJob as MergeJob
from ._core.io import atomic_write_json as atomic_write_json
from ._core.io import load_module as load_module
from ._core.io import load_trajectories as load_trajectories
from ._core.model import Failure as Failure
from ._core.model import FunctionSpec as FunctionSpec
from ._core.model import MergeNode as MergeNode
from ._core.model import Module as Module
from ._core.model import Outcome as Outcome
from ._core.model import RenderedTrajectory as RenderedTrajectory
from ._core.model import Rule as Rule
from ._core.model import RunReport as RunReport
from ._core.model import Step as Step
from ._core.model import Subset as Subset
from ._core.model import Trajectory as Trajectory
from ._core.tokens import TokenCounter as TokenCounter
from ._core.tokens import default_counter as default_counter
from ._daemon.bridge import AsyncioOptimizer as AsyncioOptimizer
from ._daemon.bridge import open_optimizer_asyncio as open_optimizer_asyncio
from ._daemon.ingest import IngestResult as IngestResult
from ._daemon.optimizer import DaemonConfig as DaemonConfig
from ._daemon.optimizer import DaemonStatistics as DaemonStatistics
from ._daemon.optimizer import StreamingOptimizer as StreamingOptimizer
from ._daemon.optimizer import open_optimizer as open_optimizer
from ._llm.gateway import GatewayConfig as GatewayConfig
from ._llm.gateway import GatewayStatistics as GatewayStatistics
from ._llm.gateway import LLMGateway as LLMGateway
from ._storage.store import StoreError as StoreError
from ._storage.store import Version as Version
from .actors.run import RunFailedError as RunFailedError
from .actors.run import RunResult as RunResult
from .actors.run import run as run
from .actors.state import RunConfig as RunConfig
from .actors.state import RunState as RunState
from .actors.state import RunStatistics as RunStatistics
from .agent.sandbox import SandboxLimits as SandboxLimits
from .agent.sandbox import SandboxResult as SandboxResult
from .agent.sandbox import run_function as run_function

__version__ = "0.1.0"

__all__ = [
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
