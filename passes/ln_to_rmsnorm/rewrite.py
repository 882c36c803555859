"""The rewrite of ln-to-rmsnorm: centre the stream's writers, then LayerNorm → RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.analysis.residual_stream import StreamWriter
from normrewrite.core.graph import Flavour, add_parameter, erase_unused, flavour, get_tensor
from normrewrite.core.ops import NormInfo
from normrewrite.core.ops.args import call_args
from normrewrite.core.pass_infra import PassContext, compute_tensors

from .plan import StreamPlan

aten = torch.ops.aten

# --------------------------------------------------------------------------- tensor math


def centre(t: Tensor, dim: int) -> Tensor:
    """``t`` minus its mean along ``dim`` (computed in float64)."""
    dt = torch.float64 if t.device.type in ("cpu", "meta", "cuda") else torch.float32
    w = t.to(dt)
    return (w - w.mean(dim, keepdim=True)).to(t.dtype)


def centre_part(t: Tensor, dim: int, part: tuple[tuple[int, ...], int, int]) -> Tensor:
    """``t`` with its ``dim`` split as ``part[0]``, the slice ``part[2]`` along split dim
    ``part[1]`` centred along the split's last dim (one head part's rows of a projection)."""
    split, pick, idx = part
    w = t.movedim(dim, 0)
    v = w.reshape(*split, *w.shape[1:]).clone()
    sel = v.select(pick, idx)
    sel.copy_(centre(sel, len(split) - 2))
    return v.reshape(w.shape).movedim(0, dim)


def scaled(t: Tensor, lam: Tensor, dim: int) -> Tensor:
    """``t`` with its index ``i`` along ``dim`` multiplied by ``λ[i]``."""
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * lam.reshape(shape).to(t.dtype)


# --------------------------------------------------------------------------- rewrite


def _untie(
    gm: GraphModule, ctx: PassContext, fqn: str, writers: tuple[StreamWriter, ...]
) -> dict[str, str]:
    """Give the stream's readers of ``fqn`` a private copy; returns {old: new}."""
    owner, _, name = fqn.rpartition(".")
    new = add_parameter(gm, owner, f"{name}_centred", get_tensor(gm, fqn))
    compute_tensors(gm, ctx, [new], [fqn], lambda t: (t.clone(),), origin="ln-to-rmsnorm")
    for w in writers:
        for arg in w.node.all_input_nodes:
            if arg.op == "get_attr" and str(arg.target) == fqn:
                with gm.graph.inserting_before(w.node):
                    getter = gm.graph.get_attr(new)
                getter.meta = dict(arg.meta)
                w.node.replace_input_with(arg, getter)
        if w.node.op == "get_attr" and str(w.node.target) == fqn:
            w.node.target = new
    return {fqn: new}


def subtract_mean(gm: GraphModule, w: StreamWriter) -> Node:
    """Insert ``x - x.mean(axis, keepdim=True)`` after ``w.node`` for the stream's users of it."""
    aten_flavour = flavour(gm) is Flavour.ATEN
    x = w.node
    with gm.graph.inserting_after(x):
        if aten_flavour:
            mean = gm.graph.call_function(aten.mean.dim, (x, [w.axis], True))
        else:
            mean = gm.graph.call_function(torch.mean, (x, w.axis), {"keepdim": True})
    with gm.graph.inserting_after(mean):
        out = gm.graph.call_function(aten.sub.Tensor if aten_flavour else torch.sub, (x, mean))
    if "val" in x.meta:
        val = x.meta["val"]
        mean.meta["val"] = val.mean(w.axis, keepdim=True)
        out.meta["val"] = val
    for k in ("stack_trace", "nn_module_stack"):
        if k in x.meta:
            mean.meta[k] = out.meta[k] = x.meta[k]
    for u in w.uses:
        u.replace_input_with(x, out)
    return out


def drop_shift(gm: GraphModule, w: StreamWriter) -> None:
    """Replace ``x ± c`` (``c`` the same for every feature) by ``x``: centred, ``c`` is 0. Its
    ``x`` is read now, after the writers before it (an explicit centring of ``x``) are in."""
    assert w.keep is not None
    x, c = w.node.args[w.keep], w.node.args[1 - w.keep]
    w.node.replace_all_uses_with(x)
    dead = [c] if isinstance(c, Node) and c.op != "placeholder" else []
    erase_unused(gm, [w.node, *dead])


