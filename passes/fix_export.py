"""fix-export: repair graphs that ``torch.export`` traces but ``torch.onnx.export`` cannot take.

Identities (elementwise equal values; only memory layout / aliasing differ)::

    contiguous(x)  == clone(x, memory_format=contiguous_format)
    view(x, s)     == reshape(x, s)        (wherever the view is defined)

The failure. HF T5/UMT5 encoders, BEiT, Data2Vec-vision, Swin and Wav2Vec2-BERT attention end in
``transpose(1, 2).contiguous().reshape(…)``. torch.export records exactly that, but the ONNX
exporter's decomposition step drops ``aten.contiguous`` (ONNX has no strides), then decomposes
the ``reshape`` into an ``aten.view`` of the still-transposed tensor and stops with "Cannot view a
tensor with shape … and strides …". Writing the ``contiguous`` as the equivalent contiguous
``clone`` survives the decomposition (it is a real op) and the view is then valid. A ``view``
recorded directly on a non-contiguous tensor is rewritten to ``reshape``.

Preconditions, each checked and reported: the input's layout is known (``meta['val']`` of an
export graph, or ``meta['tensor_meta']`` after ShapeProp for symbolic_trace graphs) and is
non-contiguous — otherwise nothing needs fixing and the node is left alone; neither the node
nor its input is mutated in place afterwards (a copy would break the aliasing the mutation
relies on). Running the pass on a graph that exports fine changes nothing.

Custom ops with a known decomposition (:data:`DECOMPOSITIONS`, keyed by the op's qualified name)
are replaced by a call to a Python function of standard ops that torch.export traces::

    transformers::grouped_mm_fallback(x, W, offs)[s] = x[s] · W[e(s)],   e(s) = #{k : offs[k] ≤ s}
                                                       (0 for rows s ≥ offs[-1])

(Mixtral and other MoE models; the fallback loops over ``offs.tolist()``, which no exporter can
follow). The decomposition computes every expert's product and gathers each row's: exact up to
float summation order, at E× the matmul work. Other ops with no ONNX translation are left alone and
the exporter's error is reported in one line naming the op
(:func:`normrewrite.emit.onnx.export.export_error`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from normrewrite.core.pass_infra import Change, NoOptions, PassContext, Skip
from normrewrite.core.rewrite import Rewrite, RewritePass

_VIEW_TARGETS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (sorted by expert) times their expert's ``weight[e]``; ``offs`` holds the
    cumulative row counts per expert. Standard ops only (no data-dependent loop)."""
    rows = torch.arange(x.shape[0], device=x.device, dtype=offs.dtype)
    expert = (offs.unsqueeze(0) <= rows.unsqueeze(1)).sum(1)  # e(s)
    valid = expert < weight.shape[0]
    expert = expert.clamp(max=weight.shape[0] - 1)
    every = torch.matmul(x.unsqueeze(0), weight)  # (E, S, out)
    picked = every[expert, torch.arange(x.shape[0], device=x.device)]
    return picked * valid.unsqueeze(1).to(picked.dtype)


# custom op (qualified name) → a Python decomposition of standard ops with the same signature
DECOMPOSITIONS = {"transformers::grouped_mm_fallback": grouped_mm}


def _qualname(node: Node) -> str | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    return target._schema.name  # e.g. "transformers::grouped_mm_fallback"


class FixKind(enum.Enum):
    """What a fix does to its node (the value: how the change is reported)."""

    RESHAPE = "view → reshape"
    CLONE = "contiguous → clone(contiguous_format)"
    DECOMPOSE = "replaced by its decomposition"  # a custom op without an ONNX translation


@dataclass(frozen=True)
class ViewFix:
    node: Node
    reason: str
    kind: FixKind = FixKind.RESHAPE

    @property
    def label(self) -> str:
        return self.node.name

    def describe(self) -> str:
        return f"{self.reason}: {self.kind.value}"

    def preview(self) -> str:
        return self.describe()


def _strides(node: object) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(shape, strides) of a node's value, from export's fake tensor or ShapeProp's tensor_meta."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(d) for d in val.shape), tuple(int(s) for s in val.stride())
        except (TypeError, ValueError, RuntimeError):  # symbolic sizes
            return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and getattr(tm, "stride", None) is not None:
        return tuple(int(d) for d in tm.shape), tuple(int(s) for s in tm.stride)
    return None


