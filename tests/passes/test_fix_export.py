"""fix-export (passes/fix_export.py): real models that torch.export traces but torch.onnx.export
rejects (HF T5 encoder, Swin: ``contiguous`` + ``view``; Mixtral: a custom grouped-matmul op) come
out as valid ONNX matching the original; the pass is a no-op where nothing needs fixing; an op with
no translation is named in one line."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
import torch
from models import bert, randomize_norms, token_ids
from normrewrite.passes.fix_export import FixExport, grouped_mm
from torch import nn

import normrewrite
from normrewrite.errors import EmitError
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
