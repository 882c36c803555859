"""The ``normrewrite`` command line: every bad input fails cleanly, and the main job works end to
end on Hugging Face ResNet-50 (``save_pretrained`` directory → ``.pt2`` + ``.onnx``).

A clean failure is: a non-zero exit, one line on stderr naming the problem, no traceback (unless
``--debug``), no output file (not even a partial one) and the input file's bytes unchanged.
"""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from normrewrite.cli import main
from normrewrite.core.graph import get_tensor
from normrewrite.core.ops import conv_info
from normrewrite.core.pass_infra import Pass, PassContext, PassResult, compute_tensors
from normrewrite.errors import VerifyError
from normrewrite.load.inputs import InputSpec, make_inputs
from normrewrite.passes import REGISTRY

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_cnn.py"


def cli(*args: str) -> Result:
    # wide enough that rich does not wrap or cut table cells
    return CliRunner(env={"COLUMNS": "250"}).invoke(
        main, [str(a) for a in args], catch_exceptions=False
    )


def files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid .pt2 of the example model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tiny_cnn", EXAMPLE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, inputs = mod.build()
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    torch.export.save(torch.export.export(model, inputs, strict=False), str(path))
    return path


def _write(d: Path, name: str, text: str | bytes) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(textwrap.dedent(text))
    return p


@dataclass(frozen=True)
class Bad:
    id: str
    make: Callable[[Path, Path], tuple[str, list[str]]]  # (tmp, program) -> (model arg, extra args)
    message: str
    exit_code: int = 1
    output: str = "out.pt2"


def _factory(body: str) -> Callable[[Path, Path], tuple[str, list[str]]]:
    def make(d: Path, _p: Path) -> tuple[str, list[str]]:
        f = _write(d, "m.py", "import torch\nfrom torch import nn\n" + textwrap.dedent(body))
        return f"{f}:build", []

    return make


_GOOD = """
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), (torch.randn(1, 3, 8, 8),)
"""


def _hf_dir(config: str) -> Callable[[Path, Path], tuple[str, list[str]]]:
    def make(d: Path, _p: Path) -> tuple[str, list[str]]:
        _write(d, "hf/config.json", config)
        _write(d, "hf/model.safetensors", b"\0" * 16)
        return str(d / "hf"), []

    return make


BAD = [
    Bad("missing-file", lambda d, p: (str(d / "nope.py") + ":build", []), "no such file"),
    Bad("missing-pt2", lambda d, p: (str(d / "nope.pt2"), []), "no such file"),
    Bad("missing-model", lambda d, p: (str(d / "nothing"), []), "no such model"),
    Bad(
        "corrupt-pt2",
        lambda d, p: (str(_write(d, "bad.pt2", b"not a zip at all")), []),
        "not a torch.export program",
    ),
    Bad(
        "truncated-pt2",
        lambda d, p: (str(_write(d, "cut.pt2", p.read_bytes()[:2000])), []),
        "cut.pt2",
    ),
    Bad("bad-config-json", _hf_dir("{not json"), "not valid JSON"),
    Bad("config-without-architectures", _hf_dir('{"model_type": "resnet"}'), "no 'architectures'"),
    Bad(
        "factory-raises",
        _factory("def build():\n    raise RuntimeError('boom')\n"),
        "factory",
    ),
    Bad("factory-import-fails", _factory("import no_such_module_xyz\n"), "importing"),
    Bad("factory-returns-junk", _factory("def build():\n    return 42\n"), "expected an nn.Module"),
    Bad(
        "factory-without-inputs", _factory("def build():\n    return nn.Linear(2, 2)\n"), "--input"
    ),
    Bad(
        "unknown-pass",
        lambda d, p: (str(p), ["-p", "no-such-pass"]),
        "unknown pass 'no-such-pass'",
        2,
    ),
    Bad(
        "unknown-pass-option",
        lambda d, p: (str(p), ["-p", "fold-bn:colour=red"]),
        "unknown option 'colour'",
        2,
    ),
    Bad(
        "bad-pass-option-value",
        lambda d, p: (str(p), ["-p", "fold-bn:shared=maybe"]),
        "is not one of skip, clone",
        2,
    ),
    Bad(
        "malformed-pass-option",
        lambda d, p: (str(p), ["-p", "fold-bn:shared"]),
        "is not key=value",
        2,
    ),
    Bad("bad-shape-spec", lambda d, p: (str(p), ["--input", "1xAx3"]), "bad input spec '1xAx3'", 2),
    Bad("bad-dtype-spec", lambda d, p: (str(p), ["--input", "1x3:float7"]), "unknown dtype", 2),
    Bad(
        "wrong-shape-for-model",
        lambda d, p: (_factory(_GOOD)(d, p)[0], ["--input", "1x5x8x8"]),
        "failed",
    ),
    Bad(
        "untraceable-model",
        _factory("""
        class M(nn.Module):
            def forward(self, x):
                return x.numpy() if x.sum().item() > 0 else x
        def build():
            return M(), (torch.ones(2, 3),)
        """),
        "torch.export failed",
    ),
    # ONNX input is refused with "not supported yet" until the ONNX issue lands; either way a
    # corrupt .onnx must fail cleanly, naming the file
    Bad("onnx-input", lambda d, p: (str(_write(d, "m.onnx", b"\x08\x07")), []), "m.onnx"),
    Bad(
        "pickled-pt",
        lambda d, p: (str(_write(d, "m.pt", b"\x80\x04junk")), []),
        "refusing to unpickle",
    ),
    Bad(
        "existing-output",
        lambda d, p: (str(p), []),
        "exists; pass --force",
        exit_code=2,
        output="exists.pt2",
    ),
    Bad(
        "missing-output-dir",
        lambda d, p: (str(p), []),
        "does not exist",
        exit_code=2,
        output="no/such/dir/out.pt2",
    ),
    Bad(
        "output-is-input",
        lambda d, p: (str(_copy(p, d)), ["--force"]),
        "is the input",
        exit_code=2,
        output="same.pt2",
    ),
    Bad("unknown-output-format", lambda d, p: (str(p), []), "output format", output="out.txt"),
]


