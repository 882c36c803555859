"""The analysis driver: one :class:`~.propagate.Propagation` per parameter, and the results.

Parameters are grouped by identity (a tied weight read under two FQNs is one parameter with
aliases); each gets a role from the op that reads it, a status, and for ``invariant`` the
condition it holds under.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch.fx import GraphModule, Node

from normrewrite.analysis.scale_invariance.op_table import op_name
from normrewrite.analysis.scale_invariance.propagate import NodeOps, Propagation, Status
from normrewrite.core.graph import is_bookkeeping
from normrewrite.core.ops import call_args, conv_info, linear_info, norm_info


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
        if op_name(gm, n) == "embedding":
            if n.op == "call_module":
                roles.setdefault(f"{n.target}.weight", "embedding")
            else:
                w = call_args(gm, n).get("weight")
                if isinstance(w, Node) and w.op == "get_attr":
                    roles.setdefault(str(w.target), "embedding")
    return roles


def analyze(gm: GraphModule) -> ScaleInvariance:
    """Scale-invariance of every parameter ``gm`` reads (see
    :mod:`normrewrite.analysis.scale_invariance`)."""
    groups: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
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
    cache: dict[Node, NodeOps] = {}
    result = ScaleInvariance()
    for names in groups.values():
        if not read & set(names):
            continue
        a = Propagation(gm, frozenset(names), cache, module_reads)
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
