"""swap-norm's graph surgery: emit the target norm in place of the source (both flavours)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node

from normrewrite.core.graph import (
    Flavour,
    erase_unused,
    flavour,
    has_tensor,
    module_path,
    node_dtype,
    replace_with_holder,
)
from normrewrite.core.ops import NormInfo, emit_norm, emit_op
from normrewrite.core.pass_infra import PassContext, compute_tensors
from normrewrite.verify import tensor_leaves

from .math import broadcast_chw, channel_stats, frozen_affine
from .plan import AxisMap, SwapPlan

DEFAULT_EPS = 1e-5


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
    while has_tensor(gm, fqn) or hasattr(
        gm.get_submodule(owner) if owner else gm, fqn.rpartition(".")[2]
    ):
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


def apply(
    gm: GraphModule, p: SwapPlan, ctx: PassContext, alpha: float, stats: dict[Node, Tensor]
) -> str:
    """Rewrite the norm of ``p``; returns a note on what was done beyond the swap, if anything."""
    src, g = p.src, gm.graph
    aten_form = flavour(gm) is Flavour.ATEN
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
        if t is None or p.layout is not AxisMap.CHANNEL or rank <= 2:
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
            compute_tensors(
                gm, ctx, [a], [], lambda: (torch.full((), alpha, dtype=dtype),), origin="swap-norm"
            )
            out = op("tanh", op("mul", x, get(a)))
            if weight is not None:
                out = op("mul", out, per_channel(get(weight)))
            if bias is not None:
                out = op("add", out, per_channel(get(bias)))
        elif p.to in ("layernorm", "rmsnorm"):
            if p.layout is AxisMap.CHW:  # per-channel γ/β → per element of (C, *S)
                full = tuple(p.shape[1:])
                for fqn in (weight, bias):
                    if fqn is not None:
                        compute_tensors(
                            gm,
                            ctx,
                            [fqn],
                            [fqn],
                            lambda t, s=full: (broadcast_chw(t, s),),
                            origin="swap-norm",
                        )
                shape = full
                note = f"γ/β broadcast to {full}: the model now needs inputs of this spatial size"
            elif p.layout is AxisMap.CHANNELS:
                shape = (c,)
                perm = [0, *range(2, rank), 1]
                x = op("permute", x, perm)
            else:
                shape = tuple(src.normalized_shape or p.shape[1:])
            if p.to == "layernorm":
                out = emit_norm(
                    gm,
                    "layernorm",
                    x,
                    aten_form=aten_form,
                    weight=get(weight),
                    bias=get(bias),
                    eps=eps,
                    normalized_shape=shape,
                )
            else:
                out = emit_norm(
                    gm,
                    "rmsnorm",
                    x,
                    aten_form=aten_form,
                    weight=get(weight),
                    eps=p.eps,
                    normalized_shape=shape,
                )
                if bias is not None:
                    out = op("add", out, get(bias))
                    note = "β kept as an add after the RMSNorm"
            if p.layout is AxisMap.CHANNELS:
                inv = [0, rank - 1, *range(1, rank - 1)]
                out = op("permute", out, inv)
        else:  # batchnorm / groupnorm / instancenorm
            rm = rv = None
            if p.to == "batchnorm":
                rm, rv = (
                    _new_buffer(gm, owner, prefix + "running_mean"),
                    _new_buffer(gm, owner, prefix + "running_var"),
                )
                if src.input in stats:
                    mean, var = channel_stats(stats[src.input])
                    note = "running statistics calibrated on the example inputs"
                else:
                    mean, var = torch.zeros(c), torch.ones(c)
                    note = "running statistics set to mean 0, variance 1 (no example inputs to calibrate on)"
                mean, var = mean.to(dtype), var.to(dtype)
                compute_tensors(
                    gm, ctx, [rm, rv], [], lambda: (mean.clone(), var.clone()), origin="swap-norm"
                )
            out = emit_norm(
                gm,
                p.to,
                x,
                aten_form=aten_form,
                weight=get(weight),
                bias=get(bias),
                eps=eps,
                num_groups=p.groups,
                running_mean=get(rm),
                running_var=get(rv),
            )
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


__all__ = ["apply", "capture"]
