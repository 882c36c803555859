"""The CLI's terminal rendering: the conversion report, ``inspect``'s table and the pass list.

On a terminal, rich lays tables out to its width and wraps long cells at word boundaries; when
stdout (or stderr) is not a terminal — piped, redirected, under a test runner — the consoles are
wide and soft-wrapping (:func:`console`), so module names, notes and messages come out whole,
never cut at 80 columns. Columns holding names fold rather than end in an ellipsis either way.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normrewrite.report import Report

PIPE_WIDTH = 100_000  # "no limit" for output that is not a terminal: nothing wraps or is cut


def console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """A console for stdout (or stderr): the terminal's width on a terminal, otherwise unlimited
    width with soft wrapping (full lines for pipes, files and tools reading the output)."""
    c = Console(stderr=stderr, quiet=quiet, highlight=False)
    if c.is_terminal:
        return c
    return Console(stderr=stderr, quiet=quiet, highlight=False, width=PIPE_WIDTH, soft_wrap=True)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def no_changes(report: Report) -> bool:
    """No pass of the run changed the model."""
    return not any(p.modified for p in report.passes)


def render_report(report: Report, out: Console, *, max_rows: int = 12) -> None:
    """The conversion report: header, notes, one row per pass, then the summary."""
    out.print(
        f"[bold]{escape(report.model)}[/]  traced with [cyan]{report.tracer}[/]  inputs "
        f"{', '.join(report.inputs)} ({report.input_origin})"
    )
    for note in report.notes:
        out.print(f"[yellow]note:[/] {escape(note)}")
    table = Table(title="passes", show_lines=False)
    table.add_column("pass", overflow="fold")
    table.add_column("kind")
    table.add_column("changed", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column("details", overflow="fold")
    for p in report.passes:
        details = [] if p.modified else ["[bold yellow]no changes[/]"]
        details += [escape(f"{c.target}: {c.detail}") for c in p.changes[:max_rows]]
        if len(p.changes) > max_rows:
            details.append(f"… {len(p.changes) - max_rows} more")
        details += [
            f"[yellow]skipped[/] {escape(f'{s.target}: {s.reason}')}" for s in p.skipped[:max_rows]
        ]
        if len(p.skipped) > max_rows:
            details.append(f"… {len(p.skipped) - max_rows} more skipped")
        details += [f"[dim]{escape(n)}[/]" for n in p.notes]
        table.add_row(
            escape(p.spec),
            "exact" if p.exact else "[magenta]approximate[/]",
            str(len(p.changes)),
            str(len(p.skipped)),
            "\n".join(details) or "-",
        )
    out.print(table)
    summary = Table(show_header=False, box=None)
    summary.add_column(overflow="fold")
    summary.add_column(overflow="fold")
    if report.passes and no_changes(report):
        summary.add_row("result", "[bold yellow]no changes: no pass changed the model[/]")
    summary.add_row("nodes", f"{report.nodes_before} → {report.nodes_after}")
    v = report.verify
    if v is None:
        summary.add_row("verify", "skipped")
    else:
        verdict = (
            "[green]passed[/]"
            if v.passed
            else "[red]FAILED[/]"
            if v.passed is False
            else "[magenta]approximate rewrite: measured, not judged[/]"
        )
        summary.add_row(
            "verify",
            f"max abs err {_fmt(v.max_abs_err)}, max rel err {_fmt(v.max_rel_err)} "
            f"(rtol {v.rtol:g}) {verdict}",
        )
        if v.nonfinite_introduced:
            summary.add_row(
                "", f"[red]{v.nonfinite_introduced} NaN/Inf values the original does not have[/]"
            )
        if v.unverified:
            outs = ", ".join(map(str, v.unverified_outputs))
            summary.add_row(
                "",
                f"[yellow]cannot verify {v.unverified} elements[/] (NaN/Inf in the original's output {outs})",
            )
    for o in report.outputs:
        extra = ""
        if o.onnx_max_rel_err is not None:
            extra = f" (onnxruntime vs original: max abs {_fmt(o.onnx_max_abs_err)}, rel {_fmt(o.onnx_max_rel_err)})"
        if o.notes:
            extra += escape(" (" + "; ".join(o.notes) + ")")
        summary.add_row("wrote", escape(f"{o.path} [{o.format}]") + extra)
    if report.program_outputs:
        kind = "tensors" if report.outputs_flattened else "the model's output class, fields"
        summary.add_row("returns", escape(f"{kind}: {', '.join(report.program_outputs)}"))
    out.print(summary)


def render_streamed(report: Report, summary: list[str], out: Console) -> None:
    """``convert --meta``: changes per pass, then what was written."""
    for p in report.passes:
        said = f"{len(p.changes)} changes" if p.modified else "[bold yellow]no changes[/]"
        out.print(f"[bold]{escape(p.spec)}[/]: {said}")
    if report.passes and no_changes(report):
        out.print("[bold yellow]no changes: no pass changed the model[/]")
    for line in summary:
        out.print(f"  {line}" if line is not summary[-1] else line, markup=False)


def _axes(n: Any) -> str:
    """``axes``, and the same axes in the model's layout when layout ops lie between."""
    axes = "?" if n.axes is None else ",".join(map(str, n.axes))
    if n.source_axes is None or (n.source_axes == n.axes and n.source_shape == n.shape):
        return axes
    shape = "x".join(map(str, n.source_shape or ()))
    return f"{axes} (= {','.join(map(str, n.source_axes))} of {shape})"


