"""Healing: fine-tune a rewritten model for a few steps to match the original's outputs.

An approximate rewrite (``post-to-pre``) changes the function a model computes. Distillation
pulls it back: minimise ``Σ_outputs mean((student(x) - teacher(x))²) / var(teacher(x))`` over
inputs ``x`` that look like the example inputs — floating inputs are drawn ``N(μ, σ²)`` with the
example's statistics, integer inputs uniformly over their valid range (token ids: the rows of the
embedding table they index, found on the graph; other integer inputs, e.g. masks: the example's
value range) — or over a user-supplied file of inputs. The teacher is the original model (frozen);
the student's parameters are trained on private copies (the original model shares tensors with the
traced graph and is never written into) and stored back through
:func:`normrewrite.core.pass_infra.compute_tensors`, so the edit is logged like any other.

The error before and after is measured on the example inputs with the measure ``verify`` uses
(max |Δ| / max |y|) and on a held-out random batch (relative RMS), so the report shows whether the
fine-tune generalises beyond the inputs it saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from normrewrite.core.pass_infra import PassContext, compute_tensors
from normrewrite.errors import PassError, UsageError
from normrewrite.verify import compare, tensor_leaves

aten = torch.ops.aten


@dataclass(frozen=True)
class HealReport:
    steps: int
    lr: float
    source: str  # "random inputs" or the data file
    example_rel_before: float  # max |Δ| / max |y| on the example inputs
    example_rel_after: float
    heldout_rms_before: float  # relative RMS error on a held-out batch
    heldout_rms_after: float
    loss_first: float
    loss_last: float
    seconds: float

    def describe(self) -> str:
        return (
            f"healed {self.steps} steps (lr {self.lr:g}, {self.source}): output error on the example "
            f"inputs {self.example_rel_before:.3g} → {self.example_rel_after:.3g} (max rel), on held-out "
            f"inputs {self.heldout_rms_before:.3g} → {self.heldout_rms_after:.3g} (rel RMS)"
        )


# --------------------------------------------------------------------------- inputs


def int_ranges(gm: GraphModule, example_inputs: Sequence[Any]) -> list[tuple[int, int] | None]:
    """For each positional input: the [low, high) range of valid integer values, if integer.

    An input that indexes an embedding table (directly or through views/casts) takes the table's
    row count; any other integer input keeps the example's value range."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out: list[tuple[int, int] | None] = []
    for i, x in enumerate(example_inputs):
        if not isinstance(x, Tensor) or x.is_floating_point() or x.dtype == torch.bool:
            out.append(None)
            continue
        rows = _embedding_rows(gm, placeholders[i]) if i < len(placeholders) else None
        if rows is not None:
            out.append((0, rows))
        else:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
            out.append((lo, hi + 1))
    return out


def _embedding_rows(gm: GraphModule, node: Node, depth: int = 4) -> int | None:
    for u in node.users:
        if u.op == "call_function" and u.target is aten.embedding.default and u.args[1] is node:
            w = u.args[0]
            if isinstance(w, Node) and isinstance(w.meta.get("val"), Tensor):
                return int(w.meta["val"].shape[0])
            if isinstance(w, Node) and w.op == "get_attr":
                from normrewrite.core.graph import get_tensor

                return int(get_tensor(gm, str(w.target)).shape[0])
        if u.op == "call_module":
            mod = gm.get_submodule(str(u.target))
            if isinstance(mod, nn.Embedding):
                return mod.num_embeddings
        if (
            u.op == "call_function"
            and u.target is torch.nn.functional.embedding
            and u.args[0] is node
        ):
            w = u.args[1]
            if isinstance(w, Node) and w.op == "get_attr":
                from normrewrite.core.graph import get_tensor

                return int(get_tensor(gm, str(w.target)).shape[0])
        if depth > 0 and u.op in ("call_function", "call_method") and u.args and u.args[0] is node:
            found = _embedding_rows(gm, u, depth - 1)
            if found is not None:
                return found
    return None


