"""ONNX emission options (the ONNX pipeline, normrewrite.emit.onnx, through normrewrite.convert): opset default and
the opset actually written, fused norm ops per target/opset (RMSNorm, Pre-Norm skip fusion,
GroupNorm), --dynamic checked at another size, --dtype with fp32 norm compute, external data,
and the BatchNorm-in-training-mode trap. One test per known trap of issue 5."""

from __future__ import annotations

import collections
import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from models import bert, llama, randomize_norms, token_ids
from torch import nn

import normrewrite
from normrewrite.cli import main
from normrewrite.core import onnx_graph
from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.errors import EmitError
from normrewrite.verify.onnxruntime import relative_error, session


def convert(module: nn.Module, inputs: tuple, path: Path, **options):
    result = normrewrite.convert(
        module,
        [],
        example_inputs=inputs,
        outputs=[path],
        force=True,
        tracer="export",
        onnx_options=OnnxOptions(**options),
    )
    return result.report.outputs[0], onnx.load(str(path), load_external_data=False)


def op_counts(proto: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in proto.graph.node)


class Norms(nn.Module):
    """LayerNorm, torch's RMSNorm (positive reduce axis in its decomposition) and GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.rms = nn.LayerNorm(16), nn.RMSNorm(16)
        self.conv, self.gn = nn.Conv1d(8, 8, 1), nn.GroupNorm(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rms(self.ln(x))
        return self.gn(self.conv(y.reshape(y.shape[0], 8, -1)))


def norms_model() -> nn.Module:
    return randomize_norms(Norms()).eval()


def test_default_opset_is_newest_supported_and_asserted(tmp_path: Path) -> None:
    expected = min(
        onnx.defs.onnx_opset_version(), onnx_graph.ort_max_opset(), onnx_graph.exporter_max_opset()
    )
    assert onnx_graph.default_opset() == expected
    out, proto = convert(norms_model(), (torch.randn(2, 4, 16),), tmp_path / "m.onnx")
    assert {o.domain: o.version for o in proto.opset_import}[""] == expected
    counts = op_counts(proto)
    # trap: opset 21+ GroupNormalization has no ORT kernel → the InstanceNormalization form
    assert counts["GroupNormalization"] == 0 and counts["InstanceNormalization"] == 1
    assert counts["LayerNormalization"] == 1 and counts["RMSNormalization"] == 1
    assert not {"ReduceMean", "Sqrt", "Pow"} & set(counts)
    assert out.onnx_max_rel_err <= 1e-5
    assert any("InstanceNormalization" in n for n in out.notes)


def test_opset_17_is_refused_not_silently_18(tmp_path: Path) -> None:
    with pytest.raises(EmitError, match="asking for 17 silently gives 18"):
        convert(norms_model(), (torch.randn(2, 4, 16),), tmp_path / "m.onnx", opset=17)
    assert not (tmp_path / "m.onnx").exists()


def test_llama_rmsnorm_per_target(tmp_path: Path) -> None:
    """Pre-Norm Llama: opset 23 → RMSNormalization; ort below 23 → SimplifiedLayerNormalization with
    the residual adds left as Add (SkipSimplifiedLayerNormalization is 6-7x slower on onnxruntime
    CPU); standard below 23 stays decomposed (no op exists) and says so."""
    model, ids = llama(layers=2), (token_ids(),)
    out23, p23 = convert(model, ids, tmp_path / "a.onnx")
    assert op_counts(p23)["RMSNormalization"] == 5 and op_counts(p23)["ReduceMean"] == 0
    out_ort, p_ort = convert(model, ids, tmp_path / "b.onnx", opset=18, target="ort")
    c = op_counts(p_ort)
    assert c["SkipSimplifiedLayerNormalization"] == 0 and c["SimplifiedLayerNormalization"] == 5
    # opset 18 spells rotary/attention out (+~16 nodes) and the 4 residual Adds stay separate
    assert c["ReduceMean"] == 0 and len(p_ort.graph.node) < len(p23.graph.node) + 24
    assert any("validated by an onnxruntime session" in n for n in out_ort.notes)
    out_std, p_std = convert(model, ids, tmp_path / "c.onnx", opset=18)
    assert op_counts(p_std)["ReduceMean"] == 5
    assert any("no standard RMSNorm op below opset 23" in n for n in out_std.notes)
    for out in (out23, out_ort, out_std):
        assert out.onnx_max_rel_err <= 1e-5


def test_dynamic_axes_run_at_another_size(tmp_path: Path) -> None:
    model = bert(layers=1)
    out, proto = convert(model, (token_ids(batch=2, seq=16),), tmp_path / "d.onnx", dynamic=True)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims)  # batch and sequence symbolic
    assert any(n.startswith("dynamic axes checked at 3x24") for n in out.notes)
    sess = session(tmp_path / "d.onnx")
    ids = token_ids(batch=3, seq=11, seed=3)
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    ref = model(ids).last_hidden_state.detach().numpy()
    assert relative_error([ref], [got])[1] <= 1e-5


@pytest.mark.parametrize("keep_io", [False, True])
def test_fp16_norms_compute_in_fp32(tmp_path: Path, keep_io: bool) -> None:
    """Large-magnitude inputs (x² overflows fp16): the fused norms keep stash_type=1, and the
    output matches an fp64 run of the fp32 original within fp16 tolerance."""
    module = norms_model()
    x = torch.randn(2, 4, 16) * 400
    out, proto = convert(module, (x,), tmp_path / "h.onnx", dtype="float16", keep_io_types=keep_io)
    elem = proto.graph.input[0].type.tensor_type.elem_type
    assert elem == (onnx.TensorProto.FLOAT if keep_io else onnx.TensorProto.FLOAT16)
    for n in proto.graph.node:
        if n.op_type in ("LayerNormalization", "RMSNormalization"):
            stash = {a.name: a.i for a in n.attribute}.get("stash_type", 1)
            assert stash == 1
    assert out.onnx_max_rel_err <= 2e-2
    sess = session(tmp_path / "h.onnx")
    feed = x.numpy() if keep_io else x.half().numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: feed})[0].astype(np.float64)
    ref64 = module.double()(x.double()).detach().numpy()
    assert np.isfinite(got).all() and relative_error([ref64], [got])[1] <= 2e-2


def test_external_data_written_atomically(tmp_path: Path) -> None:
    out, _ = convert(
        norms_model(), (torch.randn(2, 4, 16),), tmp_path / "big.onnx", external_data_threshold=256
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert any("external data" in n for n in out.notes)
    assert out.onnx_max_rel_err <= 1e-5
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)


def test_training_mode_batchnorm_is_refused(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(EmitError, match="training mode"):
        normrewrite.convert(
            module,
            [],
            example_inputs=(torch.randn(2, 3, 8, 8),),
            outputs=[tmp_path / "t.onnx"],
            keep_training=True,
            verify=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_options(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)).eval(), (torch.randn(2, 16),)\n"
    )
    out = tmp_path / "o.onnx"
    res = CliRunner(env={"COLUMNS": "250"}).invoke(
        main,
        [
            "convert",
            f"{src}:build",
            "-p",
            "fold-bn",
            "-o",
            str(out),
            "--opset",
            "18",
            "--onnx-target",
            "ort",
            "--dtype",
            "float16",
            "--keep-io-types",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    res = CliRunner().invoke(
        main, ["convert", f"{src}:build", "-o", str(tmp_path / "x.onnx"), "--keep-io-types"]
    )
    assert res.exit_code == 2 and "--keep-io-types needs --dtype" in res.output


def test_dynamic_export_that_breaks_at_other_sizes_is_refused(tmp_path: Path) -> None:
    """The exporter writes AdaptiveAvgPool2d with the example's kernel: correct at 32x32, wrong at
    48x48. The other-size run catches it; nothing is written."""
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 4)
    )
    with pytest.raises(EmitError, match="does not run at other input sizes"):
        convert(module.eval(), (torch.randn(2, 3, 32, 32),), tmp_path / "p.onnx", dynamic=True)
    assert list(tmp_path.iterdir()) == []


class ShapeChain(nn.Module):
    """Shape-dependent code as older exporters and HF models write it: a view built from
    x.shape (Shape/Gather/Unsqueeze/Concat → Reshape), a seq x seq causal mask built from the
    sequence length (ConstantOfShape → Trilu; 96² elements, above onnxscript's default folding
    limit of 8192) and a zero Linear bias (freshly initialized layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.ln = nn.Linear(16, 16), nn.LayerNorm(16)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.proj(x).view(b, s, 4, -1).transpose(1, 2)
        att = (q @ q.transpose(-1, -2) + torch.ones(s, s).tril()).softmax(-1) @ q
        return self.ln(att.transpose(1, 2).reshape(b, s, -1))


# what the static-shape cleanup must leave of ShapeChain: no shape op, no mask op, no bias Add
FOLDED = {
    "MatMul": 3,
    "Transpose": 3,
    "Reshape": 2,
    "Add": 1,
    "Softmax": 1,
    "LayerNormalization": 1,
}
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "ConstantOfShape", "Trilu", "Expand"}


