"""ln-to-rmsnorm through layout ops (normrewrite/analysis/residual_stream/layout.py): conv-layout
streams whose reshapes keep each position's feature vector, flattens of size-1 dims, position
tables resized by interpolation, and Swin's patch merging (a cat along the features, which no
writer surgery can centre exactly)."""

from __future__ import annotations

import copy

import models
import torch
import torch.nn.functional as F
from test_ln_to_rmsnorm_coverage import VISION, _count, _no_saving, _run
from torch import nn

from normrewrite.analysis.norms import find_norms
from normrewrite.core.graph import get_tensor
from normrewrite.passes.ln_to_rmsnorm import LnToRmsNorm
from normrewrite.trace import trace
from normrewrite.verify import compare, tensor_leaves

aten = torch.ops.aten
C = 32


class Blocks(nn.Module):
    """Pre-LN residual blocks over (N, T, C), then a final LayerNorm."""

    def __init__(self, d: int = C, layers: int = 2) -> None:
        super().__init__()
        self.lns = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.final = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for ln, ffn in zip(self.lns, self.ffn, strict=True):
            h = h + ffn(torch.relu(ln(h)))
        return self.final(h)


class ConvLayout(nn.Module):
    """SegFormer/PVT's patch embedding: ``conv → reshape(N, C, H·W) → transpose → LayerNorm``
    (the reshape merges H and W only); ``mix=True`` reshapes straight to (N, H·W, C) instead,
    which scatters each position's features over several positions."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.mix = mix
        self.conv = nn.Conv2d(3, C, 8, stride=8)
        self.blocks = Blocks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        n, c, h, w = x.shape
        x = x.reshape(n, h * w, c) if self.mix else x.reshape(n, c, h * w).transpose(1, 2)
        return self.blocks(x)


def test_conv_layout_reshape_keeps_the_features() -> None:
    """The reshape merges H and W, not the features: the conv is the stream's writer (its output
    channels centred), no mean subtraction is inserted; a reshape that mixes the features is
    still refused, named."""
    run = _run(ConvLayout(), models.pixels())
    assert run.layernorms == (3, 0) and run.rms_norms == 3
    assert run.converted == run.claimed and not run.result.skipped and not run.result.notes
    assert get_tensor(run.gm, "conv.weight").double().mean(0).abs().max() < 1e-6
    assert run.err <= 1e-5

    mixed = _run(ConvLayout(mix=True), models.pixels())
    assert mixed.layernorms == (3, 3) and mixed.converted == mixed.claimed == set()
    assert {s.reason for s in mixed.result.skipped} == {"reshape reshapes the feature dim"}


class FlattenPooled(nn.Module):
    """Hiera's pooler: a mean over tokens kept as ``(N, C, 1)``, flattened to ``(N, C)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, C)
        self.blocks = nn.ModuleList(nn.Linear(C, C) for _ in range(2))
        self.lns = nn.ModuleList(nn.LayerNorm(C) for _ in range(2))
        self.final = nn.LayerNorm(C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for ln, lin in zip(self.lns, self.blocks, strict=True):
            h = h + lin(torch.relu(ln(h)))
        pooled = h.transpose(1, 2).mean(2, keepdim=True)  # (N, C, 1)
        return self.final(pooled.flatten(1))


def test_flatten_of_a_size_one_dim() -> None:
    """``flatten`` of ``(N, C, 1)`` merges the features with a size-1 dim only: walked through,
    the pooled norm is centred by the same writers (no "flattens the feature dim" refusal)."""
    run = _run(FlattenPooled(), models.token_ids(seq=8, vocab=50))
    assert run.layernorms == (3, 0) and run.rms_norms == 3
    assert run.converted == run.claimed and not run.result.skipped and not run.result.notes
    assert get_tensor(run.gm, "emb.weight").double().mean(1).abs().max() < 1e-6
    assert run.err <= 1e-5


class PatchMerging(nn.Module):
    """Swin: patch conv, a Pre-LN block over C, then ``view(N, H, W, C)``, four strided slices
    concatenated along the features, a LayerNorm over 4C, the reduction to 2C, a block over 2C."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 8, stride=8)
        self.ln1, self.fc1 = nn.LayerNorm(C), nn.Linear(C, C)
        self.merge_norm, self.reduce = nn.LayerNorm(4 * C), nn.Linear(4 * C, 2 * C, bias=False)
        self.blocks = Blocks(2 * C, layers=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        n, c, h, w = x.shape
        s = x.flatten(2).transpose(1, 2)
        s = s + self.fc1(torch.relu(self.ln1(s)))
        g = s.view(n, h, w, c)
        parts = [g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]]
        merged = torch.cat(parts, -1).view(n, -1, 4 * c)
        return self.blocks(self.reduce(self.merge_norm(merged)))


def test_swin_patch_merging_cat_along_the_features() -> None:
    """Centring each C-part moves the four parts of a 4C vector by different means, which the
    LayerNorm over 4C does not ignore: the C-wide stream, read raw by the cat, keeps its conv
    and linear as they are (only mean subtractions at its norm's input), the 4C norm gets one
    after the cat, and the 2C stream after the reduction is centred by weight surgery. All
    converted, exactly."""
    model = PatchMerging()
    conv = model.conv.weight.detach().clone()
    run = _run(model, models.pixels())
    assert run.layernorms == (4, 0) and run.rms_norms == 4
    assert run.converted == run.claimed and not run.result.skipped
    assert _no_saving(run) == ["ln1", "merge_norm"]
    assert torch.equal(get_tensor(run.gm, "conv.weight"), conv)
    assert get_tensor(run.gm, "reduce.weight").double().mean(0).abs().max() < 1e-6
    assert _count(run.gm, aten.cat.default) == 1
    assert run.err <= 1e-5


class InterpolatedTable(nn.Module):
    """YOLOS/DeiT-style position table stored for a 2×2 grid, resized to the image's 4×4 grid:
    the class row picked by ``select``, the patch rows sliced, laid out as (1, C, 2, 2),
    bicubically interpolated, flattened back and concatenated along the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.pos = nn.Parameter(torch.randn(1, 1 + 4, C))
        self.blocks = Blocks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        n, c, h, w = x.shape
        tokens = torch.cat([self.cls.expand(n, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        grid = self.pos[:, 1:].transpose(1, 2).reshape(1, c, 2, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([self.pos[:, 0][:, None], grid.flatten(2).transpose(1, 2)], 1)
        return self.blocks(tokens + pos)


def test_position_table_through_interpolation() -> None:
    """Interpolation applies the same spatial weights to every channel: the stored table is
    centred over its features in place (one table, read by the class pick and the patch slice),
    along with the conv and the class token; nothing is inserted."""
    run = _run(InterpolatedTable(), models.pixels())
    assert run.layernorms == (3, 0) and run.rms_norms == 3
    assert run.converted == run.claimed and not run.result.skipped and not run.result.notes
    for fqn in ("pos", "cls"):
        assert get_tensor(run.gm, fqn).double().mean(-1).abs().max() < 1e-6
    assert run.err <= 1e-5


def test_position_table_fx_flavour() -> None:
    """The same model traced by torch.fx: ``pos[:, 0][:, None]`` is two getitems (an int pick, a
    ``None`` for the new axis), walked through to the table too."""
    model = models.randomize_norms(InterpolatedTable()).eval()
    x = models.pixels()
    with torch.no_grad():
        ref = tensor_leaves(copy.deepcopy(model).double()(x.double()))
    gm = trace(model, (x,), "fx").graph_module
    layernorms = lambda: sum(n.kind == "layernorm" for n in find_norms(gm))  # noqa: E731
    assert layernorms() == 3
    result = LnToRmsNorm()(gm)
    assert not result.skipped and not result.notes
    assert layernorms() == 0 and _count(gm, F.rms_norm) == 3
    assert get_tensor(gm, "pos").double().mean(-1).abs().max() < 1e-6
    with torch.no_grad():
        assert compare(ref, tensor_leaves(gm(x))).max_rel_err <= 1e-5


def test_yolos_interpolated_position_tables() -> None:
    """YOLOS: the position table and the per-layer mid position tables, resized by bicubic
    interpolation and concatenated with the class and detection rows, are centred in place."""
    import transformers as t

    cfg = t.YolosConfig(**VISION | {"image_size": [32, 32]}, num_detection_tokens=4)
    run = _run(t.YolosModel(cfg), models.pixels())
    assert run.layernorms == (5, 0) and run.rms_norms == 5
    assert run.converted == run.claimed and not run.result.skipped and not run.result.notes
    for fqn in ("embeddings.position_embeddings", "encoder.interpolation.mid_position_embeddings"):
        assert get_tensor(run.gm, fqn).double().mean(-1).abs().max() < 1e-6
    assert run.err <= 1e-5
