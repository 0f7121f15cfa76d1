"""A real OpenAI-compatible HTTP server on loopback, with scripted replies.

Used by the test-suite and the benchmark scripts, and useful to anyone who
wants to try ``fgo optimize`` end to end without an LLM. It speaks HTTP/1.1
over trio sockets (with h11), so the client under test is the real httpx
client, the real JSON and the real retries. Under trio's MockClock its
latencies and the client's backoff both run in virtual time.

Replies are deterministic: an optimize request gets one new rule naming the
trajectories it saw; a merge request keeps the children's rules, or combines
them with lineage once there are many. Latency and faults are injectable per request.

``synthetic_trajectory`` makes the deterministic trajectories the tests and
benchmarks feed it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable
from typing import Any

import attrs
import h11
import trio

from ._core.model import Outcome, Step, Trajectory


def synthetic_trajectory(
    i: int,
    *,
    steps: int = 4,
    words: int = 12,
    groups: int = 3,
    prefix: str = "t",
    width: int = 4,
) -> Trajectory:
    """Trajectory number ``i``: deterministic, with sizes, groups (``task_type``)
    and outcomes (one in three fails) that vary with ``i``; its id is
    ``prefix`` and ``i`` padded to ``width`` digits."""
    body = [
        Step(
            role="user",
            content=f"observation {i}.{k}: "
            + " ".join(f"w{(i * 7 + k * 3 + j) % 97}" for j in range(words + (i % 5) * 3)),
        )
        if k % 2 == 0
        else Step(role="assistant", content=f"action {k} for item {i}")
        for k in range(steps)
    ]
    return Trajectory(
        id=f"{prefix}{i:0{width}d}",
        task=f"task number {i}",
        steps=tuple(body),
        outcome=Outcome(success=i % 3 != 0, score=float(i % 3 != 0)),
        metadata={"task_type": f"type{i % groups}"},
    )


Policy = Callable[[dict[str, Any]], str]
Latency = Callable[[dict[str, Any]], float]

_TRAJ = re.compile(r"^### Trajectory (\S+)$", re.MULTILINE)
_CURRENT = re.compile(r"<module>\n(.*?)\n</module>", re.DOTALL)
_MERGE_VERSION = re.compile(r"^Version (\S+): ", re.MULTILINE)
_MERGE_RULE = re.compile(r"^- \[([^\]]+)\] \([^)]*\) (.*)$", re.MULTILINE)
_MERGE_FUNCTION = re.compile(
    r'<function name="([^"]+)" version="[^"]+">\n(.*?)\n</function>', re.DOTALL
)


@attrs.define
class Fault:
    """What to do instead of a normal reply.

    ``status`` with an error body (and ``retry_after``), or ``content``: a 200
    reply whose message text is this string (for bad-JSON tests), with
    ``finish_reason`` (``"length"``: a reply cut off at the token cap), or
    ``drop``: close the connection without answering.
    """

    status: int = 500
    retry_after: float | str | None = None
    content: str | None = None
    drop: bool = False
    finish_reason: str = "stop"


@attrs.define
class RecordedRequest:
    body: dict[str, Any]
    started: float
    finished: float | None = None
    fault: Fault | None = None
    headers: dict[str, str] = attrs.field(factory=dict)  # names in lower case

    @property
    def schema_name(self) -> str | None:
        return schema_name_of(self.body)

    @property
    def prompt(self) -> str:
        return "\n".join(str(m.get("content") or "") for m in self.body.get("messages", []))


def schema_name_of(body: dict[str, Any]) -> str | None:
    rf = body.get("response_format")
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_schema":
        name = rf.get("json_schema", {}).get("name")
        return name if isinstance(name, str) else None
    schema = rf.get("schema")
    if isinstance(schema, dict) and isinstance(schema.get("title"), str):
        return str(schema["title"])
    return None


def _first_user(body: dict[str, Any]) -> str:
    for m in body.get("messages", []):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


MAX_SCRIPTED_RULES = 6
_OPTION = re.compile(r"^(\d+)\. (.+)$", re.MULTILINE)
_AGENT_PREFERENCE = ("[", "open ", "put ", "take ")


def agent_choice(prompt: str) -> str:
    """A reference-agent turn: the number of the first module shortcut offered,
    else of the first open, put or take action, else 1. Deterministic."""
    options = _OPTION.findall(prompt)
    for prefix in _AGENT_PREFERENCE:
        for number, text in options:
            if text.startswith(prefix):
                return str(number)
    return "1"


def scripted_reply(body: dict[str, Any]) -> str:
    """The default policy: a deterministic, schema-valid optimize or merge reply,
    or, for a reference-agent turn (no response format), ``agent_choice``
    (``done`` in tool-call mode).

    Optimize: add one rule naming the trajectories seen (evidence), or, once the
    module holds MAX_SCRIPTED_RULES rules, revise one instead, so modules stay
    small. Merge: keep every distinct child rule with its lineage; past
    MAX_SCRIPTED_RULES rules, consolidate them into that many rules whose
    ``from`` lists name every source, so nothing learned loses its lineage.
    """
    name = schema_name_of(body)
    if name is None:
        messages = body.get("messages") or [{}]
        last = str(messages[-1].get("content") or "")
        if "Reply with the number of one action" in last:
            return agent_choice(last)
        if "Reply with one function call, or done." in last:
            return "done"  # tool-call mode: end each request at once
    prompt = _first_user(body)
    if name == "fgo_merge":
        return json.dumps(scripted_merge(prompt))
    ids = _TRAJ.findall(prompt)
    current = _CURRENT.search(prompt)
    existing = json.loads(current.group(1)).get("rules", []) if current else []
    span = f"{ids[0] if ids else '-'}..{ids[-1] if ids else '-'}"
    if len(existing) >= MAX_SCRIPTED_RULES:
        target = existing[len(ids) % len(existing)]["id"]
        action: dict[str, Any] = {
            "op": "revise_rule",
            "id": target,
            "text": f"Revised from {span}: verify preconditions before acting.",
            "evidence": ids[:3],
        }
    else:
        action = {
            "op": "add_rule",
            "text": f"Lesson {len(existing) + 1} from {span}: verify preconditions before acting "
            f"({len(ids)} runs).",
            "evidence": ids[:3],
        }
    return json.dumps({"analysis": f"saw {len(ids)} trajectories", "actions": [action]})


def merge_prompt_versions(prompt: str) -> list[str]:
    """The child node ids a merge prompt merges, in order."""
    return _MERGE_VERSION.findall(prompt)


def merge_prompt_rules(prompt: str) -> list[tuple[str, str]]:
    """The (id, text) of each rule a merge prompt lists."""
    return [(m.group(1), m.group(2)) for m in _MERGE_RULE.finditer(prompt)]


def scripted_merge(prompt: str) -> dict[str, Any]:
    """The default merge reply: keep every rule (no decisions) while there are at
    most MAX_SCRIPTED_RULES; past that, combine them into that many rules whose
    ids name every source. A conflicting function gets its first version."""
    rules = merge_prompt_rules(prompt)
    decisions: list[dict[str, Any]] = []
    if len(rules) > MAX_SCRIPTED_RULES:
        groups: list[list[str]] = [[] for _ in range(MAX_SCRIPTED_RULES)]
        for i, (rid, _text) in enumerate(rules):
            groups[i % MAX_SCRIPTED_RULES].append(rid)
        decisions = [
            {
                "op": "combine",
                "ids": ids,
                "text": f"Consolidated lesson {k + 1}: verify preconditions before acting.",
            }
            for k, ids in enumerate(groups)
        ]
    functions: dict[str, Any] = {}
    for fname, text in _MERGE_FUNCTION.findall(prompt):
        functions.setdefault(fname, json.loads(text))
    return {
        "analysis": f"{len(rules)} rules, {len(decisions)} combined",
        "decisions": decisions,
        "functions": list(functions.values()),
    }


def consolidating_merge_policy(body: dict[str, Any]) -> str:
    """A policy whose merges do what real models often do: consolidate all the
    children's rules into one general rule, naming no ids in its lineage.
    Optimize calls get ``scripted_reply``."""
    if schema_name_of(body) != "fgo_merge":
        return scripted_reply(body)
    rules = merge_prompt_rules(_first_user(body))
    decisions = (
        [{"op": "combine", "text": "Verify the preconditions before acting."}]
        if len(rules) > 1
        else []
    )
    return json.dumps({"analysis": f"{len(rules)} rules into one", "decisions": decisions})


class FakeLLMServer:
    """Serve ``POST /v1/chat/completions`` on 127.0.0.1.

    Start it with ``base_url = await nursery.start(server.serve)``.
    ``faults`` is consumed in arrival order, one per request, before the policy.
    """

    def __init__(
        self,
        *,
        policy: Policy = scripted_reply,
        latency: Latency | float | None = None,
        faults: list[Fault] | None = None,
        fault_for: Callable[[dict[str, Any]], Fault | None] | None = None,
        include_usage: bool = True,
        owned_by: str = "fgo-actors-testing",
    ) -> None:
        self.policy = policy
        self.latency = latency
        self.faults: list[Fault] = list(faults or [])
        self.fault_for = fault_for
        self.include_usage = include_usage
        self.owned_by = owned_by
        self.model_listings = 0
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        task_status.started(f"http://{sockname[0]}:{sockname[1]}/v1")
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, stream)
                if request is None:
                    return
                keep = await self._respond(conn, stream, request, body)
                if not keep or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None, b""

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        payload: bytes,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            *(extra_headers or []),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers))
        out += conn.send(h11.Data(data=payload)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out or b"")

    async def _respond(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, raw: bytes
    ) -> bool:
        if request.method == b"GET" and request.target.endswith(b"/models"):
            self.model_listings += 1
            listing = {
                "object": "list",
                "data": [{"id": "fake", "object": "model", "owned_by": self.owned_by}],
            }
            await self._send(conn, stream, 200, json.dumps(listing).encode())
            return True
        if request.method != b"POST" or not request.target.endswith(b"/chat/completions"):
            await self._send(conn, stream, 404, b'{"error": "not found"}')
            return True
        try:
            body = json.loads(raw)
        except ValueError:
            await self._send(conn, stream, 400, b'{"error": "body is not JSON"}')
            return True
        record = RecordedRequest(
            body=body,
            started=trio.current_time(),
            headers={k.decode().lower(): v.decode("latin-1") for k, v in request.headers},
        )
        self.requests.append(record)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = self.latency(body) if callable(self.latency) else self.latency
            if delay:
                await trio.sleep(delay)
            fault = self.faults.pop(0) if self.faults else None
            if fault is None and self.fault_for is not None:
                fault = self.fault_for(body)
            record.fault = fault
            if fault is not None and fault.drop:
                return False
            if fault is not None and fault.content is None:
                headers = []
                if fault.retry_after is not None:
                    headers.append(("retry-after", str(fault.retry_after)))
                await self._send(
                    conn,
                    stream,
                    fault.status,
                    json.dumps({"error": {"message": f"injected {fault.status}"}}).encode(),
                    headers,
                )
                return True
            content = (
                fault.content
                if fault is not None and fault.content is not None
                else (self.policy(body))
            )
            prompt_chars = sum(len(str(m.get("content") or "")) for m in body["messages"])
            reply = {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": fault.finish_reason if fault is not None else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_chars // 4 + 1,
                    "completion_tokens": len(content) // 4 + 1,
                    "total_tokens": prompt_chars // 4 + len(content) // 4 + 2,
                },
            }
            if not self.include_usage:
                del reply["usage"]
            await self._send(conn, stream, 200, json.dumps(reply).encode())
            return True
        finally:
            record.finished = trio.current_time()
            self.in_flight -= 1


async def _serve_forever(port: int, latency: float) -> None:
    server = FakeLLMServer(latency=latency or None)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(server.serve, port=port))
        print(f"scripted OpenAI-compatible server at {url} (Ctrl-C to stop)", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m fgo_actors.testing [--port N] [--latency S]``: a scripted server for demos."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fgo_actors.testing", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve_forever, args.port, args.latency)


if __name__ == "__main__":
    main()
