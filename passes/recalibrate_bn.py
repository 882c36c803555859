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

Batches may have another batch size than the example inputs: the calibration run skips
``torch.export``'s shape guards, so this works wherever the graph has no batch size baked in (a
graph that has fails with a one-line error naming the batch).

Preconditions: real (not ``meta``) weights; each BN has stored running statistics and is in eval
mode (a BN that uses batch statistics in this graph never reads its running statistics and is
skipped, as is one without them); every channel sees more than one value per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node
from torch.utils import _pytree as pytree

from normrewrite.core.graph import get_tensor, has_tensor, is_bookkeeping
from normrewrite.core.ops import NormInfo, batchnorm_info
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, Skip, compute_tensors
from normrewrite.errors import PassError, UsageError

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
            f"a BatchNorm sees {n} value per channel in a batch of shape {tuple(x.shape)}; "
            "its variance is undefined (use a larger batch: recalibrate-bn:batch_size=N)"
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


@dataclass
class Calibration:
    """What a run over the batches measured: running-stat FQN → moments."""

    moments: dict[str, Moments] = field(default_factory=dict)
    batches: int = 0


def bn_targets(gm: GraphModule) -> tuple[list[Target], list[Skip]]:
    targets: list[Target] = []
    skipped: list[Skip] = []
    for node in gm.graph.nodes:
        bn = batchnorm_info(gm, node)
        if bn is None or (bn.op_node is not None and bn.op_node is not node):
            continue
        if not bn.tracks_stats:
            skipped.append(Skip(bn.label, "no running statistics (track_running_stats=False)"))
        elif bn.training:
            skipped.append(
                Skip(
                    bn.label,
                    "uses batch statistics in this graph (training mode): "
                    "its running statistics are never read",
                )
            )
        elif bn.running_mean is None or bn.running_var is None:
            skipped.append(
                Skip(bn.label, "running statistics are computed in the graph, not stored")
            )
        else:
            targets.append(Target(bn, bn.running_mean, bn.running_var))
    return targets, skipped


class _Recorder(Interpreter):
    """Runs the graph with every target BN in training-mode normalization, recording the
    per-channel moments of its input."""

    def __init__(self, gm: GraphModule, targets: Sequence[Target], cal: Calibration) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.by_node = {(t.info.op_node or t.info.node): t for t in targets}
        self.cal = cal

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
        self.cal.moments.setdefault(target.mean, Moments()).add(x)
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


def measure(
    gm: GraphModule, batches: Sequence[Batch], targets: Sequence[Target] | None = None
) -> Calibration:
    """Run ``gm`` over ``batches`` and return each target BN's cumulative statistics."""
    if targets is None:
        targets, _ = bn_targets(gm)
    cal = Calibration()
    rec = _Recorder(gm, targets, cal)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            try:
                rec.run(*batch)
            except PassError:
                raise
            except Exception as e:
                msg = " ".join(str(e).split())[:200]
                shapes = ", ".join("x".join(map(str, t.shape)) for t in batch)
                raise PassError(
                    f"recalibrate-bn: running the model on batch {i} ({shapes}) failed: "
                    f"{type(e).__name__}: {msg}"
                ) from e
            cal.batches += 1
    return cal


# --------------------------------------------------------------------------- data


def random_batches(
    example: Sequence[Any], n: int, batch_size: int | None, seed: int
) -> list[Batch]:
    """``n`` random batches shaped like ``example`` (see the module docstring)."""
    leaves = pytree.tree_leaves(tuple(example))
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if len(tensors) != len(leaves) or not tensors:
        raise PassError(
            "recalibrate-bn: the example inputs must be tensors to draw random batches like them"
        )
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(tuple(_draw(t, batch_size, g) for t in tensors))
    return out


def _draw(t: Tensor, batch_size: int | None, g: torch.Generator) -> Tensor:
    shape = list(t.shape)
    if batch_size is not None and shape:
        shape[0] = batch_size
    if t.dtype.is_floating_point:
        ref = t.detach().double()
        mean = float(ref.mean()) if ref.numel() else 0.0
        std = float(ref.std()) if ref.numel() > 1 else 1.0
        if not math.isfinite(std) or std <= 0:
            std = 1.0
        x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
        return x.to(t.dtype)
    if t.dtype is torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    lo = int(t.min()) if t.numel() else 0
    hi = int(t.max()) if t.numel() else 0
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=t.dtype)


