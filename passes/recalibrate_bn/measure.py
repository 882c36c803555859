"""recalibrate-bn's measuring: which BNs it re-estimates (:func:`match`), the per-batch moments
and their cumulative average (pure tensor math), and the calibration run that records them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node

from normrewrite.core.graph import get_tensor, is_bookkeeping
from normrewrite.core.ops import NormInfo, batchnorm_info
from normrewrite.core.pass_infra import Skip
from normrewrite.errors import PassError, first_line

aten = torch.ops.aten

Batch = tuple[Tensor, ...]

# --------------------------------------------------------------------------- tensor math


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel (dim 1) mean and unbiased variance of one batch, in float64, and the number
    of values per channel."""
    if x.dim() < 2:
        raise PassError(f"a BatchNorm input of shape {tuple(x.shape)} has no channel dim")
    dims = [d for d in range(x.dim()) if d != 1]
    n = x.numel() // x.shape[1]
    if n < 2:
        raise PassError(
            f"the BatchNorm sees {n} value per channel (its input is {tuple(x.shape)}): its "
            "variance is undefined; use larger batches (recalibrate-bn:batch_size=N)"
        )
    x64 = x.detach().to(torch.float64)
    return x64.mean(dims), x64.var(dims, unbiased=True), n


@dataclass
class Moments:
    """Cumulative (momentum=None) average of per-batch means and unbiased variances."""

    mean_sum: Tensor | None = None
    var_sum: Tensor | None = None
    count: int = 0

    def add(self, x: Tensor) -> None:
        mean, var, _ = batch_moments(x)
        self.mean_sum = mean if self.mean_sum is None else self.mean_sum + mean
        self.var_sum = var if self.var_sum is None else self.var_sum + var
        self.count += 1

    def result(self) -> tuple[Tensor, Tensor]:
        assert self.mean_sum is not None and self.var_sum is not None  # count > 0
        return self.mean_sum / self.count, self.var_sum / self.count


def shift(
    old_mean: Tensor, old_var: Tensor, new_mean: Tensor, new_var: Tensor
) -> tuple[float, float]:
    """How far statistics moved: (max |Δμ| in units of the old σ, max |log(σ²_new / σ²_old)|)."""
    om, ov = old_mean.double(), old_var.double().clamp_min(1e-12)
    nm, nv = new_mean.double(), new_var.double().clamp_min(1e-12)
    return float(((nm - om).abs() / ov.sqrt()).max()), float((nv / ov).log().abs().max())


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Target:
    """A BN whose running statistics the pass rewrites (a BN called twice has two nodes)."""

    info: NormInfo
    mean: str  # FQNs
    var: str

    @property
    def label(self) -> str:
        return self.info.label

    def preview(self) -> str:
        return "running statistics can be re-estimated on data"


@dataclass
class Calibration:
    """What a run over the batches measured: running-stat FQN → moments."""

    moments: dict[str, Moments] = field(default_factory=dict)
    batches: int = 0


def match(gm: GraphModule, node: Node) -> Target | Skip | None:
    """``node`` as a BN whose statistics can be re-estimated, or why not; None for other nodes
    (and for the tuple-item node of a BN op, which is judged at the op)."""
    bn = batchnorm_info(gm, node)
    if bn is None or (bn.op_node is not None and bn.op_node is not node):
        return None
    if not bn.tracks_stats:
        return Skip(bn.label, "no running statistics (track_running_stats=False)")
    if bn.training:
        return Skip(
            bn.label,
            "uses batch statistics in this graph (training mode): its running statistics are never read",
        )
    if bn.running_mean is None or bn.running_var is None:
        return Skip(bn.label, "running statistics are computed in the graph, not stored")
    return Target(bn, bn.running_mean, bn.running_var)


def bn_targets(gm: GraphModule) -> list[Target]:
    """Every BN whose statistics can be re-estimated."""
    return [t for n in gm.graph.nodes if isinstance(t := match(gm, n), Target)]


class _Recorder(Interpreter):
    """Runs the graph with every target BN in training-mode normalization, recording the
    per-channel moments of its input; with ``cal=None`` runs it as it is, keeping a copy of every
    target BN's input (:attr:`inputs`, per running-mean FQN in call order)."""

    def __init__(self, gm: GraphModule, targets: Sequence[Target], cal: Calibration | None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # errors stay one line: no node dump and traceback appended
        self.by_node = {(t.info.op_node or t.info.node): t for t in targets}
        self.cal = cal
        self.inputs: dict[str, list[Tensor]] = {}

    def run_node(self, n: Node) -> Any:
        if is_bookkeeping(n):  # export's shape guards: batches may have another batch size
            return None
        target = self.by_node.get(n)
        if target is None:
            return super().run_node(n)
        x = (
            self.env[target.info.input]
            if isinstance(target.info.input, Node)
            else target.info.input
        )
        if self.cal is None:
            self.inputs.setdefault(target.mean, []).append(x.detach().clone())
            return super().run_node(n)
        try:
            self.cal.moments.setdefault(target.mean, Moments()).add(x)
        except PassError as e:
            raise PassError(f"{target.label}: {e}") from None
        info = target.info
        weight = get_tensor(self.module, info.weight) if info.weight else self._arg(n, 1)
        bias = get_tensor(self.module, info.bias) if info.bias else self._arg(n, 2)
        out = F.batch_norm(x, None, None, weight, bias, True, 0.0, info.eps or 0.0)
        if (
            n.op == "call_function"
            and n.target is aten._native_batch_norm_legit_no_training.default
        ):
            return out, x.new_empty(0), x.new_empty(0)
        return out

    def _arg(self, n: Node, i: int) -> Tensor | None:
        """γ/β computed in the graph (call_function BN only)."""
        if n.op != "call_function" or len(n.args) <= i or not isinstance(n.args[i], Node):
            return None
        return self.env[n.args[i]]


def bn_inputs(
    gm: GraphModule, targets: Sequence[Target], inputs: Sequence[Any]
) -> dict[str, list[Tensor]]:
    """The input of every target BN call when ``gm`` runs (unchanged) on ``inputs``."""
    rec = _Recorder(gm, targets, None)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.inputs


def measure(
    gm: GraphModule,
    batches: Sequence[Batch],
    targets: Sequence[Target] | None = None,
    calibration: Calibration | None = None,
) -> Calibration:
    """Run ``gm`` over ``batches`` and return each target BN's cumulative statistics (added to
    ``calibration`` when given: the average is over every batch, whichever graph ran it). ``gm``
    must accept the batches' shapes (:mod:`.eager`). Errors are one line: the fx interpreter
    appends the failing node and a traceback to the message, :func:`first_line` drops them."""
    if targets is None:
        targets = bn_targets(gm)
    cal = calibration if calibration is not None else Calibration()
    rec = _Recorder(gm, targets, cal)
    with torch.no_grad():
        for batch in batches:
            shapes = ", ".join("x".join(map(str, t.shape)) for t in batch)
            try:
                rec.run(*batch)
            except PassError as e:
                raise PassError(
                    f"recalibrate-bn: batch {cal.batches} ({shapes}): {first_line(e)}"
                ) from None
            except Exception as e:
                raise PassError(
                    f"recalibrate-bn: running the model on batch {cal.batches} ({shapes}) failed: "
                    f"{type(e).__name__}: {first_line(e)}"
                ) from e
            cal.batches += 1
    return cal


__all__ = [
    "Batch",
    "Calibration",
    "Moments",
    "Target",
    "batch_moments",
    "bn_inputs",
    "bn_targets",
    "match",
    "measure",
    "shift",
]