def recentre(gm: GraphModule, ctx: PassContext, p: StreamPlan, done: set[str]) -> int:
    """Centre every writer's tensors along the feature dim (or, for a "centre" writer, subtract
    the mean after it), but those in ``done`` (centred for another stream; updated); returns
    how many tensors changed."""
    renamed: dict[str, str] = {}
    for fqn in p.untie:
        renamed |= _untie(gm, ctx, fqn, p.stream.writers)
    before = len(done)
    for w in p.stream.writers:
        if w.kind == "centre":
            subtract_mean(gm, w)
            continue
        if w.kind == "shift":
            drop_shift(gm, w)
            continue
        for fqn, dim in w.tensors:
            fqn = renamed.get(fqn, fqn)
            if fqn in done and w.part is None:
                continue
            done.add(fqn)
            if w.part is not None:
                compute_tensors(
                    gm,
                    ctx,
                    [fqn],
                    [fqn],
                    lambda t, d=dim, part=w.part: (centre_part(t, d, part),),
                    origin="ln-to-rmsnorm",
                )
            elif w.scale is None:
                compute_tensors(
                    gm, ctx, [fqn], [fqn], lambda t, d=dim: (centre(t, d),), origin="ln-to-rmsnorm"
                )
            else:  # fold the layer scale first: C (λ ⊙ W x + λ ⊙ b)
                compute_tensors(
                    gm,
                    ctx,
                    [fqn],
                    [fqn, w.scale],
                    lambda t, lam, d=dim: (centre(scaled(t, lam, d), d),),
                    origin="ln-to-rmsnorm",
                )
        if w.scaled is not None:
            w.node.replace_all_uses_with(w.scaled)
            erase_unused(gm, [w.node])
    return len(done) - before


def to_rmsnorm(gm: GraphModule, info: NormInfo) -> Node:
    """Replace the LayerNorm by ``rms_norm(x; γ, ε) [+ β]`` (same eps); returns the new output."""
    node = info.op_node or info.node
    features = list(info.normalized_shape or ())
    eps = info.eps if info.eps is not None else 1e-5
    aten_flavour = flavour(gm) is Flavour.ATEN
    computed = call_args(gm, node) if node.op == "call_function" else {}
    with gm.graph.inserting_before(node):
        # γ/β computed in the graph (Nemotron's LayerNorm1P reads ``1 + γ``) are kept as computed
        weight = gm.graph.get_attr(info.weight) if info.weight else None
        bias = gm.graph.get_attr(info.bias) if info.bias else None
        weight = computed.get("weight") if weight is None and info.has_weight else weight
        bias = computed.get("bias") if bias is None and info.has_bias else bias
        if aten_flavour:
            out = gm.graph.call_function(aten.rms_norm.default, (info.input, features, weight, eps))
        else:
            out = gm.graph.call_function(F.rms_norm, (info.input, tuple(features), weight, eps))
        out.meta = dict(info.node.meta)
        if bias is not None:
            out = gm.graph.call_function(
                aten.add.Tensor if aten_flavour else torch.add, (out, bias)
            )
            out.meta = dict(info.node.meta)
    for g in (weight, bias):
        if g is not None and g.op == "get_attr":
            g.meta["val"] = get_tensor(gm, str(g.target))
    info.node.replace_all_uses_with(out)
    erase_unused(gm, [info.node, node])
    return out


def unit_weight(gm: GraphModule, ctx: PassContext, info: NormInfo) -> str:
    """A new stored γ of ones beside the norm's old γ (or its input's dtype/shape)."""
    features = (info.normalized_shape or (0,))[0]
    ref = info.weight or info.bias
    assert ref is not None  # fold only runs on norms with γ or β
    owner, _, _ = ref.rpartition(".")
    fqn = add_parameter(gm, owner, "unit_weight", get_tensor(gm, ref).new_ones(features))
    compute_tensors(
        gm, ctx, [fqn], [ref], lambda t, n=features: (t.new_ones(n),), origin="ln-to-rmsnorm"
    )
    return fqn
