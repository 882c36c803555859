"""recalibrate-bn: re-estimate every BatchNorm's running statistics on sample data.

Identity. Nothing is preserved: this pass *deliberately* changes the model (``exact = False``),
so the numeric gate of ``convert`` measures but does not judge it. What it guarantees is that the
new statistics are exactly those PyTorch itself would compute by running the model in training
mode with ``momentum=None`` (cumulative moving average) over the same ``N`` batches, starting from
reset statistics (as ``torch.optim.swa_utils.update_bn`` does)::

    μ  = (1/N) Σ_k  mean_k(x)                     per channel c, x = the BN's input in batch k
    σ² = (1/N) Σ_k  var_k(x) · n_k / (n_k - 1)    n_k = values per channel (N·H·W …): *unbiased*

— every batch weighs the same whatever its size, and the variance is the unbiased batch variance
(PyTorch normalizes with the biased one but stores the unbiased one). During the calibration run
each BN normalizes with its batch statistics, as in training, so a BN downstream sees the input it
would see in training mode. A BN module called at several sites counts each call as one batch.
``num_batches_tracked`` is set to the number of batches seen, where the model keeps one.

Only ``running_mean``, ``running_var`` and ``num_batches_tracked`` change; weights, γ/β and the
graph are untouched (tested). Use it after anything that makes statistics stale: a norm swap,
pruning, a pre/post-norm conversion, fine-tuning with frozen BN.

Data (``data=``): a ``.pt`` file read with ``torch.load(weights_only=True)`` or an ``.npz``:

* a tensor / a single array: samples along dim 0 of a one-input model, cut into batches of
  ``batch_size`` (default: the example input's dim 0);
* a list/tuple: one entry per batch, each a tensor (one-input model) or a list/tuple of tensors
  (one per model input);
* an ``.npz`` with several arrays: one array per model input, in stored order (``arr_0``, …),
  each cut along dim 0 like a single tensor.

Without ``data``, ``batches`` random batches are drawn in the example inputs' shapes (``batch_size``
replaces dim 0): floating inputs from a normal distribution with the example tensor's mean and
standard deviation, integer inputs uniformly from the example's ``[min, max]`` (so token ids stay
inside the vocabulary), booleans as fair coin flips.

Batches may have another batch size than the example inputs (``batch_size``, or the batches of a
data file). A ``symbolic_trace`` graph runs at any size. A ``torch.export`` graph is valid only at
the shapes it was traced at (LeViT's, traced at batch 1, bakes batch 1 into ``split_with_sizes``
and reshapes), so batches of other shapes run through the source model (``PassContext.reference``)
given the graph's tensors, with hooks on its BatchNorm modules — after checking, on the example
inputs, that each of its BNs sees what the graph's BN sees (:mod:`.eager`, which also says why this
and not a second trace). Where the check fails (an earlier pass restructured the model) or there is
no source model, the graph runs as it is, skipping its shape guards: that works where no batch size
is baked in, and otherwise fails in one line saying why.

Preconditions: real (not ``meta``) weights; each BN has stored running statistics and is in eval
mode (a BN that uses batch statistics in this graph never reads its running statistics and is
skipped, as is one without them); every channel sees more than one value per batch.

Layout: :mod:`.measure` (which BNs, the moments, the calibration run), :mod:`.data` (batches),
:mod:`.eager` (batch sizes the graph was not traced for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from normrewrite.core.graph import get_tensor, has_tensor
from normrewrite.core.pass_infra import Change, PassContext, PassResult, Skip, compute_tensors
from normrewrite.core.rewrite import Rewrite, RewritePass, Sweep, rewrite_each
from normrewrite.errors import PassError, UsageError

from .data import load_batches, random_batches
from .eager import EagerModel, accepts, shape_key, shapes
from .measure import (
    Batch,
    Calibration,
    Moments,
    Target,
    batch_moments,
    bn_targets,
    match,
    measure,
    shift,
)


class _Recalibrate(Rewrite[Target]):
    refused = "left alone"

    def __init__(self, gm: GraphModule, ctx: PassContext, owner: RecalibrateBatchNorm) -> None:
        super().__init__(gm, ctx)
        self.owner = owner
        self.calibration = Calibration()
        self.origin = ""
        self.done: set[str] = set()

    def match(self, candidate: Node) -> Target | Skip | None:
        return match(self.gm, candidate)

    def prepare(self, matches: list[Target]) -> None:
        batches, self.origin = self.owner.batches(self.ctx)
        groups: dict[tuple[tuple[int, ...], ...], list[Batch]] = {}
        for b in batches:  # one graph per batch shape the traced graph does not accept
            groups.setdefault(shape_key(b), []).append(b)
        eager: EagerModel | PassError | None = None  # for shapes the graph was not traced at
        for group in groups.values():
            if not accepts(self.gm, group[0]) and eager is None:
                try:
                    eager = EagerModel(
                        self.gm, self.ctx.reference, matches, self.ctx.example_inputs
                    )
                except PassError as e:
                    eager = e
            if accepts(self.gm, group[0]) or not isinstance(eager, EagerModel):
                try:
                    measure(self.gm, group, matches, self.calibration)
                except PassError as e:
                    if eager is None:
                        raise
                    raise PassError(
                        f"{e}; the graph was traced at {shapes(self.ctx.example_inputs)} and the "
                        f"source model cannot run in its place ({eager}): calibrate at the traced "
                        "size, or run recalibrate-bn before the passes that change the model"
                    ) from None
            else:
                eager.measure(group, matches, self.calibration)

    def apply(self, found: Target) -> Change | None:
        """New statistics for ``found`` (None when a BN called at several sites was already
        written, or nothing moved)."""
        gm, t = self.gm, found
        if t.mean in self.done:  # a BN called at several sites: one set of statistics
            return None
        self.done.add(t.mean)
        moments = self.calibration.moments.get(t.mean)
        if moments is None or moments.count == 0:  # every node runs in the calibration
            raise PassError(f"recalibrate-bn: {t.label} was not reached when running the model")
        mean, var = moments.result()
        old_mean, old_var = get_tensor(gm, t.mean), get_tensor(gm, t.var)
        new_mean, new_var = mean.to(old_mean.dtype), var.to(old_var.dtype)
        if torch.equal(new_mean, old_mean) and torch.equal(new_var, old_var):
            return None
        dm, dv = shift(old_mean, old_var, new_mean, new_var)
        outputs, fns = [t.mean, t.var], [new_mean, new_var]
        counter = t.mean.rpartition(".")[0] + ".num_batches_tracked"
        if t.mean.endswith("running_mean") and has_tensor(gm, counter):
            old = get_tensor(gm, counter)
            outputs.append(counter)
            fns.append(torch.full_like(old, moments.count))
        values = tuple(
            v.to(get_tensor(gm, name).device) for v, name in zip(fns, outputs, strict=True)
        )
        compute_tensors(gm, self.ctx, outputs, [], lambda v=values: v, origin=self.owner.name)
        return Change(
            t.label,
            f"statistics from {moments.count} batches: mean moved {dm:.3g} σ (max |Δμ|/σ_old), "
            f"variance by a factor of up to {math.exp(dv):.3g} (max |log σ²_new/σ²_old| = {dv:.3g})",
        )


@dataclass(frozen=True)
class RecalibrateOptions:
    batches: int = 16
    """Number of batches (random ones, or at most this many from ``data``)."""
    data: str | None = None
    """A .pt or .npz file of input batches; random inputs like the example ones when unset."""
    batch_size: int | None = None
    """Batch size of random batches / of a sample tensor cut into batches (default: example's dim 0)."""


class RecalibrateBatchNorm(RewritePass):
    name = "recalibrate-bn"
    summary = (
        "re-estimate BatchNorm running statistics on sample data (approximate: changes outputs)"
    )
    exact = False
    sweep = Sweep.MATCH_ALL_FIRST  # one calibration run measures every BN
    Options = RecalibrateOptions

    def validate_options(self) -> None:
        if self.options.batches < 1:
            raise UsageError("pass recalibrate-bn: batches must be at least 1")
        if self.options.batch_size is not None and self.options.batch_size < 1:
            raise UsageError("pass recalibrate-bn: batch_size must be at least 1")

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        if not ctx.example_inputs:
            raise PassError("recalibrate-bn needs example inputs (their shapes and dtypes)")
        for t in pytree.tree_leaves(tuple(ctx.example_inputs)):
            if isinstance(t, Tensor) and t.device.type == "meta":
                raise PassError("recalibrate-bn runs the model: it cannot work on the meta device")

    def batches(self, ctx: PassContext) -> tuple[list[Batch], str]:
        o = self.options
        if o.data:
            b = load_batches(o.data, ctx.example_inputs, o.batches, o.batch_size)
            return b, f"{len(b)} batches from {o.data}"
        b = random_batches(ctx.example_inputs, o.batches, o.batch_size, ctx.seed)
        shapes = ", ".join("x".join(map(str, t.shape)) for t in b[0])
        return b, f"{len(b)} random batches ({shapes})"

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Recalibrate:
        return _Recalibrate(gm, ctx, self)

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rewrite = self.rewriter(gm, ctx)
        result = rewrite_each(rewrite, self.sweep)
        if result.changes:
            result.notes.append(f"recalibrated on {rewrite.origin}")
        return result


__all__ = [
    "Calibration",
    "Moments",
    "RecalibrateBatchNorm",
    "batch_moments",
    "bn_targets",
    "load_batches",
    "measure",
    "random_batches",
    "shift",
]
