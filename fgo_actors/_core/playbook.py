"""Playbooks: the action sequences that earned score, learned as data (pure).

A small optimizer model writes vague rules and no working functions, but the
trajectories themselves say which actions raised the score and what led up
to them. ``mine`` reads that from the recorded turns of a subset, with no
knowledge of any environment:

- a *rewarded* action is the last action of a turn that took the score to a
  new high (winning back points lost to a mistake teaches nothing);
- its *object* is a run of words it shares with an earlier action of the
  episode (``dirty red shirt`` in ``take dirty red shirt`` and ``put dirty red
  shirt in laundry basket``), leaving out the words both start with (``take``
  in ``take x`` / ``take y``). When several runs qualify (``laundry basket``
  is shared with ``open laundry basket`` too), the one whose play recurs in
  the most episodes wins: what varies between episodes is the object;
- its *lead-up* is the last earlier action naming the object, then those since
  that share more than half of their words, past the command word, with the
  rest of the rewarded action (``open laundry basket``);
- the *play* is the lead-up and the rewarded action with the object replaced by
  ``{x}``, counted once per episode for that object.

The plays become the data table of one generic module function, ``playbook``
(its source is ``_playbook_fn.py``), which offers a play again for objects
that resemble the ones it was seen with. Plays from different subsets are
united by adding their counts (``merge_functions``), so a merge keeps every
subset's knowledge; the table is cut to ``MAX_OBJECTS`` objects, the least
seen first. The LLM sees the function by name and description only, and may
neither edit nor drop it: it is what the scores say, not an opinion.
"""

from __future__ import annotations

import ast
import functools
import pprint
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources

import attrs

from .model import FunctionSpec, Module, Turn

PLAYBOOK = "playbook"
MAX_OBJECTS = 1000  # objects kept over all plays
MAX_LEADUP = 3  # earlier actions kept before a rewarded one
MAX_SLOT_WORDS = 8

Plays = dict[tuple[str, ...], dict[str, int]]

_WORD = re.compile(r"[a-z0-9]+")
_TABLE_LINE = "PLAYS: dict[tuple[str, ...], dict[str, int]] = {}\n"
_PARAMETERS = {
    "type": "object",
    "properties": {
        "task": {"type": "string"},
        "observation": {"type": "string"},
        "valid_actions": {"type": "array", "items": {"type": "string"}},
        "history": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
    },
    "required": ["task", "observation", "valid_actions", "history"],
}


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def _longest_run(a: Sequence[str], b: Sequence[str]) -> tuple[int, int]:
    """(start in ``a``, length) of the longest run of words ``a`` and ``b`` share,
    leaving out the words both start with (their command: ``pick up``)."""
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    best = (0, 0)
    for i in range(len(a)):
        for j in range(len(b)):
            if i == j and i < prefix:
                continue
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                n += 1
            if n > best[1]:
                best = (i, n)
    return best


def _slot_pattern(slot: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\S)" + re.escape(slot) + r"(?!\S)")


def candidate_plays(rewarded: str, earlier: Sequence[str]) -> list[tuple[tuple[str, ...], str]]:
    """The plays ``rewarded`` may stand for given the episode's ``earlier``
    actions, one per candidate object, longest object first: (steps with
    ``{x}``, the object). Empty when no earlier action shares an object."""
    words = rewarded.split()
    runs: dict[str, int] = {}
    for action in earlier:
        i, n = _longest_run(words, action.split())
        if 0 < n < len(words) and n <= MAX_SLOT_WORDS:
            runs.setdefault(" ".join(words[i : i + n]), n)
    out: list[tuple[tuple[str, ...], str]] = []
    for slot in sorted(runs, key=lambda s: -runs[s]):
        names = _slot_pattern(slot)
        tail = _words(" ".join(names.sub(" ", rewarded).split()[1:]))
        last = max(i for i, a in enumerate(earlier) if names.search(a))
        if earlier[last].split()[0] == words[0]:
            continue  # the same command on a look-alike ("take red x", "take blue x")
        # The last action naming the object, then those since that share more
        # than half of their words (past the command word) with the rest of the
        # rewarded one: "take x", "open laundry basket", "put x in laundry basket".
        fixed: list[str] = []
        for action in earlier[last + 1 :]:
            own = _words(" ".join(action.split()[1:]))
            if action not in fixed and own and len(own & tail) * 2 > len(own):
                fixed.append(action)
        lead = [earlier[last], *fixed[-(MAX_LEADUP - 1) :]]
        steps = tuple(names.sub("{x}", a) for a in (*lead, rewarded))
        # A play must say more than "do it again to x": its rewarded step keeps
        # a word of its own past the command, and no step repeats.
        if len(set(steps)) == len(steps) and len(steps[-1].replace("{x}", " ").split()) > 1:
            out.append((steps, slot))
    return out


def _rewarded(turns: Sequence[Turn]) -> Iterator[tuple[str, list[str]]]:
    """Each rewarded action of an episode (one that took the score to a new
    high: winning back points lost to a mistake is not a lesson) with the
    actions before it."""
    earlier: list[str] = []
    best = 0.0
    for turn in turns:
        if not turn.played:
            continue
        if turn.score is not None and turn.score > best + 1e-9:
            best = turn.score
            yield turn.played[-1], [*earlier, *turn.played[:-1]]
        earlier.extend(turn.played)


