"""ONNX benchmark: node count and onnxruntime CPU latency (graph optimizations on and off).

Torch in (HF ResNet-50, a BERT-base-sized encoder, a 2-layer Llama of TinyLlama width):
  (a) torch.onnx.export(dynamo=True, optimize=False), (b) the same with optimize=True,
  (c) normrewrite convert (fold-bn; fused norms) for --onnx-target standard and (d) ort (opset 18).
ONNX in (the unoptimized export (a) as input): normrewrite -p fold-bn -p fuse-norm vs onnxoptimizer
and onnxsim when installed (pip install onnxsim onnxoptimizer).

    python bench/bench_onnx.py            # writes bench/results/onnx.json and onnx.md
    python bench/bench_onnx.py --quick    # small models, for a smoke run

One run; latencies are medians over --runs runs after warm-up, on whatever CPU this is (shared
cores make absolute numbers noisy: compare ratios within a row).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402

import normrewrite  # noqa: E402
from normrewrite.core.onnx_graph import default_opset  # noqa: E402
from normrewrite.emit.onnx.options import OnnxOptions  # noqa: E402


def build(name: str, quick: bool) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    t = models._transformers()
    torch.manual_seed(0)
    if name == "resnet50":
        m = models.resnet() if quick else models.resnet50()
        return m, (models.pixels(size=64 if quick else 224),)
    if name == "bert-base":
        cfg = t.BertConfig(
            num_hidden_layers=2 if quick else 12,
            hidden_size=64 if quick else 768,
            num_attention_heads=2 if quick else 12,
            intermediate_size=128 if quick else 3072,
        )
        return models.randomize_norms(t.BertModel(cfg)).eval(), (
            models.token_ids(seq=128, vocab=1000),
        )
    cfg = t.LlamaConfig(
        vocab_size=1000 if quick else 32000,
        hidden_size=64 if quick else 2048,
        intermediate_size=128 if quick else 5632,
        num_hidden_layers=2,
        num_attention_heads=2 if quick else 16,
        num_key_value_heads=2 if quick else 16,
        max_position_embeddings=256,
        use_cache=False,
    )
    return models.randomize_norms(t.LlamaModel(cfg)).eval(), (
        models.token_ids(seq=128, vocab=1000),
    )


def export(module: torch.nn.Module, inputs: tuple, path: Path, optimize: bool, opset: int) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, inputs, dynamo=True, optimize=optimize, opset_version=opset
        )
        prog.save(str(path))


def latency(path: Path, inputs: tuple, optimize: bool, runs: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def nodes(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def measure(path: Path, inputs: tuple, runs: int) -> dict[str, Any]:
    return {
        "nodes": nodes(path),
        "ms_ort_opt_off": round(latency(path, inputs, False, runs), 2),
        "ms_ort_opt_on": round(latency(path, inputs, True, runs), 2),
    }


def bench_model(name: str, quick: bool, runs: int, work: Path) -> dict[str, Any]:
    module, inputs = build(name, quick)
    opset = default_opset()
    rows: dict[str, Any] = {}
    a, b = work / f"{name}_a.onnx", work / f"{name}_b.onnx"
    export(module, inputs, a, False, opset)
    rows["(a) torch.onnx.export optimize=False"] = measure(a, inputs, runs)
    export(module, inputs, b, True, opset)
    rows["(b) torch.onnx.export optimize=True"] = measure(b, inputs, runs)
    passes = ["fold-bn"]
    for label, opts in (
        ("(c) normrewrite, standard", OnnxOptions()),
        ("(d) normrewrite, --onnx-target ort --opset 18", OnnxOptions(opset=18, target="ort")),
    ):
        out = work / f"{name}_{label[1]}.onnx"
        r = normrewrite.convert(
            module, passes, example_inputs=inputs, outputs=[out], force=True, onnx_options=opts
        )
        rows[label] = measure(out, inputs, runs) | {
            "onnx_rel_err": r.report.outputs[0].onnx_max_rel_err
        }
    # ONNX in: the unoptimized export as everybody's input
    onnx_in: dict[str, Any] = {}
    out = work / f"{name}_in_nr.onnx"
    r = normrewrite.convert(str(a), ["fold-bn", "fuse-norm"], outputs=[out], force=True)
    onnx_in["normrewrite -p fold-bn -p fuse-norm"] = measure(out, inputs, runs) | {
        "rel_err_vs_input": r.report.verify.max_rel_err
    }
    try:
        import onnxoptimizer

        o = work / f"{name}_in_onnxoptimizer.onnx"
        onnx.save(onnxoptimizer.optimize(onnx.load(str(a))), str(o))
        onnx_in["onnxoptimizer (default passes)"] = measure(o, inputs, runs)
    except ImportError:
        onnx_in["onnxoptimizer"] = "not installed"
    except Exception as e:
        onnx_in["onnxoptimizer (default passes)"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    try:
        import onnxsim

        o = work / f"{name}_in_onnxsim.onnx"
        simplified, ok = onnxsim.simplify(onnx.load(str(a)))
        onnx.save(simplified, str(o))
        onnx_in["onnxsim"] = measure(o, inputs, runs) | {"check": bool(ok)}
    except ImportError:
        onnx_in["onnxsim"] = "not installed"
    except Exception as e:
        onnx_in["onnxsim"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    return {
        "opset": opset,
        "inputs": [list(t.shape) for t in inputs],
        "torch_in": rows,
        "onnx_in": onnx_in,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| model | variant | nodes | ORT opt off (ms) | ORT opt on (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for model, res in results["models"].items():
        for section in ("torch_in", "onnx_in"):
            for label, row in res[section].items():
                prefix = "ONNX in: " if section == "onnx_in" else ""
                if isinstance(row, str):
                    lines.append(f"| {model} | {prefix}{label} | {row} | | |")
                    continue
                lines.append(
                    f"| {model} | {prefix}{label} | {row['nodes']} | {row['ms_ort_opt_off']} | "
                    f"{row['ms_ort_opt_on']} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--models", default="resnet50,bert-base,llama")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(2)
    import onnxruntime

    results: dict[str, Any] = {
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "quick": args.quick,
        "runs": args.runs,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            start = time.perf_counter()
            results["models"][name] = bench_model(name, args.quick, args.runs, Path(d))
            print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
