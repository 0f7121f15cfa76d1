"""Token counting in ``_core/tokens.py``."""

from __future__ import annotations

import pytest


def test_without_tiktoken_tokens_are_estimated_at_four_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tiktoken

    from fgo_actors._core import tokens as _tokens

    def unavailable(name: str) -> object:
        raise OSError(f"cannot download {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", unavailable)
    _tokens.default_counter.cache_clear()
    try:
        counter = _tokens.default_counter()
        assert counter.encoding_name == "chars/4"
        assert counter.count("abcd" * 10) == 10
        assert counter.count("abcde") == 2
        text = "x" * 400
        cut = counter.truncate_middle(text, 20, " [...] ")
        assert counter.count(cut) <= 20
        assert cut.startswith("x")
        assert cut.endswith("x")
        assert " [...] " in cut
    finally:
        _tokens.default_counter.cache_clear()
