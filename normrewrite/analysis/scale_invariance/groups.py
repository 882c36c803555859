"""Library entry points on an ``nn.Module``: :func:`scale_invariant_params` traces the model and
runs :func:`~.analyze.analyze`; :func:`param_groups` turns the answer into ``torch.optim``
parameter groups.

The tracing here (``normrewrite.trace``, ``normrewrite.load.inputs``) is the one place an
analysis reaches above ``core``; tests/test_layers.py allowlists it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.fx import GraphModule

from normrewrite.analysis.scale_invariance.analyze import ScaleInvariance, analyze


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
    ``GraphModule``) are scale-invariant; see :mod:`normrewrite.analysis.scale_invariance` for the rules."""
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
