"""FGO Actors: Fine-Grained Optimization of LLM agent modules from trajectories.

Divide trajectories into token-budgeted subsets, optimize each concurrently
with an LLM, and merge the optimized modules progressively, pairwise, until
one remains. This module is the public surface; everything in ``_*`` modules
is an implementation detail.
"""

from ._bridge import AsyncioOptimizer as AsyncioOptimizer
from ._bridge import open_optimizer_asyncio as open_optimizer_asyncio
from ._daemon import DaemonConfig as DaemonConfig
from ._daemon import DaemonStatistics as DaemonStatistics
from ._daemon import IngestResult as IngestResult
from ._daemon import StreamingOptimizer as StreamingOptimizer
from ._daemon import open_optimizer as open_optimizer
from ._errors import BudgetExhaustedError as BudgetExhaustedError
from ._errors import FGOError as FGOError
from ._errors import InputError as InputError
from ._errors import LLMUnavailableError as LLMUnavailableError
from ._errors import ReplyRejectedError as ReplyRejectedError
from ._errors import UnitFailedError as UnitFailedError
from ._forest import ForestStatistics as ForestStatistics
from ._forest import MergeForest as MergeForest
from ._forest import MergeJob as MergeJob
from ._gateway import GatewayConfig as GatewayConfig
from ._gateway import GatewayStatistics as GatewayStatistics
from ._gateway import LLMGateway as LLMGateway
from ._io import atomic_write_json as atomic_write_json
from ._io import load_module as load_module
from ._io import load_trajectories as load_trajectories
from ._model import Failure as Failure
from ._model import FunctionSpec as FunctionSpec
from ._model import MergeNode as MergeNode
from ._model import Module as Module
from ._model import Outcome as Outcome
from ._model import RenderedTrajectory as RenderedTrajectory
from ._model import Rule as Rule
from ._model import RunReport as RunReport
from ._model import Step as Step
from ._model import Subset as Subset
from ._model import Trajectory as Trajectory
from ._pipeline import RunFailedError as RunFailedError
from ._pipeline import RunResult as RunResult
from ._pipeline import run as run
from ._sandbox import SandboxLimits as SandboxLimits
from ._sandbox import SandboxResult as SandboxResult
from ._sandbox import run_function as run_function
from ._state import RunConfig as RunConfig
from ._state import RunState as RunState
from ._state import RunStatistics as RunStatistics
from ._store import StoreError as StoreError
from ._store import Version as Version
from ._tokens import TokenCounter as TokenCounter
from ._tokens import default_counter as default_counter

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
