"""fold-bn: fold BatchNorm running statistics into the neighbouring conv/linear weights.

Identity. In eval mode a BatchNorm is a per-channel affine map::

    BN(x) = s * x + t,    s = γ / sqrt(σ² + ε),    t = β - μ * s     (γ = 1, β = 0 if affine=False)

*Output side* — BN after a layer ``L(x) = W ⊛ x + b`` that is linear in ``x``::

    BN(L(x))_c = s_c (W ⊛ x)_c + (s_c b_c + t_c)   ⇒   W'_c = s_c W_c,   b' = s b + t

where ``c`` is the layer's output channel: dim 0 of a Conv/Linear weight ``(C_out, C_in/g, k…)``;
for a ConvTranspose, whose weight is ``(C_in, C_out/g, k…)``, output channel ``c = g·(C_out/g) + j``
lives in ``W[g·C_in/g : (g+1)·C_in/g, j]`` — the grouped layout folders commonly get wrong.
A missing conv bias is created (``b = 0``); an existing one is rescaled.

*Input side* — BN before a layer: ``L(s x + t) = (W · diag(s)) ⊛ x + (W ⊛ t + b)``. The second term
is a constant per output channel only when every output sees a full kernel of ``t``: true for
Linear (also after ``flatten(1)`` of a BN2d output, each channel repeated H·W times) and for
unpadded Conv (zero padding would mix 0 with ``t`` at the borders; reflect/replicate/circular
padding pads with BN'd values and stays exact, whether the conv pads itself or torch.export wrote
it as a separate ``pad`` node before an unpadded conv). Transposed convs are never input-folded.

Preconditions, each checked and reported when it fails: BN in eval mode with running statistics;
the statistics are valid (``running_var`` finite and ≥ 0, ``running_mean``, γ, β finite — checked
on real tensors; on ``meta`` tensors the values are unknown and not checked); the layer's weight
and bias are stored tensors read by this layer only (a conv module called at two sites or a tied
weight is skipped, or cloned with ``shared=clone``); exactly one user between the two; the BN
channel axis (dim 1) is the layer's channel axis (``Linear`` on ``(N, L, F)`` followed by
``BatchNorm1d(L)`` normalizes ``L``, not ``F``). BN → ReLU → Conv is not adjacent and never
matches.

Through layout ops. Flatten/reshape/view/squeeze/unsqueeze (row-major reinterpretations) and
transpose/permute between the layer and the BN change no value, only where each element sits; the
fold stays exact when every element keeps its channel on one axis (:mod:`normrewrite.core.ops.layout` tracks that axis
by shape): LeViT's Linear → ``flatten(0, 1)`` → BN1d → ``reshape_as``, PatchTST's Linear →
``transpose(1, 2)`` → BN1d → ``transpose(1, 2)``, and on the input side BN → ``flatten``/``view``/
``transpose`` → Linear (the channel must land on the Linear's features, possibly merged with inner
axes: ``repeat`` features per channel) or → conv (dim 1). An op that splits the channel axis or
merges it with an outer one, or a permutation that leaves it off the axis the other side needs, is
refused, naming the op; every op in between must feed the chain only.

Numerics: the folded tensors are computed in float64 and cast back to the weight dtype, so fp16/bf16
models fold without overflow (an fp16 ``running_var`` above 65504 would be ``inf``).

Layout: :mod:`.math` (pure tensor math), :mod:`.conditions` (the preconditions as functions of
plain values, for every graph form), :mod:`.fx` (the torch.fx matcher and surgery), :mod:`.fx_layout` /
:mod:`.onnx_layout` (the channel axis through layout ops; the shape math is
:mod:`normrewrite.core.ops.layout`); the ONNX form is
:mod:`normrewrite.passes.fold_bn.onnx`.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from normrewrite.core.pass_infra import Change, PassContext, Skip
from normrewrite.core.rewrite import Rewrite, RewritePass
from normrewrite.core.usage import TensorUsage

from . import fx
from .fx import FoldMatch
from .math import Side, bn_affine, fold_input, fold_output
from .options import FoldBatchNormOptions


class _Fold(Rewrite[FoldMatch]):
    refused = "not foldable"

    def __init__(self, gm: GraphModule, ctx: PassContext, shared: str) -> None:
        super().__init__(gm, ctx)
        self.shared = shared
        self.usage = TensorUsage.of(gm)

    def match(self, candidate: Node) -> FoldMatch | Skip | None:
        return fx.match(self.gm, candidate, self.usage, self.shared)

    def apply(self, found: FoldMatch) -> Change:
        change = Change(found.label, found.describe())
        logged = len(self.ctx.recipes)
        fx.apply(self.gm, found, self.ctx)
        # the fold rewrote, created (bias, private copies) and removed (the BN's) tensors, all
        # named by the recipes it logged
        self.usage.refresh(
            self.gm, {n for r in self.ctx.recipes[logged:] for n in (*r.outputs, *r.inputs)}
        )
        return change


class FoldBatchNorm(RewritePass):
    name = "fold-bn"
    summary = "fold eval-mode BatchNorm into the adjacent conv/linear weights (exact)"
    exact = True
    Options = FoldBatchNormOptions
    onnx_form = "normrewrite.passes.fold_bn.onnx:OnnxFoldBatchNorm"

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Fold:
        return _Fold(gm, ctx, self.options.shared)


__all__ = [
    "FoldBatchNorm",
    "FoldBatchNormOptions",
    "FoldMatch",
    "Side",
    "bn_affine",
    "fold_input",
    "fold_output",
]
