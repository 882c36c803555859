"""fix-export (passes/fix_export.py): real models that torch.export traces but torch.onnx.export
rejects (HF T5 encoder, Swin: ``contiguous`` + ``view``; Mixtral: a custom grouped-matmul op;
Falcon: multi-query attention) come out as valid ONNX matching the original; the pass is a no-op
where nothing needs fixing; an op with no translation is named in one line."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from harness import fp64_reference, ort_run, rel_err
from models import bert, randomize_norms, token_ids
from torch import nn

import normrewrite
from normrewrite.cli import main
from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.errors import EmitError
from normrewrite.passes.fix_export import FixExport, grouped_mm
from normrewrite.trace import trace
from normrewrite.verify.onnxruntime import relative_error, session


def _transformers():
    import transformers

    return transformers


def t5():
    t = _transformers()
    torch.manual_seed(0)
    cfg = t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return randomize_norms(t.T5EncoderModel(cfg)).eval(), (token_ids(),)


def swin():
    t = _transformers()
    torch.manual_seed(0)
    cfg = t.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
    )
    return randomize_norms(t.SwinModel(cfg)).eval(), (torch.randn(1, 3, 32, 32),)


def mixtral():
    t = _transformers()
    torch.manual_seed(0)
    cfg = t.MixtralConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    return randomize_norms(t.MixtralModel(cfg)).eval(), (token_ids(seq=8),)


def plain_onnx_export_fails(module: nn.Module, inputs: tuple) -> bool:
    ep = torch.export.export(trace(module, inputs, "export").graph_module, inputs, strict=False)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(ep, (), dynamo=True)
    except Exception:
        return True
    return False


@pytest.mark.parametrize(
    ("build", "fixes"), [(t5, "contiguous"), (swin, "contiguous"), (mixtral, "custom op")]
)
def test_exporter_failures_come_out_as_valid_onnx(tmp_path: Path, build, fixes: str) -> None:
    module, inputs = build()
    if build is t5:  # the failure this pass exists for (checked once: each export costs seconds)
        assert plain_onnx_export_fails(module, inputs)
    out = tmp_path / "m.onnx"
    result = normrewrite.convert(
        module, ["fix-export"], example_inputs=inputs, outputs=[out], tracer="export"
    )
    fix = next(p for p in result.report.passes if p.name == "fix-export")
    assert fix.modified and all(fixes in c.detail for c in fix.changes)
    assert result.report.verify.max_rel_err <= 1e-5
    assert (
        result.report.outputs[0].onnx_max_rel_err <= 1e-5
    )  # onnx.checker passed too (emit checks)
    if (
        build is mixtral
    ):  # different tokens route to different experts: the decomposition is general
        other = (token_ids(seq=8, seed=7),)
        sess = session(out)
        got = sess.run(None, {sess.get_inputs()[0].name: other[0].numpy()})[0]
        ref = module(*other).last_hidden_state.detach().numpy()
        assert relative_error([ref], [got])[1] <= 1e-5


def test_runs_automatically_before_onnx_emission(tmp_path: Path) -> None:
    module, inputs = swin()
    result = normrewrite.convert(
        module, [], example_inputs=inputs, outputs=[tmp_path / "s.onnx"], tracer="export"
    )
    fix = [p for p in result.report.passes if p.name == "fix-export"]
    assert fix and "run automatically before ONNX emission" in fix[0].notes


def test_grouped_mm_decomposition_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = (
        torch.randn(10, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 4, generator=g, dtype=torch.float64),
    )
    offs = torch.tensor([4, 4, 9])  # expert 1 empty, row 9 past the end (stays zero)
    expected = torch.zeros(10, 4, dtype=torch.float64)
    expected[0:4] = x[0:4] @ w[0]
    expected[4:9] = x[4:9] @ w[2]
    torch.testing.assert_close(grouped_mm(x, w, offs), expected, rtol=1e-12, atol=1e-12)


def test_noop_where_nothing_needs_fixing() -> None:
    module, inputs = bert(layers=1), (token_ids(),)
    gm = trace(module, inputs, "export").graph_module
    code = gm.code
    result = FixExport()(gm)
    assert not result.modified and gm.code == code


def test_idempotent() -> None:
    module, inputs = t5()
    gm = trace(module, inputs, "export").graph_module
    assert FixExport()(gm).modified
    assert not FixExport()(gm).modified


@torch.library.custom_op("nrtest::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _opaque(x) + 1


def test_unknown_op_is_named_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(EmitError) as info:
        normrewrite.convert(
            Opaque(),
            [],
            example_inputs=(torch.randn(2, 3),),
            outputs=[tmp_path / "o.onnx"],
            tracer="export",
        )
    msg = str(info.value)
    assert "at op nrtest.opaque" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """q with 4 heads; k/v with ``kv_heads`` heads (1: multi-query, as Falcon), from the input or,
    with ``memory``, from a stored batch-1 memory (k/v broadcast over the batch too)."""

    def __init__(self, kv_heads: int = 1, gqa: bool = False, memory: bool = False) -> None:
        super().__init__()
        self.kv_heads, self.gqa = kv_heads, gqa
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 2 * 8 * kv_heads)
        self.memory = nn.Parameter(torch.randn(1, 6, 32)) if memory else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        src = x if self.memory is None else self.memory
        k, v = self.kv(src).view(src.shape[0], src.shape[1], 2, self.kv_heads, 8).unbind(2)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=self.gqa
        )
        return out.transpose(1, 2).reshape(b, n, 32)


def _sdpa(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    targets = (torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _plain_export_fails_at_opset_23(module: nn.Module, inputs: tuple) -> str | None:
    ep = torch.export.export(module, inputs, strict=False)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=23)
        sess = session(program.model_proto.SerializeToString())
        sess.run(None, {sess.get_inputs()[0].name: inputs[0].numpy()})
    except Exception as e:
        return str(e)
    return None


# (kv heads, enable_gqa, stored memory) → the k/v dims fix-export expands (0 batch, 1 heads)
ATTENTION = {
    "multi-query": (1, False, False, ((1,), (1,))),
    "batch-1 memory": (4, False, True, ((0,), (0,))),
    "multi-query memory": (1, False, True, ((0, 1), (0, 1))),
    "gqa, equal heads": (4, True, False, ((), ())),
    "gqa, batch-1 memory": (2, True, True, ((0,), (0,))),
}


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_broadcast_attention_is_expanded(tmp_path: Path, case: str, tracer: str) -> None:
    kv_heads, gqa, memory, dims = ATTENTION[case]
    torch.manual_seed(0)
    module, x = Attention(kv_heads, gqa, memory).eval(), torch.randn(2, 5, 32)
    if tracer == "export" and case in ("multi-query", "gqa, equal heads", "batch-1 memory"):
        assert _plain_export_fails_at_opset_23(module, (x,)) is not None  # why the pass exists
    gm = trace(module, (x,), tracer).graph_module
    result = FixExport()(gm)
    (sdpa,) = _sdpa(gm)
    (change,) = result.changes
    assert change.target == sdpa.name
    for arg, want in zip(sdpa.args[1:3], dims, strict=True):
        if want:
            assert arg.target is torch.ops.aten.expand.default
            assert [i for i, d in enumerate(arg.args[1]) if d != -1] == list(want)
            assert all(arg.args[1][d] == 4 if d == 1 else arg.args[1][d] == 2 for d in want)
        else:
            assert arg.target is not torch.ops.aten.expand.default
    assert sdpa.kwargs.get("enable_gqa", False) is (gqa and kv_heads < 4)
    gm.graph.lint()
    want = fp64_reference(module, x)
    assert rel_err(want, gm(x)) <= 1e-6  # same values; the kernel may sum in another order
    assert not FixExport()(gm).modified  # idempotent
    if tracer == "export":  # ONNX emission re-exports either flavour: one suffices
        out = tmp_path / "a.onnx"
        normrewrite.convert(module, [], (x,), outputs=[out], tracer=tracer)
        assert rel_err(want, torch.from_numpy(ort_run(out, x)[0])) <= 1e-5


def test_grouped_query_attention_is_left_alone() -> None:
    """enable_gqa with kv heads dividing q heads exports at opset 23 as it is."""
    torch.manual_seed(0)
    module, x = Attention(kv_heads=2, gqa=True).eval(), torch.randn(2, 5, 32)
    assert _plain_export_fails_at_opset_23(module, (x,)) is None
    gm = trace(module, (x,), "export").graph_module
    assert not FixExport()(gm).modified


def test_dynamic_batch_survives_the_expansion(tmp_path: Path) -> None:
    """A batch-1 memory expanded to a symbolic batch (read with sym_size): the --dynamic ONNX runs
    at other batch sizes (the emitter checks one; this test another)."""
    torch.manual_seed(0)
    module, x = Attention(kv_heads=1, memory=True).eval(), torch.randn(2, 5, 32)
    out = tmp_path / "d.onnx"
    result = normrewrite.convert(
        module, [], (x,), outputs=[out], tracer="export", onnx_options=OnnxOptions(dynamic=True)
    )
    fix = next(p for p in result.report.passes if p.name == "fix-export")
    assert "key/value expanded" in fix.changes[0].detail
    other = torch.randn(3, 7, 32)
    assert rel_err(fp64_reference(module, other), torch.from_numpy(ort_run(out, other)[0])) <= 1e-5


def _falcon_dir(path: Path) -> Path:
    t = _transformers()
    torch.manual_seed(0)
    cfg = t.FalconConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        new_decoder_architecture=False,
        use_cache=False,
        max_position_embeddings=64,
    )
    randomize_norms(t.FalconModel(cfg)).eval().save_pretrained(path)
    return path


def test_falcon_multi_query_to_onnx_and_pt2_at_default_opset(tmp_path: Path) -> None:
    """The issue's command: Falcon's multi-query attention at the default opset, .pt2 in the same
    command; the tool checks ONNX parity, the test again against the fp64 model."""
    model = _falcon_dir(tmp_path / "falcon")
    onnx_out, pt2_out, report = tmp_path / "x.onnx", tmp_path / "x.pt2", tmp_path / "r.json"
    args = [str(model), "-p", "fold-bn", "-p", "fuse-norm", "-o", str(onnx_out), "-o", str(pt2_out)]
    res = CliRunner().invoke(main, ["convert", *args, "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert onnx_out.is_file() and pt2_out.is_file()
    data = json.loads(report.read_text())
    fix = next(p for p in data["passes"] if p["name"] == "fix-export")
    assert len(fix["changes"]) == 2  # one SDPA per layer
    assert all("key/value expanded" in c["detail"] for c in fix["changes"])
    (onnx_report,) = (o for o in data["outputs"] if o["path"].endswith(".onnx"))
    assert onnx_report["onnx_max_rel_err"] <= 1e-5

    hf = _transformers().FalconModel.from_pretrained(model).eval()
    ids = token_ids()
    want = fp64_reference(hf, ids)[0]
    assert rel_err(want, torch.from_numpy(ort_run(onnx_out, ids)[0])) <= 1e-5
    program = torch.export.load(str(pt2_out)).module()
    assert rel_err(want, torch.as_tensor(program(ids)[0])) <= 1e-5


def test_llama_grouped_query_attention_exports_at_default_opset(tmp_path: Path) -> None:
    """Llama with 2 kv heads for 4 query heads: transformers repeats k/v itself under export, so
    the graph's SDPA sees equal heads and the default opset takes it as it is."""
    t = _transformers()
    torch.manual_seed(0)
    cfg = t.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    module, ids = randomize_norms(t.LlamaModel(cfg)).eval(), token_ids()
    out = tmp_path / "l.onnx"
    normrewrite.convert(module, ["fuse-norm"], (ids,), outputs=[out])
    want = fp64_reference(module, ids)[0]
    assert rel_err(want, torch.from_numpy(ort_run(out, ids)[0])) <= 1e-5
