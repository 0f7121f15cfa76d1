"""The actors of a run: plain async functions connected by bounded memory channels.

Each actor closes its channel ends with a plain ``with`` inside its own task;
the end-of-channel cascade is what shuts a pipeline down. Beside them:
``run`` (the batch pipeline that starts them), ``state`` (RunConfig and the
run's shared state) and ``online`` (epochs of rollouts and optimization).
"""

from .merger import merge_modules, merger
from .optimizer import optimize_subset, optimize_unit, optimizer
from .partitioner import make_subsets, partitioner

__all__ = [
    "make_subsets",
    "merge_modules",
    "merger",
    "optimize_subset",
    "optimize_unit",
    "optimizer",
    "partitioner",
]