def load_batches(
    path: str | Path, example: Sequence[Any], n: int | None, batch_size: int | None
) -> list[Batch]:
    """Batches from a ``.pt`` or ``.npz`` file (see the module docstring), at most ``n``."""
    path = Path(path)
    tensors = [t for t in pytree.tree_leaves(tuple(example)) if isinstance(t, Tensor)]
    n_inputs = len(tensors)
    if not path.is_file():
        raise UsageError(f"recalibrate-bn: data file {path} does not exist")
    if path.suffix == ".npz":
        raw: Any = _load_npz(path)
        if isinstance(raw, list) and len(raw) > 1:
            raw = _zip_inputs(raw, n_inputs, batch_size, tensors, path)
    elif path.suffix in (".pt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = " ".join(str(e).split())[:160]
            raise UsageError(
                f"recalibrate-bn: cannot read {path} with torch.load(weights_only=True): {msg}"
            ) from None
    else:
        raise UsageError(f"recalibrate-bn: data file {path} must be .pt or .npz")
    if isinstance(raw, list) and len(raw) == 1 and path.suffix == ".npz":
        raw = raw[0]
    if isinstance(raw, Tensor):
        if n_inputs != 1:
            raise UsageError(
                f"recalibrate-bn: {path} holds one tensor but the model takes {n_inputs} inputs"
            )
        batches = [(b,) for b in _split(raw, batch_size, tensors[0], path)]
    elif isinstance(raw, list | tuple):
        batches = [_batch(item, n_inputs, path, i) for i, item in enumerate(raw)]
    else:
        raise UsageError(
            f"recalibrate-bn: {path} holds a {type(raw).__name__}, not a tensor or a list of batches"
        )
    if not batches:
        raise UsageError(f"recalibrate-bn: {path} holds no batches")
    batches = batches[:n] if n is not None else batches
    return [tuple(_cast(x, ref) for x, ref in zip(b, tensors, strict=True)) for b in batches]


def _load_npz(path: Path) -> list[Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return [torch.from_numpy(np.array(data[k])) for k in data.files]
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise UsageError(f"recalibrate-bn: cannot read {path}: {msg}") from None


def _zip_inputs(
    arrays: list[Tensor], n_inputs: int, batch_size: int | None, refs: list[Tensor], path: Path
) -> list[Batch]:
    if len(arrays) != n_inputs:
        raise UsageError(
            f"recalibrate-bn: {path} holds {len(arrays)} arrays but the model takes {n_inputs} inputs"
        )
    parts = [_split(a, batch_size, r, path) for a, r in zip(arrays, refs, strict=True)]
    if len({len(p) for p in parts}) != 1:
        raise UsageError(f"recalibrate-bn: the arrays in {path} hold different numbers of samples")
    return [tuple(b) for b in zip(*parts, strict=True)]


def _split(t: Tensor, batch_size: int | None, ref: Tensor, path: Path) -> list[Tensor]:
    if t.dim() == 0:
        raise UsageError(f"recalibrate-bn: {path} holds a scalar, not samples")
    size = batch_size or (ref.shape[0] if ref.dim() else 1)
    return list(torch.split(t, size))


def _batch(item: Any, n_inputs: int, path: Path, i: int) -> Batch:
    parts = (
        [item]
        if isinstance(item, Tensor)
        else list(item)
        if isinstance(item, list | tuple)
        else None
    )
    if parts is None or not all(isinstance(p, Tensor) for p in parts):
        raise UsageError(
            f"recalibrate-bn: batch {i} in {path} is not a tensor or a list of tensors"
        )
    if len(parts) != n_inputs:
        raise UsageError(
            f"recalibrate-bn: batch {i} in {path} has {len(parts)} tensors, the model takes {n_inputs} inputs"
        )
    return tuple(parts)


def _cast(x: Tensor, ref: Tensor) -> Tensor:
    if x.dtype == ref.dtype:
        return x
    if x.dtype.is_floating_point != ref.dtype.is_floating_point and ref.dtype is not torch.bool:
        kind = "floating" if ref.dtype.is_floating_point else "integer"
        raise UsageError(
            f"recalibrate-bn: data of dtype {x.dtype} for a model input that is {kind} ({ref.dtype})"
        )
    return x.to(ref.dtype)


# --------------------------------------------------------------------------- pass


@dataclass(frozen=True)
class RecalibrateOptions:
    batches: int = 16
    """Number of batches (random ones, or at most this many from ``data``)."""
    data: str | None = None
    """A .pt or .npz file of input batches; random inputs like the example ones when unset."""
    batch_size: int | None = None
    """Batch size of random batches / of a sample tensor cut into batches (default: example's dim 0)."""


class RecalibrateBatchNorm(Pass):
    name = "recalibrate-bn"
    summary = (
        "re-estimate BatchNorm running statistics on sample data (approximate: changes outputs)"
    )
    exact = False
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

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        targets, skipped = bn_targets(gm)
        if not targets:
            return PassResult(gm, False, [], skipped)
        batches, origin = self.batches(ctx)
        cal = measure(gm, batches, targets)
        changes: list[Change] = []
        done: set[str] = set()
        for t in targets:
            if t.mean in done:  # a BN called at several sites: one set of statistics
                continue
            done.add(t.mean)
            moments = cal.moments.get(t.mean)
            if moments is None or moments.count == 0:  # pragma: no cover - every target runs
                skipped.append(Skip(t.info.label, "not reached when running the model"))
                continue
            mean, var = moments.result()
            old_mean, old_var = get_tensor(gm, t.mean), get_tensor(gm, t.var)
            new_mean, new_var = mean.to(old_mean.dtype), var.to(old_var.dtype)
            if torch.equal(new_mean, old_mean) and torch.equal(new_var, old_var):
                continue
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
            compute_tensors(gm, ctx, outputs, [], lambda v=values: v, origin=self.name)
            changes.append(
                Change(
                    t.info.label,
                    f"statistics from {moments.count} batches: mean moved {dm:.3g} σ (max |Δμ|/σ_old), "
                    f"variance by a factor of up to {math.exp(dv):.3g} (max |log σ²_new/σ²_old| = {dv:.3g})",
                )
            )
        notes = [f"recalibrated on {origin}"] if changes else []
        return PassResult(gm, bool(changes), changes, skipped, notes)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        targets, skipped = bn_targets(gm)
        out = {
            (t.info.op_node or t.info.node).name: "running statistics can be re-estimated on data"
            for t in targets
        }
        for node in gm.graph.nodes:
            bn = batchnorm_info(gm, node)
            if bn is not None and node is (bn.op_node or bn.node):
                reason = next((s.reason for s in skipped if s.target == bn.label), None)
                if reason is not None:
                    out[node.name] = f"left alone: {reason}"
        return out


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
