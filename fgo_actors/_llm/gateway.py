"""The LLM gateway: one shared, backpressured client for every optimize and merge call.

It owns the concurrency limiter, retries with backoff (honouring Retry-After),
per-call timeouts, the usage ledger with its hard token budget, and structured
output: the request names a JSON Schema from ``protocols/``, the reply is parsed
and validated, and a rejected reply is re-asked a bounded number of times with
the error shown to the LLM.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import inspect
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar, overload

import attrs
import httpx
import stamina
import structlog
import trio

from .._core.errors import (
    BudgetExhaustedError,
    FGOError,
    LLMUnavailableError,
    ReplyRejectedError,
    UnitFailedError,
)
from .._core.prompts import reask_message
from .._core.schemas import load_schema, schema_error
from .._core.tokens import TokenCounter, default_counter
from .aimd import Window
from .replies import salvage_cut_reply
from .strict import from_strict, strict_variant

T = TypeVar("T")
StructuredMode = Literal["auto", "json_schema", "json_object", "none"]
# ``owned_by`` values in GET /models that mark a llama.cpp server, which wants
# ``json_object`` + ``schema`` (llama-cpp-python answers HTTP 500 to json_schema).
LLAMA_CPP_OWNERS = frozenset({"me", "llamacpp", "llama.cpp"})
SCHEMA_FILES = {"fgo_optimize": "optimize_response", "fgo_merge": "merge_response"}
# The list of each reply whose whole elements are kept when it is cut off.
SALVAGED_LIST = {"fgo_optimize": "actions", "fgo_merge": "decisions"}


@attrs.frozen
class GatewayConfig:
    """Where the LLM is and how to call it. ``base_url`` ends before
    ``/chat/completions`` (e.g. ``http://127.0.0.1:8080/v1``)."""

    base_url: str
    model: str
    api_key: str | None = None
    max_concurrency: int = 4
    # Seconds one HTTP attempt may take in all; connect gets its own short limit.
    call_timeout: float = 600.0
    connect_timeout: float = 10.0
    retry_attempts: int = 6
    retry_wait_initial: float = 1.0
    retry_wait_max: float = 60.0
    retry_after_max: float = 900.0
    max_reasks: int = 2
    token_budget: int | None = None
    max_completion_tokens: int = 2048
    temperature: float = 0.2
    structured_output: StructuredMode = "auto"
    strict: bool = True
    # AIMD (``aimd``): a 429 or 503 cuts the calls in flight by a quarter, successes
    # raise them again up to max_concurrency; refusals while the window
    # shrinks spend no retries.
    adaptive: bool = True

    def __attrs_post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base URL {self.base_url!r} must start with http:// or https:// "
                "(e.g. http://127.0.0.1:8080/v1)"
            )
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError("token_budget must be positive")
        for name in ("call_timeout", "connect_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.retry_attempts < 1:
            raise ValueError("retry_attempts must be at least 1")
        if self.max_reasks < 0:
            raise ValueError("max_reasks must not be negative")
        if self.max_completion_tokens < 1:
            raise ValueError("max_completion_tokens must be at least 1")


@attrs.frozen
class GatewayStatistics:
    """An immutable snapshot of the gateway's counters."""

    calls: dict[str, int]
    prompt_tokens: dict[str, int]
    completion_tokens: dict[str, int]
    retries: int
    reasks: int
    in_flight: int
    max_in_flight: int
    token_budget: int | None
    budget_exhausted: bool
    cached: dict[str, int] = attrs.field(factory=dict)
    # The adaptive concurrency window (None: fixed at max_concurrency), the
    # times it was cut, and the calls sent again because of a cut.
    window: int | None = None
    window_cuts: int = 0
    throttled: int = 0
    # Replies cut off at the cap whose whole part was kept (``_llm.replies``).
    salvaged: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.prompt_tokens.values()) + sum(self.completion_tokens.values())

    def since(self, earlier: GatewayStatistics) -> GatewayStatistics:
        """What happened after ``earlier`` (a snapshot of the same gateway)."""

        def diff(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
            return {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0)}

        return attrs.evolve(
            self,
            calls=diff(self.calls, earlier.calls),
            prompt_tokens=diff(self.prompt_tokens, earlier.prompt_tokens),
            completion_tokens=diff(self.completion_tokens, earlier.completion_tokens),
            cached=diff(self.cached, earlier.cached),
            retries=self.retries - earlier.retries,
            window_cuts=self.window_cuts - earlier.window_cuts,
            throttled=self.throttled - earlier.throttled,
            reasks=self.reasks - earlier.reasks,
            salvaged=self.salvaged - earlier.salvaged,
        )


