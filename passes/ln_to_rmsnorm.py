"""ln-to-rmsnorm: LayerNorm → RMSNorm, made exact by re-centring the residual stream.

Identity (Jiang et al., NeurIPS 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers",
arXiv 2305.14858). For a vector ``x`` of ``D`` features with mean ``x̄ = 0``::

    LayerNorm(x; γ, β, ε) = γ ⊙ x / sqrt(mean(x²) + ε) + β = RMSNorm(x; γ, ε) + β

A Pre-LN transformer reads its residual stream only through LayerNorms, which ignore the mean of
their input; so the mean can be removed from the stream without changing the model: replace every
*writer* ``w`` of the stream by ``C w`` with ``C = I − 11ᵀ/D`` — for a linear layer ``W ← W −
mean_out(W)``, ``b ← b − mean(b)``; for an embedding table, each row minus its mean; likewise a
patch-embedding conv's output channels and stored tensors added in (``cls_token``, position
embeddings). Each op between writers and readers (residual adds, dropout, reshapes keeping the
features, transposes, ``cat`` along tokens) commutes with ``C``, so every stream value becomes
zero-mean and each LayerNorm becomes an RMSNorm with the same ε. Finally γ/β are folded into the
linear layers that read the norm (``fold-norm-affine``; option ``fold``) or, where the norm feeds
anything else (the final norm's output is the model output), kept as ``RMSNorm(x; γ) + β``.

Preconditions, checked on the graph (:func:`normrewrite.analysis.residual_stream.residual_streams`), per
stream; a stream that fails one keeps its LayerNorms and the report gives the reason:

* the stream is read only through LayerNorms over its features (Pre-LN; a Post-LN model such as
  BERT reads the un-normalized sum in the next branch, and a model returning the raw stream
  exposes its mean — both are refused);
* every writer is a linear / non-grouped conv / embedding / stored tensor, or else gets an explicit
  mean subtraction (2 ops per position, listed in the report's notes) — refused where that would
  be all the stream has;
* the writers' tensors are read nowhere else: a tied output head (``lm_head.weight is
  wte.weight``) is refused, or with ``untie=true`` the embedding gets its own re-centred copy
  (the head keeps the original table);
* the RMSNorm keeps the LayerNorm's ε (it is the same ``mean(x²) + ε`` once the mean is zero).

The rewrite is exact in real arithmetic; in floating point the stream's mean is zero only up to
rounding, so outputs agree to ~1e-6 relative (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.analysis.norms import Norm, find_norms
from normrewrite.analysis.residual_stream import ResidualStream, StreamWriter, residual_streams
from normrewrite.core.graph import (
    Flavour,
    add_parameter,
    erase_unused,
    flavour,
    get_tensor,
    node_label,
)
from normrewrite.core.ops import NormInfo, norm_info
from normrewrite.core.ops.args import call_args
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, Skip, compute_tensors
from normrewrite.core.usage import TensorUsage

from .fold_norm_affine import AffineFold, fold_into_layers
from .fold_norm_affine import match as match_affine

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


# --------------------------------------------------------------------------- matcher


@dataclass(frozen=True)
class StreamPlan:
    stream: ResidualStream
    untie: tuple[str, ...]  # FQNs to give their own copy first (tied embeddings)


def plan(
    gm: GraphModule, stream: ResidualStream, usage: TensorUsage, untie: bool
) -> StreamPlan | tuple[Skip, ...]:
    """The rewrite of one residual stream, or why not: one :class:`Skip` per norm reading it."""
    labels = tuple(node_label(n) for n in stream.readers)

    def skip(reason: str) -> tuple[Skip, ...]:
        return tuple(Skip(label, reason) for label in labels)

    if stream.problems:
        more = f" (and {len(stream.problems) - 1} more)" if len(stream.problems) > 1 else ""
        return skip(stream.problems[0] + more)
    if not stream.writers:
        return skip("no writer of the stream found")
    reads_inside: dict[str, int] = {}
    for w in stream.writers:
        for fqn, _ in w.tensors:  # a stored table read by several slices counts each
            reads = len(w.node.users) if w.node.op == "get_attr" else 1
            reads_inside[fqn] = reads_inside.get(fqn, 0) + reads
    to_untie: list[str] = []
    for w in stream.writers:
        for fqn, _ in w.tensors:
            shared = usage.count(fqn) > reads_inside[fqn] or len(usage.aliases.get(fqn, ())) > 1
            if not shared:
                continue
            if untie and w.kind in ("embedding", "constant") and w.node.op != "call_module":
                to_untie.append(fqn)
                continue
            hint = (
                " (ln-to-rmsnorm:untie=true gives it its own copy)"
                if w.kind in ("embedding", "constant")
                else ""
            )
            return skip(
                f"{fqn}, written into the stream by {w.label}, is also read elsewhere "
                f"(a tied output head?){hint}"
            )
    return StreamPlan(stream, tuple(dict.fromkeys(to_untie)))


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


def recentre(gm: GraphModule, ctx: PassContext, p: StreamPlan) -> int:
    """Centre every writer's tensors along the feature dim (or, for a "centre" writer, subtract
    the mean after it); returns how many tensors changed."""
    renamed: dict[str, str] = {}
    for fqn in p.untie:
        renamed |= _untie(gm, ctx, fqn, p.stream.writers)
    done: set[str] = set()
    for w in p.stream.writers:
        if w.kind == "centre":
            subtract_mean(gm, w)
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
    return len(done)


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


def _unit_weight(gm: GraphModule, ctx: PassContext, info: NormInfo) -> str:
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


# --------------------------------------------------------------------------- pass


def _centres(stream: ResidualStream) -> str:
    n = sum(w.kind == "centre" for w in stream.writers)
    subtractions = f"{n} explicit mean subtraction{'s' if n > 1 else ''}"
    if stream.explicit:
        return f"only by {subtractions} at its norms' inputs (no saving)"
    inserted = f" ({subtractions} inserted)" if n else ""
    return f"stream written by {len(stream.writers)} ops{inserted}"


def _note(stream: ResidualStream, w: StreamWriter) -> str:
    """What an inserted mean subtraction costs, and whether it saves anything."""
    cost = f"(2 ops: mean, sub over {stream.features} features per position)"
    if not stream.explicit:
        return (
            f"ln-to-rmsnorm: inserted a mean subtraction after {w.label} {cost}, which no "
            "weight surgery can centre"
        )
    norms = ", ".join(node_label(u) for u in w.uses)
    saving = (
        "no saving, it replaces the LayerNorm's own centring"
        if len(w.uses) == 1
        else f"it replaces the centring of {len(w.uses)} LayerNorms"
    )
    return (
        f"ln-to-rmsnorm: inserted a mean subtraction before {norms} {cost}: no stored tensor "
        f"writes its stream; {saving}"
    )


@dataclass(frozen=True)
class LnToRmsNormOptions:
    fold: bool = True
    """Fold γ/β into the linear layers reading each norm where all its readers are linear."""
    untie: bool = False
    """Give a tied embedding (shared with an output head) its own re-centred copy."""
    unit_weight: bool = False
    """Where γ was folded, give the RMSNorm a stored γ of ones instead of none: the ONNX exporter
    writes a missing RMSNormalization scale as a ConstantOfShape that onnxruntime recomputes on
    every run (≈8× slower per norm, see bench/results/norms.md)."""


class LnToRmsNorm(Pass):
    name = "ln-to-rmsnorm"
    summary = "LayerNorm → RMSNorm in Pre-LN transformers, exact by re-centring the residual stream"
    exact = True
    Options = LnToRmsNormOptions

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        changes: list[Change] = []
        skipped: list[Skip] = []
        notes: list[str] = []
        done: list[tuple[ResidualStream, int]] = []
        # every stream is centred before any norm is replaced: a stream may start at the output
        # of a norm that reads another stream
        for stream in residual_streams(gm):
            found = plan(gm, stream, TensorUsage.of(gm), self.options.untie)
            if isinstance(found, tuple):
                skipped += found
                continue
            n = recentre(gm, ctx, found)
            notes += [_note(stream, w) for w in stream.writers if w.kind == "centre"]
            untied = f"; untied {', '.join(found.untie)}" if found.untie else ""
            done.append((stream, len(changes)))
            changes.append(
                Change(
                    ", ".join(w.label for w in stream.writers),
                    f"re-centred {n} tensors of {len(stream.writers)} stream writers{untied}",
                )
            )
        for stream, at in reversed(done):
            converted = [self._convert(gm, ctx, ln) for ln in stream.readers]
            changes[at + 1 : at + 1] = converted
        skipped += [Skip(n.label, WRITTEN_OUT) for n in _written_layernorms(gm)]
        return PassResult(gm, bool(changes), changes, skipped, notes)

    def _convert(self, gm: GraphModule, ctx: PassContext, ln: Node) -> Change:
        """LayerNorm ``ln``, reading a centred stream, → RMSNorm (γ/β folded where possible)."""
        info = norm_info(gm, ln)
        assert info is not None
        label, folded = info.label, ""
        stored = (info.weight or not info.has_weight) and (info.bias or not info.has_bias)
        if self.options.fold and stored:
            m = match_affine(gm, ln, TensorUsage.of(gm))
            if isinstance(m, AffineFold):
                fold_into_layers(gm, ctx, m.layers, info.weight, info.bias, "ln-to-rmsnorm")
                folded = f"; γ/β folded into {', '.join(d.label for d in m.layers)}"
                ones = _unit_weight(gm, ctx, info) if self.options.unit_weight else None
                info = NormInfo(
                    **{
                        **info.__dict__,
                        "weight": ones,
                        "bias": None,
                        "has_weight": ones is not None,
                        "has_bias": False,
                    }
                )
        to_rmsnorm(gm, info)
        kept = " + β" if info.has_bias else ""
        return Change(label, f"LayerNorm → RMSNorm{kept} (eps={info.eps:g}){folded}")

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        out: dict[str, str] = {}
        usage = TensorUsage.of(gm)
        for stream in residual_streams(gm):
            found = plan(gm, stream, usage, self.options.untie)
            for ln in stream.readers:
                out[ln.name] = (
                    f"not convertible: {found[0].reason}"
                    if isinstance(found, tuple)
                    else f"convertible: {_centres(stream)}"
                )
        for n in _written_layernorms(gm):
            out[n.node.name] = f"not convertible: {WRITTEN_OUT}"
        return out


WRITTEN_OUT = "LayerNorm written out as arithmetic: run fuse-norm first to make it one op"


def _written_layernorms(gm: GraphModule) -> list[Norm]:
    """LayerNorms the model writes out by hand (Cohere): this pass rewrites fused ops only."""
    return [n for n in find_norms(gm) if n.kind == "layernorm" and n.form == "written"]


__all__ = ["LnToRmsNorm", "StreamPlan", "centre", "plan", "recentre", "to_rmsnorm"]