def _copy(src: Path, d: Path) -> Path:
    dst = d / "same.pt2"
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_bad_input_fails_cleanly(bad: Bad, tmp_path: Path, program: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    model, extra = bad.make(work, program)
    out = work / bad.output
    if bad.id == "existing-output":
        out.write_bytes(b"precious")
    model_file = Path(model.rpartition(":")[0] if model.endswith(":build") else model)
    before = model_file.read_bytes() if model_file.is_file() else None
    listing = files(work)
    report = work / "report.json"

    r = cli("convert", model, "-o", out, "--report", report, *extra)

    assert r.exit_code == bad.exit_code, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert bad.message in lines[0], lines[0]
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert r.stdout == ""
    assert files(work) == listing, "an output (or a partial one) was written"
    if before is not None:
        assert model_file.read_bytes() == before, "the input changed"
    if bad.id == "existing-output":
        assert out.read_bytes() == b"precious"


# --------------------------------------------------------------------------- no changes


def test_a_pass_that_changes_nothing_says_so(tmp_path: Path) -> None:
    """fuse-norm on a CNN: exit 0, the (valid) output is written, the report says "no changes"
    for the pass and for the run; fold-bn in the same run changes it, so the run is not."""
    out = tmp_path / "m.pt2"
    r = cli("convert", f"{EXAMPLE}:build", "-p", "fuse-norm", "-o", out)
    assert r.exit_code == 0, r.output
    [row] = [line for line in r.stdout.splitlines() if "fuse-norm" in line]
    assert "no changes" in row
    assert "no changes: no pass changed the model" in r.stdout
    assert torch.export.load(str(out)) is not None
    r = cli("convert", f"{EXAMPLE}:build", "-p", "fuse-norm", "-p", "fold-bn", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert "no changes: no pass" not in r.stdout
    assert "no changes" in next(line for line in r.stdout.splitlines() if "fuse-norm" in line)


def test_fail_if_unchanged_fails_before_writing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = ["-o", work / "m.pt2", "-o", work / "m.onnx", "--report", work / "r.json"]
    r = cli("convert", f"{EXAMPLE}:build", "-p", "fuse-norm", *args, "--fail-if-unchanged")
    assert r.exit_code == 1
    [line] = r.stderr.strip().splitlines()
    assert line == (
        "Error: no changes: fuse-norm left the model unchanged (--fail-if-unchanged); nothing written"
    )
    assert r.stdout == "" and list(work.iterdir()) == []
    r = cli("convert", f"{EXAMPLE}:build", "-p", "fold-bn", *args, "--fail-if-unchanged", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in work.iterdir()) == ["m.onnx", "m.pt2", "r.json"]


def test_fail_if_unchanged_on_onnx_inputs(tmp_path: Path) -> None:
    """ONNX in → ONNX out: no BatchNorm to fold; refused, nothing written."""
    import normrewrite
    from normrewrite.errors import UnchangedError

    src = tmp_path / "lin.onnx"
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    normrewrite.convert(model, [], (torch.randn(2, 4),), outputs=[src])
    before = set(tmp_path.iterdir())
    out = tmp_path / "out.onnx"
    with pytest.raises(UnchangedError, match="fold-bn left the model unchanged"):
        normrewrite.convert(src, ["fold-bn"], outputs=[out], fail_if_unchanged=True)
    assert set(tmp_path.iterdir()) == before
    normrewrite.convert(src, ["fold-bn"], outputs=[out])  # without the flag: written, unchanged
    assert out.exists()


def test_fail_if_unchanged_with_meta(tmp_path: Path) -> None:
    """--meta: BERT has no BatchNorm; exit 1, no output directory; without the flag "no changes"."""
    from models import bert

    src = tmp_path / "bert"
    bert(layers=1).save_pretrained(src)
    out = tmp_path / "out"
    r = cli("convert", src, "--meta", "-p", "fold-bn", "-o", f"{out}/", "--fail-if-unchanged")
    assert r.exit_code == 1
    [line] = r.stderr.strip().splitlines()
    assert "no changes: fold-bn left the model unchanged" in line
    assert not out.exists()
    r = cli("convert", src, "--meta", "-p", "fold-bn", "-o", f"{out}/")
    assert r.exit_code == 0, r.output
    assert "fold-bn: no changes" in r.stdout and "no pass changed the model" in r.stdout
    assert (out / "config.json").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = cli("convert", tmp_path / "nope.py:build", "-o", tmp_path / "o.pt2", "--debug")
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and "LoadError" in r.stderr


# --------------------------------------------------------------------------- passes, inspect


def test_passes_lists_every_registered_pass() -> None:
    r = cli("passes")
    assert r.exit_code == 0
    for p in REGISTRY:
        assert p.name in r.stdout
    assert "fold-bn" in r.stdout and "exact" in r.stdout


def test_inspect_shows_bn_layers_and_fold_targets() -> None:
    r = cli("inspect", f"{EXAMPLE}:build")
    assert r.exit_code == 0, r.output
    assert "stem.1" in r.stdout and "foldable into stem.0" in r.stdout
    assert "post_relu_bn" in r.stdout and "not foldable" in r.stdout


def test_inspect_json() -> None:
    r = cli("inspect", f"{EXAMPLE}:build", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tracer"] == "fx" and data["inputs"] == ["4x3x32x32:float32"]
    by_name = {n["name"]: n for n in data["norms"]}
    assert set(by_name) == {
        "stem.1",
        "grouped.1",
        "depthwise.1",
        "up.1",
        "post_relu_bn",
        "head_bn",
        "fc_bn",
    }
    assert by_name["stem.1"]["type"] == "batchnorm" and by_name["stem.1"]["shape"] == [
        4,
        16,
        16,
        16,
    ]
    assert by_name["stem.1"]["actions"]["fold-bn"] == "foldable into stem.0 (output side)"
    assert by_name["head_bn"]["actions"]["fold-bn"] == "foldable into fc (input side)"
    assert by_name["post_relu_bn"]["actions"]["fold-bn"].startswith("not foldable: ")


# --------------------------------------------------------------------------- verify failures


class BreakFirstConv(Pass):
    """Claims to be exact but scales the first conv weight: verification must catch it."""

    name = "break-first-conv"
    summary = "test pass: scales a conv weight by 1.01 and claims exactness"
    exact = True

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        for n in gm.graph.nodes:
            info = conv_info(gm, n)
            if info is not None and info.weight is not None:
                compute_tensors(gm, ctx, [info.weight], [info.weight], lambda w: w * 1.01)
                return PassResult(gm, True)
        return PassResult(gm, False)


def test_wrong_exact_pass_raises_verify_error_in_the_api(tmp_path: Path) -> None:
    import normrewrite

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    out = tmp_path / "m.pt2"
    with pytest.raises(VerifyError, match="max rel err"):
        normrewrite.convert(model, [BreakFirstConv()], (torch.randn(1, 3, 8, 8),), outputs=[out])
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verify_each", [False, True], ids=["verify", "verify-each"])
def test_wrong_exact_pass_fails_the_cli(
    verify_each: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY._by_name, BreakFirstConv.name, BreakFirstConv)
    factory = _factory(_GOOD)(tmp_path, tmp_path)[0]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outs = [out_dir / "m.pt2", out_dir / "m.onnx", out_dir / "d"]
    args = ["-p", "break-first-conv", "-p", "fold-bn"] + (["--verify-each"] if verify_each else [])
    r = cli("convert", factory, *[a for o in outs for a in ("-o", o)], *args)
    assert r.exit_code == 1
    [line] = r.stderr.strip().splitlines()
    expected = "after pass break-first-conv" if verify_each else "differs from the original"
    assert expected in line and "Traceback" not in r.output
    assert list(out_dir.iterdir()) == []


def test_print_after_change_and_no_verify(tmp_path: Path) -> None:
    r = cli(
        "convert",
        f"{EXAMPLE}:build",
        "-o",
        tmp_path / "m.pt2",
        "--print-after-change",
        "--no-verify",
    )
    assert r.exit_code == 0, r.output
    assert "# after fold-bn" in r.stdout and "def forward" in r.stdout
    assert "verify" in r.stdout and "skipped" in r.stdout
    assert (tmp_path / "m.pt2").is_file()


def test_pt2_in_pt2_out(program: Path, tmp_path: Path) -> None:
    before = program.read_bytes()
    out, report = tmp_path / "folded.pt2", tmp_path / "r.json"
    r = cli("convert", program, "-o", out, "--report", report, "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["tracer"] == "pt2" and rep["input_origin"] == "program"
    assert len(rep["passes"][0]["changes"]) == 6 and rep["verify"]["passed"] is True
    assert [s["target"] for s in rep["passes"][0]["skipped"]] == ["post_relu_bn"]
    original, folded = torch.export.load(str(program)), torch.export.load(str(out))
    x = original.example_inputs[0][0]
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(x), original.module()(x), rtol=1e-5, atol=1e-5)
    n_bn = sum("batch_norm" in str(n.target) for n in folded.graph.nodes)
    assert n_bn == 1  # post_relu_bn stays
    assert program.read_bytes() == before


def test_force_replaces_an_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"
    out.write_bytes(b"old")
    r = cli("convert", f"{EXAMPLE}:build", "-o", out, "--force", "-q")
    assert r.exit_code == 0 and r.output == ""
    ep = torch.export.load(str(out))  # the old bytes are gone: a loadable program that runs
    (x,) = ep.example_inputs[0] if ep.example_inputs else (torch.randn(1, 3, 32, 32),)
    assert ep.module()(x).shape[0] == x.shape[0]


# --------------------------------------------------------------------------- ResNet-50 end to end


@pytest.fixture(scope="module")
def resnet50_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    from models import resnet50

    model = resnet50()
    d = tmp_path_factory.mktemp("hf") / "resnet50"
    model.save_pretrained(d)
    return d, model


@pytest.mark.slow
def test_hf_resnet50_end_to_end(resnet50_dir: tuple[Path, nn.Module], tmp_path: Path) -> None:
    src, model = resnet50_dir
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    pt2, onnx_path, report_path = tmp_path / "r50.pt2", tmp_path / "r50.onnx", tmp_path / "r.json"
    r = cli("convert", src, "-o", pt2, "-o", onnx_path, "--report", report_path)
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before

    rep = json.loads(report_path.read_text())
    assert rep["tracer"] == "export" and rep["source"] == "hf"
    assert rep["inputs"] == ["1x3x224x224:float32"] and rep["input_origin"] == "config"
    [fold] = rep["passes"]
    assert fold["name"] == "fold-bn" and fold["exact"] is True and rep["exact"] is True
    assert len(fold["changes"]) == 53 and fold["skipped"] == []  # every BN of ResNet-50
    assert all(c["detail"].startswith("folded into ") for c in fold["changes"])
    assert "embedder.embedder.normalization" in {c["target"] for c in fold["changes"]}
    assert rep["nodes_before"] - rep["nodes_after"] == 53
    v = rep["verify"]
    assert v["passed"] is True and 0 < v["max_rel_err"] <= 1e-4 and v["max_abs_err"] > 0
    assert rep["output"]["path"] == str(pt2) and rep["output"]["format"] == "pt2"
    onnx_out = next(o for o in rep["outputs"] if o["format"] == "onnx")
    assert onnx_out["onnx_max_rel_err"] <= 1e-4

    # parity of what was written, against an fp64 run of the original
    [x] = make_inputs([InputSpec((1, 3, 224, 224))], seed=0)
    ep = torch.export.load(str(pt2))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double()).last_hidden_state
        folded = ep.module()(x)[0]
    scale = ref.abs().max()
    assert float((folded.double() - ref).abs().max() / scale) <= 1e-4
    from harness import ort_run

    [y, *_] = ort_run(onnx_path, x)
    assert float((torch.from_numpy(y).double() - ref).abs().max() / scale) <= 1e-4
    # no BatchNorm is left in the written program
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets
    assert get_tensor(ep.module(), "embedder.embedder.convolution.bias").shape == (64,)
