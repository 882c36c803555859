"""ONNX run-time benchmark: normrewrite's ONNX targets against the anchors on onnxruntime CPU.

Models (random weights, batch 1): HF BERT-base (seq 128), GPT-2 small (seq 128), a Llama-style
decoder (hidden 512, 4 layers, seq 128), ViT-base (224²) and ResNet-50 (HF ``ResNetModel``, 224²).

Variants per model:

* anchors — ``torch.onnx.export(dynamo=True, optimize=True)``; onnxruntime's transformers
  optimizer (``optimize_model``) on that export, where it has a model type for it; onnxsim on
  that export;
* normrewrite (``normrewrite.convert``, ``-p fold-bn`` plus the automatic norm fusions) —
  ``--onnx-target standard``, ``--onnx-target ort`` (default opset), ``--onnx-target ort
  --opset 18`` (the contrib norm ops), and both targets with ``--dtype float16 --keep-io-types``
  (recorded as "not runnable" with onnxruntime's error line when CPU cannot run them).

Latency: one intra-op thread, graph optimizations on (``ORT_ENABLE_ALL``), every session open at
once, interleaved rounds (the order of variants rotates each round) so that load from other
processes hits every variant alike; medians and spreads (p10–p90) over all timed runs. The
ratio of each normrewrite variant to the best (fastest) anchor of its model is the figure of merit.

    python bench/bench_onnx.py            # writes bench/results/ort_latency.json and onnx.md
    python bench/bench_onnx.py --quick    # tiny models and few rounds, for development
    python bench/bench_onnx.py --profile llama   # per-op times (standard vs ort) from ORT's profiler
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
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402

import normrewrite  # noqa: E402
from normrewrite.emit.onnx.options import OnnxOptions  # noqa: E402
from normrewrite.errors import first_line  # noqa: E402

ANCHORS = ("export optimize=True", "ORT transformers optimizer", "onnxsim")
NORMREWRITE = {
    "standard": OnnxOptions(),
    "ort": OnnxOptions(target="ort"),
    "ort --opset 18": OnnxOptions(target="ort", opset=18),
    "standard fp16": OnnxOptions(dtype="float16", keep_io_types=True),
    "ort fp16": OnnxOptions(target="ort", dtype="float16", keep_io_types=True),
}


# --------------------------------------------------------------------------- models


def _build(name: str, quick: bool) -> tuple[torch.nn.Module, tuple, str | None, int, int]:
    """(module, inputs, onnxruntime optimizer model type, heads, hidden)."""
    t = models._transformers()
    torch.manual_seed(0)
    seq = 32 if quick else 128
    ids = (models.token_ids(seq=seq, vocab=100),)
    if name == "bert-base":
        h, n, layers = (64, 2, 2) if quick else (768, 12, 12)
        cfg = t.BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=n,
                           intermediate_size=4 * h)  # fmt: skip
        return models.randomize_norms(t.BertModel(cfg)).eval(), ids, "bert", n, h
    if name == "gpt2":
        h, n, layers = (64, 2, 2) if quick else (768, 12, 12)
        cfg = t.GPT2Config(n_embd=h, n_layer=layers, n_head=n, use_cache=False)
        return models.randomize_norms(t.GPT2Model(cfg)).eval(), ids, "gpt2", n, h
    if name == "llama":
        h, n, layers = (64, 2, 2) if quick else (512, 8, 4)
        cfg = t.LlamaConfig(vocab_size=32000, hidden_size=h, num_hidden_layers=layers,
                            num_attention_heads=n, num_key_value_heads=n,
                            intermediate_size=h * 8 // 3 // 64 * 64 or 2 * h,
                            max_position_embeddings=2048, use_cache=False)  # fmt: skip
        return models.randomize_norms(t.LlamaModel(cfg)).eval(), ids, None, n, h
    if name == "vit-base":
        h, n, layers, size = (64, 2, 2, 64) if quick else (768, 12, 12, 224)
        cfg = t.ViTConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=n,
                          intermediate_size=4 * h, image_size=size, patch_size=16)  # fmt: skip
        m = models.randomize_norms(t.ViTModel(cfg, add_pooling_layer=False)).eval()
        return m, (models.pixels(size=size),), "vit", n, h
    if name == "resnet50":
        m = models.resnet() if quick else models.resnet50()
        return m, (models.pixels(size=64 if quick else 224),), None, 0, 0
    raise SystemExit(f"unknown model {name}")


def _quiet(fn: Callable[[], Any]) -> Any:
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        return fn()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)[:200]}"


def variants(name: str, quick: bool, work: Path) -> tuple[dict[str, Path | str], tuple, dict]:
    """Every variant's file (or why it has none), the inputs, and conversion facts."""
    module, inputs, ort_type, heads, hidden = _build(name, quick)
    files: dict[str, Path | str] = {}
    facts: dict[str, Any] = {"inputs": [list(t.shape) for t in inputs]}
    exported = work / f"{name}_export.onnx"
    start = time.perf_counter()
    _quiet(
        lambda: torch.onnx.export(module, inputs, dynamo=True, optimize=True).save(str(exported))
    )
    facts["export_s"] = round(time.perf_counter() - start, 1)
    files["export optimize=True"] = exported
    if ort_type is None:
        files["ORT transformers optimizer"] = "n/a: no model type for this architecture"
    else:
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            out = work / f"{name}_ortopt.onnx"
            opt = _quiet(lambda: optimize_model(str(exported), model_type=ort_type,
                                                num_heads=heads, hidden_size=hidden))  # fmt: skip
            opt.save_model_to_file(str(out))
            files["ORT transformers optimizer"] = out
            facts["ORT transformers optimizer fused"] = {
                k: v for k, v in opt.get_fused_operator_statistics().items() if v
            }
        except Exception as e:
            files["ORT transformers optimizer"] = f"failed: {_error(e)}"
    try:
        import onnxsim

        out = work / f"{name}_onnxsim.onnx"
        simplified, ok = _quiet(lambda: onnxsim.simplify(onnx.load(str(exported))))
        onnx.save(simplified, str(out))
        files["onnxsim"] = out if ok else "failed: onnxsim's check did not pass"
    except Exception as e:
        files["onnxsim"] = f"failed: {_error(e)}"
    for label, opts in NORMREWRITE.items():
        out = work / f"{name}_nr_{label.replace(' ', '_')}.onnx"
        try:
            r = _quiet(lambda o=opts, p=out: normrewrite.convert(
                module, ["fold-bn"], example_inputs=inputs, outputs=[p], force=True,
                onnx_options=o))  # fmt: skip
            files[label] = out
            facts[f"{label} rel err"] = r.report.outputs[0].onnx_max_rel_err
        except Exception as e:
            files[label] = f"conversion failed: {_error(e)}"
    return files, inputs, facts


