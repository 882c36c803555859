"""swap-norm: replace every normalization layer of one kind by another kind.

``swap-norm:from=X,to=Y[,groups=G,eps=E,alpha=A,layout=L,calibrate=B]`` with X, Y among
``batchnorm``, ``groupnorm``, ``instancenorm``, ``layernorm``, ``rmsnorm``, and also ``to=frozen``
(from batchnorm) and ``to=dyt`` (Dynamic Tanh).

Axis semantics. BatchNorm, GroupNorm and InstanceNorm are *channel* norms: on ``(N, C, *S)`` they
normalize over dim 1's channels (BN: statistics over N and S; GN: per sample over a group of
channels and S; IN: per sample and channel over S) and their γ/β have shape ``(C,)``. LayerNorm
and RMSNorm are *trailing* norms: per position over the trailing ``normalized_shape``, γ/β of
that shape. A swap within a family keeps the axes; across families:

* channel → trailing on ``(N, C)``: the same features (dim 1 is the last dim); γ/β carry over.
* channel → trailing on ``(N, C, *S)``: two different norms share the name. ``layout=chw`` is
  LayerNorm over ``(C, *S)`` (one statistic per sample; γ/β broadcast to ``(C, *S)``, which fixes
  the spatial size); ``layout=channels`` is ConvNeXt's per-position channel LayerNorm (permute to
  channels-last, normalize over C, permute back; γ/β stay ``(C,)``). With ``layout=auto`` the pass
  refuses rather than guess.
* trailing → channel: only on ``(N, C)`` inputs; a transformer's ``(N, L, C)`` has its features
  last, not at dim 1, and the pass refuses.

Exact swaps (``Pass.exact`` is set per instance from the options):

* ``from=batchnorm,to=frozen``: in eval mode ``BN(x) = s·x + t`` with ``s = γ/√(σ²+ε)`` and
  ``t = β − μ·s`` per channel (see ``fold_bn.math.bn_affine``): one mul and one add with stored
  buffers ``<bn>.scale`` / ``<bn>.shift`` of shape ``(C, 1, …)``, computed in float64.
  Precondition: running statistics, eval mode.
* ``from=instancenorm,to=groupnorm`` (no ``groups``) and ``from=groupnorm,to=instancenorm``:
  ``IN(x) = GN(x, groups=C)`` — both normalize each (sample, channel) over S with the same
  per-channel affine. Preconditions: InstanceNorm without running statistics (with them it is a
  fixed affine in eval, a different op: refused); for GN → IN, ``num_groups == C`` (others
  are skipped).

Approximate swaps (an architecture change; verification measures the error, the report says
"approximate"): every other pair. γ/β carry over when their shape allows (a norm without β —
RMSNorm — keeps the source β as an add after it, so only the centring changes); the new tensors
are real ``nn.Parameter``\\ s (trainable), new running statistics are buffers. ``to=batchnorm``
sets its running statistics from the norm's input on the example inputs (``calibrate=true``,
the default; 0/1 otherwise) and is emitted in eval form. ``to=groupnorm`` uses ``groups`` or the
largest divisor of C not above 32 (Wu & He's G = 32). ``to=dyt`` is Dynamic Tanh (Zhu et al.,
CVPR 2025, arXiv 2503.10622): ``DyT(x) = γ·tanh(α·x) + β`` with a learnable scalar α initialised
to ``alpha`` (0.5, the paper's default) and γ/β from the norm.

Impossible requests raise a one-line :class:`~normrewrite.errors.PassError`: ``groups`` not
dividing a layer's channels, the ``layout`` ambiguity above, trailing → channel norms on inputs
with more than two dims, InstanceNorm on ``(N, C)``. Per-layer preconditions (tensors computed in
the graph or shared, a module called at several sites) skip that layer with the reason.

Layout: :mod:`.math` (tensor math), :mod:`.plan` (options and the matcher), :mod:`.rewrite`
(the graph surgery).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.core.pass_infra import Change, PassContext, PassResult, Skip
from normrewrite.core.rewrite import Rewrite, RewritePass, Sweep, rewrite_each
from normrewrite.core.usage import TensorUsage

from .math import default_groups
from .plan import SwapNormOptions, SwapPlan, is_exact, plan, validate
from .rewrite import apply, capture


class _Swap(Rewrite[SwapPlan]):
    refused = "not swapped"

    def __init__(self, gm: GraphModule, ctx: PassContext, options: SwapNormOptions) -> None:
        super().__init__(gm, ctx)
        self.options = options
        self.usage = TensorUsage.of(gm)
        self.stats: dict[Node, Tensor] = {}

    def match(self, candidate: Node) -> SwapPlan | Skip | None:
        return plan(self.gm, candidate, self.options, self.usage)

    def prepare(self, matches: list[SwapPlan]) -> None:
        """to=batchnorm: measure each norm's input on the original graph, to calibrate."""
        if self.options.to == "batchnorm" and self.options.calibrate:
            self.stats = capture(self.gm, {p.src.input for p in matches}, self.ctx.example_inputs)

    def apply(self, found: SwapPlan) -> Change:
        note = apply(self.gm, found, self.ctx, self.options.alpha, self.stats)
        return Change(found.label, found.describe() + (f"; {note}" if note else ""))


class SwapNorm(RewritePass):
    name = "swap-norm"
    summary = (
        "replace norms of one kind by another (from=,to=; exact for batchnorm→frozen and "
        "instancenorm↔groupnorm, else approximate: trainable, error measured)"
    )
    exact = False  # per instance: see is_exact
    sweep = Sweep.MATCH_ALL_FIRST  # to=batchnorm measures the original graph first
    Options = SwapNormOptions

    def __init__(self, options: SwapNormOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)  # `from` and `from_` both name SwapNormOptions.from_
        self.exact = is_exact(self.options)

    def validate_options(self) -> None:
        validate(self.options)

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Swap:
        return _Swap(gm, ctx, self.options)

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = rewrite_each(self.rewriter(gm, ctx), self.sweep)
        if result.changes and not self.exact:
            result.notes.append(
                f"approximate: {self.options.from_} → {self.options.to} changes the model; "
                "fine-tune it (the new parameters are trainable)"
            )
        return result


__all__ = ["SwapNorm", "SwapNormOptions", "SwapPlan", "default_groups", "is_exact", "plan"]
