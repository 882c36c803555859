"""The plan of a streamed conversion: which output tensor comes from which checkpoint tensor or
recipe output.

Passes run on the ``meta`` graph edit stored tensors only through
:func:`normrewrite.core.pass_infra.compute_tensors`, which logs each edit as a
:class:`~normrewrite.core.pass_infra.TensorRecipe` ``outputs = fn(*inputs)`` (names are FQNs at
the time the pass ran). :func:`make_plan` resolves the log into references — :class:`Source` (an
original tensor, read from the checkpoint) or :class:`RecipeOutput` — for every tensor of the
rewritten graph, finds tied names (written once) and refuses tensors changed without a recipe.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from normrewrite.core.pass_infra import TensorRecipe
from normrewrite.errors import LoadError, PassError
from normrewrite.load.checkpoint import KeyMap, key_mapping


@dataclass(frozen=True)
class Source:
    name: str  # graph FQN of an original tensor


@dataclass(frozen=True)
class RecipeOutput:
    recipe: int
    index: int


Ref = Source | RecipeOutput


@dataclass
class StreamPlan:
    """Which output key comes from which source tensor or recipe output."""

    outputs: dict[str, tuple[Ref, torch.dtype, tuple[int, ...]]]  # key → (ref, dtype, shape)
    recipes: list[tuple[TensorRecipe, tuple[Ref, ...]]]
    source_keys: dict[str, str]  # original graph FQN → checkpoint key
    tied: dict[str, str] = field(default_factory=dict)  # alias FQN → written key
    not_written: list[str] = field(default_factory=list)  # buffers absent from the checkpoint
    dropped: list[str] = field(default_factory=list)  # checkpoint keys the rewrite no longer has


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers, every name of a tied tensor included."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def tensor_groups(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, list[str]]]:
    """Name → tensor, and the names of each tensor object (tied names share one)."""
    named = dict(named_tensors(module))
    groups: dict[int, list[str]] = {}
    for name, t in named.items():
        groups.setdefault(id(t), []).append(name)
    return named, groups


def make_plan(
    before: nn.Module,
    after: nn.Module,
    recipes: Sequence[TensorRecipe],
    checkpoint_keys: Collection[str],
    *,
    keymap: KeyMap | None = None,
) -> StreamPlan:
    """Plan the streamed conversion: ``before`` is the traced graph before the passes (its
    tensors' identities, to find tied names), ``after`` the rewritten one."""
    names_before, groups_before = tensor_groups(before)
    keymap = keymap or key_mapping(names_before, checkpoint_keys)
    source_keys: dict[str, str] = {}
    for name, t in names_before.items():
        for alias in groups_before[id(t)]:
            if keymap.key(alias) in checkpoint_keys:
                source_keys[name] = keymap.key(alias)
                break
    current: dict[str, Ref] = {}
    replay: list[tuple[TensorRecipe, tuple[Ref, ...]]] = []
    for i, r in enumerate(recipes):
        ins = tuple(current.get(n, Source(n)) for n in r.inputs)
        for ref in ins:
            if isinstance(ref, Source) and ref.name not in source_keys:
                raise PassError(
                    f"pass {r.origin or '?'} reads {ref.name}, which the checkpoint does not hold "
                    f"(looked for {keymap.key(ref.name)!r}); it cannot be streamed"
                )
        replay.append((r, ins))
        for j, o in enumerate(r.outputs):
            current[o] = RecipeOutput(i, j)
    outputs: dict[str, tuple[Ref, torch.dtype, tuple[int, ...]]] = {}
    tied: dict[str, str] = {}
    not_written: list[str] = []
    written_ids: dict[int, str] = {}
    for name, t in named_tensors(after):
        if id(t) in written_ids:
            tied[name] = written_ids[id(t)]
            continue
        ref = current.get(name)
        if ref is None:
            if names_before.get(name) is not t:
                raise PassError(
                    f"tensor {name} was changed without compute_tensors (no recipe): the pass "
                    "cannot be streamed from a checkpoint"
                )
            if name not in source_keys:
                if isinstance(t, nn.Parameter):
                    raise LoadError(
                        f"the checkpoint has no tensor for parameter {name} "
                        f"(looked for {keymap.key(name)!r})"
                    )
                not_written.append(name)
                continue
            ref = Source(name)
        key = keymap.key(name)
        outputs[key] = (ref, t.dtype, tuple(t.shape))
        written_ids[id(t)] = key
    dropped = sorted(k for k in set(source_keys.values()) if k not in outputs)
    return StreamPlan(outputs, replay, source_keys, tied, not_written, dropped)
