"""Benchmark the AOTInductor package against the plain ``.pt2`` program, on the fold-bn'd
Hugging Face ResNet-50 (random weights, randomized BN statistics), CPU, batch 1.

One run: ``normrewrite.convert(model, ["fold-bn"])`` writes the plain ``torch.export`` program
(``folded.pt2``) and the AOTInductor package (``folded.aoti.pt2``, ``device="cpu"``) of the same
rewritten graph. Then both are loaded — ``torch.export.load(...).module()`` and
``torch._inductor.aoti_load_package`` — and timed interleaved (each round runs both, in rotating
order; warm-up rounds discarded; medians reported), with a fixed thread count.

Also recorded: the compile + package time of the AOTInductor output, the plain convert time, and
the parity of each artifact against the original model.

    python bench/bench_aoti.py [--rounds 20] [--threads 1]

Writes ``bench/results/aoti.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from models import resnet50  # noqa: E402
from timing import time_interleaved  # noqa: E402

import normrewrite  # noqa: E402
from normrewrite.emit.aoti import load_package  # noqa: E402
from normrewrite.verify import compare, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "aoti.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = resnet50()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reference = run(model, (x,))
    with tempfile.TemporaryDirectory() as tmp:
        plain, compiled = Path(tmp) / "folded.pt2", Path(tmp) / "folded.aoti.pt2"
        start = time.perf_counter()
        result = normrewrite.convert(model, ["fold-bn"], (x,), outputs=[plain])
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        aoti = normrewrite.convert(
            model, ["fold-bn"], (x,), outputs=[compiled], compile="aoti", device="cpu"
        )
        aoti_convert_s = time.perf_counter() - start
        compile_s = aoti.report.seconds.get("compile")
        eager = torch.export.load(str(plain)).module()
        package = load_package(compiled)
        sizes = {"pt2": plain.stat().st_size, "aoti.pt2": compiled.stat().st_size}
        parity = {
            "pt2": compare(reference, run(eager, (x,))).max_rel_err,
            "aoti.pt2": compare(reference, run(package, (x,))).max_rel_err,
        }
        times = time_interleaved(
            {"pt2": lambda: eager(x), "aoti.pt2": lambda: package(x)}, args.rounds, args.warmup
        )

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    out: dict[str, Any] = {
        "model": "HF ResNetModel (ResNet-50 config), fold-bn applied",
        "input": "1x3x224x224 float32",
        "device": "cpu",
        "threads": args.threads,
        "rounds": args.rounds,
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "min_ms": {k: round(min(v) * 1000, 2) for k, v in times.items()},
        "speedup_aoti_vs_pt2": round(med["pt2"] / med["aoti.pt2"], 3),
        "aoti_compile_seconds": None if compile_s is None else round(compile_s, 1),
        "convert_seconds": {"pt2": round(convert_s, 1), "aoti.pt2": round(aoti_convert_s, 1)},
        "bytes": sizes,
        "max_rel_err_vs_original": parity,
        "folds": len(result.report.passes[0].changes),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": "one run on a shared 2-core machine; ratios are indicative, absolute times noisy",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
