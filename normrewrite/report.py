"""The conversion report: what each pass did, node counts, verification, outputs — the data and
its JSON form (the CLI renders it for the terminal: :mod:`normrewrite.cli_render`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    # the emitted program's outputs, in order (.pt2 / ONNX): plain tensors unless
    # --keep-output-classes (then the model's own output classes, with these fields)
    program_outputs: list[str] = field(default_factory=list)
    outputs_flattened: bool | None = None

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