def _is_view(node: Node) -> bool:
    if node.op == "call_function" and node.target in _VIEW_TARGETS:
        return True
    return node.op == "call_method" and node.target == "view"


def _mutated(node: Node) -> bool:
    """Is ``node``'s value written in place by one of its users?"""
    for user in node.users:
        if user.op == "call_method" and str(user.target).endswith("_"):
            return True
        schema = getattr(user.target, "_schema", None)
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
                if value is node:
                    return True
    return False


def _needs_reshape(node: Node) -> str | None:
    """Why the view must become a reshape, or None when it exports as it is."""
    src = node.args[0] if node.args else None
    info = _strides(src)
    if info is None:
        return None
    shape, strides = info
    probe = torch.empty_strided(shape, strides, device="meta")
    target = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else node.args[1]
    if isinstance(target, torch.Size | list | tuple) and all(isinstance(d, int) for d in target):
        try:
            probe.view(tuple(target))
            return None
        except RuntimeError:
            return f"view of a non-contiguous {tuple(shape)} tensor (strides {strides})"
    return None if probe.is_contiguous() else f"view of a non-contiguous {tuple(shape)} tensor"


def _is_contiguous_call(node: Node) -> bool:
    if node.op == "call_function" and node.target == torch.ops.aten.contiguous.default:
        fmt = node.kwargs.get("memory_format", node.args[1] if len(node.args) > 1 else None)
        return fmt in (None, torch.contiguous_format)
    return (
        node.op == "call_method"
        and node.target == "contiguous"
        and len(node.args) == 1
        and not node.kwargs
    )


def _non_contiguous(node: object) -> str | None:
    info = _strides(node)
    if info is None:
        return None
    shape, strides = info
    if torch.empty_strided(shape, strides, device="meta").is_contiguous():
        return None
    return f"contiguous() of a non-contiguous {tuple(shape)} tensor (strides {strides})"


def match(node: Node) -> ViewFix | Skip | None:
    name = _qualname(node)
    if name in DECOMPOSITIONS:
        return ViewFix(node, f"custom op {name} has no ONNX translation", FixKind.DECOMPOSE)
    if _is_contiguous_call(node):
        why = _non_contiguous(node.args[0])
        if why is None:
            return None
        if _mutated(node):
            return Skip(node.name, f"{why}, but it is mutated in place afterwards")
        return ViewFix(node, why, FixKind.CLONE)
    if not _is_view(node):
        return None
    why = _needs_reshape(node)
    if why is None:
        return None
    if _mutated(node) or _mutated(node.args[0]):
        return Skip(
            node.name, f"{why}, but it is mutated in place: a reshape copy would break the alias"
        )
    return ViewFix(node, why)


def apply(gm: GraphModule, fix: ViewFix) -> None:
    node = fix.node
    if fix.kind is FixKind.DECOMPOSE:
        node.target = DECOMPOSITIONS[_qualname(node)]
        return
    if fix.kind is FixKind.CLONE:
        node.args = node.args[:1]
        node.kwargs = {"memory_format": torch.contiguous_format}
        node.target = "clone" if node.op == "call_method" else torch.ops.aten.clone.default
        return
    if node.op == "call_method":
        node.target = "reshape"
    else:
        node.target = torch.ops.aten.reshape.default


class _Fix(Rewrite[ViewFix]):
    refused = "not fixed"

    def match(self, candidate: Node) -> ViewFix | Skip | None:
        return match(candidate)

    def apply(self, found: ViewFix) -> Change:
        apply(self.gm, found)
        return Change(found.label, found.describe())


class FixExport(RewritePass):
    name = "fix-export"
    summary = (
        "make torch.export graphs ONNX-exportable: contiguous/view of non-contiguous tensors, "
        "custom ops with a known decomposition (exact)"
    )
    exact = True
    Options = NoOptions

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Fix:
        return _Fix(gm, ctx)


__all__ = ["FixExport", "FixKind", "ViewFix", "apply", "match"]
