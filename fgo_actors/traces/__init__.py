"""OpenTelemetry traces in: OTLP/JSON exports as trajectories.

- ``otlp``: OTLP/JSON text (JSON Lines or one document, hex or base64 ids)
  parsed with ``opentelemetry-proto`` into flat :class:`Span` records, and
  spec OTLP/JSON written back (:func:`to_otlp_json`);
- ``conventions``: one span read with the OpenTelemetry GenAI or the
  OpenInference attribute conventions;
- ``convert``: spans joined by trace id (:class:`TraceSet`) and each trace
  turned into a trajectory, or skipped with a counted reason;
- ``pending``: traces waiting for their outcome or the rest of their spans,
  bounded in time and count (the daemon's ``POST /v1/traces``);
- ``issues``: the record of what was skipped or repaired, and why.

Needs the ``otel`` extra (``pip install 'fgo-actors[otel]'``); nothing else
in the package imports this one, so the rest works without it.
"""

from .convert import DEFAULT_MAX_CHARS as DEFAULT_MAX_CHARS
from .convert import FORMATS as FORMATS
from .convert import Converted as Converted
from .convert import Feedback as Feedback
from .convert import Format as Format
from .convert import OutcomeRule as OutcomeRule
from .convert import Summary as Summary
from .convert import TraceSet as TraceSet
from .convert import convert_trace as convert_trace
from .convert import parse_score as parse_score
from .convert import parse_success as parse_success
from .convert import read_feedback as read_feedback
from .convert import summarize as summarize
from .issues import REASONS as REASONS
from .issues import Issue as Issue
from .otlp import OTLPRead as OTLPRead
from .otlp import Span as Span
from .otlp import SpanEvent as SpanEvent
from .otlp import parse_otlp_json as parse_otlp_json
from .otlp import read_otlp_text as read_otlp_text
from .otlp import span_from_json as span_from_json
from .otlp import span_to_json as span_to_json
from .otlp import spans_of as spans_of
from .otlp import to_otlp_json as to_otlp_json
from .pending import Due as Due
from .pending import Waiting as Waiting
