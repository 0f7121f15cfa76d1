"""OTLP/JSON trace exports in, flat span records out (and spec OTLP/JSON back).

The wire format is the real one: each document is parsed by protobuf's
``json_format`` into ``TracesData`` from ``opentelemetry-proto``, not walked
by hand. One thing must be done before that: OTLP/JSON writes trace and span
ids as hex (as the collector's file exporter does), while proto3 JSON reads
``bytes`` fields as base64. Both alphabets overlap, so a 32-character hex
trace id parses without complaint as 24 wrong bytes. The ids are therefore
rewritten from hex to base64 first; an id already in base64 (what
``MessageToJson`` writes) is told apart by its length and left alone.

The records here (:class:`Span`) hold plain Python values, so the conversion
in :mod:`.convert` needs no protobuf and a caller holding an
``ExportTraceServiceRequest`` (the daemon's future ``POST /v1/traces``) can
use :func:`spans_of` directly.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from .._core.io import JSONTooDeepError, loads
from .issues import Issue

# An attribute's value, as OTLP's AnyValue holds it.
AttrValue = str | bool | int | float | bytes | list[Any] | dict[str, Any] | None

TRACE_ID_BYTES = 16
SPAN_ID_BYTES = 8
_HEX = re.compile(r"[0-9a-fA-F]*")

# The id fields of a span and of its links, in both spellings json_format
# accepts (lowerCamelCase as OTLP/JSON writes it, and the proto field names).
_SPAN_ID_FIELDS = {
    "traceId": TRACE_ID_BYTES,
    "trace_id": TRACE_ID_BYTES,
    "spanId": SPAN_ID_BYTES,
    "span_id": SPAN_ID_BYTES,
    "parentSpanId": SPAN_ID_BYTES,
    "parent_span_id": SPAN_ID_BYTES,
}


@attrs.frozen
class SpanEvent:
    """A span event: its name, time and attributes (older GenAI conventions put
    the messages here)."""

    name: str
    time_ns: int
    attributes: Mapping[str, AttrValue]


@attrs.frozen
class Span:
    """One span, flattened out of its resource and scope.

    ``trace_id`` and ``span_id`` are lowercase hex; ``parent_id`` is None for a
    root. ``file`` and ``line`` say where it was read (``line`` is None for a
    span that came from a request rather than a file).
    """

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, AttrValue]
    events: tuple[SpanEvent, ...] = ()
    resource: Mapping[str, AttrValue] = attrs.field(factory=dict)
    file: str = ""
    line: int | None = None

    @property
    def where(self) -> str:
        """``file:line``, as the summary names it."""
        return f"{self.file}:{self.line}" if self.line is not None else self.file


@attrs.frozen
class OTLPRead:
    """What one file's text held: its spans, the documents (lines) that were
    read, and the problems met (each line that could not be read is skipped)."""

    spans: tuple[Span, ...]
    documents: int
    problems: tuple[Issue, ...]


class OTLPFormatError(ValueError):
    """A JSON document that is not OTLP/JSON trace data."""


def _hex_to_base64(value: object, size: int) -> object:
    """``value`` in base64 if it is a hex id of ``size`` bytes, else unchanged."""
    if isinstance(value, str) and len(value) == 2 * size and _HEX.fullmatch(value):
        return base64.b64encode(bytes.fromhex(value)).decode("ascii")
    return value


def _items(obj: Mapping[str, Any], *names: str) -> list[Any]:
    """The list under the first of ``names`` that ``obj`` has (a wrong type: none)."""
    for name in names:
        value = obj.get(name)
        if isinstance(value, list):
            return value
    return []


def _ids_to_base64(doc: Mapping[str, Any]) -> None:
    """Rewrite, in place, the hex ids of every span and link in ``doc``."""
    for resource_spans in _items(doc, "resourceSpans", "resource_spans"):
        if not isinstance(resource_spans, dict):
            continue
        for scope_spans in _items(resource_spans, "scopeSpans", "scope_spans"):
            if not isinstance(scope_spans, dict):
                continue
            for span in _items(scope_spans, "spans"):
                if not isinstance(span, dict):
                    continue
                for target in (span, *_items(span, "links")):
                    if not isinstance(target, dict):
                        continue
                    for name, size in _SPAN_ID_FIELDS.items():
                        if name in target:
                            target[name] = _hex_to_base64(target[name], size)


def parse_otlp_json(doc: object) -> TracesData:
    """One OTLP/JSON document (``{"resourceSpans": [...]}``, already loaded
    from JSON) as ``TracesData``; ids may be hex (the spec) or base64.

    Unknown fields are ignored, as OTLP asks receivers to do, so a newer
    exporter's additions do not make a line unreadable. OTLPFormatError when
    it is not trace data at all.
    """
    if not isinstance(doc, dict):
        raise OTLPFormatError(f"expected a JSON object, got {type(doc).__name__}")
    if not any(k in doc for k in ("resourceSpans", "resource_spans")):
        raise OTLPFormatError("no resourceSpans: not an OTLP/JSON trace export")
    _ids_to_base64(doc)
    try:
        return json_format.ParseDict(doc, TracesData(), ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise OTLPFormatError(str(e)) from e


def _value(v: AnyValue) -> AttrValue:
    """An AnyValue as a plain Python value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    value: AttrValue = getattr(v, which)
    return value


