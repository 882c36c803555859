"""Shared tools for reading and editing traced graphs.

normrewrite works on ``torch.fx.GraphModule``\\ s of two flavours:

* **module** flavour, from ``torch.fx.symbolic_trace``: layers are ``call_module`` nodes whose
  parameters live on the submodule (``conv1.weight``);
* **aten** flavour, from ``torch.export`` (``ExportedProgram.module()``): layers are ATen
  ``call_function`` nodes (``aten.conv2d``, ``aten.batch_norm``) whose parameters are read by
  ``get_attr`` nodes (target ``conv1.weight``).

In both, a stored tensor is addressed by its fully qualified name (FQN) on the GraphModule, so the
helpers here — reading, replacing and adding tensors, counting who reads a tensor, naming nodes
after the module that produced them, the networkx view of the graph — serve every pass alike.
Nothing here assumes real data: tensors may live on the ``meta`` device.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import networkx as nx
import torch
from torch import nn
from torch.fx import GraphModule, Node

# Nodes torch.export adds that are bookkeeping, not computation: guard submodules, and dtype/shape
# assertions that read a value without computing from it.
_BOOKKEEPING_PREFIXES = ("_guards_fn",)
_ASSERTIONS = frozenset({torch.ops.aten._assert_tensor_metadata.default})


# --------------------------------------------------------------------------- naming


def module_path(node: Node) -> str | None:
    """The dotted path of the user-level module that produced ``node``, if known.

    ``call_module`` targets are that path; ATen nodes carry it in ``nn_module_stack`` metadata
    (innermost module last).
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(path)
    return None


def _clean_path(path: str) -> str:
    # torch.export writes e.g. "L['self'].layer1[0].conv1" in some versions; normalise to dots.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("]", "").split("["):
        out.append(part.strip("'\""))
    return ".".join(p for p in ".".join(out).split(".") if p)


def node_label(node: Node) -> str:
    """A human name for a node: its module path where known, else its node name."""
    return module_path(node) or node.name


def is_bookkeeping(node: Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(_BOOKKEEPING_PREFIXES)


def is_assertion(node: Node) -> bool:
    """An export assertion on a value (dtype/shape metadata): it reads the value, computes nothing."""
    return node.op == "call_function" and node.target in _ASSERTIONS


def users(node: Node) -> list[Node]:
    """Users of ``node`` that compute something (export's metadata assertions are not users)."""
    return [u for u in node.users if not is_assertion(u)]


def assertions_on(nodes: Iterable[Node]) -> list[Node]:
    """The export assertions that read any of ``nodes`` (to erase along with them)."""
    return [u for n in nodes for u in n.users if is_assertion(u)]


def compute_nodes(gm: GraphModule) -> list[Node]:
    """Nodes that compute something (calls), without inputs, constants and export bookkeeping."""
    return [
        n
        for n in gm.graph.nodes
        if n.op in ("call_function", "call_method", "call_module") and not is_bookkeeping(n)
    ]


def count_ops(gm: GraphModule) -> int:
    return len(compute_nodes(gm))


class Flavour(enum.StrEnum):
    """The two kinds of fx graph normrewrite reads (see the module docstring)."""

    MODULE = "module"  # torch.fx.symbolic_trace: call_module layers, torch/operator calls
    ATEN = "aten"  # torch.export: ATen op overloads, get_attr parameter reads


def flavour(gm: GraphModule) -> Flavour:
    """:attr:`Flavour.ATEN` for torch.export graphs, :attr:`Flavour.MODULE` for symbolic_trace graphs."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            return Flavour.ATEN
    return Flavour.MODULE


# --------------------------------------------------------------------------- shapes


def node_shape(node: object) -> tuple[int, ...] | None:
    """The (concrete or hinted) shape of a node's tensor value, if the trace recorded it."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(_hint(d) for d in val.shape)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(_hint(d) for d in tm.shape)
    return None


def node_dtype(node: object) -> torch.dtype | None:
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)


def _hint(d: object) -> int:
    if isinstance(d, int):
        return d
    try:
        return int(d)  # SymInt with a hint
    except Exception:  # pragma: no cover - unbacked symbol
        node = getattr(d, "node", None)
        return int(getattr(node, "hint", -1) or -1)


# --------------------------------------------------------------------------- tensors by FQN


def split_fqn(fqn: str) -> tuple[str, str]:
    prefix, _, name = fqn.rpartition(".")
    return prefix, name


def get_tensor(gm: nn.Module, fqn: str) -> torch.Tensor:
    prefix, name = split_fqn(fqn)
    owner = gm.get_submodule(prefix) if prefix else gm
    value = getattr(owner, name)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"{fqn} is not a tensor")
    return value


def has_tensor(gm: nn.Module, fqn: str) -> bool:
    try:
        get_tensor(gm, fqn)
    except (AttributeError, KeyError):
        return False
    return True


