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
  ``t = β − μ·s`` per channel (see ``fold_bn.bn_affine``): one mul and one add with stored
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node

from normrewrite.core.graph import (
    TensorUsage,
    erase_unused,
    flavour,
    has_tensor,
    module_path,
    node_dtype,
    node_shape,
    replace_with_holder,
)
from normrewrite.core.ops import NormInfo, emit_norm, emit_op, norm_info
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, Skip, compute_tensors
from normrewrite.errors import PassError, UsageError
from normrewrite.verify import tensor_leaves

from .fold_bn import bn_affine

NormKind = Literal["batchnorm", "groupnorm", "instancenorm", "layernorm", "rmsnorm"]
Target = Literal["batchnorm", "groupnorm", "instancenorm", "layernorm", "rmsnorm", "frozen", "dyt"]
CHANNEL_KINDS = ("batchnorm", "groupnorm", "instancenorm")
TRAILING_KINDS = ("layernorm", "rmsnorm")
DEFAULT_EPS = 1e-5

# --------------------------------------------------------------------------- tensor math


def frozen_affine(
    mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, rank: int
) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval BatchNorm, shaped ``(C, 1, …)`` to broadcast over a rank-``rank``
    input, in the dtype of the running mean."""
    scale, shift = bn_affine(mean, var, gamma, beta, eps)
    shape = (-1,) + (1,) * max(rank - 2, 0)
    return scale.reshape(shape).to(mean.dtype), shift.reshape(shape).to(mean.dtype)


def default_groups(channels: int, at_most: int = 32) -> int:
    """The largest divisor of ``channels`` not above ``at_most``."""
    return max(g for g in range(1, min(channels, at_most) + 1) if channels % g == 0)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dim 1) mean and biased variance over every other dim, in float64."""
    dims = [d for d in range(x.dim()) if d != 1]
    x = x.double()
    return x.mean(dims), x.var(dims, unbiased=False)


