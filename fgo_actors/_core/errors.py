"""The project's own exception types.

Every error a user can cause or meet has a type here, so the CLI can map it to
an exit code and a message that names what went wrong and where.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def leaf_exceptions(group: BaseExceptionGroup[E]) -> list[E]:
    """The exceptions in a (possibly nested) group, as nurseries raise them."""
    out: list[E] = []
    for e in group.exceptions:
        out.extend(leaf_exceptions(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


class FGOError(Exception):
    """Base class for all errors raised by fgo_actors."""


class InputError(FGOError):
    """Bad input: a malformed file, a missing field, a wrong type, a duplicate id.

    ``path``, ``line`` and ``field`` locate the problem; any of them may be None
    when it does not apply (an empty file has no line).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        where = ""
        if path is not None:
            where = path
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            where += f"field {field!r}: "
        super().__init__(where + message)


class LLMUnavailableError(FGOError):
    """The LLM endpoint could not be reached, or calls still failed after retries."""


class ClusterUnavailableError(FGOError):
    """The Ray cluster that plays episodes could not be reached or started
    (exit 3, as an unreachable endpoint)."""


class BudgetExhaustedError(FGOError):
    """The hard token budget would be exceeded by the next call."""


class ReplyRejectedError(FGOError):
    """An LLM reply was not acceptable (bad JSON, schema mismatch, unknown id).

    The message is written so it can be shown to the LLM in a re-ask. With
    ``reask=False`` the caller knows another re-ask would not help: the unit
    fails at once (UnitFailedError), and the reply is not replayed in that run.
    """

    def __init__(self, message: str, *, reask: bool = True) -> None:
        super().__init__(message)
        self.reask = reask


class UnitFailedError(FGOError):
    """One optimize or merge unit failed cleanly after its bounded re-asks."""
