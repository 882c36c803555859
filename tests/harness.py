"""The one test harness: fp64 references, relative errors, running graphs, and onnxruntime parity
through the emitter normrewrite ships (``normrewrite.convert(..., outputs=[x.onnx])``).

Relative errors here are measured the way the product's verification measures them: the largest
absolute difference over the largest reference magnitude, per output, maximum over outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import normrewrite
from normrewrite.verify import tensor_leaves


def outputs_of(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensors, tuples, dicts, HF output classes)."""
    return [t for t in tensor_leaves(value) if t.is_floating_point()]


@torch.no_grad()
def run(module: nn.Module, *inputs: Any) -> list[torch.Tensor]:
    """Run ``module`` on ``inputs`` and return its floating-point outputs."""
    return outputs_of(module(*inputs))


@torch.no_grad()
def fp64_reference(module: nn.Module, *inputs: Any) -> list[torch.Tensor]:
    """The outputs of an fp64 copy of ``module`` on fp64 copies of the floating inputs: the truth a
    rewrite in fp32 is judged against (the original in fp32 is itself only an approximation)."""
    m64 = copy.deepcopy(module).double()
    xs = tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)
    return run(m64, *xs)


def rel_err(
    reference: Sequence[torch.Tensor] | torch.Tensor, out: Sequence[torch.Tensor] | torch.Tensor
) -> float:
    """max over outputs of max|out - ref| / max|ref| (computed in fp64; NaN anywhere fails)."""
    refs = [reference] if torch.is_tensor(reference) else list(reference)
    outs = [out] if torch.is_tensor(out) else list(out)
    assert len(refs) == len(outs), f"{len(refs)} reference outputs, {len(outs)} outputs"
    worst = 0.0
    for r, o in zip(refs, outs, strict=True):
        r64, o64 = torch.as_tensor(r).double(), torch.as_tensor(o).double()
        assert r64.shape == o64.shape, f"shape {tuple(o64.shape)} != reference {tuple(r64.shape)}"
        if not torch.isfinite(o64).all():
            return float("inf")
        scale = r64.abs().max().item() if r64.numel() else 0.0
        diff = (o64 - r64).abs().max().item() if r64.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def ort_run(path: Path | str, *inputs: torch.Tensor) -> list[np.ndarray]:
    """Run an ONNX file in onnxruntime on CPU with graph optimizations off (what is written is what
    runs), feeding ``inputs`` in order."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=False)}
    return sess.run(None, feeds)


def onnx_parity(
    model: nn.Module,
    passes: Sequence[str],
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    **kwargs: Any,
) -> tuple[normrewrite.ConvertResult, float]:
    """Convert ``model`` with ``passes`` through the shipped ONNX emitter into ``path``, run the file
    in onnxruntime, and return (result, relative error of ONNX vs the rewritten torch graph)."""
    result = normrewrite.convert(model, list(passes), inputs, outputs=[path], **kwargs)
    want = run(result.graph_module, *inputs)
    got = [torch.from_numpy(a) for a in ort_run(path, *inputs)]
    floats = [g for g in got if g.is_floating_point()]
    return result, rel_err(want, floats)
