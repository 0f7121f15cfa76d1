"""``fgo bench``: what each optimization strategy buys, measured side by side.

One bench, on a fixed seed and split:
1. **collect**: a behaviour policy plays the training tasks; those
   trajectories are the data every strategy optimizes from. The policy is the
   reference agent with the base module (``llm``), or the environment's gold
   path with some random valid actions mixed in (``oracle``, no LLM), which
   gives both solved and failed episodes to learn from;
2. **optimize**: all-at-once, batch and FGO each optimize the base module
   from the same trajectories, through the same gateway, one after another
   (so their tokens, calls and wall times are comparable);
3. **evaluate**: the base module and every optimized module play the same
   held-out tasks; each gets its success rate with a 95% Wilson interval, its
   mean score, and McNemar's exact test against the base on the same seeds.

With an out dir, everything is kept there as it is made, so running the same
bench again carries on where it stopped: the training episodes and each
arm's held-out episodes (append-only JSONL), each strategy's module and run
report, and every LLM reply (a SQLite response cache). ``bench-state.json``
records the settings the cached work was made with; a bench with other
settings is refused (:class:`BenchStateError`) rather than mixed with it.
Tokens, calls and wall time are what each phase paid over all its runs
(replies replayed from the cache are not paid twice).

The numbers are whatever they turn out to be. The report keeps everything
needed to check them: the modules, the run reports and every episode.

The package: ``run`` plays and optimizes, ``workspace`` keeps what a rerun
carries on from, ``records`` and ``report`` say what was found.
"""

from .records import Arm as Arm
from .records import BenchConfig as BenchConfig
from .records import BenchProgress as BenchProgress
from .records import BenchResult as BenchResult
from .records import BenchStateError as BenchStateError
from .records import remaining_seconds as remaining_seconds
from .report import _p as _p
from .report import format_eta as format_eta
from .report import markdown_table as markdown_table
from .report import write_outputs as write_outputs
from .run import bench as bench
from .workspace import _report_from_json as _report_from_json