# --------------------------------------------------------------------------- latency


def _options(profile: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return opts


def _session(path: Path, inputs: tuple, profile: str | None = None) -> tuple[Any, dict]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), _options(profile), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    sess.run(None, feed)  # warm-up (and: does it run at all)
    return sess, feed


def interleaved(files: dict[str, Path | str], inputs: tuple, rounds: int, per_round: int) -> dict:
    """Latency of every runnable variant, rounds interleaved with a rotating order."""
    rows: dict[str, Any] = {}
    live: dict[str, tuple[Any, dict]] = {}
    for label, f in files.items():
        if isinstance(f, str):
            rows[label] = {"status": f}
            continue
        try:
            live[label] = _session(f, inputs)
            rows[label] = {"nodes": len(onnx.load(str(f), load_external_data=False).graph.node)}
        except Exception as e:
            rows[label] = {"status": f"not runnable: {_error(e)}"}
    times: dict[str, list[float]] = defaultdict(list)
    order = list(live)
    for r in range(rounds):
        for label in order[r % len(order) :] + order[: r % len(order)]:
            sess, feed = live[label]
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, feed)
                times[label].append((time.perf_counter() - start) * 1e3)
    for label, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        rows[label] |= {"median_ms": round(statistics.median(ts), 2),
                        "p10_ms": round(q[0], 2), "p90_ms": round(q[-1], 2), "runs": len(ts)}  # fmt: skip
    best = min(
        (label for label in ANCHORS if "median_ms" in rows.get(label, {})),
        key=lambda label: rows[label]["median_ms"],
        default=None,
    )
    if best is not None:
        for label in NORMREWRITE:
            if "median_ms" in rows.get(label, {}):
                rows[label]["vs_best_anchor"] = round(
                    rows[label]["median_ms"] / rows[best]["median_ms"], 3
                )
    return {"best_anchor": best, "variants": rows}


# --------------------------------------------------------------------------- profile


def op_times(files: dict[str, Path | str], labels: list[str], inputs: tuple, runs: int) -> dict:
    """Total time per (optimized) op type over ``runs`` runs, from onnxruntime's profiler."""
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        f = files[label]
        if isinstance(f, str):
            continue
        sess, feed = _session(f, inputs, profile=str(f.with_suffix("")) + "_prof")
        for _ in range(runs):
            sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
        per_op: dict[str, float] = defaultdict(float)
        for ev in trace:
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                per_op[ev["args"]["op_name"]] += ev["dur"] / 1e3 / (runs + 1)
        out[label] = {k: round(v, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}
    return out


# --------------------------------------------------------------------------- output


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| model | variant | nodes | median ms | p10–p90 ms | × best anchor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, res in results["models"].items():
        for label, row in res["variants"].items():
            name = f"**{label}**" if label == res["best_anchor"] else label
            if "median_ms" not in row:
                lines.append(f"| {model} | {name} | | {row['status']} | | |")
                continue
            ratio = row.get("vs_best_anchor", "")
            lines.append(
                f"| {model} | {name} | {row['nodes']} | {row['median_ms']} | "
                f"{row['p10_ms']}–{row['p90_ms']} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny models, 3 rounds")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=2, help="timed runs per variant and round")
    ap.add_argument("--models", default="bert-base,gpt2,llama,vit-base,resnet50")
    ap.add_argument("--profile", metavar="MODEL", help="per-op times of standard vs ort instead")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ort_latency.json"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "results" / "onnx.md"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)
    import onnxruntime

    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as d:
        if args.profile:
            files, inputs, _ = variants(args.profile, args.quick, Path(d))
            labels = ["standard", "ort", "ort --opset 18", *ANCHORS]
            print(json.dumps(op_times(files, labels, inputs, rounds * 3), indent=1))
            return
        results: dict[str, Any] = {
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "quick": args.quick,
            "rounds": rounds,
            "per_round": args.per_round,
            "threads": 1,
            "models": {},
        }
        for name in args.models.split(","):
            start = time.perf_counter()
            files, inputs, facts = variants(name, args.quick, Path(d))
            res = interleaved(files, inputs, rounds, args.per_round)
            results["models"][name] = res | {"facts": facts}
            print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))  # per model
    Path(args.md).write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