def _attributes(kvs: Iterator[KeyValue] | Any) -> dict[str, AttrValue]:
    return {kv.key: _value(kv.value) for kv in kvs}


def spans_of(
    data: TracesData | ExportTraceServiceRequest, *, file: str = "", line: int | None = None
) -> tuple[list[Span], list[Issue]]:
    """The spans in ``data`` (a parsed file line, or a collector request), and
    an issue for each span whose ids are not valid (that span is skipped)."""
    spans: list[Span] = []
    problems: list[Issue] = []
    where = f"{file}:{line}" if line is not None else file
    for resource_spans in data.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                bad = _bad_ids(s.trace_id, s.span_id, s.parent_span_id)
                if bad:
                    problems.append(
                        Issue("bad_span", f"span {s.name!r}: {bad}; the span is skipped", where)
                    )
                    continue
                spans.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_attributes(s.attributes),
                        events=tuple(
                            SpanEvent(e.name, e.time_unix_nano, _attributes(e.attributes))
                            for e in s.events
                        ),
                        resource=resource,
                        file=file,
                        line=line,
                    )
                )
    return spans, problems


def _bad_ids(trace_id: bytes, span_id: bytes, parent_id: bytes) -> str | None:
    """Why a span's ids are not valid OTLP ids, or None."""
    if len(trace_id) != TRACE_ID_BYTES or not any(trace_id):
        return f"trace id must be {TRACE_ID_BYTES} bytes, not all zero (got {len(trace_id)})"
    if len(span_id) != SPAN_ID_BYTES or not any(span_id):
        return f"span id must be {SPAN_ID_BYTES} bytes, not all zero (got {len(span_id)})"
    if parent_id and len(parent_id) != SPAN_ID_BYTES:
        return f"parent span id must be {SPAN_ID_BYTES} bytes (got {len(parent_id)})"
    return None