def random_inputs(
    example_inputs: Sequence[Any],
    ranges: Sequence[tuple[int, int] | None],
    batch: int,
    gen: torch.Generator,
) -> tuple[Any, ...]:
    """A random batch shaped like the example inputs (dim 0 resized to ``batch``)."""
    out: list[Any] = []
    for x, r in zip(example_inputs, ranges, strict=True):
        if not isinstance(x, Tensor):
            out.append(x)
            continue
        shape = (batch, *x.shape[1:]) if x.dim() else ()
        if x.is_floating_point():
            xf = x.double()
            mu = float(xf.mean()) if x.numel() else 0.0
            sd = float(xf.std()) if x.numel() > 1 else 1.0
            out.append(
                (torch.randn(shape, generator=gen, dtype=torch.float64) * (sd or 1.0) + mu).to(
                    x.dtype
                )
            )
        elif x.dtype == torch.bool:
            out.append(torch.rand(shape, generator=gen) < float(x.float().mean()))
        else:
            lo, hi = r if r is not None else (0, 2)
            out.append(torch.randint(lo, max(hi, lo + 1), shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def load_data(path: str, n_inputs: int) -> list[Tensor]:
    """Inputs from a file: one tensor per positional input, samples on dim 0.

    ``.pt``/``.pth``: a tensor, or a tuple/list/dict of tensors (read with ``weights_only=True``);
    ``.npz``: its arrays in file order."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"heal_data file {path} does not exist")
    try:
        if p.suffix == ".npz":
            import numpy as np

            with np.load(p, allow_pickle=False) as z:
                tensors = [torch.from_numpy(z[k]) for k in z.files]
        else:
            obj = torch.load(p, weights_only=True, map_location="cpu")
            if isinstance(obj, Tensor):
                tensors = [obj]
            elif isinstance(obj, dict):
                tensors = list(obj.values())
            else:
                tensors = list(obj)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(
            f"heal_data file {path} could not be read: {type(e).__name__}: {e}"
        ) from None
    if len(tensors) != n_inputs or not all(isinstance(t, Tensor) for t in tensors):
        raise UsageError(
            f"heal_data file {path} holds {len(tensors)} tensors; the model takes {n_inputs} inputs"
        )
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise UsageError(
            f"heal_data file {path}: the tensors disagree on the number of samples (dim 0)"
        )
    return tensors


# --------------------------------------------------------------------------- training


def _floats(outputs: Any) -> list[Tensor]:
    return [t for t in tensor_leaves(outputs) if t.is_floating_point()]


def _rel_rms(ref: list[Tensor], out: list[Tensor]) -> float:
    num = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(ref, out, strict=True))
    den = sum(float((a.double() ** 2).sum()) for a in ref)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def heal(
    gm: GraphModule,
    teacher: Callable[..., Any],
    ctx: PassContext,
    *,
    steps: int,
    lr: float = 1e-3,
    data: str | None = None,
    origin: str = "heal",
) -> HealReport:
    """Fine-tune ``gm``'s floating-point parameters for ``steps`` Adam steps to match ``teacher``.

    Parameters are written back through :func:`compute_tensors` (logged as recipes)."""
    import time

    start = time.perf_counter()
    inputs = tuple(ctx.example_inputs)
    if not inputs:
        raise PassError("healing needs example inputs (PassContext.example_inputs)")
    if any(isinstance(t, Tensor) and t.device.type == "meta" for t in inputs):
        raise PassError("healing needs real weights and inputs; the model is on the meta device")
    if isinstance(teacher, nn.Module):
        teacher.eval()
    gen = torch.Generator().manual_seed(ctx.seed)
    ranges = int_ranges(gm, inputs)
    # traced graphs are specialised to the example shapes: train on batches of that shape
    first = next((x for x in inputs if isinstance(x, Tensor) and x.dim()), None)
    bsz = int(first.shape[0]) if first is not None else 1
    file_data = load_data(data, len(inputs)) if data else None

    def sample() -> tuple[Any, ...]:
        if file_data is not None:
            n = int(file_data[0].shape[0])
            idx = torch.randint(0, n, (bsz,), generator=gen)
            return tuple(t[idx] for t in file_data)
        return random_inputs(inputs, ranges, bsz, gen)

    # private trainable copies of every floating parameter (tied names share one copy)
    named: dict[int, list[str]] = {}
    tensors: dict[int, Tensor] = {}
    for name, t in gm.named_parameters(remove_duplicate=False):
        if t.is_floating_point():
            named.setdefault(id(t), []).append(name)
            tensors[id(t)] = t
    trained = {k: nn.Parameter(t.detach().clone()) for k, t in tensors.items()}
    params = {name: trained[k] for k, names in named.items() for name in names}
    buffers = dict(gm.named_buffers(remove_duplicate=False))

    def student(*xs: Any) -> Any:
        return torch.func.functional_call(gm, {**buffers, **params}, xs, tie_weights=False)

    heldout = random_inputs(inputs, ranges, bsz, torch.Generator().manual_seed(ctx.seed + 1))
    with torch.no_grad():
        ref_example = _floats(teacher(*inputs))
        ref_heldout = _floats(teacher(*heldout))
        before_example = compare(ref_example, _floats(student(*inputs))).max_rel_err
        before_heldout = _rel_rms(ref_heldout, _floats(student(*heldout)))

    opt = torch.optim.Adam(list(trained.values()), lr=lr)
    losses: list[float] = []
    for _ in range(steps):
        xs = sample()
        with torch.no_grad():
            target = _floats(teacher(*xs))
        out = _floats(student(*xs))
        loss = sum(
            ((o - t) ** 2).mean() / (t.var() + 1e-12) for o, t in zip(out, target, strict=True)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        losses.append(float(loss.detach()))  # type: ignore[union-attr]

    with torch.no_grad():
        after_example = compare(ref_example, _floats(student(*inputs))).max_rel_err
        after_heldout = _rel_rms(ref_heldout, _floats(student(*heldout)))

    # store the trained values (one recipe: constants, replayable)
    out_names = [names[0] for names in named.values()]
    values = tuple(trained[k].detach().clone() for k in named)
    compute_tensors(gm, ctx, out_names, [], lambda: values, origin=origin)
    from normrewrite.core.graph import get_tensor

    for names in named.values():  # re-tie aliases to the first name's new parameter
        first_t = get_tensor(gm, names[0])
        for alias in names[1:]:
            owner_path, _, attr = alias.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            owner._parameters[attr] = first_t  # type: ignore[assignment]
    return HealReport(
        steps,
        lr,
        f"inputs from {data}" if data else "random inputs",
        before_example,
        after_example,
        before_heldout,
        after_heldout,
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        round(time.perf_counter() - start, 2),
    )


__all__ = ["HealReport", "heal", "int_ranges", "load_data", "random_inputs"]
