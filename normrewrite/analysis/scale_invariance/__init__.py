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

Modules: :mod:`.lattice` (the states), :mod:`.op_table` (which rule each op follows, one line
per op), :mod:`.rules` (the transfer functions), :mod:`.propagate` (one parameter through the
graph), :mod:`.analyze` (every parameter, the results), :mod:`.groups` (tracing a module, and
optimizer parameter groups).
"""

from normrewrite.analysis.scale_invariance.analyze import ParamClaim, ScaleInvariance, analyze
from normrewrite.analysis.scale_invariance.groups import param_groups, scale_invariant_params
from normrewrite.analysis.scale_invariance.propagate import Status

__all__ = [
    "ParamClaim",
    "ScaleInvariance",
    "Status",
    "analyze",
    "param_groups",
    "scale_invariant_params",
]
