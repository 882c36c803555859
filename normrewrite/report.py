"""The conversion report: what each pass did, node counts, verification, output — as JSON and as
rich tables for the terminal."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normrewrite.core.pass_infra import Change, Skip


@dataclass
class PassReport:
    name: str
    spec: str
    exact: bool
    modified: bool
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class VerifyReport:
    max_abs_err: float
    max_rel_err: float
    rtol: float
    exact: bool  # all modifying passes claim exactness
    passed: bool | None  # None: approximate rewrite, error measured but not judged
    unverified: int = 0  # output elements NaN/Inf in the original: cannot be verified
    unverified_outputs: list[int] = field(default_factory=list)  # which outputs hold them
    nonfinite_introduced: int = 0  # NaN/Inf in the rewritten outputs where the original is finite


@dataclass
class OutputReport:
    path: str
    format: str
    onnx_max_abs_err: float | None = None
    onnx_max_rel_err: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    model: str
    source: str
    tracer: str
    inputs: list[str]
    input_origin: str
    passes: list[PassReport] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    verify: VerifyReport | None = None
    outputs: list[OutputReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.passes if p.modified)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["exact"] = self.exact
        data["output"] = data["outputs"][0] if data["outputs"] else None
        return _finite(data)


def save(report: Report, path: Path) -> None:
    """The report as JSON at ``path`` (atomically; staged in the run's output transaction)."""
    from normrewrite.emit.files import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report.to_json(), indent=2, default=str))


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: spell them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render(report: Report, console: Console, *, max_rows: int = 12) -> None:
    console.print(
        f"[bold]{report.model}[/]  traced with [cyan]{report.tracer}[/]  inputs "
        f"{', '.join(report.inputs)} ({report.input_origin})"
    )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    table = Table(title="passes", show_lines=False)
    table.add_column("pass")
    table.add_column("kind")
    table.add_column("changed", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column("details")
    for p in report.passes:
        details = [f"{c.target}: {c.detail}" for c in p.changes[:max_rows]]
        if len(p.changes) > max_rows:
            details.append(f"… {len(p.changes) - max_rows} more")
        details += [f"[yellow]skipped[/] {s.target}: {s.reason}" for s in p.skipped[:max_rows]]
        if len(p.skipped) > max_rows:
            details.append(f"… {len(p.skipped) - max_rows} more skipped")
        details += [f"[dim]{n}[/]" for n in p.notes]
        table.add_row(
            p.spec,
            "exact" if p.exact else "[magenta]approximate[/]",
            str(len(p.changes)),
            str(len(p.skipped)),
            "\n".join(details) or "-",
        )
    console.print(table)
    summary = Table(show_header=False, box=None)
    summary.add_row("nodes", f"{report.nodes_before} → {report.nodes_after}")
    v = report.verify
    if v is None:
        summary.add_row("verify", "skipped")
    else:
        verdict = (
            "[green]passed[/]" if v.passed else "[red]FAILED[/]" if v.passed is False
            else "[magenta]approximate rewrite: measured, not judged[/]"
        )
        summary.add_row(
            "verify",
            f"max abs err {_fmt(v.max_abs_err)}, max rel err {_fmt(v.max_rel_err)} "
            f"(rtol {v.rtol:g}) {verdict}",
        )
        if v.nonfinite_introduced:
            summary.add_row("", f"[red]{v.nonfinite_introduced} NaN/Inf values the original does not have[/]")
        if v.unverified:
            outs = ", ".join(map(str, v.unverified_outputs))
            summary.add_row(
                "", f"[yellow]cannot verify {v.unverified} elements[/] (NaN/Inf in the original's output {outs})"
            )
    for o in report.outputs:
        extra = ""
        if o.onnx_max_rel_err is not None:
            extra = f" (onnxruntime vs original: max abs {_fmt(o.onnx_max_abs_err)}, rel {_fmt(o.onnx_max_rel_err)})"
        if o.notes:
            extra += escape(" (" + "; ".join(o.notes) + ")")
        summary.add_row("wrote", escape(f"{o.path} [{o.format}]") + extra)
    console.print(summary)
