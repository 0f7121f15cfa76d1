"""``fgo import-traces``: OpenTelemetry trace exports (OTLP/JSON) as trajectory JSONL.

The conversion is ``fgo_actors.traces`` (pure); this module reads the files,
writes the output atomically and reports what was skipped or repaired. The
``traces`` package needs the otel extra, so it is imported only when the
command runs: the rest of ``fgo`` works without it, and this command says
what to install.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, cast

import click
import structlog
from rich.console import Console
from rich.markup import escape

from .._core.io import atomic_write_jsonl
from .common import EXIT_BAD_INPUT, Fail, _check_outputs, _positive, start_command

if TYPE_CHECKING:
    from ..traces import Summary

# The --format choices; fgo_actors.traces.FORMATS (checked by a test), repeated
# here so that `fgo --help` needs no otel packages.
FORMAT_CHOICES = ("auto", "otlp-json", "openinference")
# fgo_actors.traces.DEFAULT_MAX_CHARS, likewise.
DEFAULT_MAX_CONTENT_CHARS = 20_000
INSTALL_HINT = "pip install 'fgo-actors[otel]'"
# The packages the otel extra brings (protobuf comes with opentelemetry-proto).
_OTEL_MODULES = ("opentelemetry", "openinference", "google")


def missing_extra(error: ImportError, fail: Fail) -> NoReturn:
    """Exit saying which extra to install, when ``error`` is a missing otel
    package (any other ImportError is a bug, and raised as it is)."""
    if not (error.name or "").startswith(_OTEL_MODULES):
        raise error
    fail(
        EXIT_BAD_INPUT,
        "missing dependency",
        escape(
            f"fgo import-traces needs the otel extra ({error.name} is not installed): "
            + INSTALL_HINT
        ),
    )


def _check_outcome_flags(
    success_attr: str | None,
    score_attr: str | None,
    success_threshold: float | None,
    feedback: Path | None,
) -> None:
    """Bad usage (exit 2) when the flags cannot give any trace an outcome."""
    if success_threshold is not None and not (score_attr or feedback):
        raise click.UsageError("--success-threshold needs scores: --score-attr or --feedback")
    if not (success_attr or score_attr or feedback):
        raise click.UsageError(
            "no outcome source: pass --success-attr ATTR (a span or resource attribute "
            "holding true/false), --score-attr ATTR with --success-threshold X, or "
            "--feedback FILE (JSON Lines keyed by trace_id); an outcome is never invented"
        )
    if score_attr and success_threshold is None and not (success_attr or feedback):
        raise click.UsageError(
            "--score-attr alone does not say which runs succeeded: add --success-threshold X "
            "(success is score >= X), --success-attr or --feedback"
        )


def _read_text(path: Path) -> str:
    """A file's text (UTF-8, a byte-order mark dropped); OSError or
    UnicodeDecodeError when it cannot be had."""
    return path.read_bytes().decode("utf-8-sig")


def _summary_lines(summary: Summary, reasons: dict[str, str], out: Path) -> list[str]:
    """The summary as people read it (rich markup escaped)."""
    traces = "trace" if summary.traces == 1 else "traces"
    written = "trajectory" if summary.written == 1 else "trajectories"
    head = f"{summary.traces} {traces} read: {summary.written} {written} written"
    if summary.written:
        head += f" to {escape(str(out))}"
    if summary.skipped:
        head += f", {summary.skipped} skipped"
    lines = [head]
    for reason, count in summary.counts.items():
        lines.append(f"  {reason}: {count} ({escape(reasons.get(reason, reason))})")
        examples = summary.examples.get(reason, ())
        lines += [f"      {escape(str(issue))}" for issue in examples]
        if count > len(examples):
            lines.append(f"      ... and {count - len(examples)} more")
    if summary.unmatched_feedback:
        lines.append(f"  feedback records that matched no trace: {summary.unmatched_feedback}")
    return lines


@click.command("import-traces")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMAT_CHOICES),
    default="auto",
    show_default=True,
    help="The spans' attributes: otlp-json: the OpenTelemetry GenAI semantic conventions "
    "(gen_ai.*); openinference: OpenInference (openinference.span.kind, llm.*); auto: "
    "OpenInference for a trace that has its span kind, else GenAI. The files are OTLP/JSON "
    "either way (JSON Lines, as the collector's file exporter writes, or one document).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The trajectory JSONL to write (atomically; fgo optimize's input).",
)
@click.option(
    "--success-attr",
    metavar="ATTR",
    help="A span or resource attribute holding each run's success (a bool, true/false or "
    "1/0): the agent run span's first, then the latest-ending span's, then the resource's.",
)
@click.option(
    "--score-attr", metavar="ATTR", help="A span or resource attribute holding a score (a number)."
)
@click.option(
    "--success-threshold",
    type=float,
    metavar="X",
    help="With scores: a run without a success value succeeded if its score >= X.",
)
@click.option(
    "--feedback",
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSON Lines of {"trace_id", "success", "score", "feedback"} (each but trace_id '
    "optional); it wins over the attributes, field by field.",
)
@click.option(
    "--max-content-chars",
    type=int,
    default=DEFAULT_MAX_CONTENT_CHARS,
    show_default=True,
    callback=_positive,
    help="A message's text (or a tool call's arguments, or the task) longer than this is cut, "
    "and counted.",
)
@click.option("--log-json", is_flag=True, help="The summary as one JSON line on stderr.")
def import_traces_command(
    files: tuple[Path, ...],
    fmt: str,
    out: Path,
    success_attr: str | None,
    score_attr: str | None,
    success_threshold: float | None,
    feedback: Path | None,
    max_content_chars: int,
    log_json: bool,
) -> None:
    """Convert OpenTelemetry traces (OTLP/JSON FILE...) into trajectories.

    Each trace becomes one trajectory (its id is the trace id; spans of one
    trace in several files are joined). Every trajectory needs an outcome,
    from --success-attr, --score-attr with --success-threshold, or --feedback;
    a trace without one is skipped, never given one. Bad lines, spans and
    traces are skipped or repaired and counted; the summary goes to stderr.
    Exit 0 when something was written; 2 on bad usage or when nothing was.
    """
    _, err, fail = start_command(log_json)
    _check_outcome_flags(success_attr, score_attr, success_threshold, feedback)
    try:
        from ..traces import (
            REASONS,
            Feedback,
            Format,
            Issue,
            OutcomeRule,
            TraceSet,
            convert_trace,
            read_feedback,
            read_otlp_text,
            summarize,
        )
    except ImportError as e:
        missing_extra(e, fail)
    _check_outputs(err, out)
    resolved_out = os.path.realpath(out)
    for path in files:
        if os.path.realpath(path) == resolved_out:
            fail(EXIT_BAD_INPUT, "error", f"--out {out} is also an input file")

    problems: list[Issue] = []
    records: dict[str, Feedback] = {}
    if feedback is not None:
        try:
            text = _read_text(feedback)
        except (OSError, UnicodeDecodeError) as e:
            fail(EXIT_BAD_INPUT, "error", f"cannot read --feedback {feedback}: {e}")
        records, bad_feedback = read_feedback(text, str(feedback))
        problems += bad_feedback

    joined = TraceSet()
    for path in files:
        try:
            text = _read_text(path)
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            problems.append(Issue("unreadable_file", f"cannot read: {reason}", str(path)))
            continue
        read = read_otlp_text(text, str(path))
        problems += read.problems
        joined.add(read.spans)
    problems += joined.duplicates

    rule = OutcomeRule(
        success_attr=success_attr,
        score_attr=score_attr,
        success_threshold=success_threshold,
        feedback=records,
    )
    converted = [
        convert_trace(t, joined.spans(t), rule, fmt=cast(Format, fmt), max_chars=max_content_chars)
        for t in joined.trace_ids()
    ]
    summary = summarize(converted, problems, feedback=records)
    trajectories = [c.trajectory.to_json() for c in converted if c.trajectory is not None]
    if trajectories:
        atomic_write_jsonl(out, trajectories)
    _report(err, summary, REASONS, out, log_json)
    if not trajectories:
        why = "the input holds no traces" if not summary.traces else "every trace was skipped"
        fail(EXIT_BAD_INPUT, "nothing written", f"{why}; {out} was not written")
    click.echo(f"trajectories: {out} ({summary.written})")


def _report(
    err: Console, summary: Summary, reasons: dict[str, str], out: Path, log_json: bool
) -> None:
    """The summary: one JSON log event with --log-json, else lines for people."""
    if log_json:
        structlog.get_logger().info("traces_imported", out=str(out), **summary.to_json())
        return
    for line in _summary_lines(summary, reasons, out):
        err.print(line, highlight=False)
