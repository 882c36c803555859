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
  mean subtraction (2 ops per position, listed in the report's notes); where that would be all the
  stream has, the norm is still converted (the user asked for RMSNorm-only norms) with one
  subtraction at its input, and the note says it saves nothing;
* the writers' tensors are read nowhere else but by writers of streams rewritten too (mBART's one
  token table for encoder and decoder): a tied output head (``lm_head.weight is wte.weight``) is
  refused, or with ``untie=true`` the embedding gets its own re-centred copy (the head keeps the
  original table);
* the RMSNorm keeps the LayerNorm's ε (it is the same ``mean(x²) + ε`` once the mean is zero).

A value the same for every feature added to the stream (``x + 0``, the start of MusicGen's
``sum()`` over codebook embeddings; any ``x ± c`` with ``c`` of size 1 along the features) is
centred to zero: the add is replaced by ``x`` (exact because only LayerNorms, which ignore a
shift, read the stream; a nonzero ``c`` dropped is noted). LayerNorms written out as arithmetic
(Cohere) are fused first with fuse-norm's rewrite where their stream converts — decided on a copy
of the graph with all of them fused (:mod:`.written`), so ``explain`` and ``call`` agree; the
others (Post-LN) stay as written and are refused with the copy's reason.

The rewrite is exact in real arithmetic; in floating point the stream's mean is zero only up to
rounding, so outputs agree to ~1e-6 relative (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from normrewrite.analysis.residual_stream import (
    ResidualStream,
    StreamWriter,
    residual_streams,
    shifted_by,
)
from normrewrite.core.graph import node_label
from normrewrite.core.ops import NormInfo, norm_info
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, Skip
from normrewrite.core.usage import TensorUsage

from ..fold_norm_affine import AffineFold, fold_into_layers
from ..fold_norm_affine import match as match_affine
from .plan import plan_all
from .rewrite import recentre, to_rmsnorm, unit_weight
from .written import analyse, fuse_chosen

# --------------------------------------------------------------------------- pass


def _centres(stream: ResidualStream) -> str:
    n = sum(w.kind == "centre" for w in stream.writers)
    shifts = sum(w.kind == "shift" for w in stream.writers)
    subtractions = f"{n} explicit mean subtraction{'s' if n > 1 else ''}"
    if stream.explicit:
        saving = " (no saving)" if n >= len(stream.readers) else ""
        return f"only by {subtractions} at its norms' inputs{saving}"
    inserted = f" ({subtractions} inserted)" if n else ""
    dropped = f" ({shifts} added constant(s) dropped)" if shifts else ""
    return f"stream written by {len(stream.writers) - shifts} ops{inserted}{dropped}"


def _note(stream: ResidualStream, w: StreamWriter) -> str:
    """What an inserted mean subtraction costs, and whether it saves anything; which nonzero
    constant a "shift" writer added (dropped: the centred stream does not carry it)."""
    if w.kind == "shift":
        c = shifted_by(w)
        return (
            f"ln-to-rmsnorm: dropped {c}, added to every feature of the stream by {w.label} "
            "(centring removes it; only LayerNorms read the stream)"
            if c
            else ""
        )
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
        f"ln-to-rmsnorm: inserted a mean subtraction before {norms} {cost}: its stream takes as "
        f"many to centre as it has norms; {saving}"
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
        seen = analyse(gm, self.options.untie)
        if seen.written:  # written-out LayerNorms: fuse those whose stream converts, then plan
            fused = fuse_chosen(gm, seen.to_fuse())
            skipped += seen.refused()
            if fused:
                notes.append(
                    f"ln-to-rmsnorm: fused {len(fused)} written-out LayerNorm"
                    f"{'s' if len(fused) > 1 else ''} first (fuse-norm's rewrite): "
                    + ", ".join(fused)
                )
            streams = residual_streams(gm)
            plans = plan_all(gm, streams, self.options.untie)
        else:
            streams, plans = seen.streams, seen.plans
        # every stream is centred before any norm is replaced: a stream may start at the output
        # of a norm that reads another stream
        centred: set[str] = set()  # a tensor writing several streams is centred once
        for stream, found in zip(streams, plans, strict=True):
            if isinstance(found, tuple):
                skipped += found
                continue
            n = recentre(gm, ctx, found, centred)
            notes += [
                note
                for w in stream.writers
                if w.kind in ("centre", "shift") and (note := _note(stream, w))
            ]
            untied = f"; untied {', '.join(found.untie)}" if found.untie else ""
            done.append((stream, len(changes)))
            writers = [w for w in stream.writers if w.kind != "shift"]
            shifts = len(stream.writers) - len(writers)
            dropped = f"; dropped {shifts} constant(s) added to the stream" if shifts else ""
            what = (
                f"inserted {len(stream.writers)} mean subtraction(s) at the norms' inputs"
                if stream.explicit
                else f"re-centred {n} tensors of {len(writers)} stream writers{untied}{dropped}"
            )
            changes.append(Change(", ".join(w.label for w in writers), what))
        for stream, at in reversed(done):
            converted = [self._convert(gm, ctx, ln) for ln in stream.readers]
            changes[at + 1 : at + 1] = converted
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
                ones = unit_weight(gm, ctx, info) if self.options.unit_weight else None
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
        seen = analyse(gm, self.options.untie)
        for stream, found in zip(seen.streams, seen.plans, strict=True):
            for ln in stream.readers:
                fused = " (written out: fused first)" if ln in seen.written else ""
                out[seen.name(ln)] = (
                    f"not convertible: {found[0].reason}"
                    if isinstance(found, tuple)
                    else f"convertible{fused}: {_centres(stream)}"
                )
        return out


__all__ = ["LnToRmsNorm", "LnToRmsNormOptions"]
