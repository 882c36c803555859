"""recalibrate-bn at batch sizes the graph was not traced for: the eager model with hooks.

A ``torch.export`` graph is valid only at the shapes it was traced at: its placeholders record them
(symbolic where the trace made them dynamic), and sizes derived from them — a reshape to
``(1, 16, 32)``, LeViT's ``split_with_sizes`` — are baked into the graph as literals. Such a graph
cannot run on batches of another size. The source model (``PassContext.reference``) can: a copy of
it is given the graph's current tensors (by name) and a forward hook on each BatchNorm module
whose running statistics the graph reads records the module's input and normalizes with the
batch's statistics, exactly as :class:`~.measure._Recorder` does on the graph.

Why not trace the source model again at the calibration batch size: a trace records the model's
state as well as its code, and models keep state — LeViT caches its attention biases after the
first eager call, so a second trace is another graph than the first — and each trace costs seconds.
The eager model runs at any batch size as it is.

It must be the model the graph computes, BN by BN: every BN the pass targets is a BatchNorm module
at the path its running statistics name, and on the example inputs each BN call of the copy sees
the same input as the graph's (max |Δ| ≤ 1e-5 · max |x|). Where that fails (an earlier pass
restructured the model around a BN, or there is no source model) the graph itself runs on the
batches, skipping its shape guards, as it always could: that works where no size is baked in, and
otherwise fails in one line that gives both reasons. ``symbolic_trace`` graphs hold no sizes and
always run as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule

from normrewrite.core.graph import Flavour, flavour, get_tensor, has_tensor, set_tensor
from normrewrite.errors import PassError, first_line

from .measure import Batch, Calibration, Moments, Target, bn_inputs

_MATCH_RTOL = 1e-5


def shape_key(batch: Batch) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in batch)


def accepts(gm: GraphModule, batch: Batch) -> bool:
    """Was ``gm`` traced for inputs of ``batch``'s shapes (every static placeholder size equal)?"""
    if flavour(gm) is Flavour.MODULE:
        return True
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, batch, strict=False):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        if val.dim() != x.dim():
            return False
        for traced, size in zip(val.shape, x.shape, strict=True):
            if isinstance(traced, int) and traced != size:
                return False
    return True


def shapes(batch: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in batch if isinstance(t, Tensor))


class EagerModel:
    """A copy of the source model holding the graph's tensors, with its target BN modules."""

    def __init__(
        self,
        gm: GraphModule,
        reference: nn.Module | None,
        targets: Sequence[Target],
        example: Sequence[Any],
    ) -> None:
        """Raises :class:`PassError` with the reason the source model cannot stand in for ``gm``."""
        if reference is None:
            raise PassError("no source model is available")
        model = copy.deepcopy(reference).eval()
        named = [*model.named_parameters(remove_duplicate=False)]
        named += [*model.named_buffers(remove_duplicate=False)]
        for name, _ in named:
            if has_tensor(gm, name):
                set_tensor(model, name, get_tensor(gm, name))
        self.model = model
        self.modules: dict[str, nn.modules.batchnorm._BatchNorm] = {}
        modules = dict(model.named_modules())
        for t in targets:
            module = modules.get(t.mean.rpartition(".")[0])
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise PassError(f"{t.label} is not a BatchNorm module of the source model")
            self.modules[t.mean] = module
        want = bn_inputs(gm, targets, example)
        got = self._run(example, lambda mean, x: None)
        for mean, xs in want.items():
            ys = got.get(mean, [])
            if len(ys) != len(xs) or any(not _close(x, y) for x, y in zip(xs, ys, strict=False)):
                label = next(t.label for t in targets if t.mean == mean)
                raise PassError(f"the source model's {label} does not see the graph's input")

    def _run(
        self, inputs: Sequence[Any], normalize: Callable[[str, Tensor], Tensor | None]
    ) -> dict[str, list[Tensor]]:
        """Run the copy with a hook on each target BN: record its input, and replace its output by
        ``normalize(mean FQN, input)`` unless that is None."""
        seen: dict[str, list[Tensor]] = {}

        def hook_for(mean: str) -> Callable[..., Tensor | None]:
            def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
                seen.setdefault(mean, []).append(args[0].detach().clone())
                return normalize(mean, args[0])

            return hook

        handles = [m.register_forward_hook(hook_for(mean)) for mean, m in self.modules.items()]
        try:
            with torch.no_grad():
                self.model(*inputs)
        finally:
            for h in handles:
                h.remove()
        return seen

    def measure(
        self, batches: Sequence[Batch], targets: Sequence[Target], cal: Calibration
    ) -> None:
        """Add each target BN's moments over ``batches`` to ``cal`` (training-mode normalization
        during the run, as :func:`~.measure.measure` does on the graph)."""
        labels = {t.mean: t.label for t in targets}

        def normalize(mean: str, x: Tensor) -> Tensor:
            try:
                cal.moments.setdefault(mean, Moments()).add(x)
            except PassError as e:
                raise PassError(f"{labels[mean]}: {e}") from None
            bn = self.modules[mean]
            return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

        for batch in batches:
            try:
                self._run(batch, normalize)
            except PassError as e:
                raise PassError(
                    f"recalibrate-bn: batch {cal.batches} ({shapes(batch)}): {first_line(e)}"
                ) from None
            except Exception as e:
                raise PassError(
                    f"recalibrate-bn: running the model on batch {cal.batches} ({shapes(batch)}) "
                    f"failed: {type(e).__name__}: {first_line(e)}"
                ) from e
            cal.batches += 1


def _close(x: Tensor, y: Tensor) -> bool:
    if x.shape != y.shape:
        return False
    if not x.numel():
        return True
    diff = (x.double() - y.double()).abs().max()
    return float(diff) <= _MATCH_RTOL * float(x.double().abs().max())


__all__ = ["EagerModel", "accepts", "shape_key", "shapes"]
