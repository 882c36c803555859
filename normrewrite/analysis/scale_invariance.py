"""Scale-invariance analysis: which parameters can be multiplied by a positive constant without
changing the model's output — and optimizer parameter groups built from the answer.

Why. A weight whose output is normalized (conv → BatchNorm, linear → LayerNorm, …) is
scale-invariant: ``Norm(c·W ⊛ x) = Norm(W ⊛ x)`` for ``c > 0``. L2 weight decay then has no
regularising effect on it; it only shrinks ``‖W‖`` and so raises the effective learning rate
(``∝ lr / ‖W‖²``). Optimizers want such weights, norm γ/β and biases in separate groups.

How. For each parameter ``P``, a forward abstract interpretation over the traced graph tracks how
every value depends on ``c`` when ``P → c·P``:

==========  =============================================================================
``I``       independent of ``c``
``H(k)``    positively homogeneous: ``v(c) = cᵏ·v(1)`` (k ≠ 0)
``A(k,V)``  ``cᵏ·h + a`` with ``a`` independent of ``c`` and constant along every axis not in
            ``V`` (a conv bias after a scaled conv weight: ``V = {1}``)
``S(V)``    ``h + s(c)``: only an additive term depends on ``c``, varying along ``V`` (a scaled
            bias or β)
``X``       depends on ``c`` in a way no later op is known to undo (not invariant)
``U``       an op without a rule (undecided)
==========  =============================================================================

Rules, each an identity for ``c > 0``: reshapes, permutes, slicing, dropout (eval), sums, means,
average pools, concatenation of equally scaled tensors: linear, so ``H → H``. ReLU, leaky ReLU,
max-pools, ``abs``, ``max``: positively homogeneous, so ``H → H`` but an additive term does not
survive them (``relu(c·h + a) ≠ c·relu(h) + a``). Products add degrees; conv/linear with a scaled
weight or input is ``H``, plus their bias ``A``. Adding an unscaled activation (a residual
branch) gives ``X``. A normalization maps ``H`` to ``I`` (it divides by the scale), and ``A``/``S``
to ``I`` only when it subtracts the mean over every axis the additive term is constant along:

* BatchNorm (per channel over N and space) removes a term varying along ``{1}`` only — a conv bias;
* InstanceNorm (per sample and channel) removes one varying along ``{0, 1}``;
* GroupNorm removes a per-channel term only with one channel per group;
* LayerNorm over the last ``m`` axes removes a term constant along those axes (a linear bias,
  which varies along the features, is *not* removed);
* RMSNorm subtracts no mean: it removes nothing additive.

A parameter is ``invariant`` when every model output is ``I``, ``not-invariant`` when an output is
``H``/``A``/``S``/``X`` (the scaling reaches it through ops known not to undo it; generic weights
assumed), ``undecided`` otherwise. The analysis is conservative: ``invariant`` claims are proofs
(tests check each numerically at ×2 and ×0.5).

Conditions. LayerNorm/GroupNorm/InstanceNorm/RMSNorm normalize with the statistics of their own
input (``condition = "always"``). BatchNorm does so in training mode only: a weight cancelled by a
BatchNorm is invariant *with batch statistics* (``condition = "batch-stats"``) — in training, where
weight decay acts; an eval-mode model needs its running statistics rescaled along (μ→cμ,
σ²→c²σ², which ``recalibrate-bn`` does). All claims hold up to the norm's ε (exact when
``ε ≪ σ²``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import GraphModule, Node

from normrewrite.core.graph import is_bookkeeping, node_label, node_shape
from normrewrite.core.ops import ConvInfo, NormInfo, call_args, conv_info, linear_info, norm_info

Status = Literal["invariant", "not-invariant", "undecided"]

# --------------------------------------------------------------------------- lattice


@dataclass(frozen=True)
class St:
    kind: Literal["I", "H", "A", "S", "X", "U"]
    k: int = 0  # degree, for H and A
    axes: frozenset[int] | None = None  # V, for A and S (None: unknown)
    why: str = ""  # for X and U


IND = St("I")


def _H(k: int) -> St:
    return IND if k == 0 else St("H", k)


def _bad(st: St) -> bool:
    return st.kind in ("X", "U")


def _x(why: str) -> St:
    return St("X", why=why)


def _u(why: str) -> St:
    return St("U", why=why)


def _join_axes(*sets: frozenset[int] | None) -> frozenset[int] | None:
    if any(s is None for s in sets):
        return None
    out: frozenset[int] = frozenset()
    for s in sets:
        out |= s  # type: ignore[operator]
    return out


def _first_bad(states: Iterable[St]) -> St | None:
    """X wins over U: a path known to carry ``c`` makes the claim "not invariant" anyway."""
    states = list(states)
    for s in states:
        if s.kind == "X":
            return s
    for s in states:
        if s.kind == "U":
            return s
    return None


# --------------------------------------------------------------------------- op table

_KEEP = {
    "clone",
    "contiguous",
    "dropout",
    "alias",
    "detach",
    "to",
    "_to_copy",
    "type_as",
    "identity",
    "feature_dropout",
    "alpha_dropout",
    "float",
    "half",
    "bfloat16",
    "double",
    "lift_fresh_copy",
    "_assert_tensor_metadata",
}
_LINEAR = {
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "slice",
    "select",
    "getitem",
    "narrow",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "repeat",
    "flip",
    "roll",
    "mean",
    "sum",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_bilinear2d",
    "upsample_linear1d",
    "interpolate",
    "neg",
    "pixel_shuffle",
    "pixel_unshuffle",
    "movedim",
    "index_select",
    "swapaxes",
}
_CHANNEL_KEEP = {
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
}  # no padding: a per-channel constant stays one
_POS_HOM = {
    "relu",
    "leaky_relu",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "abs",
    "amax",
    "amin",
    "max",
    "min",
    "prelu",
}
_NONLINEAR = {
    "gelu",
    "tanh",
    "sigmoid",
    "silu",
    "softmax",
    "_softmax",
    "log_softmax",
    "exp",
    "log",
    "erf",
    "hardtanh",
    "relu6",
    "elu",
    "selu",
    "celu",
    "softplus",
    "mish",
    "hardswish",
    "hardsigmoid",
    "sin",
    "cos",
    "clamp",
    "clip",
    "logsigmoid",
    "glu",
    "cumsum",
}
_NONLINEAR.discard("cumsum")  # linear, but no rule yet: stays undecided
_SHIFT_INVARIANT = {"softmax", "_softmax", "log_softmax"}  # softmax(x + a·1) = softmax(x)
_ADD = {"add", "sub", "iadd", "isub"}
_MUL = {"mul", "imul"}
_DIV = {"div", "truediv", "itruediv"}
_MATMUL = {"matmul", "mm", "bmm"}
_CAT = {"cat", "concat", "concatenate", "stack"}

_MODULES: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str], ...] = (
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), "max_pool2d"),
    ((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), "adaptive_max_pool2d"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "avg_pool2d"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), "adaptive_avg_pool2d"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), "dropout"),
    (nn.Identity, "identity"),
    (nn.Flatten, "flatten"),
    (nn.Unflatten, "unflatten"),
    (nn.Upsample, "interpolate"),
    (
        (
            nn.GELU,
            nn.Tanh,
            nn.Sigmoid,
            nn.SiLU,
            nn.Softmax,
            nn.ELU,
            nn.Hardtanh,
            nn.ReLU6,
            nn.Softplus,
            nn.Mish,
            nn.Hardswish,
            nn.Hardsigmoid,
        ),
        "gelu",
    ),
)


def _op_name(gm: GraphModule, node: Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op == "call_module":
        mod = gm.get_submodule(str(t))
        for cls, name in _MODULES:
            if isinstance(mod, cls):
                return name
        return f"module {type(mod).__name__}"
    if isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
    elif t is operator.getitem:
        return "getitem"
    else:
        name = getattr(t, "__name__", str(t))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


# --------------------------------------------------------------------------- per-node rules


def _rank(node: Any) -> int | None:
    shape = node_shape(node)
    return None if shape is None else len(shape)


def _lift(st: St, src: Any, dst: Node) -> St:
    """Re-express the axes of ``st`` (valid at ``src``) at ``dst`` (right-aligned broadcast)."""
    if st.kind not in ("A", "S") or st.axes is None:
        return st
    r_in, r_out = _rank(src), _rank(dst)
    if r_in is None or r_out is None:
        return St(st.kind, st.k, None)
    shift = r_out - r_in
    return St(st.kind, st.k, frozenset(a + shift for a in st.axes))


def _const_axes(gm: GraphModule, arg: Any, out: Node) -> frozenset[int] | None:
    """Axes along which a constant operand varies (right-aligned to ``out``), or None when the
    operand is an activation (not a constant)."""
    if not isinstance(arg, Node):
        return frozenset()  # a Python scalar
    if arg.op != "get_attr":
        return None
    shape, r_out = node_shape(arg), _rank(out)
    if shape is None or r_out is None:
        return None
    shift = r_out - len(shape)
    return frozenset(i + shift for i, d in enumerate(shape) if d != 1)


class _Analysis:
    """Propagates the states for one parameter (by its FQN aliases) through ``gm``."""

    def __init__(
        self,
        gm: GraphModule,
        names: frozenset[str],
        cache: dict[Node, Any],
        module_reads: dict[Node, frozenset[str]],
    ) -> None:
        self.gm, self.names, self.cache, self.module_reads = gm, names, cache, module_reads
        self.state: dict[Node, St] = {}
        self.conditions: set[str] = set()
        self.cancelled_by: set[str] = set()

    def get(self, arg: Any) -> St:
        return self.state.get(arg, IND) if isinstance(arg, Node) else IND

    def param_state(self, fqn: str | None) -> St:
        return _H(1) if fqn is not None and fqn in self.names else IND

    def run(self) -> tuple[Status, str]:
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                if str(n.target) in self.names:
                    self.state[n] = _H(1)
                continue
            if n.op == "placeholder" or is_bookkeeping(n):
                continue
            if n.op == "output":
                return self.verdict(n)
            reads = bool(self.module_reads.get(n, frozenset()) & self.names)
            if not reads and all(self.get(a).kind == "I" for a in n.all_input_nodes):
                continue
            st = self.visit(n)
            if st.kind != "I":
                self.state[n] = st
                # an in-place op changes its first argument for later readers too
                if (
                    n.op == "call_function"
                    and isinstance(n.target, torch._ops.OpOverload)
                    and n.target.overloadpacket.__name__.endswith("_")
                    and n.args
                    and isinstance(n.args[0], Node)
                ):
                    self.state[n.args[0]] = st
        return "undecided", "the graph has no output"

    def verdict(self, out: Node) -> tuple[Status, str]:
        leaves = [a for a in out.all_input_nodes]
        states = [(a, self.get(a)) for a in leaves]
        bad = _first_bad(s for _, s in states)
        if bad is not None and bad.kind == "X":
            return "not-invariant", bad.why
        live = [(a, s) for a, s in states if s.kind in ("H", "A", "S")]
        if live:
            return (
                "not-invariant",
                f"the scaled value reaches the model output ({node_label(live[0][0])}) un-normalized",
            )
        if bad is not None:
            return "undecided", bad.why
        return "invariant", ""

    # ------------------------------------------------------------------ dispatch
    def visit(self, n: Node) -> St:
        gm = self.gm
        rec = self.cache.get(n)
        if rec is None:
            rec = (norm_info(gm, n), conv_info(gm, n), linear_info(gm, n), _op_name(gm, n))
            self.cache[n] = rec
        norm, conv, lin, name = rec
        if norm is not None:
            return self.norm(n, norm)
        if conv is not None or lin is not None:
            return self.layer(n, conv or lin)
        args = n.all_input_nodes
        deps = [self.get(a) for a in args]
        bad = _first_bad(deps)
        if name == "embedding":
            return self.embedding(n)
        if n.op == "call_module":
            if name.startswith("module "):
                return _u(f"no rule for {name} ({node_label(n)})")
            x = n.args[0] if n.args else None
            st = self.get(x)
            if name in _NONLINEAR and st.kind != "I" and not _bad(st):
                return _x(
                    f"{type(self.gm.get_submodule(str(n.target))).__name__} at {node_label(n)} "
                    "is not positively homogeneous"
                )
            return self.unary(n, name, st, x)
        if bad is not None and name not in _ADD | _MUL | _DIV | _MATMUL:
            return bad
        if name in _KEEP or name in _LINEAR or name in _POS_HOM:
            dep = [(a, self.get(a)) for a in args if self.get(a).kind != "I"]
            if len(dep) != 1 or not self._is_data_arg(n, dep[0][0]):
                return _u(
                    f"{name} at {node_label(n)} reads the scaled value as a non-data argument"
                )
            return self.unary(n, name, dep[0][1], dep[0][0])
        if name in _NONLINEAR:
            dep = [self.get(a) for a in args if self.get(a).kind != "I"]
            if name in _SHIFT_INVARIANT and all(d.kind == "S" for d in dep):
                return _u(f"{name} at {node_label(n)} may cancel the additive term before it")
            return _x(f"{name} at {node_label(n)} is not positively homogeneous")
        if name in _ADD:
            return self.add(n)
        if name in _MUL | _DIV:
            return self.mul(n, divide=name in _DIV)
        if name in _MATMUL:
            return self.matmul(n)
        if name in _CAT:
            return self.cat(n)
        if name == "scaled_dot_product_attention":
            return self.sdpa(n)
        return _u(f"no rule for {name} ({node_label(n)})")

    def _is_data_arg(self, n: Node, arg: Node) -> bool:
        first = n.args[0] if n.args else n.kwargs.get("input", n.kwargs.get("self"))
        if isinstance(first, list | tuple):  # getitem on a list, cat-like
            return arg in first
        return first is arg

    # ------------------------------------------------------------------ rules
    def unary(self, n: Node, name: str, st: St, src: Any) -> St:
        if st.kind in ("I", "X", "U"):
            return st
        if st.kind == "H":
            return st
        if name in _KEEP or name in _CHANNEL_KEEP:  # per-channel constants stay per-channel
            return _lift(st, src, n)
        if name in _LINEAR:
            return St(st.kind, st.k, None)
        if name in _POS_HOM:
            return _x(f"an additive term passes through {name} at {node_label(n)}")
        return _x(f"{name} at {node_label(n)} is not positively homogeneous")

    def add(self, n: Node) -> St:
        a, b = (*n.args, None, None)[:2]
        sa, sb = self.get(a), self.get(b)
        if n.kwargs.get("alpha") is not None and isinstance(n.kwargs.get("alpha"), Node):
            return _u(f"add with a computed alpha at {node_label(n)}")
        bad = _first_bad((sa, sb))
        if bad is not None:
            return bad
        sa, sb = _lift(sa, a, n), _lift(sb, b, n)
        if sa.kind == "I" or sb.kind == "I":
            s, other = (sb, a) if sa.kind == "I" else (sa, b)
            if s.kind == "S":
                return s  # h + i + s(c): still only an additive term depends on c
            axes = _const_axes(self.gm, other, n)
            if axes is None:
                return _x(f"{node_label(n)} adds a branch that is not scaled with it")
            return St("A", s.k, axes if s.kind == "H" else _join_axes(s.axes, axes))
        if sa.kind == sb.kind == "S":
            return St("S", 0, _join_axes(sa.axes, sb.axes))
        if sa.kind in ("H", "A") and sb.kind in ("H", "A") and sa.k == sb.k:
            if sa.kind == sb.kind == "H":
                return sa
            return St(
                "A",
                sa.k,
                _join_axes(
                    sa.axes if sa.kind == "A" else frozenset(),
                    sb.axes if sb.kind == "A" else frozenset(),
                ),
            )
        return _x(f"{node_label(n)} adds terms that scale differently")

    def mul(self, n: Node, *, divide: bool) -> St:
        a, b = (*n.args, None, None)[:2]
        sa, sb = self.get(a), self.get(b)
        bad = _first_bad((sa, sb))
        if bad is not None:
            return bad
        if (sa.kind == "H" and sb.kind in ("H", "I")) or (sa.kind == "I" and sb.kind == "H"):
            kb = sb.k if sb.kind == "H" else 0
            ka = sa.k if sa.kind == "H" else 0
            return _H(ka - kb if divide else ka + kb)
        # an additive term times a constant stays an additive term
        if sb.kind == "I" and sa.kind in ("A", "S"):
            axes = _const_axes(self.gm, b, n)
            if axes is not None:
                sa = _lift(sa, a, n)
                return St(sa.kind, sa.k, _join_axes(sa.axes, axes))
        if not divide and sa.kind == "I" and sb.kind in ("A", "S"):
            axes = _const_axes(self.gm, a, n)
            if axes is not None:
                sb = _lift(sb, b, n)
                return St(sb.kind, sb.k, _join_axes(sb.axes, axes))
        return _u(f"{node_label(n)} multiplies a shifted value by an activation")

    def matmul(self, n: Node) -> St:
        a, b = (*n.args, None, None)[:2]
        sa, sb = self.get(a), self.get(b)
        bad = _first_bad((sa, sb))
        if bad is not None:
            return bad
        if sa.kind in ("H", "I") and sb.kind in ("H", "I"):
            return _H((sa.k if sa.kind == "H" else 0) + (sb.k if sb.kind == "H" else 0))
        for s, other in ((sa, b), (sb, a)):
            if s.kind in ("A", "S") and self.get(other).kind == "I":
                if isinstance(other, Node) and other.op == "get_attr":
                    return St(s.kind, s.k, None)
                # e.g. q·(k + b)ᵀ: a per-row constant a later softmax removes
                return _u(f"{node_label(n)} multiplies a shifted value by an activation")
        return _x(f"{node_label(n)} multiplies terms that scale differently")

    def cat(self, n: Node) -> St:
        seq = n.args[0] if n.args else []
        states = [self.get(a) for a in seq]
        bad = _first_bad(states)
        if bad is not None:
            return bad
        if all(s.kind == "H" for s in states) and len({s.k for s in states}) == 1:
            return states[0]
        return _u(
            f"{node_label(n)} concatenates scaled and unscaled tensors (a later per-channel "
            "norm could still cancel it)"
        )

    def sdpa(self, n: Node) -> St:
        q, k, v = (*n.args, None, None, None)[:3]
        sq, sk = self.get(q), self.get(k)
        if sk.kind == "S" and sq.kind == "I":  # q·(k + c·b)ᵀ: a per-query constant
            return _u(f"an additive term in the keys at {node_label(n)} may cancel in the softmax")
        if sq.kind != "I" or sk.kind != "I":
            return _x(
                f"the attention scores at {node_label(n)} are scaled (softmax is not homogeneous)"
            )
        sv = self.get(v)
        if _bad(sv) or sv.kind == "H":
            return sv
        return St(sv.kind, sv.k, None)

    def embedding(self, n: Node) -> St:
        if n.op == "call_module":
            mod = self.gm.get_submodule(str(n.target))
            return (
                self.param_state(f"{n.target}.weight")
                if hasattr(mod, "weight")
                else _u("embedding")
            )
        kw = call_args(self.gm, n)
        w = kw.get("weight")
        idx = kw.get("indices", kw.get("input"))
        if self.get(idx).kind != "I":
            return _u(f"embedding indices depend on the parameter at {node_label(n)}")
        return self.get(w)

    def _arg(self, n: Node, name: str, fqn: str | None) -> St:
        if n.op == "call_module":
            return self.param_state(fqn)
        kw = call_args(self.gm, n)
        return self.get(kw.get(name))

    def layer(self, n: Node, info: Any) -> St:
        x = self.get(info.input)
        w = self._arg(n, "weight", info.weight)
        b = self._arg(n, "bias", info.bias) if info.has_bias else IND
        bad = _first_bad((x, w, b))
        if bad is not None:
            return bad
        rank = _rank(n)
        if rank is None:
            axes = None
        elif isinstance(info, ConvInfo):  # channel axis
            axes = frozenset({1 if rank == info.ndim + 2 else 0})
        else:
            axes = frozenset({rank - 1})
        if x.kind == "I" and w.kind == "I":
            if b.kind == "H" and b.k == 1:
                return St("S", 0, axes)  # W·x + c·b
            return IND
        if x.kind in ("H", "I") and w.kind in ("H", "I"):
            k = (x.k if x.kind == "H" else 0) + (w.k if w.kind == "H" else 0)
            if b.kind == "I":
                return St("A", k, axes) if info.has_bias else _H(k)
            if b.kind == "H" and b.k == k:
                return _H(k)
            return _x(f"{node_label(n)}: weight and bias scale differently")
        if x.kind in ("A", "S") and w.kind == "I" and b.kind == "I":
            # W ⊛ (c·h + a): W ⊛ a is constant per output channel when a is constant per input
            # channel and every output sees a full kernel (no zero padding, not transposed)
            r_in = _rank(info.input)
            full = not isinstance(info, ConvInfo) or (not info.transposed and info.zero_padding())
            if full and x.axes is not None and r_in == rank and axes is not None and x.axes <= axes:
                return St(x.kind, x.k, axes)
            return St(x.kind, x.k, None)
        return _x(f"{node_label(n)}: inputs scale differently")

    def norm(self, n: Node, info: NormInfo) -> St:
        if n is not (info.op_node or info.node):
            return IND
        x = self.get(info.input)
        g = self._arg(n, "weight", info.weight) if info.has_weight else IND
        b = self._arg(n, "bias", info.bias) if info.has_bias else IND
        bad = _first_bad((x, g, b))
        if bad is not None:
            return bad
        label = info.label
        rank = _rank(info.input)
        if rank is None:
            chan = None
        elif info.kind in ("layernorm", "rmsnorm"):
            m = len(info.normalized_shape or ())
            chan = frozenset(range(rank - m, rank))
        else:
            chan = frozenset({1})
        if g.kind == "I" and b.kind == "I":
            if x.kind == "I":
                return IND
            uses_input_stats = info.kind != "instancenorm" or info.training
            if not uses_input_stats:
                return _u(f"{label} normalizes with running statistics (instance norm, eval)")
            if x.kind == "H":
                return self._cancel(info)
            # A or S: is the additive term removed?
            if x.axes is None:
                return _u(f"cannot tell whether {label} removes the additive term before it")
            if _removes(info, x.axes, rank, node_shape(info.input)):
                return self._cancel(info)
            what = "a bias" if x.kind == "A" else "the scaled additive term"
            return _x(
                f"{label} ({info.kind}) does not remove {what} varying along axes {sorted(x.axes)}"
            )
        if x.kind == "I":
            if g.kind == "H" and b.kind == "I":
                return St("A", g.k, chan) if info.has_bias else g
            if g.kind == "I" and b.kind == "H" and b.k == 1:
                return St("S", 0, chan)
            if g.kind == b.kind == "H" and g.k == b.k:
                return g
        return _x(f"{label}: its input and its γ/β scale differently")

    def _cancel(self, info: NormInfo) -> St:
        self.cancelled_by.add(info.label)
        if info.kind == "batchnorm":
            self.conditions.add("batch-stats")
        return IND


def _removes(
    info: NormInfo, axes: frozenset[int], rank: int | None, shape: Sequence[int] | None
) -> bool:
    """Does ``info`` subtract the mean over every axis an additive term along ``axes`` is
    constant on (so that the term disappears)?"""
    if info.kind == "batchnorm":
        return axes <= {1}
    if info.kind == "instancenorm":
        return axes <= {0, 1}
    if info.kind == "groupnorm":
        channels = shape[1] if shape and len(shape) > 1 else None
        return axes <= {0} or (
            axes <= {0, 1} and channels is not None and info.num_groups == channels
        )
    if info.kind == "layernorm" and rank is not None:
        m = len(info.normalized_shape or ())
        return not (axes & set(range(rank - m, rank)))
    return False  # rmsnorm: no mean subtraction


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ParamClaim:
    name: str  # FQN (the first of its aliases)
    role: str  # "weight" | "bias" | "norm-weight" | "norm-bias" | "embedding" | "other"
    status: Status
    condition: str | None = None  # for invariant: "always" | "batch-stats"
    reason: str = ""  # for not-invariant / undecided
    cancelled_by: tuple[str, ...] = ()  # the norms that undo the scaling
    aliases: tuple[str, ...] = ()


@dataclass
class ScaleInvariance:
    params: list[ParamClaim] = field(default_factory=list)

    def of(self, status: Status) -> list[ParamClaim]:
        return [p for p in self.params if p.status == status]

    @property
    def invariant(self) -> list[ParamClaim]:
        return self.of("invariant")

    @property
    def not_invariant(self) -> list[ParamClaim]:
        return self.of("not-invariant")

    @property
    def undecided(self) -> list[ParamClaim]:
        return self.of("undecided")

    @property
    def norm_params(self) -> list[ParamClaim]:
        return [p for p in self.params if p.role in ("norm-weight", "norm-bias")]

    def claim(self, name: str) -> ParamClaim:
        for p in self.params:
            if name == p.name or name in p.aliases:
                return p
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "scale_invariant": [
                {
                    "name": p.name,
                    "role": p.role,
                    "condition": p.condition,
                    "cancelled_by": list(p.cancelled_by),
                }
                for p in self.invariant
            ],
            "undecided": [{"name": p.name, "reason": p.reason} for p in self.undecided],
            "not_invariant": [p.name for p in self.not_invariant],
            "norm_params": [p.name for p in self.norm_params],
        }

    def summary(self) -> str:
        inv = self.invariant
        bs = sum(1 for p in inv if p.condition == "batch-stats")
        return (
            f"{len(inv)} of {len(self.params)} parameters scale-invariant"
            + (f" ({bs} with batch statistics: BatchNorm)" if bs else "")
            + f", {len(self.undecided)} undecided, {len(self.norm_params)} norm γ/β"
        )

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.params]


def _roles(gm: GraphModule) -> dict[str, str]:
    roles: dict[str, str] = {}
    for n in gm.graph.nodes:
        info = norm_info(gm, n)
        if info is not None:
            for fqn, role in ((info.weight, "norm-weight"), (info.bias, "norm-bias")):
                if fqn:
                    roles.setdefault(fqn, role)
            continue
        layer = conv_info(gm, n) or linear_info(gm, n)
        if layer is not None:
            if layer.weight:
                roles.setdefault(layer.weight, "weight")
            if layer.bias:
                roles.setdefault(layer.bias, "bias")
            continue
        if _op_name(gm, n) == "embedding":
            if n.op == "call_module":
                roles.setdefault(f"{n.target}.weight", "embedding")
            else:
                w = call_args(gm, n).get("weight")
                if isinstance(w, Node) and w.op == "get_attr":
                    roles.setdefault(str(w.target), "embedding")
    return roles


def analyze(gm: GraphModule) -> ScaleInvariance:
    """Scale-invariance of every parameter ``gm`` reads (see the module docstring)."""
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    module_reads: dict[Node, frozenset[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and not is_bookkeeping(n):
            mod = gm.get_submodule(str(n.target))
            module_reads[n] = frozenset(
                f"{n.target}.{p}" for p, _ in mod.named_parameters(remove_duplicate=False)
            )
            read |= module_reads[n]
    roles = _roles(gm)
    cache: dict[Node, Any] = {}
    result = ScaleInvariance()
    for names in groups.values():
        if not read & set(names):
            continue
        a = _Analysis(gm, frozenset(names), cache, module_reads)
        status, reason = a.run()
        role = next((roles[n] for n in names if n in roles), "other")
        condition = None
        if status == "invariant":
            condition = "batch-stats" if "batch-stats" in a.conditions else "always"
        result.params.append(
            ParamClaim(
                names[0],
                role,
                status,
                condition,
                reason,
                tuple(sorted(a.cancelled_by)),
                tuple(names[1:]),
            )
        )
    return result


# --------------------------------------------------------------------------- library API


def _trace_eval(model: nn.Module, example_inputs: Any, tracer: str) -> GraphModule:
    from normrewrite.load.inputs import as_tuple
    from normrewrite.trace import trace

    if example_inputs is None:
        raise ValueError("example_inputs are needed to trace the model")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return trace(model, as_tuple(example_inputs), tracer).graph_module  # type: ignore[arg-type]
    finally:
        for m, mode in modes.items():
            m.training = mode


def scale_invariant_params(
    model: nn.Module, example_inputs: Any = None, *, tracer: str = "auto"
) -> ScaleInvariance:
    """Which parameters of ``model`` (an ``nn.Module``, traced here, or an already traced
    ``GraphModule``) are scale-invariant; see the module docstring for the rules."""
    if isinstance(model, GraphModule) and example_inputs is None:
        return analyze(model)
    return analyze(_trace_eval(model, example_inputs, tracer))


def param_groups(
    model: nn.Module,
    weight_decay: float = 1e-4,
    example_inputs: Any = None,
    *,
    scale_invariant_weight_decay: float | None = None,
    tracer: str = "auto",
    analysis: ScaleInvariance | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` (``torch.optim.SGD(param_groups(m, 5e-4, x), lr=…)``):

    * ``"decay"`` — ordinary weights (conv/linear/embedding weights that are not
      scale-invariant, and anything else): ``weight_decay``;
    * ``"no_decay"`` — norm γ/β and biases: ``0.0`` (decaying them changes what the model computes
      without regularising it);
    * ``"scale_invariant"`` — weights whose output is normalized: ``scale_invariant_weight_decay``,
      by default ``weight_decay``. Decay does not regularise these; it keeps ``‖W‖`` from growing,
      which holds their effective learning rate up (without it the rate decays as ``‖W‖`` grows).
      Set it to ``0`` to leave their norm free, or tune it as an effective-learning-rate knob.

    Every trainable parameter of ``model`` is in exactly one group (parameters the traced graph
    never reads go to ``"decay"``). Each group carries a ``"name"`` key; empty groups are left out.
    """
    info = analysis or scale_invariant_params(model, example_inputs, tracer=tracer)
    by_name = {}
    for p in info.params:
        for n in (p.name, *p.aliases):
            by_name[n] = p
    si_decay = (
        weight_decay if scale_invariant_weight_decay is None else scale_invariant_weight_decay
    )
    buckets: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "scale_invariant": []}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        claim = by_name.get(name)
        if claim is None:
            buckets["decay"].append(param)
        elif claim.role in ("norm-weight", "norm-bias", "bias"):
            buckets["no_decay"].append(param)
        elif claim.status == "invariant":
            buckets["scale_invariant"].append(param)
        else:
            buckets["decay"].append(param)
    decay = {"decay": weight_decay, "no_decay": 0.0, "scale_invariant": si_decay}
    return [{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in buckets.items() if ps]


__all__ = ["ParamClaim", "ScaleInvariance", "analyze", "param_groups", "scale_invariant_params"]
