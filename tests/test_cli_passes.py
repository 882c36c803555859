"""``normrewrite passes`` and ``normrewrite passes NAME``: every registered pass with its option
names; one pass's summary, exactness, what it matches and each option's CLI name, type, default
and meaning (from the Options dataclass's attribute docstrings); ``convert --help`` points there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from normrewrite.cli import main
from normrewrite.core.pass_help import pass_help
from normrewrite.passes import ONNX_REGISTRY, REGISTRY

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_cnn.py"


def cli(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "250"}).invoke(main, list(args))


def test_list_shows_every_pass_with_its_option_names() -> None:
    res = cli("passes")
    assert res.exit_code == 0
    for p in REGISTRY:
        row = next(line for line in res.output.splitlines() if f" {p.name} " in line)
        for f in dataclasses.fields(p.Options):
            assert f.name.rstrip("_") in row, (p.name, f.name)
    swap = next(line for line in res.output.splitlines() if " swap-norm " in line)
    assert "from," in swap and "from_" not in swap
    assert "normrewrite passes NAME" in res.output


@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_option_of_every_pass_is_documented(name: str) -> None:
    """The help is complete: no option without a meaning (a new field without an attribute
    docstring fails here)."""
    h = pass_help(REGISTRY.get(name))
    assert h.description and h.summary
    assert all(o.meaning for o in h.options), [o.name for o in h.options if not o.meaning]


def test_pass_help_for_fold_bn() -> None:
    res = cli("passes", "fold-bn")
    assert res.exit_code == 0, res.output
    out = res.output
    assert out.startswith("fold-bn: fold eval-mode BatchNorm")
    assert "kind: exact" in out
    assert "usage: -p fold-bn[:option=value,...]" in out
    assert "also runs on .onnx inputs" in out  # fold-bn has an ONNX form
    assert "  shared  skip|clone  (default: skip)\n" in out
    assert "What to do when the layer's weights are shared" in out
    # what it matches: the module docstring, reST markup made plain
    assert "what it matches" in out and "ConvTranspose" in out and "``" not in out


def test_pass_help_types_defaults_and_the_cli_name_of_from() -> None:
    out = cli("passes", "swap-norm").output
    assert "kind: approximate" in out
    assert (
        "  from  batchnorm|groupnorm|instancenorm|layernorm|rmsnorm or none  (default: none)" in out
    )
    assert "from_" not in out
    assert "  alpha  float  (default: 0.5)\n      to=dyt: initial α." in out
    assert "  calibrate  bool (true/false)  (default: true)" in out
    out = cli("passes", "recalibrate-bn").output
    assert (
        "  batch_size  int or none  (default: none)" in out
        and "  batches  int  (default: 16)" in out
    )
    assert "also runs on .onnx inputs" not in out and "recalibrate-bn" not in ONNX_REGISTRY


def test_pass_without_options() -> None:
    out = cli("passes", "fix-export").output
    assert "options: none" in out and "usage: -p fix-export\n" in out
    assert "scaled_dot_product_attention" in out  # its docstring: the attention identity


def test_unknown_pass_is_a_one_line_usage_error() -> None:
    res = cli("passes", "fold-bnn")
    assert res.exit_code == 2
    assert "unknown pass 'fold-bnn'" in res.output and "fold-bn" in res.output
    assert "Traceback" not in res.output


def test_convert_help_points_to_pass_help() -> None:
    out = cli("convert", "--help").output
    assert "normrewrite passes NAME" in " ".join(out.split())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("swap-norm:from=foo,to=rmsnorm", "option from='foo' is not one of batchnorm"),
        ("swap-norm:frm=layernorm", "unknown option 'frm' (options: alpha, calibrate, eps, from,"),
        ("fold-bn:shared=copy", "option shared='copy' is not one of skip, clone"),
        ("recalibrate-bn:batches=many", "option batches='many' is not a valid int"),
    ],
)
def test_convert_option_errors_name_the_option_as_typed(
    tmp_path: Path, spec: str, message: str
) -> None:
    res = cli("convert", f"{EXAMPLE}:build", "-p", spec, "-o", str(tmp_path / "o.pt2"))
    assert res.exit_code == 2, res.output
    assert message in res.output and "from_" not in res.output
    assert len(res.output.strip().splitlines()) == 1
