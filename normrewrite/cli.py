"""``normrewrite`` command line: a thin shell over :mod:`normrewrite.api`.

User errors (:class:`~normrewrite.errors.NormRewriteError`) print one line and exit non-zero;
``--debug`` shows the traceback instead. Reports go to stdout, messages to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console

from normrewrite.cli_render import console
from normrewrite.errors import NormRewriteError
from normrewrite.load.inputs import MAX_INPUT_BYTES, InputSpec, check_input_size, input_limit
from normrewrite.stream.shards import DEFAULT_MAX_SHARD_BYTES


def _specs(values: tuple[str, ...], max_bytes: int = MAX_INPUT_BYTES) -> list[InputSpec] | None:
    specs = [InputSpec.parse(v) for v in values]
    check_input_size(specs, max_bytes)  # before anything loads; make_inputs checks again
    return specs or None


def _limits(values: tuple[str, ...]) -> Any:
    """``--onnx-limit KEY=VALUE`` → :class:`normrewrite.load.onnx.OnnxLimits` (None: defaults)."""
    if not values:
        return None
    import dataclasses

    from normrewrite.errors import UsageError
    from normrewrite.load.onnx import OnnxLimits

    fields = {f.name: f for f in dataclasses.fields(OnnxLimits)}
    given: dict[str, Any] = {}
    for item in values:
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            raise UsageError(f"--onnx-limit {item!r}: use KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = float if key == "max_declared_ratio" else int
        try:
            value = kind(raw)
        except ValueError:
            raise UsageError(f"--onnx-limit {item!r}: {raw!r} is not a number") from None
        if not value > 0:
            raise UsageError(f"--onnx-limit {item!r}: must be positive")
        given[key] = value
    return OnnxLimits(**given)


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """Library warnings, logs (torch's fake-tensor and export error logs included) and progress
    bars stay out of normrewrite's own output for the command: a failure prints its one line
    alone. ``--debug`` leaves them on."""
    if debug:
        yield
        return
    _silence_progress()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


def _silence_progress() -> None:
    """No third-party progress bars (transformers' weight loading): normrewrite shows its own."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    tf = sys.modules.get("transformers")
    if tf is not None:
        with contextlib.suppress(Exception):
            tf.utils.logging.disable_progress_bar()


def _run(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; user errors become one line and exit code, others too unless --debug. An
    interruption (Ctrl-C, SIGTERM) exits 130 and says whether the outputs were written."""
    from normrewrite.emit.files import committed, reset_committed

    reset_committed()
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
    except KeyboardInterrupt as e:
        written = getattr(e, "written", None) or committed()
        msg = "interrupted; nothing written"
        if written:
            shown = ", ".join(str(p) for p in written)
            msg = f"interrupted after the outputs were written (all complete): {shown}"
        exc = click.ClickException(msg)
        exc.exit_code = 130
        raise exc from None
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
_max_input_opt = click.option(
    "--max-input-bytes", type=click.IntRange(min=1), default=MAX_INPUT_BYTES, show_default=True,
    help="refuse --input shapes whose tensors take more bytes than this in total",
)
_onnx_limit_opt = click.option(
    "--onnx-limit", "onnx_limits", multiple=True, metavar="KEY=VALUE",
    help="raise a limit on ONNX inputs: max_nodes (500000), max_depth (32), max_declared_ratio (16)",
)
_tracer_opt = click.option(
    "--tracer", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
    help="torch.fx.symbolic_trace, torch.export, or fx falling back to export",
)
_debug_opt = click.option("--debug", is_flag=True, help="show tracebacks")
_trust_opt = click.option(
    "--trust-remote-code", is_flag=True, help="allow a Hugging Face directory's own model code to run"
)
_pickle_opt = click.option(
    "--trust-pickle", is_flag=True,
    help="allow unpickling a .pt/.pth/.bin module or pickles in a .pt2 (runs code from the file)",
)
_native_opt = click.option(
    "--trust-native-code", is_flag=True,
    help="allow a .pt2 that carries compiled code (shared objects); loading it runs that code",
)


@main.command()
@_model_arg
@click.option("-o", "--output", "outputs", multiple=True, required=True,
              help="OUT.pt2, OUT.onnx or DIR/ (code + weights); repeatable")
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="NAME[:k=v,...]",
              help="pass to run, in order; repeatable (default: fold-bn); options of a pass: "
                   "normrewrite passes NAME")
@_input_opt
@_max_input_opt
@_onnx_limit_opt
@_tracer_opt
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--rtol", type=float, default=None,
              help="tolerated relative error (max |Δ| / max |y|) for exact rewrites "
                   "[default: 1e-4; 1e-5 for ONNX inputs]")
@click.option("--no-verify", is_flag=True, help="skip the numeric check of the rewritten model")
@click.option("--verify-each", is_flag=True, help="check outputs after every exact pass that changed the graph")
@click.option("--print-after-change", is_flag=True, help="print the graph after every pass that changed it")
@click.option("--opset", type=int, default=None,
              help="ONNX opset (default: the newest onnx, onnxruntime and the exporter all support)")
@click.option("--onnx-target", type=click.Choice(["standard", "ort"]), default="standard", show_default=True,
              help="ONNX ops: standard only (any runtime; at the default opset 23 onnxruntime CPU runs it "
                   "as fast as ort), or onnxruntime's contrib norm ops (SimplifiedLayerNormalization, "
                   "LayerNormalization below 17) for onnxruntime at opset < 23; no Skip*Normalization "
                   "(slower on onnxruntime CPU)")
@click.option("--dynamic", is_flag=True,
              help="ONNX with symbolic batch/sequence/image dims (checked at another size)")
@click.option("--dtype", "onnx_dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="ONNX weights and compute dtype (norms reduce in fp32)")
@click.option("--keep-io-types", is_flag=True, help="with --dtype: keep fp32 ONNX inputs and outputs")
@click.option("--keep-output-classes", is_flag=True,
              help=".pt2: keep the model's own output classes (e.g. transformers' ModelOutput; loading "
                   "then needs those classes) instead of plain tensors named in the report")
@click.option("--force", is_flag=True, help="replace existing outputs")
@click.option("--keep-training-mode", is_flag=True,
              help="trace as is instead of switching a model in training mode to eval")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for random example inputs")
@click.option("--fail-if-unchanged", is_flag=True,
              help="exit 1 (before writing anything) when no pass changed the model")
@click.option("-q", "--quiet", is_flag=True, help="print nothing but errors")
@click.option("--meta", is_flag=True,
              help="for models larger than memory: trace on the meta device and stream the weights "
                   "from MODEL's safetensors into sharded safetensors in the -o DIR/, or into "
                   "-o OUT.onnx with its weights in OUT.onnx.data")
@click.option("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES, show_default=True,
              help="bytes per output shard with --meta")
@click.option("--compile", "compile_", type=click.Choice(["aoti"]), default=None,
              help="write .pt2 outputs as AOTInductor packages (compiled; load with "
                   "torch._inductor.aoti_load_package); *.aoti.pt2 outputs always are")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="device the AOTInductor package is compiled for")
@_trust_opt
@_pickle_opt
@_native_opt
@_debug_opt
def convert(
    model: str, outputs: tuple[str, ...], pass_specs: tuple[str, ...], inputs: tuple[str, ...],
    tracer: str, report_path: str | None, rtol: float | None, no_verify: bool, verify_each: bool,
    print_after_change: bool, opset: int | None, force: bool, keep_training_mode: bool, seed: int,
    quiet: bool, meta: bool, max_shard_size: int, trust_remote_code: bool, trust_pickle: bool,
    debug: bool, compile_: str | None = None, device: str = "cpu", onnx_target: str = "standard",
    dynamic: bool = False, onnx_dtype: str = "float32", keep_io_types: bool = False,
    trust_native_code: bool = False, max_input_bytes: int = MAX_INPUT_BYTES,
    fail_if_unchanged: bool = False, keep_output_classes: bool = False,
    onnx_limits: tuple[str, ...] = (),
) -> None:
    """Rewrite MODEL with passes and write it to each -o output.

    MODEL is FILE.py:factory, pkg.module:factory, a Hugging Face directory or a .pt2 program,
    or an .onnx model (rewritten ONNX in → ONNX out with the passes' ONNX forms).

    The passes: normrewrite passes; one pass's options (type, default, meaning), what it
    matches and whether it is exact: normrewrite passes NAME.
    """
    if quiet:
        _silence_progress()
    out = console(quiet=quiet)
    err = console(stderr=True, quiet=quiet)

    def go() -> None:
        from normrewrite import api
        from normrewrite.cli_render import render_report

        specs = _specs(inputs, max_input_bytes)
        passes = list(pass_specs) or ["fold-bn"]
        from normrewrite.passes import ONNX_REGISTRY, REGISTRY

        # fail fast on bad pass names/options, before loading anything
        for spec in passes:
            (ONNX_REGISTRY if model.endswith(".onnx") else REGISTRY).create(spec)
        from normrewrite.emit.onnx.options import OnnxOptions

        onnx_options = OnnxOptions(opset=opset, target=onnx_target, dynamic=dynamic,  # type: ignore[arg-type]
                                   dtype=onnx_dtype, keep_io_types=keep_io_types)

        if meta:
            _stream(model, passes, outputs, force=force, max_shard_size=max_shard_size,
                    trust_remote_code=trust_remote_code, err=err, out=out, onnx_options=onnx_options,
                    report_path=report_path, fail_if_unchanged=fail_if_unchanged)
            return

        def after(p: Any, r: Any) -> None:
            if print_after_change:
                out.print(f"[bold]# after {p.describe()}[/]")
                out.print(r.graph_module.code, markup=False)

        with err.status("working") as status:
            result = api.convert(
                model, passes, input_specs=specs, tracer=tracer, verify=not no_verify,
                rtol=rtol, outputs=outputs, force=force, opset=opset,
                keep_training=keep_training_mode, trust_remote_code=trust_remote_code, seed=seed,
                verify_each=verify_each, after_change=after, trust_pickle=trust_pickle,
                on_stage=lambda s: status.update(s), compile=compile_, device=device,
                onnx_options=onnx_options, trust_native_code=trust_native_code,
                report_path=report_path, fail_if_unchanged=fail_if_unchanged,
                keep_output_classes=keep_output_classes, onnx_limits=_limits(onnx_limits),
            )
        render_report(result.report, out)

    def limited() -> None:
        with input_limit(max_input_bytes), _quiet_libraries(debug):
            go()

    _run(debug, limited)


def _stream(model: str, passes: list[str], outputs: tuple[str, ...], *, force: bool,
            max_shard_size: int, trust_remote_code: bool, err: Console, out: Console,
            onnx_options: Any, report_path: str | None, fail_if_unchanged: bool) -> None:
    """``--meta``: the pipeline's streamed configuration, with a progress bar."""
    from normrewrite import api
    from normrewrite.cli_progress import ProgressBar
    from normrewrite.cli_render import render_streamed

    with ProgressBar(not err.quiet, err) as bar:
        result = api.convert(model, passes, meta=True, outputs=outputs, force=force,
                             max_shard_size=max_shard_size, trust_remote_code=trust_remote_code,
                             onnx=onnx_options, report_path=report_path, progress=bar,
                             fail_if_unchanged=fail_if_unchanged)
    render_streamed(result.report, result.summary, out)


@main.command()
@_model_arg
@_input_opt
@_max_input_opt
@_onnx_limit_opt
@_tracer_opt
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@_trust_opt
@_pickle_opt
@_native_opt
@_debug_opt
def inspect(model: str, inputs: tuple[str, ...], tracer: str, as_json: bool,
            trust_remote_code: bool, trust_pickle: bool, debug: bool,
            trust_native_code: bool = False, max_input_bytes: int = MAX_INPUT_BYTES,
            onnx_limits: tuple[str, ...] = ()) -> None:
    """List MODEL's norm layers and what each pass could do with them."""

    def go() -> None:
        from normrewrite import api
        from normrewrite.cli_render import render_inspect

        result = api.inspect(model, input_specs=_specs(inputs, max_input_bytes), tracer=tracer,
                             trust_remote_code=trust_remote_code, trust_pickle=trust_pickle,
                             trust_native_code=trust_native_code, onnx_limits=_limits(onnx_limits))
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2, default=str))
            return
        render_inspect(result, console())

    def limited() -> None:
        with input_limit(max_input_bytes), _quiet_libraries(debug):
            go()

    _run(debug, limited)


@main.command("passes")
@click.argument("name", required=False)
def list_passes(name: str | None) -> None:
    """List the available passes, or explain one: normrewrite passes NAME shows what it matches,
    whether it is exact, and its options (type, default, meaning)."""
    from normrewrite.cli_render import pass_help_text, render_passes
    from normrewrite.core.pass_help import pass_help
    from normrewrite.passes import ONNX_REGISTRY, REGISTRY

    if name is not None:
        _run(False, lambda: click.echo(pass_help_text(pass_help(REGISTRY.get(name)), name in ONNX_REGISTRY)))
        return
    render_passes(REGISTRY, console())


if __name__ == "__main__":  # pragma: no cover
    main()