def broadcast_chw(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A per-channel ``(C,)`` tensor broadcast to ``(C, *S)`` (a copy, so it trains per element)."""
    view = t.reshape((-1,) + (1,) * (len(shape) - 1))
    return view.expand(shape).clone()


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SwapNormOptions:
    from_: NormKind | None = None
    """The kind of norm to replace (CLI: ``from=``)."""
    to: Target | None = None
    """What to replace it with."""
    groups: int | None = None
    """to=groupnorm: number of groups (default: C for instancenorm, else the largest divisor ≤ 32)."""
    eps: float | None = None
    """ε of the new norm (default: the old norm's)."""
    alpha: float = 0.5
    """to=dyt: initial α."""
    layout: Literal["auto", "chw", "channels"] = "auto"
    """channel norm → layernorm/rmsnorm on (N, C, *S): over (C, *S), or per position over C."""
    calibrate: bool = True
    """to=batchnorm: running statistics from the example inputs (else mean 0, variance 1)."""


def is_exact(o: SwapNormOptions) -> bool:
    pair = (o.from_, o.to)
    return pair in (("batchnorm", "frozen"), ("groupnorm", "instancenorm")) or (
        pair == ("instancenorm", "groupnorm") and o.groups is None
    )


# --------------------------------------------------------------------------- matcher


@dataclass(frozen=True)
class SwapPlan:
    src: NormInfo
    to: str
    shape: tuple[int, ...]  # input shape
    layout: Literal["channel", "trailing", "chw", "channels"]
    groups: int | None = None
    eps: float | None = None

    @property
    def channels(self) -> int:
        return self.shape[1]

    def describe(self) -> str:
        extra = f" ({self.groups} groups)" if self.to == "groupnorm" else ""
        if self.layout in ("chw", "channels"):
            extra += f" (layout={self.layout})"
        return f"{self.src.kind} → {self.to}{extra}"


@dataclass(frozen=True)
class NoSwap:
    label: str
    reason: str


def _family_layout(src: NormInfo, to: str, shape: tuple[int, ...], o: SwapNormOptions) -> str:
    """How the source's axes map onto the target's, or raise PassError for impossible requests."""
    rank = len(shape)
    label = src.label
    src_channel = src.kind in CHANNEL_KINDS
    if to in ("frozen", "dyt"):
        return "channel" if src_channel else "trailing"
    if src_channel and to in CHANNEL_KINDS:
        if to == "instancenorm" and rank < 3:
            raise PassError(f"swap-norm: {label} has input {shape}: InstanceNorm needs spatial dims (N, C, *S)")
        return "channel"
    if not src_channel and to in TRAILING_KINDS:
        return "trailing"
    if src_channel:  # → layernorm / rmsnorm
        if rank == 2:
            return "trailing"
        if o.layout == "auto":
            raise PassError(
                f"swap-norm: {label} normalizes channels of a {shape} tensor; {to} over (C, *S) "
                f"(one statistic per sample) and per-position channel {to} (ConvNeXt-style, over C "
                "of the channels-last tensor) are different norms: choose layout=chw or layout=channels"
            )
        return o.layout
    # trailing → channel norm
    normalized = tuple(src.normalized_shape or ())
    if rank > 2 and normalized == shape[1:]:
        raise PassError(
            f"swap-norm: {label} is a LayerNorm over (C, *S) = {normalized} with a per-element affine "
            f"(one statistic per sample, like GroupNorm(1)), not a per-channel {to}; refusing to guess"
        )
    if rank > 2:
        raise PassError(
            f"swap-norm: {label} normalizes the last dim of a {shape} tensor (features last: a "
            f"transformer's tokens, or ConvNeXt's per-pixel LayerNorm on channels-last); {to} normalizes "
            "channel dim 1 of (N, C, *S): only (N, C) inputs map onto it"
        )
    if normalized != shape[1:]:
        raise PassError(f"swap-norm: {label} normalizes {normalized} of a {shape} tensor: not its channels")
    if to == "instancenorm":
        raise PassError(f"swap-norm: {label} has input {shape}: InstanceNorm needs spatial dims (N, C, *S)")
    return "channel"


def plan(gm: GraphModule, node: Node, o: SwapNormOptions, usage: TensorUsage) -> SwapPlan | NoSwap | None:
    """What to do with ``node`` if it is a norm of kind ``from``; None for other nodes.

    Raises :class:`PassError` for requests that cannot be met on this layer."""
    src = norm_info(gm, node)
    if src is None or src.kind != o.from_ or o.to is None:
        return None
    label = src.label
    stored = [src.weight, src.bias, src.running_mean, src.running_var]
    if (src.has_weight and src.weight is None) or (src.has_bias and src.bias is None):
        return NoSwap(label, "γ/β are computed in the graph, not stored")
    for fqn in stored:
        if fqn is not None and not usage.exclusive(fqn):
            n = usage.count(fqn)
            return NoSwap(label, f"{fqn} is shared ({n} readers or tied names); swapping would change the others")
    if src.kind == "instancenorm" and src.tracks_stats:
        return NoSwap(label, "InstanceNorm with track_running_stats uses running statistics in eval: a fixed "
                             "per-channel affine, not an instance (or group) norm; not swapped")
    shape = node_shape(src.input)
    if shape is None:
        return NoSwap(label, "the input shape is unknown")
    if src.kind in CHANNEL_KINDS and len(shape) < 2:
        return NoSwap(label, f"input {shape} has no channel dim")
    if o.to == "frozen":
        if not src.tracks_stats or src.training:
            return NoSwap(label, "BatchNorm uses batch statistics (training mode or no running stats): nothing to freeze")
        if src.running_mean is None or src.running_var is None:
            return NoSwap(label, "running statistics are computed in the graph, not stored")
    layout = _family_layout(src, o.to, shape, o)
    eps = o.eps if o.eps is not None else src.eps
    groups = None
    if o.to == "groupnorm":
        c = shape[1]
        groups = o.groups or (c if src.kind == "instancenorm" else default_groups(c))
        if c % groups:
            raise PassError(f"swap-norm: groups={groups} does not divide the {c} channels of {label}")
    if o.to == "instancenorm" and src.kind == "groupnorm" and src.num_groups != shape[1]:
        return NoSwap(label, f"GroupNorm has {src.num_groups} groups for {shape[1]} channels: InstanceNorm "
                             "would be an approximation (exact only with groups = channels)")
    return SwapPlan(src, o.to, tuple(shape), layout, groups, eps)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rewrite


def _owner(gm: GraphModule, src: NormInfo) -> tuple[str, str]:
    """(module path that will hold the new tensors, name prefix) for the norm ``src``."""
    for fqn in (src.weight, src.running_mean, src.bias):
        if fqn is not None:
            return fqn.rpartition(".")[0], ""
    path = module_path(src.op_node or src.node)
    if path:
        try:
            gm.get_submodule(path)
            return path, ""
        except AttributeError:
            return "", path.replace(".", "_") + "_"
    return "", (src.op_node or src.node).name + "_"


def _free_name(gm: GraphModule, owner: str, name: str) -> str:
    fqn = f"{owner}.{name}" if owner else name
    base, i = fqn, 1
    while has_tensor(gm, fqn) or hasattr(gm.get_submodule(owner) if owner else gm, fqn.rpartition(".")[2]):
        fqn, i = f"{base}_{i}", i + 1
    return fqn


def _new_buffer(gm: GraphModule, owner: str, name: str) -> str:
    fqn = _free_name(gm, owner, name)
    mod = gm.get_submodule(owner) if owner else gm
    mod.register_buffer(fqn.rpartition(".")[2], torch.empty(0))
    return fqn


class _Capture(Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[Node, Tensor] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted and isinstance(out, Tensor):
            self.seen[n] = out.detach()
        return out


def capture(gm: GraphModule, nodes: set[Node], inputs: tuple[Any, ...]) -> dict[Node, Tensor]:
    """The values of ``nodes`` when ``gm`` runs on ``inputs`` (empty if it cannot run)."""
    leaves = tensor_leaves(inputs)
    if not leaves or any(t.device.type == "meta" for t in leaves):
        return {}
    cap = _Capture(gm, nodes)
    with torch.no_grad():
        cap.run(*leaves)
    return cap.seen


def apply(gm: GraphModule, p: SwapPlan, ctx: PassContext, alpha: float, stats: dict[Node, Tensor]) -> str:
    """Rewrite the norm of ``p``; returns a note on what was done beyond the swap, if anything."""
    src, g = p.src, gm.graph
    aten_form = flavour(gm) == "aten"
    owner, prefix = _owner(gm, src)
    dtype = node_dtype(src.input) or torch.float32
    rank, c = len(p.shape), p.channels
    chan_shape = [c] + [1] * (rank - 2)
    eps = p.eps if p.eps is not None else DEFAULT_EPS
    note = ""

    def op(name: str, *args: Any) -> Node:
        return emit_op(gm, name, *args, aten_form=aten_form)

    def get(fqn: str | None) -> Node | None:
        return None if fqn is None else g.get_attr(fqn)

    def per_channel(t: Node | None) -> Node | None:  # (C,) → (C, 1, …) for channel layouts
        if t is None or p.layout != "channel" or rank <= 2:
            return t
        return op("reshape", t, chan_shape)

    anchor = src.op_node or src.node
    with g.inserting_before(anchor):
        x = anchor.args[0]  # the input now (src.input may have been an earlier swapped norm)
        weight, bias = src.weight, src.bias
        if p.to == "frozen":
            assert src.running_mean is not None and src.running_var is not None
            scale = _new_buffer(gm, owner, prefix + "scale")
            shift = _new_buffer(gm, owner, prefix + "shift")
            names = [n for n in (src.running_mean, src.running_var, weight, bias) if n is not None]
            has_w, has_b, bn_eps = weight is not None, bias is not None, src.eps or 0.0

            def freeze(mean: Tensor, var: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
                it = iter(rest)
                gamma = next(it) if has_w else None
                beta = next(it) if has_b else None
                return frozen_affine(mean, var, gamma, beta, bn_eps, rank)

            compute_tensors(gm, ctx, [scale, shift], names, freeze, origin="swap-norm")
            out = op("add", op("mul", x, get(scale)), get(shift))
        elif p.to == "dyt":
            a = _free_name(gm, owner, prefix + "alpha")
            compute_tensors(gm, ctx, [a], [], lambda: (torch.full((), alpha, dtype=dtype),), origin="swap-norm")
            out = op("tanh", op("mul", x, get(a)))
            if weight is not None:
                out = op("mul", out, per_channel(get(weight)))
            if bias is not None:
                out = op("add", out, per_channel(get(bias)))
        elif p.to in ("layernorm", "rmsnorm"):
            if p.layout == "chw":  # per-channel γ/β → per element of (C, *S)
                full = tuple(p.shape[1:])
                for fqn in (weight, bias):
                    if fqn is not None:
                        compute_tensors(gm, ctx, [fqn], [fqn], lambda t, s=full: (broadcast_chw(t, s),),
                                        origin="swap-norm")
                shape = full
                note = f"γ/β broadcast to {full}: the model now needs inputs of this spatial size"
            elif p.layout == "channels":
                shape = (c,)
                perm = [0, *range(2, rank), 1]
                x = op("permute", x, perm)
            else:
                shape = tuple(src.normalized_shape or p.shape[1:])
            if p.to == "layernorm":
                out = emit_norm(gm, "layernorm", x, aten_form=aten_form, weight=get(weight),
                                bias=get(bias), eps=eps, normalized_shape=shape)
            else:
                out = emit_norm(gm, "rmsnorm", x, aten_form=aten_form, weight=get(weight), eps=p.eps,
                                normalized_shape=shape)
                if bias is not None:
                    out = op("add", out, get(bias))
                    note = "β kept as an add after the RMSNorm"
            if p.layout == "channels":
                inv = [0, rank - 1, *range(1, rank - 1)]
                out = op("permute", out, inv)
        else:  # batchnorm / groupnorm / instancenorm
            rm = rv = None
            if p.to == "batchnorm":
                rm, rv = _new_buffer(gm, owner, prefix + "running_mean"), _new_buffer(gm, owner, prefix + "running_var")
                if src.input in stats:
                    mean, var = channel_stats(stats[src.input])
                    note = "running statistics calibrated on the example inputs"
                else:
                    mean, var = torch.zeros(c), torch.ones(c)
                    note = "running statistics set to mean 0, variance 1 (no example inputs to calibrate on)"
                mean, var = mean.to(dtype), var.to(dtype)
                compute_tensors(gm, ctx, [rm, rv], [], lambda: (mean.clone(), var.clone()), origin="swap-norm")
            out = emit_norm(gm, p.to, x, aten_form=aten_form, weight=get(weight), bias=get(bias), eps=eps,
                            num_groups=p.groups, running_mean=get(rm), running_var=get(rv))
    for key in ("val", "tensor_meta"):
        if key in src.node.meta:
            out.meta[key] = src.node.meta[key]
    src.node.replace_all_uses_with(out)
    doomed = [src.node, *([src.op_node] if src.op_node is not None else [])]
    if src.running_mean is not None:  # export graphs read the step counter with a use-less get_attr
        counter = src.running_mean.rpartition(".")[0] + ".num_batches_tracked"
        doomed += [n for n in g.nodes if n.op == "get_attr" and n.target == counter and not n.users]
    erase_unused(gm, doomed)
    if src.node.op == "call_module":
        replace_with_holder(gm, str(src.node.target))
    return note


# --------------------------------------------------------------------------- pass


class SwapNorm(Pass):
    name = "swap-norm"
    summary = ("replace norms of one kind by another (from=,to=; exact for batchnorm→frozen and "
               "instancenorm↔groupnorm, else approximate: trainable, error measured)")
    exact = False  # per instance: see is_exact
    Options = SwapNormOptions

    def __init__(self, options: SwapNormOptions | None = None, **kwargs: Any) -> None:
        if "from" in kwargs:
            kwargs["from_"] = kwargs.pop("from")
        super().__init__(options, **kwargs)
        self.exact = is_exact(self.options)

    @classmethod
    def from_strings(cls, opts: dict[str, str]) -> Pass:
        opts = dict(opts)
        if "from" in opts:
            opts["from_"] = opts.pop("from")
        return super().from_strings(opts)

    def describe(self) -> str:
        return super().describe().replace("from_=", "from=")

    def validate_options(self) -> None:
        o = self.options
        kinds = "batchnorm, groupnorm, instancenorm, layernorm, rmsnorm"
        if o.from_ is None or o.to is None:
            raise UsageError(f"swap-norm needs from=KIND and to=KIND (from: {kinds}; to: those, frozen, dyt)")
        if o.from_ == o.to:
            raise UsageError(f"swap-norm: from and to are both {o.to}")
        if o.to == "frozen" and o.from_ != "batchnorm":
            raise UsageError("swap-norm: to=frozen freezes BatchNorm statistics; it needs from=batchnorm")
        if o.groups is not None and (o.to != "groupnorm" or o.groups <= 0):
            raise UsageError("swap-norm: groups=G needs to=groupnorm and G > 0")
        if o.eps is not None and not (o.eps > 0 and math.isfinite(o.eps)):
            raise UsageError("swap-norm: eps must be positive")
        if o.to == "frozen" and o.eps is not None:
            raise UsageError("swap-norm: to=frozen keeps the BatchNorm's eps; eps= does not apply")
        if o.layout != "auto" and not (o.from_ in CHANNEL_KINDS and o.to in TRAILING_KINDS):
            raise UsageError("swap-norm: layout= applies to batchnorm/groupnorm/instancenorm → layernorm/rmsnorm")
        if o.from_ in TRAILING_KINDS and o.to == "instancenorm":
            raise UsageError(f"swap-norm: InstanceNorm normalizes each channel over spatial dims; a {o.from_} "
                             "input has none at dim 2+ (features are last)")

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        changes: list[Change] = []
        skipped: list[Skip] = []
        usage = TensorUsage.of(gm)
        plans: list[SwapPlan] = []
        for node in gm.graph.nodes:
            found = plan(gm, node, self.options, usage)
            if isinstance(found, NoSwap):
                skipped.append(Skip(found.label, found.reason))
            elif found is not None:
                plans.append(found)
        stats: dict[Node, Tensor] = {}
        if self.options.to == "batchnorm" and self.options.calibrate and plans:
            stats = capture(gm, {p.src.input for p in plans}, ctx.example_inputs)
        for p in plans:
            label = p.src.label
            note = apply(gm, p, ctx, self.options.alpha, stats)
            changes.append(Change(label, p.describe() + (f"; {note}" if note else "")))
        if changes:
            gm.recompile()
        notes = [] if self.exact or not changes else [
            f"approximate: {self.options.from_} → {self.options.to} changes the model; fine-tune it "
            "(the new parameters are trainable)"]
        return PassResult(gm, bool(changes), changes, skipped, notes)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        usage = TensorUsage.of(gm)
        out: dict[str, str] = {}
        for node in gm.graph.nodes:
            try:
                found = plan(gm, node, self.options, usage)
            except PassError as e:
                out[node.name] = f"refused: {e}"
                continue
            if isinstance(found, SwapPlan):
                out[node.name] = found.describe()
            elif isinstance(found, NoSwap):
                out[node.name] = f"not swapped: {found.reason}"
        return out


__all__ = ["SwapNorm", "SwapNormOptions", "SwapPlan", "channel_stats", "default_groups",
           "frozen_affine", "is_exact", "plan"]
