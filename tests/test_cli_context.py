"""The optimizer's context: the flag, the local server's, or the default."""

from __future__ import annotations

from typing import Any

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


def test_the_local_model_gets_a_longer_call_timeout_unless_one_is_given() -> None:
    """A timed-out call to the one-slot local model is retried behind the
    abandoned one, which it finishes anyway: its default is long."""
    from fgo_actors._cli.common import LOCAL_CALL_TIMEOUT, REMOTE_CALL_TIMEOUT, gateway_config

    def timeout(local_ctx: int | None, given: float | None) -> float:
        config = gateway_config(
            "http://127.0.0.1:1/v1",
            "m",
            local_ctx,
            api_key_env="FGO_TEST_NO_KEY",
            max_concurrency=None,
            max_completion_tokens=256,
            call_timeout=given,
        )
        return config.call_timeout

    assert timeout(8192, None) == LOCAL_CALL_TIMEOUT > REMOTE_CALL_TIMEOUT
    assert timeout(None, None) == REMOTE_CALL_TIMEOUT
    assert timeout(8192, 42.0) == timeout(None, 42.0) == 42.0


def test_the_local_model_is_sent_json_object_without_asking() -> None:
    from fgo_actors._cli.common import gateway_config

    def mode(local_ctx: int | None, given: str | None) -> str:
        options: dict[str, Any] = {} if given is None else {"structured_output": given}
        return gateway_config(
            "http://127.0.0.1:1/v1",
            "m",
            local_ctx,
            api_key_env="FGO_TEST_NO_KEY",
            max_concurrency=None,
            max_completion_tokens=256,
            **options,
        ).structured_output

    assert mode(8192, None) == mode(8192, "auto") == "json_object"
    assert mode(None, None) == "auto"
    assert mode(8192, "none") == "none"


def test_the_local_models_replies_are_capped_lower() -> None:
    from fgo_actors._cli.common import default_completion_tokens

    assert default_completion_tokens(8192) == 2048
    assert default_completion_tokens(8192, local=True) == 1024
    assert default_completion_tokens(4096, local=True) == default_completion_tokens(4096) == 1024
    assert default_completion_tokens(2048, local=True) == 512