def _documents(text: str) -> Iterator[tuple[int, object | Issue]]:
    """(line, loaded JSON or the Issue why not) for each document in ``text``.

    The collector's file exporter writes JSON Lines; a single pretty-printed
    document is read as one. JSON Lines is assumed when the first non-blank
    line is a JSON value on its own; otherwise the whole text is tried as one
    document, and if that fails too each line is tried, with the whole
    document's error reported once when no line parses at all.
    """
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return
    if not _parses(lines[first]):
        try:
            yield first + 1, loads(text)
            return
        except (json.JSONDecodeError, JSONTooDeepError) as e:
            whole = e
    else:
        whole = None
    results: list[tuple[int, object | Issue]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            results.append((i, loads(line)))
        except json.JSONDecodeError as e:
            results.append((i, Issue("malformed_json", f"{e.msg} at column {e.colno}")))
        except JSONTooDeepError as e:
            results.append((i, Issue("malformed_json", f"refused JSON: {e}")))
    if whole is not None and all(isinstance(r, Issue) for _, r in results):
        if isinstance(whole, json.JSONDecodeError):
            yield whole.lineno, Issue("malformed_json", f"{whole.msg} at column {whole.colno}")
        else:
            yield first + 1, Issue("malformed_json", f"refused JSON: {whole}")
        return
    yield from results


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def read_otlp_text(text: str, file: str) -> OTLPRead:
    """Every span in one file's text (OTLP/JSON, as JSON Lines or one document).

    A line that is not JSON, or not OTLP trace data, is skipped and reported
    with ``file:line``; the other lines are read all the same.
    """
    spans: list[Span] = []
    problems: list[Issue] = []
    documents = 0
    for line, doc in _documents(text):
        where = f"{file}:{line}"
        if isinstance(doc, Issue):
            problems.append(attrs.evolve(doc, where=where))
            continue
        try:
            data = parse_otlp_json(doc)
        except OTLPFormatError as e:
            problems.append(Issue("not_otlp", str(e), where))
            continue
        documents += 1
        found, bad = spans_of(data, file=file, line=line)
        spans += found
        problems += bad
    return OTLPRead(tuple(spans), documents, tuple(problems))


def _base64_to_hex(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return value


def to_otlp_json(message: Message) -> dict[str, Any]:
    """``message`` (TracesData or ExportTraceServiceRequest) as spec OTLP/JSON:
    lowerCamelCase names, enums as integers and trace and span ids as hex, not
    the base64 that ``MessageToDict`` writes for bytes."""
    doc: dict[str, Any] = json_format.MessageToDict(message, use_integers_for_enums=True)
    for resource_spans in _items(doc, "resourceSpans"):
        for scope_spans in _items(resource_spans, "scopeSpans"):
            for span in _items(scope_spans, "spans"):
                for target in (span, *_items(span, "links")):
                    for name in ("traceId", "spanId", "parentSpanId"):
                        if name in target:
                            target[name] = _base64_to_hex(target[name])
    return doc


# ---------------------------------------------------------------------------
# spans kept on disk (the daemon's traces waiting for their outcome)
# ---------------------------------------------------------------------------

_BYTES_TAG = "$bytes"


def _plain(value: AttrValue) -> Any:
    if isinstance(value, bytes):
        return {_BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _unplain(value: Any) -> AttrValue:
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG} and isinstance(value[_BYTES_TAG], str):
            return base64.b64decode(value[_BYTES_TAG])
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    result: AttrValue = value
    return result


def span_to_json(span: Span) -> dict[str, Any]:
    """``span`` as a JSON object that :func:`span_from_json` reads back equal
    (bytes values, which JSON has not, are tagged)."""
    return {
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_id": span.parent_id,
        "name": span.name,
        "start_ns": span.start_ns,
        "end_ns": span.end_ns,
        "attributes": _plain(dict(span.attributes)),
        "events": [
            {"name": e.name, "time_ns": e.time_ns, "attributes": _plain(dict(e.attributes))}
            for e in span.events
        ],
        "resource": _plain(dict(span.resource)),
        "file": span.file,
        "line": span.line,
    }


def span_from_json(obj: Mapping[str, Any]) -> Span:
    """The span :func:`span_to_json` wrote."""
    return Span(
        trace_id=obj["trace_id"],
        span_id=obj["span_id"],
        parent_id=obj["parent_id"],
        name=obj["name"],
        start_ns=obj["start_ns"],
        end_ns=obj["end_ns"],
        attributes=_unplain(obj["attributes"]),  # type: ignore[arg-type]
        events=tuple(
            SpanEvent(e["name"], e["time_ns"], _unplain(e["attributes"]))  # type: ignore[arg-type]
            for e in obj["events"]
        ),
        resource=_unplain(obj["resource"]),  # type: ignore[arg-type]
        file=obj["file"],
        line=obj["line"],
    )
