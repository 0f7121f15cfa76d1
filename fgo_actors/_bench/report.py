"""A bench's outputs: the markdown table, the plot, and bench.json."""

from __future__ import annotations

import io
import math
from pathlib import Path

from .._core.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
)
from .records import TRAIN_FILE, BenchResult


def _p(p: float) -> str:
    """A p-value to three places, or to two significant digits below 0.001
    (0.000 would read as impossible)."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.2g}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown_table(result: BenchResult) -> str:
    """The comparison as a Markdown table, with a line saying what was measured."""
    lines = [
        "| arm | held-out success [95% CI] | score | vs base (only arm / only base, p) "
        "| optimization tokens (prompt + completion) | LLM calls | optimization wall s "
        "| module (rules / functions / tokens) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in result.arms:
        e = arm.evaluation
        if e is None:
            success = score = "failed"
        else:
            lo, hi = e.success_ci
            success = (
                f"{e.successes}/{e.episodes} = {_pct(e.success_rate)} [{_pct(lo)}, {_pct(hi)}]"
            )
            score = f"{e.score_mean:.3f}"
        v = arm.versus_base
        versus = "-" if v is None else f"{v.only_a} / {v.only_b}, p = {_p(v.p_value)}"
        spent = arm.optimization_spent
        if spent is None:
            tokens = calls = wall = "-"
        else:
            tokens = f"{spent.total_tokens} ({spent.prompt_tokens} + {spent.completion_tokens})"
            calls = str(arm.optimization_calls)
            seconds = arm.optimization_wall_seconds
            wall = "-" if seconds is None else f"{seconds:.0f}"
        m = arm.module
        size = (
            "-"
            if m is None
            else f"{len(m.rules)} / {len(m.functions)} / "
            + ("?" if arm.module_tokens is None else str(arm.module_tokens))
        )
        lines.append(
            f"| {arm.name} | {success} | {score} | {versus} | {tokens} | {calls} | {wall} "
            f"| {size} |"
        )
    solved = sum(t.outcome.success for t in result.train)
    if result.config.get("policy") == "oracle":
        played = (
            "played by the oracle policy (the gold path, with up to "
            f"{100 * float(result.config.get('epsilon') or 0):.0f}% random valid actions)"
        )
    else:
        played = "played with the base module"
    runs = f" over {result.runs} runs" if result.runs > 1 else ""
    lines += [
        "",
        f"Optimized from {len(result.train)} training episodes ({solved} solved) {played}; "
        f"held-out: {len(result.config['test'])} tasks, at most "
        f"{result.config['max_steps']} agent turns each. Whole bench: "
        f"{result.wall_seconds / 60:.1f} min{runs}.",
    ]
    errors = [f"- {a.name}: {a.error}" for a in result.arms if a.error]
    if errors:
        lines += ["", "Failed arms:", *errors]
    return "\n".join(lines) + "\n"


def plot_png(result: BenchResult, path: Path) -> None:
    """Success rate (with its 95% interval) against optimization tokens, one point per arm.

    Rendered in memory, then written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        for arm in result.arms:
            e = arm.evaluation
            if e is None:
                continue
            x = arm.optimization_tokens
            lo, hi = e.success_ci
            ax.errorbar(
                [x],
                [e.success_rate],
                yerr=[[e.success_rate - lo], [hi - e.success_rate]],
                fmt="o",
                capsize=4,
                label=f"{arm.name} ({e.successes}/{e.episodes})",
            )
            ax.annotate(arm.name, (x, e.success_rate), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel("optimization tokens (prompt + completion)")
        ax.set_ylabel("held-out success rate (95% CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"fgo bench: {len(result.config['test'])} held-out tasks")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, image.getvalue())


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """Write bench.json, bench.md, bench.png, the modules, the optimization run
    reports and every episode; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "bench.json",
        "markdown": out_dir / "bench.md",
        "plot": out_dir / "bench.png",
        "train": out_dir / TRAIN_FILE,
        "episodes": out_dir / "episodes.jsonl",
    }
    atomic_write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], markdown_table(result))
    atomic_write_jsonl(paths["train"], [t.to_json() for t in result.train])
    atomic_write_jsonl(
        paths["episodes"],
        [
            {**t.to_json(), "id": f"{name}/{t.id}"}
            for name, played in result.episodes.items()
            for t in played
        ],
    )
    for arm in result.arms:
        if arm.module is not None:
            target = out_dir / "modules" / f"{arm.name}.json"
            atomic_write_json(target, arm.module.to_json())
            paths[f"module:{arm.name}"] = target
        if arm.optimization is not None:  # the run report: merge tree, failures, tokens
            target = out_dir / "reports" / f"{arm.name}.json"
            atomic_write_json(target, arm.report_json or arm.optimization.to_json())
            paths[f"report:{arm.name}"] = target
    plot_png(result, paths["plot"])
    return paths


def format_eta(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "estimating"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
