"""``normrewrite`` command line: a thin shell over :mod:`normrewrite.api`.

User errors (:class:`~normrewrite.errors.NormRewriteError`) print one line and exit non-zero;
``--debug`` shows the traceback instead. Reports go to stdout, messages to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .errors import NormRewriteError
from .inputs import InputSpec


def _specs(values: tuple[str, ...]) -> list[InputSpec] | None:
    return [InputSpec.parse(v) for v in values] or None


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.export", "torch.onnx", "onnxscript", "transformers", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _run(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; user errors become one line and exit code, others too unless --debug."""
    try:
        return fn()
    except NormRewriteError as e:
        if debug:
            traceback.print_exc()
        exc = click.ClickException(str(e))
        exc.exit_code = e.exit_code
        raise exc from None
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; nothing written") from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        raise click.ClickException(f"internal error: {msg} (rerun with --debug for the traceback)") from None


def _term(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="normrewrite")
def main() -> None:
    """Rewrite the normalization layers of PyTorch models: trace, rewrite, verify, emit."""
    signal.signal(signal.SIGTERM, _term)  # clean up partial outputs like on Ctrl-C


_model_arg = click.argument("model")
_input_opt = click.option(
    "--input", "inputs", multiple=True, metavar="SHAPE[:dtype]",
    help="example input, one per positional model input, e.g. 1x3x224x224 or 1x16:int64",
)
_tracer_opt = click.option(
    "--tracer", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
    help="torch.fx.symbolic_trace, torch.export, or fx falling back to export",
)
_debug_opt = click.option("--debug", is_flag=True, help="show tracebacks")
_trust_opt = click.option(
    "--trust-remote-code", is_flag=True, help="allow a Hugging Face directory's own model code to run"
)


@main.command()
@_model_arg
@click.option("-o", "--output", "outputs", multiple=True, required=True,
              help="OUT.pt2, OUT.onnx or DIR/ (code + weights); repeatable")
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="NAME[:k=v,...]",
              help="pass to run, in order; repeatable (default: fold-bn)")
@_input_opt
@_tracer_opt
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--rtol", type=float, default=1e-4, show_default=True,
              help="tolerated relative error (max |Δ| / max |y|) for exact rewrites")
@click.option("--no-verify", is_flag=True, help="skip the numeric check of the rewritten model")
@click.option("--verify-each", is_flag=True, help="check outputs after every exact pass that changed the graph")
@click.option("--print-after-change", is_flag=True, help="print the graph after every pass that changed it")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
@click.option("--force", is_flag=True, help="replace existing outputs")
@click.option("--keep-training-mode", is_flag=True,
              help="trace as is instead of switching a model in training mode to eval")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for random example inputs")
@click.option("-q", "--quiet", is_flag=True, help="print nothing but errors")
@_trust_opt
@_debug_opt
def convert(
    model: str, outputs: tuple[str, ...], pass_specs: tuple[str, ...], inputs: tuple[str, ...],
    tracer: str, report_path: str | None, rtol: float, no_verify: bool, verify_each: bool,
    print_after_change: bool, opset: int | None, force: bool, keep_training_mode: bool, seed: int,
    quiet: bool, trust_remote_code: bool, debug: bool,
) -> None:
    """Rewrite MODEL with passes and write it to each -o output.

    MODEL is FILE.py:factory, pkg.module:factory, a Hugging Face directory or a .pt2 program.
    """
    if not debug:
        _quiet_libraries()
    out = Console(quiet=quiet, highlight=False)
    err = Console(stderr=True, quiet=quiet, highlight=False)

    def go() -> None:
        from . import api
        from .report import render

        if report_path:
            from .fsutil import check_output

            check_output(Path(report_path), force=force, inputs=(Path(model),))
        specs = _specs(inputs)
        passes = list(pass_specs) or ["fold-bn"]
        for spec in passes:  # fail fast on bad pass names/options, before loading anything
            from .passes import REGISTRY

            REGISTRY.create(spec)

        def after(p: Any, r: Any) -> None:
            if print_after_change:
                out.print(f"[bold]# after {p.describe()}[/]")
                out.print(r.graph_module.code, markup=False)

        with err.status("working") as status:
            result = api.convert(
                model, passes, input_specs=specs, tracer=tracer, verify=not no_verify,
                rtol=rtol, outputs=outputs, force=force, opset=opset,
                keep_training=keep_training_mode, trust_remote_code=trust_remote_code, seed=seed,
                verify_each=verify_each, after_change=after,
                on_stage=lambda s: status.update(s),
            )
        render(result.report, out)
        if report_path:
            from .fsutil import atomic_file

            with atomic_file(Path(report_path)) as tmp:
                tmp.write_text(json.dumps(result.report.to_json(), indent=2, default=str))

    _run(debug, go)


@main.command()
@_model_arg
@_input_opt
@_tracer_opt
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@_trust_opt
@_debug_opt
def inspect(model: str, inputs: tuple[str, ...], tracer: str, as_json: bool,
            trust_remote_code: bool, debug: bool) -> None:
    """List MODEL's norm layers and what each pass could do with them."""
    if not debug:
        _quiet_libraries()

    def go() -> None:
        from . import api

        result = api.inspect(model, input_specs=_specs(inputs), tracer=tracer,
                             trust_remote_code=trust_remote_code)
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2, default=str))
            return
        console = Console(highlight=False)
        console.print(f"[bold]{result.model}[/]  traced with {result.tracer}, inputs {', '.join(result.inputs)}, "
                      f"{result.nodes} ops, {len(result.norms)} norm layers")
        table = Table()
        for col in ("name", "type", "shape", "eps", "what passes could do"):
            table.add_column(col)
        for n in result.norms:
            acts = "\n".join(f"{k}: {v}" for k, v in n.actions.items()) or "-"
            table.add_row(n.name, n.type, "x".join(map(str, n.shape)) if n.shape else "?",
                          "-" if n.eps is None else f"{n.eps:g}", acts)
        console.print(table)

    _run(debug, go)


@main.command("passes")
def list_passes() -> None:
    """List the available passes, one line each."""
    from .passes import REGISTRY

    console = Console(highlight=False)
    table = Table(show_header=True)
    table.add_column("pass")
    table.add_column("kind")
    table.add_column("what it does")
    for p in REGISTRY:
        table.add_row(p.name, "exact" if p.exact else "approximate", p.summary)
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
