"""The optimizer's context: the flag, the local server's, or the default."""

from __future__ import annotations

import pytest

from fgo_actors._cli.common import DEFAULT_CONTEXT_TOKENS, context_for


def test_the_flag_wins_when_the_server_holds_it() -> None:
    assert context_for(4096, 8192) == 4096
    assert context_for(8192, 8192) == 8192
    assert context_for(8192, None) == 8192  # a remote endpoint: the user knows it


def test_without_the_flag_the_local_servers_context_or_the_default() -> None:
    assert context_for(None, 4096) == 4096
    assert context_for(None, None) == DEFAULT_CONTEXT_TOKENS


def test_asking_more_than_the_local_server_holds_is_an_error_naming_both() -> None:
    # A bench once ran its 8k-sized prompts against a 4k server that the command
    # had started itself: every all-at-once prompt was refused.
    with pytest.raises(ValueError, match=r"--context-tokens \(8192\).*holds \(4096\)"):
        context_for(8192, 4096)
