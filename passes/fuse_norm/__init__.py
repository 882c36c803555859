"""fuse-norm: replace norms written out as elementwise ops by one fused norm op.

Identities (over the last dim, ``D`` features, ``x̄ = mean(x)``)::

    x · rsqrt(mean(x²) + ε)                 = rms_norm(x, [D], None, ε)        (Llama, Qwen, T5)
    x / sqrt(mean(x²) + ε)                  = rms_norm(x, [D], None, ε)
    (x − x̄) · rsqrt(mean((x − x̄)²) + ε)     = layer_norm(x, [D], None, None, ε)
    (x − x̄) / sqrt(var(x, correction=0) + ε) = layer_norm(x, [D], None, None, ε)
    γ · norm(x) [+ β]                        = norm(x, γ [, β])      (γ, β stored, shape (D,))

Matched on op semantics in both graph flavours: ATen (``aten.pow.Tensor_Scalar``,
``aten.mean.dim``, ``aten.rsqrt.default``, ``aten.to.dtype`` …) and symbolic_trace (``torch.*``
functions, ``operator`` arithmetic, tensor methods). The fused op is ``aten.rms_norm`` /
``aten.layer_norm`` in ATen graphs and ``F.rms_norm`` / ``F.layer_norm`` in fx graphs.

Preconditions, each checked (a near miss is reported with the reason):

* the reduction is a ``mean`` over the last dim only (``-1`` or ``rank − 1``) with
  ``keepdim=True``, of ``x²`` (``pow(x, 2)``, ``square(x)``, ``x * x``); a variance has
  ``correction=0``; ε is a Python number added to it;
* every intermediate value is read only inside the pattern;
* the value squared and the value normalized are the same, or differ only by lossless casts
  (T5 squares ``x.to(float32)`` and multiplies ``x``);
* dtype casts are kept exactly: a cast that is a no-op (same dtype in and out, known from the
  trace) between the normalization and γ is dropped; a real down-cast (the bf16 Llama
  ``.to(input_dtype)``) stays, and γ is then left as a separate multiply after it, because
  fusing it would multiply before rounding instead of after;
* γ/β are fused only when they are stored tensors of shape ``(D,)`` with the activation's dtype.
  Gemma's ``x · (1 + γ)`` is left as a separate multiply after the fused op (still exact; folding
  the offset would re-parameterise the weight), and the change says so.

Layout: :mod:`normrewrite.analysis.norms.ops` (what each fx op means), :mod:`~normrewrite.analysis.norms.conditions` (ε, axes and γ/β checks on
plain values) and :mod:`~normrewrite.analysis.norms.written` (the matcher, shared with ``inspect``); :mod:`.fx` the rewrite; the ONNX form is
:mod:`normrewrite.passes.fuse_norm.onnx`.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.conditions import NormKind
from normrewrite.analysis.norms.ops import op_name
from normrewrite.core.pass_infra import Change, PassContext, Skip
from normrewrite.core.rewrite import Rewrite, RewritePass

from . import fx
from .fx import NormPattern


class _Fuse(Rewrite[NormPattern]):
    refused = "not fusable"

    def match(self, candidate: Node) -> NormPattern | Skip | None:
        return fx.match(self.gm, candidate)

    def apply(self, found: NormPattern) -> Change:
        change = Change(found.label, f"fused {found.describe()}")
        fx.apply(self.gm, found)
        return change


class FuseNorm(RewritePass):
    name = "fuse-norm"
    summary = "replace RMSNorm/LayerNorm written out as elementwise ops by one fused op (exact)"
    exact = True
    onnx_form = "normrewrite.passes.fuse_norm.onnx:OnnxFuseNorm"

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Fuse:
        return _Fuse(gm, ctx)


__all__ = ["FuseNorm", "NormKind", "NormPattern", "op_name"]
