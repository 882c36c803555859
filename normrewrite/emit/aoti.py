"""Compiled torch artifacts: AOTInductor packages of the rewritten model.

``torch._inductor.aoti_compile_and_package`` turns a ``torch.export`` program into a ``.pt2``
zip holding a compiled shared library (C++ for CPU, C++/CUDA for GPU) and the weights; it runs
with ``torch._inductor.aoti_load_package(path)(*inputs)`` — no model code, no normrewrite — or
from C++ (``AOTIModelPackageLoader``). The package is specialised to one device and to the
example shapes (the program's dynamic dims stay dynamic).

Which outputs are compiled (``convert --compile aoti --device cpu|cuda``, or
``normrewrite.convert(..., compile="aoti", device=...)``):

* an output named ``*.aoti.pt2`` is always an AOTInductor package;
* with ``--compile aoti`` every other ``.pt2`` output is one too (plain ``torch.export`` programs
  otherwise), so ``-o m.pt2 -o m.aoti.pt2`` writes both kinds in one run.

The package is checked before it is renamed into place: it is loaded back and its outputs are
compared with the original model's (like the ONNX parity check). Needs a C++ compiler; ``cuda``
also needs a CUDA build of torch and a visible GPU, else it fails at once with one line.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from normrewrite.emit.files import atomic_file
from normrewrite.errors import EmitError, UsageError, VerifyError, first_line
from normrewrite.report import OutputReport
from normrewrite.verify import Comparison, compare, tensor_leaves

Device = Literal["cpu", "cuda"]
AOTI_SUFFIX = ".aoti.pt2"


@dataclass(frozen=True)
class CompileResult:
    path: str
    device: str
    seconds: float  # compile + package time
    parity: Comparison | None  # the loaded package vs the reference outputs


def is_aoti_output(path: Path | str, compile: str | None) -> bool:
    """Does this output path get an AOTInductor package (see the module docstring)?"""
    name = str(path)
    return name.endswith(AOTI_SUFFIX) or (compile == "aoti" and name.endswith(".pt2"))


def output_formats(paths: Sequence[Path], formats: Sequence[str], compile: str | None) -> list[str]:
    """``formats`` with AOTInductor outputs marked ``"aoti"``; ``--compile aoti`` needs one."""
    out = ["aoti" if is_aoti_output(p, compile) else f for p, f in zip(paths, formats, strict=True)]
    if compile == "aoti" and "aoti" not in out:
        raise UsageError("--compile aoti needs a .pt2 output (-o NAME.pt2 or NAME.aoti.pt2)")
    return out


def check_compile_options(compile: str | None, device: str) -> None:
    """Reject bad combinations up front, before anything is loaded."""
    if compile not in (None, "none", "aoti"):
        raise UsageError(f"unknown --compile {compile!r} (use aoti)")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {device!r} (use cpu or cuda)")
    if device == "cuda":
        check_cuda()


def check_cuda() -> None:
    if torch.version.cuda is None:
        raise EmitError(
            f"--device cuda needs a CUDA build of torch; this one ({torch.__version__}) has no CUDA toolchain"
        )
    if not torch.cuda.is_available():
        raise EmitError("--device cuda: torch was built with CUDA but no CUDA device is visible")


def _to(value: Any, device: str) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def program_for(
    ep: ExportedProgram, inputs: tuple[Any, ...], device: str
) -> tuple[ExportedProgram, tuple[Any, ...]]:
    """The program and inputs on ``device`` (re-exported when it is not the CPU)."""
    if device == "cpu":
        return ep, tuple(inputs)
    check_cuda()
    module = ep.module().to(device)
    moved = _to(tuple(inputs), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, moved, strict=False), moved


def compile_aoti(
    ep: ExportedProgram,
    dest: Path,
    inputs: tuple[Any, ...],
    *,
    device: str = "cpu",
    reference: list[torch.Tensor] | None = None,
    check: Callable[[Comparison], None] | None = None,
) -> CompileResult:
    """Compile ``ep`` with AOTInductor for ``device`` and write the package to ``dest``.

    With ``reference`` outputs, the package is loaded back, run on ``inputs`` and compared;
    ``check`` may raise to reject it (nothing is written then)."""
    check_compile_options("aoti", device)
    program, moved = program_for(ep, inputs, device)
    start = time.perf_counter()
    parity = None
    with atomic_file(dest) as tmp:
        staged = tmp.with_name(tmp.name + ".pt2")  # the packager wants a .pt2 name
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
        except Exception as e:
            staged.unlink(missing_ok=True)
            raise EmitError(
                f"AOTInductor compilation for {device} failed: {type(e).__name__}: {first_line(e)}"
            ) from e
        seconds = time.perf_counter() - start
        try:
            if reference is not None:
                parity = compare(reference, run_package(staged, moved))
                if check is not None:
                    check(parity)
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return CompileResult(str(dest), device, seconds, parity)


def write_aoti(
    ep: ExportedProgram,
    dest: Path,
    inputs: tuple[Any, ...],
    *,
    device: str,
    reference: list[torch.Tensor] | None,
    rtol: float,
    exact: bool,
    timings: dict[str, float] | None = None,
) -> OutputReport:
    """``convert``'s AOTInductor output: compile, check parity (gated like ONNX for exact
    pipelines), and describe it for the report."""

    def gate(cmp: Comparison) -> None:
        tol = max(rtol, 1e-4)
        if exact and not cmp.within(tol):
            raise VerifyError(
                f"the AOTInductor package {dest} differs from the original model: max rel err "
                f"{cmp.max_rel_err:.3g} > {tol:g}; nothing written"
            )

    r = compile_aoti(ep, dest, inputs, device=device, reference=reference, check=gate)
    if timings is not None:
        timings["compile"] = timings.get("compile", 0.0) + r.seconds
    note = f"AOTInductor package for {device}, compiled in {r.seconds:.1f} s"
    if r.parity is not None:
        note += f"; max rel err vs the original {r.parity.max_rel_err:.3g}"
    return OutputReport(r.path, "aoti", notes=[note])


def load_package(path: Path | str) -> Callable[..., Any]:
    """The compiled model in a package: call it like the original (positional inputs)."""
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as e:
        raise EmitError(
            f"cannot load the AOTInductor package {path}: {type(e).__name__}: {first_line(e)}"
        ) from e


def run_package(path: Path | str, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    runner = load_package(path)
    with torch.no_grad():
        return [t.cpu() for t in tensor_leaves(runner(*inputs))]


__all__ = [
    "AOTI_SUFFIX",
    "CompileResult",
    "check_compile_options",
    "check_cuda",
    "compile_aoti",
    "is_aoti_output",
    "load_package",
    "output_formats",
    "run_package",
    "write_aoti",
]
