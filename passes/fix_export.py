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

Attention whose key/value broadcast against the query (q ``(B, H, L, E)``, k/v ``(b, h, S, E)``)::

    sdpa(q, k, v)                 == sdpa(q, expand(k, B', H', -1, -1), expand(v, …))
    sdpa(q, k, v, enable_gqa=True) == sdpa(q, k, v)          when h == H

with ``B' = B`` where ``b == 1 < B`` (else -1), and ``H' = H`` where ``h == 1 < H`` and GQA is off
(else -1). ``scaled_dot_product_attention`` broadcasts k/v's batch and head dims like a matmul, so
the expanded operands hold the same values at every index it reads: exact (the kernel torch picks
for the expanded operands may sum in another order: equal up to float rounding). Falcon's
multi-query attention hands SDPA one k/v head for all query heads; the exporter's opset-23
``Attention`` translation accepts only equal heads ("SDPA (MHA) requires q_num_heads =
kv_num_heads") and onnxruntime's ``Attention`` only equal batches; with equal heads and
``enable_gqa=True`` the exporter asserts ``q_num_heads > kv_num_heads``. Grouped-query attention
proper (``enable_gqa=True``, h dividing H, h < H) exports as it is and is left alone. Preconditions:
4-d q/k/v with known static k/v batch and head sizes (the query's batch may be symbolic: it is read
with ``sym_size``, and -1 keeps every other dim free, so ``--dynamic`` outputs keep their shapes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from normrewrite.core.pass_infra import Change, NoOptions, PassContext, Skip
from normrewrite.core.rewrite import Rewrite, RewritePass

_VIEW_TARGETS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
_SDPA_TARGETS = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.nn.functional.scaled_dot_product_attention,  # symbolic_trace graphs
)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")  # positional


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
    EXPAND_KV = "key/value expanded to the query's dims"  # attention broadcasting k/v
    NO_GQA = "enable_gqa=False (equal heads)"


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


@dataclass(frozen=True)
class AttentionFix:
    """An SDPA call whose k/v broadcast against q: ``expand`` says, for ``key`` and ``value``,
    which dims to expand to q's size; ``no_gqa``: drop ``enable_gqa`` (equal heads)."""

    node: Node
    reason: str
    query: tuple[int | None, ...]  # q's sizes, None where symbolic
    expand: tuple[tuple[int, ...], tuple[int, ...]]  # dims of (key, value)
    no_gqa: bool = False

    @property
    def kind(self) -> FixKind:
        return FixKind.EXPAND_KV if any(self.expand) else FixKind.NO_GQA

    @property
    def label(self) -> str:
        return self.node.name

    def describe(self) -> str:
        done = [FixKind.EXPAND_KV.value] if any(self.expand) else []
        done += [FixKind.NO_GQA.value] if self.no_gqa else []
        return f"{self.reason}: {', '.join(done)}"

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


def _sdpa_arg(node: Node, name: str, default: object = None) -> object:
    if name in _SDPA_ARGS and _SDPA_ARGS.index(name) < len(node.args):
        return node.args[_SDPA_ARGS.index(name)]
    return node.kwargs.get(name, default)


def _sizes(node: object) -> tuple[int | None, ...] | None:
    """A node's sizes, None for a symbolic one (export's fake tensor or ShapeProp's tensor_meta)."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    shape = val.shape if isinstance(val, torch.Tensor) else None
    if shape is None and node.meta.get("tensor_meta") is not None:
        shape = node.meta["tensor_meta"].shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def match_attention(node: Node) -> AttentionFix | None:
    """An SDPA call the ONNX exporter or onnxruntime cannot take as it is (module docstring)."""
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    q, k, v = (_sizes(_sdpa_arg(node, n)) for n in ("query", "key", "value"))
    if q is None or k is None or v is None or not len(q) == len(k) == len(v) == 4:
        return None
    gqa = bool(_sdpa_arg(node, "enable_gqa", False))
    no_gqa = gqa and k[1] is not None and k[1] == q[1] and v[1] == q[1]

    def broadcast(kv: tuple[int | None, ...]) -> tuple[int, ...]:
        dims = (0,) if gqa and not no_gqa else (0, 1)  # GQA proper shares heads by itself
        return tuple(d for d in dims if kv[d] == 1 and (q[d] is None or q[d] > 1))

    expand = (broadcast(k), broadcast(v))
    if not any(expand) and not no_gqa:
        return None
    qs = "x".join("?" if d is None else str(d) for d in q)
    ks = "x".join("?" if d is None else str(d) for d in k)
    what = "equal heads with enable_gqa" if not any(expand) else "key/value broadcast"
    return AttentionFix(node, f"attention {what} (q {qs}, k {ks})", q, expand, no_gqa)


def apply_attention(gm: GraphModule, fix: AttentionFix) -> None:
    node = fix.node
    args, kwargs = list(node.args), dict(node.kwargs)
    q = _sdpa_arg(node, "query")
    for which, dims in zip(("key", "value"), fix.expand, strict=True):
        if not dims:
            continue
        kv = _sdpa_arg(node, which)
        with gm.graph.inserting_before(node):
            sizes: list[object] = [-1] * 4
            for d in dims:
                size = fix.query[d]
                sizes[d] = (
                    size
                    if size is not None
                    else gm.graph.call_function(torch.ops.aten.sym_size.int, (q, d))
                )
            expanded = gm.graph.call_function(torch.ops.aten.expand.default, (kv, sizes))
        i = _SDPA_ARGS.index(which)
        if i < len(args):
            args[i] = expanded
        else:
            kwargs[which] = expanded
    if fix.no_gqa:
        kwargs["enable_gqa"] = False
    node.args, node.kwargs = tuple(args), kwargs


def match(node: Node) -> ViewFix | AttentionFix | Skip | None:
    attention = match_attention(node)
    if attention is not None:
        return attention
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


class _Fix(Rewrite[ViewFix | AttentionFix]):
    refused = "not fixed"

    def match(self, candidate: Node) -> ViewFix | AttentionFix | Skip | None:
        return match(candidate)

    def apply(self, found: ViewFix | AttentionFix) -> Change:
        if isinstance(found, AttentionFix):
            apply_attention(self.gm, found)
        else:
            apply(self.gm, found)
        return Change(found.label, found.describe())


class FixExport(RewritePass):
    name = "fix-export"
    summary = (
        "make torch.export graphs ONNX-exportable: contiguous/view of non-contiguous tensors, "
        "custom ops with a known decomposition, attention with broadcast key/value (exact)"
    )
    exact = True
    Options = NoOptions

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Fix:
        return _Fix(gm, ctx)


__all__ = [
    "AttentionFix",
    "FixExport",
    "FixKind",
    "ViewFix",
    "apply",
    "apply_attention",
    "match",
    "match_attention",
]