def render_inspect(result: Any, out: Console) -> None:
    """``inspect``: one row per norm layer, then the scale-invariance summary."""
    out.print(
        f"[bold]{escape(result.model)}[/]  traced with {result.tracer}, inputs {', '.join(result.inputs)}, "
        f"{result.nodes} ops, {len(result.norms)} norm layers"
    )
    table = Table()
    for col in (
        "block",
        "name",
        "kind",
        "placement",
        "shape",
        "axes",
        "eps",
        "affine",
        "what passes could do",
    ):
        table.add_column(col, overflow="fold")
    previous = None
    for n in result.norms:
        acts = "\n".join(f"{k}: {v}" for k, v in n.actions.items()) or "-"
        block = n.block or "-"
        table.add_row(
            escape("" if block == previous else block),
            escape(n.name),
            n.type,
            n.placement,
            "x".join(map(str, n.shape)) if n.shape else "?",
            _axes(n),
            "-" if n.eps is None else f"{n.eps:g}",
            (n.scale.replace("gamma", "γ") if n.scale != "none" else "-")
            + (" +β" if n.shift else ""),
            escape(acts),
        )
        previous = block
    out.print(table)
    si = result.scale_invariance
    if si:
        names = [
            f"{p['name']}" + (" (batch stats)" if p["condition"] == "batch-stats" else "")
            for p in si["scale_invariant"]
        ]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        out.print(
            f"scale invariance: {si['summary']}" + (f"; invariant: {shown}" if names else ""),
            markup=False,
        )
        for u in si["undecided"][:6]:
            out.print(f"  undecided {u['name']}: {u['reason']}", markup=False)


def render_passes(registry: Any, out: Console) -> None:
    """``normrewrite passes``: name, kind, option names and summary of every pass."""
    from normrewrite.core.pass_help import pass_help

    table = Table(show_header=True)
    table.add_column("pass", overflow="fold")
    table.add_column("kind")
    table.add_column("options", overflow="fold")
    table.add_column("what it does")
    for p in registry:
        options = ", ".join(o.name for o in pass_help(p).options) or "-"
        table.add_row(p.name, "exact" if p.exact else "approximate", options, escape(p.summary))
    out.print(table)
    out.print("normrewrite passes NAME: what a pass matches and its options")


def pass_help_text(h: Any, on_onnx: bool) -> str:
    """``normrewrite passes NAME`` as plain text (full lines whatever the terminal)."""
    kind = (
        "exact: preserves the model's function up to float rounding (verified; beyond --rtol "
        "nothing is written)"
        if h.exact
        else "approximate: changes the model; the report gives the measured output difference"
    )
    lines = [
        f"{h.name}: {h.summary}",
        "",
        f"kind: {kind}",
        f"usage: -p {h.name}" + ("[:option=value,...]" if h.options else ""),
    ]
    if on_onnx:
        lines.append("also runs on .onnx inputs (its ONNX form)")
    lines += ["", "options:" if h.options else "options: none"]
    for o in h.options:
        lines.append(f"  {o.name}  {o.type}  (default: {o.default})")
        lines += [f"      {line}" for line in o.meaning.splitlines()]
    lines += ["", "what it matches, its identity and preconditions:"]
    lines += [f"  {line}".rstrip() for line in h.description.splitlines()]
    return "\n".join(lines)