def test_static_shape_chains_fold_and_dynamic_ones_stay(tmp_path: Path) -> None:
    """ONNX in: a TorchScript export with symbolic batch/sequence, then the same file with its
    input pinned to a static shape (its Shape chains still inside). Static: every shape
    computation, the mask and the zero-bias Add fold (onnxsim's advantage); symbolic: the shape
    ops stay and the model still runs at another size. Torch in: the same split by --dynamic."""
    torch.manual_seed(0)
    module, x = ShapeChain().eval(), torch.randn(2, 96, 16)
    f = tmp_path / "dyn.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), str(f), dynamo=False, opset_version=18, input_names=["x"],
            dynamic_axes={"x": {0: "b", 1: "s"}},
        )  # fmt: skip
    pinned = onnx.load(str(f))
    assert SHAPE_OPS - {"Expand"} <= set(op_counts(pinned))
    for dim, size in zip(pinned.graph.input[0].type.tensor_type.shape.dim, x.shape, strict=True):
        dim.dim_value = size
    onnx.save(pinned, str(tmp_path / "static.onnx"))
    ref = module.double()(x.double()).detach().numpy()
    module.float()
    got: dict[str, collections.Counter[str]] = {}
    for name in ("static", "dyn"):
        r = normrewrite.convert(
            str(tmp_path / f"{name}.onnx"), ["fuse-norm"], outputs=[tmp_path / f"{name}_out.onnx"]
        )
        assert r.report.verify.passed and r.report.verify.max_rel_err <= 1e-5
        got[name] = op_counts(onnx.load(str(tmp_path / f"{name}_out.onnx")))
        sess = session(tmp_path / f"{name}_out.onnx")
        assert relative_error([ref], sess.run(None, {"x": x.numpy()}))[1] <= 1e-5
    assert got["static"] == collections.Counter(FOLDED)
    assert got["dyn"]["Shape"] >= 1 and got["dyn"]["Trilu"] == 1 and got["dyn"]["Add"] == 1
    other = torch.randn(3, 50, 16)
    sess = session(tmp_path / "dyn_out.onnx")
    assert (
        relative_error(
            [module(other).detach().numpy()], sess.run(None, {"x": other.numpy()})
        )[1]
        <= 1e-5
    )
    out_s, p_s = convert(module, (x,), tmp_path / "ts.onnx")
    assert op_counts(p_s) == collections.Counter(FOLDED) and out_s.onnx_max_rel_err <= 1e-5
    out_d, p_d = convert(module, (x,), tmp_path / "td.onnx", dynamic=True)
    assert op_counts(p_d)["Shape"] >= 1 and op_counts(p_d)["Trilu"] == 1
    assert out_d.onnx_max_rel_err <= 1e-5