def mine(turns_of_episodes: Iterable[Sequence[Turn]]) -> Plays:
    """The plays of these episodes, each object counted once per episode.

    A rewarded action whose object is ambiguous (``take used tissue`` / ``open
    trash can`` / ``put used tissue in trash can``) is read with the object
    whose play recurs in the most episodes: what varies between episodes is
    the object, what recurs is the play.
    """
    episodes = [[candidate_plays(r, e) for r, e in _rewarded(turns)] for turns in turns_of_episodes]
    support: dict[tuple[str, ...], int] = {}
    for episode in episodes:
        for steps in {steps for options in episode for steps, _ in options}:
            support[steps] = support.get(steps, 0) + 1
    tables: list[Plays] = []
    for episode in episodes:
        plays: Plays = {}
        for options in episode:
            if options:
                steps, obj = max(options, key=lambda o: (support[o[0]], len(o[1])))
                plays.setdefault(steps, {})[obj] = 1
        tables.append(plays)
    return merge_plays(tables)


def merge_plays(tables: Iterable[Mapping[tuple[str, ...], Mapping[str, int]]]) -> Plays:
    """The tables united, counts added, then cut to ``MAX_OBJECTS``; ordered
    most seen first, so the result does not depend on the order of ``tables``."""
    total: Plays = {}
    for table in tables:
        for steps, objects in table.items():
            row = total.setdefault(tuple(steps), {})
            for obj, n in objects.items():
                row[obj] = row.get(obj, 0) + int(n)
    cells = sorted(
        ((steps, obj, n) for steps, row in total.items() for obj, n in row.items()),
        key=lambda c: (-c[2], c[0], c[1]),
    )[:MAX_OBJECTS]
    kept: dict[tuple[str, ...], dict[str, int]] = {}
    for steps, obj, n in cells:
        kept.setdefault(steps, {})[obj] = n
    order = sorted(kept, key=lambda s: (-sum(kept[s].values()), s))
    return {
        steps: dict(sorted(kept[steps].items(), key=lambda kv: (-kv[1], kv[0]))) for steps in order
    }


def _source() -> str:
    text = (
        resources.files("fgo_actors._core").joinpath("playbook_fn.py").read_text(encoding="utf-8")
    )
    if _TABLE_LINE not in text:  # pragma: no cover - a broken install
        raise RuntimeError("fgo_actors/_core/playbook_fn.py has lost its PLAYS line")
    return text


def to_function(table: Plays) -> FunctionSpec:
    """The ``playbook`` module function holding ``table``, as ``merge_plays``
    (or ``mine``) returns it: ordered and within the cap."""
    literal = pprint.pformat(table, width=100, sort_dicts=False)
    objects = sum(len(row) for row in table.values())
    return FunctionSpec(
        name=PLAYBOOK,
        description=(
            "Offers again, for objects like the ones it was seen with, the action "
            f"sequences that earned score in the logs ({len(table)} sequences, "
            f"{objects} objects)."
        ),
        parameters=_PARAMETERS,
        code=_source().replace(_TABLE_LINE, f"PLAYS = {literal}\n", 1),
    )


def plays_of(fn: FunctionSpec) -> Plays | None:
    """The table of a ``playbook`` function (a copy), or None when ``fn`` is not one."""
    if fn.name != PLAYBOOK:
        return None
    table = _parse_table(fn.code)
    return None if table is None else {steps: dict(row) for steps, row in table.items()}


@functools.lru_cache(maxsize=64)
def _parse_table(code: str) -> Plays | None:
    """The literal ``PLAYS = {...}`` in ``code``, checked; parsed once per code
    (prompts and cap checks ask about the same playbook again and again)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id == "PLAYS"
        ):
            try:
                value = ast.literal_eval(stmt.value)
            except ValueError:
                return None
            if not isinstance(value, dict):
                return None
            table: Plays = {}
            for steps, row in value.items():
                if not (
                    isinstance(steps, tuple)
                    and all(isinstance(s, str) for s in steps)
                    and isinstance(row, dict)
                    and all(isinstance(k, str) and isinstance(n, int) for k, n in row.items())
                ):
                    return None
                table[steps] = dict(row)
            return table
    return None


def is_playbook(fn: FunctionSpec) -> bool:
    return fn.name == PLAYBOOK and _parse_table(fn.code) is not None


def merge_functions(versions: Sequence[FunctionSpec]) -> FunctionSpec | None:
    """One playbook from several (their tables united), or None if one is not a playbook."""
    tables = [plays_of(v) for v in versions]
    if any(t is None for t in tables):
        return None
    return to_function(merge_plays(t for t in tables if t is not None))


def with_plays(module: Module, turns_of_episodes: Iterable[Sequence[Turn]]) -> Module:
    """``module`` with the plays of these episodes added to its playbook (made if
    missing). Unchanged when the episodes hold no plays."""
    found = mine(turns_of_episodes)
    if not found:
        return module
    current = next((f for f in module.functions if f.name == PLAYBOOK), None)
    table = plays_of(current) if current is not None else {}
    if table is None:  # the user's own function of that name: left alone
        return module
    fn = to_function(merge_plays([table, found]))
    others = tuple(f for f in module.functions if f.name != PLAYBOOK)
    return attrs.evolve(module, functions=(*others, fn))
