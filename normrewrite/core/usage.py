"""How many places in a graph read each stored tensor, tied weights included: what a rewrite
checks before it edits a tensor in place (a tensor read elsewhere must not change under it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from normrewrite.core.graph import is_bookkeeping, split_fqn


@dataclass(frozen=True)
class TensorUsage:
    """How many places in a graph read each stored tensor, counting aliases (tied weights).

    Built once per pass with :meth:`of`; a rewrite updates the few tensors it touched with
    :meth:`refresh` instead of rescanning the graph (a rescan per match grows as layers²)."""

    reads: dict[str, int]
    aliases: dict[str, frozenset[str]]

    @classmethod
    def of(cls, gm: GraphModule) -> TensorUsage:
        reads: Counter[str] = Counter()
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                reads[str(n.target)] += max(1, len(n.users))
            elif n.op == "call_module" and not is_bookkeeping(n):
                mod = gm.get_submodule(str(n.target))
                for name, _ in _named_tensors(mod):
                    reads[f"{n.target}.{name}"] += 1
        groups: dict[int, set[str]] = {}
        for name, t in _named_tensors(gm):
            groups.setdefault(_identity(t), set()).add(name)
        aliases = {name: frozenset(g) for g in groups.values() for name in g}
        return cls(dict(reads), aliases)

    def refresh(self, gm: GraphModule, fqns: Iterable[str]) -> None:
        """Recount the tensors ``fqns`` (rewritten, created or deleted) in place. Ties are
        regrouped among these names and their former aliases."""
        names = set(fqns)
        near = set(names)
        for fqn in names:
            near |= self.aliases.pop(fqn, frozenset())
            self.reads.pop(fqn, None)
        groups: dict[int, set[str]] = {}
        for n in near:
            t = _tensor_at(gm, n)
            if t is None:
                self.aliases.pop(n, None)
            else:
                groups.setdefault(_identity(t), set()).add(n)
        for group in groups.values():
            self.aliases.update(dict.fromkeys(group, frozenset(group)))
        graph = gm.graph
        for fqn in names & set().union(*groups.values()):
            reads = sum(max(1, len(n.users)) for n in graph.find_nodes(op="get_attr", target=fqn))
            callers = graph.find_nodes(op="call_module", target=fqn.rpartition(".")[0])
            reads += sum(1 for n in callers if not is_bookkeeping(n))
            if reads:
                self.reads[fqn] = reads

    def count(self, fqn: str) -> int:
        """Reads of the tensor at ``fqn`` under any of its names."""
        names = self.aliases.get(fqn, frozenset({fqn}))
        return sum(self.reads.get(n, 0) for n in names)

    def exclusive(self, fqn: str | None) -> bool:
        """True when ``fqn`` is read at most once and has no other name."""
        if fqn is None:
            return True
        return self.count(fqn) <= 1 and len(self.aliases.get(fqn, ())) <= 1


def _tensor_at(gm: nn.Module, fqn: str) -> torch.Tensor | None:
    """The parameter or buffer at ``fqn``, if any."""
    prefix, name = split_fqn(fqn)
    try:
        owner = gm.get_submodule(prefix) if prefix else gm
    except AttributeError:
        return None
    return owner._parameters.get(name, owner._buffers.get(name))


def _named_tensors(mod: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from mod.named_parameters(remove_duplicate=False)
    yield from mod.named_buffers(remove_duplicate=False)


def _identity(t: torch.Tensor) -> int:
    return id(t)
