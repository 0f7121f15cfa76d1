"""What can be kept of a structured reply that the server cut off at its cap.

A small model sometimes runs away: it writes actions until the reply hits
``max_tokens``, and the JSON ends in the middle of one. Those tokens are
paid for, and every action before the cut is whole. ``salvage_cut_reply``
keeps the reply's complete top-level fields and the complete elements of its
list, so the caller judges them like any other reply instead of paying for
the whole prompt again. Pure; no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")
_FENCE_OPEN = re.compile(r"^\s*```[a-zA-Z]*\s*")


def _skip(text: str, i: int) -> int:
    match = _SPACE.match(text, i)
    assert match is not None  # \s* always matches
    return match.end()


def salvage_cut_reply(content: str, list_key: str) -> tuple[dict[str, Any], int] | None:
    """The whole part of a cut-off JSON object reply, and how many elements of
    ``list_key`` it keeps; None when not one element of that list is whole.

    Reads the object field by field: fields before the cut are kept whole; in
    the ``list_key`` array, every element before the cut is kept and the one
    cut in half is left out. A field cut in half other than ``list_key`` (a
    long ``analysis``) ends the reading: what came before it is kept.
    """
    text = _FENCE_OPEN.sub("", content, count=1)
    i = _skip(text, 0)
    if not text.startswith("{", i):
        return None
    i += 1
    out: dict[str, Any] = {}
    kept = 0
    try:
        while True:
            i = _skip(text, i)
            if text.startswith("}", i):
                break  # not cut after all; the caller parses such replies itself
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if not isinstance(key, str) or not text.startswith(":", i):
                break
            i = _skip(text, i + 1)
            if key == list_key and text.startswith("[", i):
                items: list[Any] = []
                out[key] = items
                i += 1
                while True:
                    i = _skip(text, i)
                    if text.startswith("]", i):
                        i += 1
                        break
                    item, i = _DECODER.raw_decode(text, i)
                    items.append(item)
                    kept += 1
                    i = _skip(text, i)
                    if text.startswith(",", i):
                        i += 1
            else:
                out[key], i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if text.startswith(",", i):
                i += 1
    except json.JSONDecodeError:
        pass  # the cut: everything read before it is whole
    if not kept:
        return None
    return out, kept
