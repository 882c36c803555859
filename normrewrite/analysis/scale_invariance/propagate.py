"""Forward propagation of the states for one parameter through a graph.

:class:`Propagation` walks the nodes in order, gives the parameter's reads ``H(1)``, every op
reading a non-independent value the state its rule computes (:mod:`.rules`, chosen by
:data:`.op_table.OP_RULES`), and reads the verdict off the graph's outputs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from normrewrite.analysis.scale_invariance import rules
from normrewrite.analysis.scale_invariance.lattice import (
    INDEPENDENT,
    State,
    absorbing,
    first_absorbing,
    homogeneous,
    not_invariant,
    undecided,
)
from normrewrite.analysis.scale_invariance.op_table import OP_RULES, Rule, op_name
from normrewrite.core.graph import is_bookkeeping, node_label
from normrewrite.core.ops import (
    ConvInfo,
    LinearInfo,
    NormInfo,
    call_args,
    conv_info,
    linear_info,
    norm_info,
)

Status = Literal["invariant", "not-invariant", "undecided"]

# what a node is, computed once per graph and shared by the propagations of all parameters
NodeOps = tuple[NormInfo | None, ConvInfo | None, LinearInfo | None, str]

# rules that see an absorbing (X/U) operand themselves instead of passing it on unread
_READ_ABSORBING = {Rule.ADD, Rule.MUL, Rule.DIV, Rule.MATMUL}
# rules of one data input: dispatched to rules.unary
_UNARY = {Rule.CHANNELWISE, Rule.LINEAR, Rule.HOMOGENEOUS}
_NONLINEAR = {Rule.NONLINEAR, Rule.SHIFT_INVARIANT}


class Propagation:
    """The states for one parameter (by its FQN aliases) in ``gm``, and what undid the scaling."""

    def __init__(
        self,
        gm: GraphModule,
        names: frozenset[str],
        cache: dict[Node, NodeOps],
        module_reads: dict[Node, frozenset[str]],
    ) -> None:
        self.gm, self.names, self.cache, self.module_reads = gm, names, cache, module_reads
        self.state: dict[Node, State] = {}
        self.conditions: set[str] = set()  # "batch-stats" when a BatchNorm cancels the scaling
        self.cancelled_by: set[str] = set()  # labels of the norms that cancel it

    def get(self, arg: Any) -> State:
        return self.state.get(arg, INDEPENDENT) if isinstance(arg, Node) else INDEPENDENT

    def param_state(self, fqn: str | None) -> State:
        return homogeneous(1) if fqn is not None and fqn in self.names else INDEPENDENT

    def arg_state(self, n: Node, name: str, fqn: str | None) -> State:
        """The state of a layer's tensor argument ``name`` (stored as ``fqn`` in a module)."""
        if n.op == "call_module":
            return self.param_state(fqn)
        return self.get(call_args(self.gm, n).get(name))

    def cancel(self, info: NormInfo) -> State:
        """``info`` removes the scaling: record it, and its condition."""
        self.cancelled_by.add(info.label)
        if info.kind == "batchnorm":
            self.conditions.add("batch-stats")
        return INDEPENDENT

    def run(self) -> tuple[Status, str]:
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                if str(n.target) in self.names:
                    self.state[n] = homogeneous(1)
                continue
            if n.op == "placeholder" or is_bookkeeping(n):
                continue
            if n.op == "output":
                return self.verdict(n)
            reads = bool(self.module_reads.get(n, frozenset()) & self.names)
            if not reads and all(self.get(a).kind == "I" for a in n.all_input_nodes):
                continue
            st = self.visit(n)
            if st.kind != "I":
                self.state[n] = st
                # an in-place op changes its first argument for later readers too
                if (
                    n.op == "call_function"
                    and isinstance(n.target, torch._ops.OpOverload)
                    and n.target.overloadpacket.__name__.endswith("_")
                    and n.args
                    and isinstance(n.args[0], Node)
                ):
                    self.state[n.args[0]] = st
        return "undecided", "the graph has no output"

    def verdict(self, out: Node) -> tuple[Status, str]:
        states = [(a, self.get(a)) for a in out.all_input_nodes]
        bad = first_absorbing(s for _, s in states)
        if bad is not None and bad.kind == "X":
            return "not-invariant", bad.why
        live = [(a, s) for a, s in states if s.kind in ("H", "A", "S")]
        if live:
            return (
                "not-invariant",
                f"the scaled value reaches the model output ({node_label(live[0][0])}) un-normalized",
            )
        if bad is not None:
            return "undecided", bad.why
        return "invariant", ""

    def ops(self, n: Node) -> NodeOps:
        rec = self.cache.get(n)
        if rec is None:
            gm = self.gm
            rec = (norm_info(gm, n), conv_info(gm, n), linear_info(gm, n), op_name(gm, n))
            self.cache[n] = rec
        return rec

    def visit(self, n: Node) -> State:
        norm, conv, lin, name = self.ops(n)
        if norm is not None:
            return rules.norm(self, n, norm)
        if conv is not None:
            return rules.layer(self, n, conv)
        if lin is not None:
            return rules.layer(self, n, lin)
        rule = OP_RULES.get(name)
        if rule is Rule.EMBEDDING:
            return rules.embedding(self, n)
        if n.op == "call_module":
            return self.visit_module(n, name, rule)
        args = n.all_input_nodes
        bad = first_absorbing(self.get(a) for a in args)
        if bad is not None and rule not in _READ_ABSORBING:
            return bad
        if rule in _UNARY:
            dep = [(a, self.get(a)) for a in args if self.get(a).kind != "I"]
            if len(dep) != 1 or not _is_data_arg(n, dep[0][0]):
                return undecided(
                    f"{name} at {node_label(n)} reads the scaled value as a non-data argument"
                )
            return rules.unary(n, name, rule, dep[0][1], dep[0][0])
        if rule in _NONLINEAR:
            dep = [self.get(a) for a in args if self.get(a).kind != "I"]
            if rule is Rule.SHIFT_INVARIANT and all(d.kind == "S" for d in dep):
                return undecided(
                    f"{name} at {node_label(n)} may cancel the additive term before it"
                )
            return not_invariant(f"{name} at {node_label(n)} is not positively homogeneous")
        if rule is Rule.ADD:
            return rules.add(self, n)
        if rule in (Rule.MUL, Rule.DIV):
            return rules.mul(self, n, divide=rule is Rule.DIV)
        if rule is Rule.MATMUL:
            return rules.matmul(self, n)
        if rule is Rule.CAT:
            return rules.cat(self, n)
        if rule is Rule.ATTENTION:
            return rules.attention(self, n)
        return undecided(f"no rule for {name} ({node_label(n)})")

    def visit_module(self, n: Node, name: str, rule: Rule | None) -> State:
        """A module call (symbolic_trace) that is not a norm, conv or linear: an activation,
        pooling, dropout or reshape module applied to its first argument."""
        if name.startswith("module "):
            return undecided(f"no rule for {name} ({node_label(n)})")
        x = n.args[0] if n.args else None
        st = self.get(x)
        if rule in _NONLINEAR and st.kind != "I" and not absorbing(st):
            return not_invariant(
                f"{type(self.gm.get_submodule(str(n.target))).__name__} at {node_label(n)} "
                "is not positively homogeneous"
            )
        return rules.unary(n, name, rule, st, x)


def _is_data_arg(n: Node, arg: Node) -> bool:
    first = n.args[0] if n.args else n.kwargs.get("input", n.kwargs.get("self"))
    if isinstance(first, list | tuple):  # getitem on a list, cat-like
        return arg in first
    return first is arg