class ResponseCache(Protocol):
    """Where finished calls are kept, so that a restarted daemon replays them
    instead of paying for them again. Keys come from :func:`request_key`."""

    async def get(self, key: str, role: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, role: str, response: dict[str, Any]) -> None:
        """Keep ``response`` under ``key``, replacing what was kept there."""
        ...


def request_key(body: dict[str, Any]) -> str:
    """A stable key for a request body: SHA-256 of its canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _RetryableStatusError(Exception):
    def __init__(self, response: httpx.Response) -> None:
        self.retry_after = _parse_retry_after(response.headers.get("retry-after"))
        super().__init__(f"HTTP {response.status_code}: {response.text[:300]}")


class _CallTimeoutError(Exception):
    pass


class _ThrottledError(Exception):
    """Refused because of our own concurrency: wait ``wait`` seconds and send again."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"throttled; retry in {wait:.3g} s")
        self.wait = wait


class _BadBodyError(Exception):
    pass


_RETRYABLE = (_RetryableStatusError, httpx.TransportError, _CallTimeoutError, _BadBodyError)


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds) or seconds < 0:
        return 0.0
    return seconds


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def parse_json_reply(content: str) -> Any:
    """Parse a reply that should be one JSON object, tolerating a code fence around it."""
    text = content.strip()
    fence = _FENCE.search(text)
    if fence is not None:
        text = fence.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReplyRejectedError(
            f"the reply is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from e


def _wire_schema(name: str) -> dict[str, Any]:
    """The schema sent to the server: the protocol schema, with ``analysis``
    required and first.

    Grammar-constrained decoding (llama.cpp) writes required properties
    before optional ones. With ``analysis`` optional, a small model had to
    write its ``actions`` before any reasoning, and wrote ``[]`` followed by
    an analysis saying which rule to add. Replies are still validated against
    the protocol schema, where ``analysis`` stays optional.
    """
    schema = dict(load_schema(SCHEMA_FILES[name]))
    schema.pop("$schema", None)
    schema.pop("$id", None)
    properties = dict(schema["properties"])
    if "analysis" in properties:
        schema["properties"] = {"analysis": properties.pop("analysis"), **properties}
        required = [r for r in schema.get("required", []) if r != "analysis"]
        schema["required"] = ["analysis", *required]
    return schema


@functools.cache
def _strict_wire_schema(name: str) -> tuple[dict[str, Any], frozenset[str]]:
    """``_wire_schema(name)`` in its strict-mode variant (``strict``), made once."""
    return strict_variant(_wire_schema(name))


@attrs.define(eq=False)
class _Slot:
    """A structured call's place in the concurrency limiter, kept from its
    reply until it is accepted or re-asked: a re-ask goes out next, while the
    server still holds its prompt, instead of queueing behind every unit that
    asked meanwhile (with one slot, as the local model has, the re-ask then
    found its ~4k-token prompt evicted and paid for all of it again)."""

    held: bool = False


class LLMGateway:
    """Use as ``async with LLMGateway(cfg) as gw:``; share one instance across actors."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        counter: TokenCounter | None = None,
        client: httpx.AsyncClient | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.counter = counter or default_counter()
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(config.call_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(
                max_connections=max(config.max_concurrency, 1),
                max_keepalive_connections=max(config.max_concurrency, 1),
            ),
            headers=({"Authorization": f"Bearer {config.api_key}"} if config.api_key else None),
        )
        self._limiter = trio.CapacityLimiter(config.max_concurrency)
        self._window = Window(config.max_concurrency) if config.adaptive else None
        self._throttled = 0
        self._calls: dict[str, int] = {}
        self._prompt: dict[str, int] = {}
        self._completion: dict[str, int] = {}
        self._cached: dict[str, int] = {}
        self._sending: dict[str, trio.Event] = {}  # cache keys of requests on their way
        # Cache keys whose latest reply this gateway refused. The reply stays in
        # the cache (it was paid for: a rerun replays it, checks it again and
        # replays the re-ask after it), but this gateway never answers the same
        # request with it again: a re-ask must reach the LLM.
        self._refused: set[str] = set()
        self._retries = 0
        self._reasks = 0
        self._salvaged = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._reserved = 0
        self._budget_released = trio.Event()
        self._exhausted = False
        self._elsewhere = 0  # tokens of calls others made on our budget (book_elsewhere)
        self._mode: StructuredMode | None = (
            None if config.structured_output == "auto" else config.structured_output
        )
        self._mode_lock = trio.Lock()
        self._log = structlog.get_logger()

    async def __aenter__(self) -> LLMGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    # -- statistics -------------------------------------------------------
    def statistics(self) -> GatewayStatistics:
        return GatewayStatistics(
            calls=dict(self._calls),
            prompt_tokens=dict(self._prompt),
            completion_tokens=dict(self._completion),
            retries=self._retries,
            reasks=self._reasks,
            salvaged=self._salvaged,
            in_flight=self._in_flight,
            max_in_flight=self._max_in_flight,
            token_budget=self.config.token_budget,
            budget_exhausted=self._exhausted,
            cached=dict(self._cached),
            window=self._window.size if self._window is not None else None,
            window_cuts=self._window.cuts if self._window is not None else 0,
            throttled=self._throttled,
        )

    @property
    def used_tokens(self) -> int:
        """Tokens spent against ``token_budget``: our calls', and those booked
        with :meth:`book_elsewhere`."""
        return sum(self._prompt.values()) + sum(self._completion.values()) + self._elsewhere

    def book_elsewhere(self, tokens: int) -> None:
        """Count ``tokens`` that calls made outside this gateway spent on its
        behalf (the agent's calls on Ray workers) against ``token_budget``.
        They are not in :meth:`statistics`, whose calls are this gateway's own:
        whoever made them reports them (``Executor.usage``)."""
        if tokens < 0:
            raise ValueError("tokens must not be negative")
        self._elsewhere += tokens
        self._note_spent()

    def check_budget(self) -> None:
        """Raise BudgetExhaustedError when ``token_budget`` is spent: for work
        that spends it elsewhere (an episode on a Ray worker), before it starts."""
        if self._note_spent():
            raise BudgetExhaustedError(
                f"token budget of {self.config.token_budget} reached ({self.used_tokens} used)"
            )

    def _note_spent(self) -> bool:
        """Whether ``token_budget`` is exhausted, marking it so once what is
        spent reaches it."""
        budget = self.config.token_budget
        if budget is not None and self.used_tokens >= budget:
            self._exhausted = True
        return self._exhausted

    # -- public calls -----------------------------------------------------
    @overload
    async def structured(
        self,
        role: str,
        messages: Sequence[dict[str, str]],
        schema_name: Literal["fgo_optimize", "fgo_merge"],
        check: Callable[[dict[str, Any]], Awaitable[T]],
    ) -> T: ...

    @overload
    async def structured(
        self,
        role: str,
        messages: Sequence[dict[str, str]],
        schema_name: Literal["fgo_optimize", "fgo_merge"],
        check: Callable[[dict[str, Any]], T],
    ) -> T: ...

    async def structured(
        self,
        role: str,
        messages: Sequence[dict[str, str]],
        schema_name: Literal["fgo_optimize", "fgo_merge"],
        check: Callable[[dict[str, Any]], Any],
    ) -> Any:
        """Ask for a reply matching ``schema_name``, then pass it through ``check``.

        ``check`` turns the parsed reply into the caller's result or raises
        ReplyRejectedError; it may be a coroutine function (an awaitable it
        returns is awaited), for checks that run something, such as a
        proposed function in the sandbox. A parse, schema or check failure re-asks the
        LLM with the error, at most ``max_reasks`` times, then raises
        UnitFailedError. Any other exception out of ``check`` but FGO's own
        errors counts as a refusal, logged with its traceback (``_checked``).
        Transport failures raise LLMUnavailableError and an exhausted budget
        BudgetExhaustedError.

        The call keeps its place in the concurrency limit from its reply until
        the reply is accepted or re-asked (``_Slot``): ``check`` holds one of
        ``max_concurrency`` places while it runs. A check that runs functions
        in the sandbox for a few seconds idles that place, against a whole
        prompt evaluated again for every re-ask that had queued behind others.
        """
        slot = _Slot()
        try:
            return await self._structured(role, messages, schema_name, check, slot)
        finally:
            self._let_go(slot)

    async def _structured(
        self,
        role: str,
        messages: Sequence[dict[str, str]],
        schema_name: Literal["fgo_optimize", "fgo_merge"],
        check: Callable[[dict[str, Any]], Any],
        slot: _Slot,
    ) -> Any:
        error: str | None = None
        attempts = 1 + self.config.max_reasks
        for attempt in range(attempts):
            send = list(messages)
            if error is not None:
                send.append(reask_message(self.counter, error))
            key: str | None = None
            try:
                content, key, cut = await self._chat(
                    role,
                    send,
                    schema_name,
                    reask=error is not None,
                    max_tokens=None,
                    accept_cut=True,
                    slot=slot,
                )
                if cut:
                    obj = self._salvage(role, schema_name, content)
                else:
                    obj = parse_json_reply(content)
                if self.config.strict and await self.structured_mode() == "json_schema":
                    obj = from_strict(obj, _strict_wire_schema(schema_name)[1])
                problem = schema_error(SCHEMA_FILES[schema_name], obj)
                if problem is not None:
                    field, message = problem
                    raise ReplyRejectedError(f"field {field}: {message}")
                assert isinstance(obj, dict)
                return await self._checked(role, check, obj)
            except ReplyRejectedError as e:
                # A refused reply is never this gateway's answer again: the
                # re-ask must reach the LLM, even when its request is
                # byte-identical to one already refused. A rerun (a new
                # gateway) replays it from the cache and checks it again.
                self._refuse(key)
                error = str(e)
                self._log.warning(
                    "llm_reply_rejected", role=role, attempt=attempt + 1, error=error[:500]
                )
                if not e.reask:
                    attempts = attempt + 1
                    break
        raise UnitFailedError(f"{role} reply still invalid after {attempts} attempts: {error}")

    async def _checked(
        self, role: str, check: Callable[[dict[str, Any]], Any], obj: dict[str, Any]
    ) -> Any:
        """``check(obj)``, awaited if it returns an awaitable. Any exception but
        our own errors is a bug in reading a reply nobody foresaw: it is logged
        with its traceback and refuses the reply, so that one odd reply does not
        end the run, and the reply (kept in the cache) does not end every rerun."""
        try:
            result = check(obj)
            if inspect.isawaitable(result):
                result = await result
        except FGOError:
            raise
        except Exception as e:
            self._log.exception("llm_reply_check_failed", role=role)
            raise ReplyRejectedError(
                f"the reply could not be read ({type(e).__name__}: {e})"
            ) from e
        return result

    async def chat(
        self,
        role: str,
        messages: Sequence[dict[str, str]],
        schema_name: str | None = None,
        *,
        reask: bool = False,
        max_tokens: int | None = None,
        accept_cut: bool = False,
    ) -> str:
        """One chat completion; returns the reply text. Retries transport-level failures.

        A request the server refuses as malformed (HTTP 400, 413, 422: typically
        a prompt over its context) fails just this unit, with UnitFailedError.
        ``max_tokens`` overrides the reply cap for this call; a reply cut off at
        the cap is rejected unless ``accept_cut``.
        """
        content, _, _ = await self._chat(
            role, messages, schema_name, reask=reask, max_tokens=max_tokens, accept_cut=accept_cut
        )
        return content

    async def _take(self, slot: _Slot | None) -> None:
        """A place in the concurrency limit: for this call, or kept by ``slot``."""
        if slot is None:
            await self._limiter.acquire()
        elif not slot.held:
            await self._limiter.acquire_on_behalf_of(slot)
            slot.held = True

    def _let_go(self, slot: _Slot | None) -> None:
        """Give the place back: the call's own (``slot`` None), or the slot's."""
        if slot is None:
            self._limiter.release()
        elif slot.held:
            slot.held = False
            self._limiter.release_on_behalf_of(slot)

    def _refuse(self, key: str | None) -> None:
        if key is not None:
            self._refused.add(key)

    async def _chat(
        self,
        role: str,
        messages: Sequence[dict[str, str]],
        schema_name: str | None,
        *,
        reask: bool,
        max_tokens: int | None,
        accept_cut: bool = False,
        slot: _Slot | None = None,
    ) -> tuple[str, str | None, bool]:
        """``chat``, also returning the reply's cache key (None without a cache)
        and whether it was cut off at the cap (kept only with ``accept_cut``).
        A reply refused here (empty, or cut off) stays in the cache for a rerun
        but is not replayed by this gateway (``_refused``)."""
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": list(messages),
            "temperature": self.config.temperature,
            "max_tokens": max_tokens or self.config.max_completion_tokens,
        }
        mode = await self.structured_mode() if schema_name is not None else "none"
        if schema_name is not None and mode != "none":
            schema = _wire_schema(schema_name)
            if mode == "json_schema":
                if self.config.strict:
                    schema = _strict_wire_schema(schema_name)[0]
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": schema_name,
                        "schema": schema,
                        "strict": self.config.strict,
                    },
                }
            else:
                body["response_format"] = {"type": "json_object", "schema": schema}
        if self.cache is None:
            data = await self._send(role, body, messages, max_tokens, reask, None, slot)
            content, cut = self._reply_content(data, max_tokens, accept_cut)
            return content, None, cut
        key = request_key(body)
        # The same request already on its way (two tasks asking the same merge)
        # is sent once: wait for it, then take its reply from the cache.
        while (sent := self._sending.get(key)) is not None:
            if slot is not None:  # not while keeping a place: the twin may need it
                self._let_go(slot)
            await sent.wait()
        self._sending[key] = trio.Event()
        try:
            hit = None if key in self._refused else await self.cache.get(key, role)
            if hit is not None:
                # A call paid for before (by this process or one that died):
                # replayed, not booked as spent again.
                self._cached[role] = self._cached.get(role, 0) + 1
                self._log.info("llm_call_cached", role=role)
                data = hit
            else:
                data = await self._send(role, body, messages, max_tokens, reask, key, slot)
                self._refused.discard(key)  # a new reply, not judged yet
            try:
                content, cut = self._reply_content(data, max_tokens, accept_cut)
                return content, key, cut
            except ReplyRejectedError:
                self._refuse(key)
                raise
        finally:
            self._sending.pop(key).set()

    async def _send(
        self,
        role: str,
        body: dict[str, Any],
        messages: Sequence[dict[str, str]],
        max_tokens: int | None,
        reask: bool,
        key: str | None,
        slot: _Slot | None = None,
    ) -> dict[str, Any]:
        """Send ``body`` (with retries), book its usage, cache it under ``key``;
        return the server's response. With a ``slot``, its place in the limit
        is taken if it has none and kept afterwards (``_let_go`` gives it up)."""
        # Counting a long prompt costs about 0.25 ms per 1k tokens, so it is done
        # only when needed: to reserve budget, or when the server reports no usage.
        prompt_estimate: int | None = None
        if self.config.token_budget is not None:
            prompt_estimate = self.counter.count_messages(messages)
        if reask:
            self._reasks += 1
        while True:
            wait: float | None = None
            await self._take(slot)
            try:
                need = (prompt_estimate or 0) + (max_tokens or self.config.max_completion_tokens)
                await self._reserve(need)
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
                started = trio.current_time()
                try:
                    data = await self._post(body)
                except _ThrottledError as e:
                    wait = e.wait
                finally:
                    self._in_flight -= 1
                    self._reserved -= need
                    self._budget_released.set()
                    self._budget_released = trio.Event()
            finally:
                if slot is None or wait is not None:
                    self._let_go(slot)
            if wait is None:
                break
            # Our own concurrency was too high: the window is smaller now.
            # Wait outside it, then send again; no retry is spent.
            self._throttled += 1
            self._log.info(
                "llm_call_throttled",
                role=role,
                retry_in=round(wait, 3),
                window=self._limiter.total_tokens,
            )
            await trio.sleep(wait)
        if self.cache is not None and key is not None:
            await self.cache.put(key, role, data)
        # Usage is booked before the reply is judged: a refused or empty reply
        # still cost its tokens.
        content, finish = _content_of(data)
        raw_usage = data.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        prompt_tokens = _int_or(usage.get("prompt_tokens"), None)
        if prompt_tokens is None:
            prompt_tokens = (
                prompt_estimate
                if prompt_estimate is not None
                else self.counter.count_messages(messages)
            )
        completion_tokens = _int_or(usage.get("completion_tokens"), None)
        if completion_tokens is None:
            completion_tokens = self.counter.count(content or "")
        self._calls[role] = self._calls.get(role, 0) + 1
        self._prompt[role] = self._prompt.get(role, 0) + prompt_tokens
        self._completion[role] = self._completion.get(role, 0) + completion_tokens
        self._note_spent()
        self._log.info(
            "llm_call",
            role=role,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            seconds=round(trio.current_time() - started, 3),
            finish_reason=finish,
        )
        return data

    def _reply_content(
        self, data: dict[str, Any], max_tokens: int | None, accept_cut: bool
    ) -> tuple[str, bool]:
        content, finish = _content_of(data)
        if content is None:
            raise ReplyRejectedError("the reply's message content is empty")
        if finish == "length" and not accept_cut:
            raise ReplyRejectedError(self._cut_message(max_tokens))
        return content, finish == "length"

    def _cut_message(self, max_tokens: int | None = None) -> str:
        cap = max_tokens or self.config.max_completion_tokens
        return f"the reply was cut off at {cap} tokens; be more concise"

    def _salvage(self, role: str, schema_name: str, content: str) -> dict[str, Any]:
        """The whole part of a structured reply cut off at the cap (its complete
        fields and list elements, ``salvage_cut_reply``), counted and logged;
        ReplyRejectedError when nothing in its list is whole."""
        found = salvage_cut_reply(content, SALVAGED_LIST[schema_name])
        if found is None:
            raise ReplyRejectedError(self._cut_message())
        obj, kept = found
        self._salvaged += 1
        self._log.warning("llm_reply_salvaged", role=role, kept=kept, chars=len(content))
        return obj

    async def structured_mode(self) -> StructuredMode:
        """The structured-output form to send; ``auto`` is resolved once, by asking
        the server's ``GET /models`` who it is."""
        if self._mode is not None:
            return self._mode
        async with self._mode_lock:
            if self._mode is None:
                self._mode = await self._detect_mode()
                self._log.info("structured_output", mode=self._mode, url=self.url)
        return self._mode

    async def _detect_mode(self) -> StructuredMode:
        try:
            with trio.move_on_after(self.config.connect_timeout):
                r = await self._client.get(self.config.base_url.rstrip("/") + "/models")
                owners = {
                    str(m.get("owned_by", "")).lower()
                    for m in r.json().get("data", [])
                    if isinstance(m, dict)
                }
                if owners & LLAMA_CPP_OWNERS:
                    return "json_object"
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        return "json_schema"

    # -- internals --------------------------------------------------------
    async def _reserve(self, need: int) -> None:
        """Set aside a call's worst case. While calls in flight hold reservations
        that would leave too little, wait for them: the budget is exhausted only
        when what is already spent leaves too little."""
        budget = self.config.token_budget
        if budget is None:
            self._reserved += need
            return
        while True:
            if self._exhausted or self.used_tokens + need > budget:
                self._exhausted = True
                raise BudgetExhaustedError(
                    f"token budget of {budget} reached ({self.used_tokens} used, "
                    f"next call needs up to {need})"
                )
            if self.used_tokens + self._reserved + need <= budget:
                self._reserved += need
                return
            await self._budget_released.wait()

    def _retry_hook(self, exc: Exception) -> bool | float:
        if isinstance(exc, _RetryableStatusError):
            if exc.retry_after is not None:
                return min(exc.retry_after, self.config.retry_after_max)
            return True
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return False
        return isinstance(exc, httpx.TransportError | _CallTimeoutError | _BadBodyError)

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        # Fast path: the first attempt runs bare, because setting up a retry
        # context costs more than the rest of the gateway together. Only after
        # a retryable failure does stamina take over; it sees that failure as
        # its own first attempt, so backoff, Retry-After and the attempt count
        # are exactly as if it had run from the start.
        first_error: Exception | None = None
        attempts = 1
        try:
            return await self._post_once(body, self._sent())
        except _RETRYABLE as e:
            if self._retry_hook(e) is False:
                raise LLMUnavailableError(f"LLM endpoint {self.url}: {e}") from e
            first_error = e
        try:
            async for attempt in stamina.retry_context(
                on=self._retry_hook,
                attempts=cfg.retry_attempts,
                timeout=None,  # stamina's timeout is wall-clock; trio bounds each attempt
                wait_initial=cfg.retry_wait_initial,
                wait_max=cfg.retry_wait_max,
            ):
                with attempt:
                    if first_error is not None:
                        replay, first_error = first_error, None
                        raise replay
                    self._retries += 1
                    attempts += 1
                    return await self._post_once(body, self._sent())
        except _RETRYABLE as e:
            raise LLMUnavailableError(
                f"LLM endpoint {self.url} failed after {attempts} "
                f"attempt{'s' if attempts > 1 else ''}: {type(e).__name__}: {e}"
            ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _sent(self) -> int:
        return self._window.sent() if self._window is not None else 0

    def _resize(self) -> None:
        if self._window is not None and self._limiter.total_tokens != self._window.size:
            self._limiter.total_tokens = self._window.size

    async def _post_once(self, body: dict[str, Any], token: int) -> dict[str, Any]:
        with trio.move_on_after(self.config.call_timeout) as scope:
            response = await self._client.post(self.url, json=body)
        if scope.cancelled_caught:
            raise _CallTimeoutError(f"no reply within {self.config.call_timeout:g} s")
        refused = response.status_code in (429, 503)
        if refused and self._window is not None and self._window.refused(token):
            self._resize()
            retry_after = _parse_retry_after(response.headers.get("retry-after"))
            raise _ThrottledError(
                min(retry_after, self.config.retry_after_max)
                if retry_after is not None
                else self.config.retry_wait_initial * (0.5 + random.random())
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise _RetryableStatusError(response)
        if response.status_code in (400, 413, 422):
            raise UnitFailedError(
                f"the LLM endpoint refused this request: HTTP {response.status_code}: "
                f"{response.text[:500]}"
            )
        if response.status_code >= 400:
            hint = ""
            if response.status_code in (401, 403):
                hint = " (check the API key: --api-key-env or FGO_API_KEY)"
            elif response.status_code == 404:
                hint = " (check --base-url; it should end before /chat/completions, e.g. .../v1)"
            raise LLMUnavailableError(
                f"LLM endpoint {self.url} refused the request: HTTP {response.status_code}"
                f"{hint}: {response.text[:500]}"
            )
        try:
            data = response.json()
        except ValueError as e:
            raise _BadBodyError(f"HTTP body is not JSON: {response.text[:200]!r}") from e
        if not isinstance(data, dict):
            raise _BadBodyError("HTTP body is not a JSON object")
        if self._window is not None:
            self._window.succeeded()
            self._resize()
        return data


def _int_or(value: object, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _content_of(data: dict[str, Any]) -> tuple[str | None, str | None]:
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, None
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return (
        content if isinstance(content, str) else None,
        finish if isinstance(finish, str) else None,
    )
