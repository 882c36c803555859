"""Benchmark fold-bn on Hugging Face ResNet-50 (random weights, randomized BN statistics).

CPU, batch 1, eager, fixed thread count. Three models, timed interleaved in one run (each round
runs every model once, in rotating order; warm-up rounds discarded; medians reported):

* ``original``  — the HF ``ResNetModel``;
* ``hand-fold`` — the reference: the same HF modules with each conv/BN pair replaced by
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and the BN by ``nn.Identity``;
* ``normrewrite`` — the tool's ``.pt2`` output, loaded with ``torch.export.load`` and run through
  its ``.module()``.

Also measured: the convert time (``normrewrite.convert`` from the saved directory to ``.pt2``,
including load, trace, fold, verify and export) and the parity of each folded model.

    python bench/bench_fold_bn.py [--rounds 40] [--threads 1]

Writes ``bench/results/fold_bn.json`` and ``bench/results/fold_bn.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from models import resnet50  # noqa: E402
from timing import time_interleaved  # noqa: E402

import normrewrite  # noqa: E402


def hand_fold(model: nn.Module) -> nn.Module:
    """Fold every conv → BN pair of an HF ResNet by hand (the reference implementation)."""
    folded = copy.deepcopy(model).eval()
    pairs = 0
    for module in folded.modules():
        conv, bn = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module.convolution = fuse_conv_bn_eval(conv, bn)
            module.normalization = nn.Identity()
            pairs += 1
    if pairs == 0:
        raise RuntimeError("no conv/BN pairs found")
    return folded


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fold_bn.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = resnet50().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        src, pt2 = Path(tmp) / "resnet50", Path(tmp) / "resnet50.pt2"
        model.save_pretrained(src)
        start = time.perf_counter()
        result = normrewrite.convert(str(src), ["fold-bn"], outputs=[pt2])
        convert_s = time.perf_counter() - start
        program = torch.export.load(str(pt2))
    tool = program.module()
    hand = hand_fold(model)
    report = result.report

    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double()).last_hidden_state
        outs = {
            "original": model(x).last_hidden_state,
            "hand-fold": hand(x).last_hidden_state,
            "normrewrite": tool(x)[0],
        }
    parity = {k: rel_err(ref64, v) for k, v in outs.items()}

    fns: dict[str, Callable[[], Any]] = {
        "original": lambda: model(x),
        "hand-fold": lambda: hand(x),
        "normrewrite": lambda: tool(x),
    }
    times = time_interleaved(fns, args.rounds, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    data = {
        "model": "HF ResNetModel, ResNet-50 config, random weights, randomized BN statistics",
        "input": "1x3x224x224 float32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "load_average_1min": round(os.getloadavg()[0], 2),  # the machine is shared
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "quartiles_ms": {
            k: [round(q * 1e3, 3) for q in statistics.quantiles(v, n=4)[::2]]
            for k, v in times.items()
        },
        "ratio_to_original": {k: round(v / med["original"], 4) for k, v in med.items()},
        "normrewrite_vs_hand_fold": round(med["normrewrite"] / med["hand-fold"], 4),
        "within_3pct_of_hand_fold": med["normrewrite"] <= 1.03 * med["hand-fold"],
        "rel_err_vs_fp64": {k: float(f"{v:.3g}") for k, v in parity.items()},
        "convert_seconds": round(convert_s, 2),
        "convert_stage_seconds": report.seconds,
        "bn_folded": len(report.passes[0].changes),
        "bn_skipped": len(report.passes[0].skipped),
        "nodes_before": report.nodes_before,
        "nodes_after": report.nodes_after,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(data))
    print(json.dumps(data, indent=2))


def _markdown(d: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {k} | {d['median_ms'][k]:.2f} | {d['ratio_to_original'][k]:.3f} | {d['rel_err_vs_fp64'][k]:.2g} |"
        for k in ("original", "hand-fold", "normrewrite")
    )
    return f"""# fold-bn benchmark: HF ResNet-50, CPU, batch 1, eager

{d["model"]}; input {d["input"]}; torch {d["torch"]}, {d["threads"]} thread(s);
{d["rounds"]} interleaved rounds after {d["warmup"]} warm-up rounds, medians (machine load
average {d["load_average_1min"]} at the end: absolute times are noisy, the ratios are what count).

| model | median latency (ms) | × original | rel err vs fp64 |
|---|---|---|---|
{rows}

normrewrite's `.pt2` (loaded with `torch.export.load`, run through `.module()`) is
**{d["normrewrite_vs_hand_fold"]:.3f}×** the hand fold (`fuse_conv_bn_eval`); within 3 %:
{"yes" if d["within_3pct_of_hand_fold"] else "NO"}.
Convert time (load + trace + fold + verify + export to `.pt2`): **{d["convert_seconds"]:.1f} s**
({", ".join(f"{k} {v:.2f} s" for k, v in d["convert_stage_seconds"].items())});
{d["bn_folded"]} BatchNorms folded, {d["bn_skipped"]} skipped; {d["nodes_before"]} → {d["nodes_after"]} ops.
"""


if __name__ == "__main__":
    main()