def set_tensor(gm: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Replace the tensor stored at ``fqn``, keeping its kind (parameter, buffer or attribute);
    a name not set yet becomes a parameter.

    Never writes into the old tensor: the original model, which may share it, stays intact.
    """
    prefix, name = split_fqn(fqn)
    owner = gm.get_submodule(prefix) if prefix else gm
    old = getattr(owner, name, None)
    value = value.detach()
    if name in owner._parameters or isinstance(old, nn.Parameter):
        requires_grad = old.requires_grad if isinstance(old, nn.Parameter) else True
        owner._parameters.pop(name, None)
        if name in owner.__dict__:
            delattr(owner, name)
        owner.register_parameter(
            name, nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
        )
    elif name in owner._buffers:
        persistent = name not in owner._non_persistent_buffers_set
        owner._buffers.pop(name)
        owner.register_buffer(name, value, persistent=persistent)
    elif old is None:  # a new tensor: a parameter, trainable if floating point
        owner.__dict__.pop(name, None)
        owner.register_parameter(name, nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        setattr(owner, name, value)


def add_parameter(gm: nn.Module, owner_path: str, base: str, value: torch.Tensor) -> str:
    """Register a new parameter on ``owner_path`` under a free name derived from ``base``."""
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name, i = base, 1
    while hasattr(owner, name) and getattr(owner, name) is not None:
        name, i = f"{base}_{i}", i + 1
    if name in owner.__dict__ or name in owner._parameters:
        owner._parameters.pop(name, None)
        owner.__dict__.pop(name, None)
    owner.register_parameter(
        name, nn.Parameter(value.detach(), requires_grad=value.is_floating_point())
    )
    return f"{owner_path}.{name}" if owner_path else name


def delete_tensor(gm: nn.Module, fqn: str) -> None:
    prefix, name = split_fqn(fqn)
    try:
        owner = gm.get_submodule(prefix) if prefix else gm
    except AttributeError:
        return
    for store in (owner._parameters, owner._buffers):
        store.pop(name, None)
    owner.__dict__.pop(name, None)


def constant_fqn(node: object) -> str | None:
    """The FQN of a stored tensor read directly by ``node`` (a ``get_attr``), else None."""
    if isinstance(node, Node) and node.op == "get_attr":
        return str(node.target)
    return None


def erase_unused(gm: GraphModule, nodes: Iterable[Node]) -> None:
    """Erase the given nodes once nothing reads them (in any order), then the ``get_attr``
    nodes they leave orphaned, and delete stored tensors and submodules no node reads any more.

    The graph's code is not regenerated: a pass erases once per match and ``Pass.ensures`` lints
    and recompiles once at the end (recompiling the whole graph per match grows as layers ×
    matches)."""
    candidates = list(nodes)
    erased: set[Node] = set()
    dropped: set[str] = set()  # get_attr / call_module targets no longer read by an erased node
    changed = True
    while changed:
        changed = False
        for n in list(candidates):
            if n in erased or n.users:
                continue
            inputs = n.all_input_nodes
            if n.op in ("get_attr", "call_module"):
                dropped.add(str(n.target))
            gm.graph.erase_node(n)
            erased.add(n)
            changed = True
            candidates.extend(a for a in inputs if a.op == "get_attr" and a not in erased)
    for target in dropped:
        if not _referenced(gm, target):
            delete_tensor(gm, target)
            _delete_unused_owners(gm, target)


def _referenced(gm: GraphModule, target: str) -> bool:
    """Whether a ``get_attr``/``call_module`` node still names ``target`` exactly."""
    graph = gm.graph
    return bool(graph.find_nodes(op="get_attr", target=target)) or bool(
        graph.find_nodes(op="call_module", target=target)
    )


def _delete_unused_owners(gm: GraphModule, target: str) -> None:
    """Delete ``target`` (if a submodule) and its enclosing submodules that no node reaches any
    more — what ``GraphModule.delete_all_unused_submodules`` does, for the paths of one dropped
    target instead of a whole-graph sweep per call."""
    parts = target.split(".")
    paths = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    if any(gm.graph.find_nodes(op="call_module", target=p) for p in paths[1:]):
        return  # inside a called module: everything under it stays
    for path in paths:
        try:
            mod = gm.get_submodule(path)
        except AttributeError:
            continue
        if _reached(gm, path, mod):
            return  # so are its owners
        gm.delete_submodule(path)


def _reached(gm: GraphModule, path: str, mod: nn.Module) -> bool:
    """Whether a node names ``path`` or anything inside the module at ``path``."""
    for prefix, sub in mod.named_modules(prefix=path, remove_duplicate=False):
        if _referenced(gm, prefix):
            return True
        attrs = [*sub._parameters, *sub._buffers]
        attrs += [k for k, v in vars(sub).items() if isinstance(v, torch.Tensor | nn.Module)]
        if any(_referenced(gm, f"{prefix}.{a}") for a in attrs):
            return True
    return False


# --------------------------------------------------------------------------- networkx view


def to_networkx(gm: GraphModule, *, with_constants: bool = False) -> nx.DiGraph:
    """A directed graph of data flow: one vertex per fx node (by name), an edge per use.

    ``get_attr`` nodes are left out unless ``with_constants`` — they are weights, not activations,
    and would connect unrelated layers that share a parameter.
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not with_constants:
            continue
        if is_bookkeeping(n):
            continue
        g.add_node(n.name, node=n)
        for a in n.all_input_nodes:
            if a.op == "get_attr" and not with_constants:
                continue
            g.add_edge(a.name, n.name)
    return g


def replace_with_holder(gm: GraphModule, path: str) -> None:
    """Replace the submodule at ``path``, once no ``call_module`` node calls it any more, by a
    plain ``nn.Module`` holding only the tensors ``get_attr`` nodes still read (same FQNs, same
    kind), so the state dict keeps no stale entries (e.g. a swapped norm's running statistics)."""
    if any(n.op == "call_module" and n.target == path for n in gm.graph.nodes):
        return
    try:
        old = gm.get_submodule(path)
    except AttributeError:
        return
    read = {
        str(n.target).rpartition(".")[2]
        for n in gm.graph.nodes
        if n.op == "get_attr" and str(n.target).rpartition(".")[0] == path
    }
    holder = nn.Module()
    for name, t in old._parameters.items():
        if name in read and t is not None:
            holder.register_parameter(name, t)
    for name, t in old._buffers.items():
        if name in read and t is not None:
            holder.register_buffer(name, t, persistent=name not in old._non_persistent_buffers_set)
    for name, child in old.named_children():
        holder.add_module(name, child)
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, holder)
    gm.delete_all_unused_submodules()
