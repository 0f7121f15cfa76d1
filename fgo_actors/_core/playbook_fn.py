"""The playbook: action sequences that earned score in recorded runs, offered again by analogy.

This file is the source of the ``playbook`` module function that FGO writes
(``playbook.to_function``). It is never imported by FGO itself: its text is
copied into the module, with ``PLAYS`` replaced by what the trajectories
taught, and it runs in the agent's sandbox like every module function. It
knows nothing about any environment; everything it offers comes from ``PLAYS``.

``PLAYS`` maps a sequence of actions in which ``{x}`` stands for one object
(``("take {x}", "put {x} in fridge")``) to the objects it earned score with and
how many times (``{"red apple": 2, "milk": 1}``). Each turn, an action on offer
that fits a step of a sequence (``take green apple`` fits ``take {x}``) makes
``green apple`` a candidate. The candidate goes with the sequence its words
make most likely (naive Bayes over the words of each sequence's objects), and
the rest of that sequence is offered as one macro. Only sequences whose
own words (the place they end at) the episode has shown are considered while
there are any. An object that a sequence's last step has already been played
on is done and not offered again.
"""

import math
import re

PLAYS: dict[tuple[str, ...], dict[str, int]] = {}
MAX_MACROS = 4  # the agent takes at most 4 options from one function
MIN_CHANCE = 0.0  # a guess beats no shortcut: a small agent without one mostly idles

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def _pattern(step: str) -> re.Pattern[str]:
    head, *rest = step.split("{x}")
    parts = [re.escape(head), "(?P<x>.+?)"]
    for i, piece in enumerate(rest):
        if i:
            parts.append("(?P=x)")
        parts.append(re.escape(piece))
    return re.compile("".join(parts) + "$")


def _chances(words: frozenset[str], groups: dict[str, dict[str, int]]) -> dict[str, float]:
    """For each group of known objects, how likely an object with ``words``
    belongs to it (naive Bayes over the words of its objects; the chances sum
    to 1). With no word in common, only how often each group was seen counts."""
    vocabulary: set[str] = set()
    for objects in groups.values():
        for obj in objects:
            vocabulary |= _words(obj)
    known = words & vocabulary
    total = sum(sum(objects.values()) for objects in groups.values())
    logs: dict[str, float] = {}
    for end, objects in groups.items():
        n = sum(objects.values())
        if n <= 0:
            continue
        log = math.log(n / total)
        for word in known:
            k = sum(times for obj, times in objects.items() if word in _words(obj))
            log += math.log((k + 0.1) / (n + 0.2))
        logs[end] = log
    if not logs:
        return {}
    top = max(logs.values())
    weights = {end: math.exp(log - top) for end, log in logs.items()}
    norm = sum(weights.values())
    return {end: w / norm for end, w in weights.items()}


def playbook(
    task: str, observation: str, valid_actions: list[str], history: list[list[str]]
) -> list[list[str]]:
    valid = set(valid_actions)
    past = {action for action, _ in history}
    # Plays that end alike (with or without an "open ..." first) know the same objects.
    known: dict[str, dict[str, int]] = {}
    for steps, objects in PLAYS.items():
        row = known.setdefault(steps[-1], {})
        for obj, times in objects.items():
            row[obj] = row.get(obj, 0) + times
    # object -> last step -> (evidence, -i, macro)
    options: dict[str, dict[str, tuple[int, int, list[str]]]] = {}
    for steps, objects in PLAYS.items():
        evidence = sum(objects.values())
        for i, step in enumerate(steps):
            if "{x}" not in step:
                continue
            pattern = _pattern(step)
            for action in valid_actions:
                match = pattern.match(action)
                if match is None:
                    continue
                x = match.group("x")
                filled = [s.replace("{x}", x) for s in steps]
                # The object's own steps from here on; a fixed step (no {x})
                # only if it can be taken now (an "open ..." already open is not).
                macro = [
                    a for j, a in enumerate(filled) if (j >= i if "{x}" in steps[j] else a in valid)
                ]
                mine = options.setdefault(x, {})
                if steps[-1] not in mine or (evidence, -i) > mine[steps[-1]][:2]:
                    mine[steps[-1]] = (evidence, -i, macro)
    # A play whose own words (its place, say: what its last step says that the
    # other plays' do not) the episode has not shown is left out while others
    # are in sight.
    own = {end: _words(end.replace("{x}", " ").split(" ", 1)[-1]) for end in known}
    common = frozenset.intersection(*own.values()) if own else frozenset()
    seen = _words(" ".join([observation, *valid_actions, *(o for _, o in history)]))
    ranked: list[tuple[float, list[str]]] = []
    for x, ends in options.items():
        if any(end.replace("{x}", x) in past for end in known):
            continue  # put away already (rightly or not: it is not moved again)
        here = {e: v for e, v in ends.items() if own[e] - common <= seen}
        groups = {end: known[end] for end in (here or ends)}
        if not here and not any(_words(x) & _words(o) for g in groups.values() for o in g):
            continue  # nothing to go on: neither the object nor its place is known
        chances = _chances(_words(x), groups)
        if chances:
            end = max(chances, key=lambda e: (chances[e], ends[e][:2]))
            if chances[end] > MIN_CHANCE:
                ranked.append((chances[end], ends[end][2]))
    ranked.sort(key=lambda cm: -cm[0])
    return [macro for _, macro in ranked[:MAX_MACROS]]
