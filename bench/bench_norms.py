"""Benchmark the norm rewrites: per-norm latency and whole-model latency, CPU, batch 1, seq 128.

Two comparisons, each in eager PyTorch (the traced/rewritten GraphModule) and in onnxruntime
(CPU, all graph optimizations on, the way it is deployed), all measured in one run:

* **decomposed RMSNorm vs ``fuse-norm``** — Hugging Face's ``LlamaRMSNorm`` (real code: cast,
  pow, mean, add, rsqrt, mul, cast, mul) as ``torch.export`` traces it, against the same graph
  after ``fuse-norm`` (one ``aten.rms_norm``; ONNX opset 23 ``RMSNormalization``);
* **LayerNorm vs ``ln-to-rmsnorm``** — ``nn.LayerNorm`` with γ/β against the norm that
  ``ln-to-rmsnorm`` leaves in a GPT-2 block (``rms_norm`` without γ/β, which were folded into
  the next linear layer).

Per-norm: one norm on a ``(1, 128, D)`` activation, ``D`` = 768 (GPT-2 small) and 2048
(Llama-style). Whole model: GPT-2-small-sized (768 wide, 12 heads) vs its ``ln-to-rmsnorm``
version, and a Llama-style model (768 wide) vs its ``fuse-norm`` version, ``--layers`` layers
(default 2, to keep the run to a few minutes: per-layer cost is what matters). Timing: rounds
interleaved in rotating order, each round a loop of calls; warm-up discarded; medians; one thread.

    python bench/bench_norms.py [--rounds 8] [--layers 2] [--threads 1]

Writes ``bench/results/norms.json`` and ``bench/results/norms.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402

from normrewrite.emit import export_program  # noqa: E402
from normrewrite.passes import FuseNorm, LnToRmsNorm  # noqa: E402
from normrewrite.trace import trace  # noqa: E402
from normrewrite.verify import compare, tensor_leaves  # noqa: E402

SEQ = 128


def timed(fns: dict[str, Callable[[], Any]], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each function, rounds interleaved in rotating order."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for r in range(rounds + 2):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                start = time.perf_counter()
                for _ in range(inner):
                    fns[n]()
                if r >= 2:
                    times[n].append((time.perf_counter() - start) / inner)
    return {n: statistics.median(t) for n, t in times.items()}


def ort_session(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], opset: int, tmp: Path, name: str,
                threads: int) -> tuple[Callable[[], Any], list[str]]:
    import numpy as np
    import onnxruntime as ort

    # the exporter's own output (not normrewrite's ONNX pipeline, whose ONNX fuse-norm would fuse the
    # decomposed baseline too): what each torch graph costs as torch.onnx.export writes it
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(export_program(gm, inputs), (), dynamo=True, opset_version=opset,
                                    optimize=True, verbose=False)
    path = tmp / f"{name}.onnx"
    program.save(str(path))
    types = sorted({n.op_type for n in program.model_proto.graph.node})
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: np.ascontiguousarray(t.numpy()) for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    return (lambda: sess.run(None, feed)), types


# --------------------------------------------------------------------------- per-norm


class RmsNoAffine(nn.Module):
    """The norm ln-to-rmsnorm leaves inside a block (γ/β folded into the next linear); with
    ``unit_weight`` a stored γ of ones (option ``ln-to-rmsnorm:unit_weight=true``)."""

    def __init__(self, d: int, eps: float, unit_weight: bool = False) -> None:
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d)) if unit_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (self.d,), self.weight, self.eps)


def per_norm(d: int, rounds: int, threads: int, tmp: Path) -> dict[str, Any]:
    """One norm on (1, 128, d). Eager times call the ops directly (the HF module's forward, or
    the one fused op the rewritten graph holds), so GraphModule call overhead does not drown
    them; onnxruntime times run the exported graphs at opset 18 and 23."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(1, SEQ, d)
    rms = models.randomize_norms(LlamaRMSNorm(d, eps=1e-6)).eval()
    decomposed = trace(rms, (x,), "export").graph_module
    fused = copy.deepcopy(decomposed)
    assert FuseNorm()(fused).modified
    (node,) = [n for n in fused.graph.nodes if n.target is torch.ops.aten.rms_norm.default]
    w = rms.weight.detach()
    ln = models.randomize_norms(nn.LayerNorm(d)).eval()
    ln_gm = trace(ln, (x,), "export").graph_module
    rms_gm = trace(RmsNoAffine(d, 1e-5), (x,), "export").graph_module
    ones_gm = trace(RmsNoAffine(d, 1e-5, unit_weight=True), (x,), "export").graph_module
    ones = torch.ones(d)
    aten = torch.ops.aten
    eager = timed({
        "rms_decomposed": lambda: rms(x),  # HF LlamaRMSNorm.forward: the decomposed ops
        "rms_fused": lambda: aten.rms_norm.default(x, [d], w, node.args[3]),
        "layernorm": lambda: aten.layer_norm.default(x, [d], ln.weight, ln.bias, 1e-5),
        "rms_no_affine": lambda: aten.rms_norm.default(x, [d], None, 1e-5),
        "rms_unit_weight": lambda: aten.rms_norm.default(x, [d], ones, 1e-5),
    }, rounds, inner=500)
    graphs = {"rms_decomposed": decomposed, "rms_fused": fused, "layernorm": ln_gm, "rms_no_affine": rms_gm,
              "rms_unit_weight": ones_gm}
    ort: dict[str, dict[str, float]] = {}
    types: dict[str, dict[str, list[str]]] = {}
    for opset in (18, 23):
        sessions = {}
        types[str(opset)] = {}
        for k, g in graphs.items():
            sessions[k], types[str(opset)][k] = ort_session(g, (x,), opset, tmp, f"{k}_{d}_{opset}", threads)
        ort[str(opset)] = _us(timed(sessions, rounds, inner=500))
    parity = compare(tensor_leaves(decomposed(x)), tensor_leaves(fused(x))).max_rel_err
    return {"features": d, "eager_us": _us(eager), "ort_us": ort, "onnx_ops": types,
            "fuse_parity_rel_err": parity}


# --------------------------------------------------------------------------- whole model


def gpt2_small(layers: int) -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.GPT2Config(vocab_size=1000, n_embd=768, n_layer=layers, n_head=12, n_positions=SEQ,
                       use_cache=False)
    return models.randomize_norms(t.GPT2Model(cfg)).eval()


def llama_style(layers: int) -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.LlamaConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                        num_key_value_heads=12, intermediate_size=2048, max_position_embeddings=SEQ,
                        use_cache=False)
    return models.randomize_norms(t.LlamaModel(cfg)).eval()


def whole_model(name: str, model: nn.Module, rewrite: Any, rounds: int, threads: int, tmp: Path) -> dict[str, Any]:
    ids = models.token_ids(seq=SEQ, vocab=1000)
    original = trace(model, (ids,), "export").graph_module
    rewritten = copy.deepcopy(original)
    result = rewrite(rewritten)
    with torch.no_grad():
        ref = tensor_leaves(copy.deepcopy(model).double()(ids))
        err = compare(ref, tensor_leaves(rewritten(ids))).max_rel_err
    eager = timed({"original": lambda: original(ids), "rewritten": lambda: rewritten(ids)}, rounds, inner=3)
    ort: dict[str, dict[str, float]] = {}
    norm_ops: dict[str, dict[str, list[str]]] = {}
    for opset in (18, 23):
        s_orig, t_orig = ort_session(original, (ids,), opset, tmp, f"{name}_orig", threads)
        s_new, t_new = ort_session(rewritten, (ids,), opset, tmp, f"{name}_new", threads)
        ort[str(opset)] = _ms(timed({"original": s_orig, "rewritten": s_new}, rounds, inner=3))
        norm_ops[str(opset)] = {"original": [t for t in t_orig if "Norm" in t],
                                "rewritten": [t for t in t_new if "Norm" in t]}
    return {"model": name, "changes": len(result.changes), "parity_rel_err_vs_fp64": err,
            "eager_ms": _ms(eager), "ort_ms": ort, "onnx_norm_ops": norm_ops}


def _us(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1e6, 2) for k, v in d.items()}


def _ms(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1e3, 3) for k, v in d.items()}


def _pct(new: float, old: float) -> str:
    return f"{(1 - new / old) * 100:+.0f}%"


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"CPU ({res['machine']}), torch {res['torch']}, onnxruntime {res['onnxruntime']}, "
        f"{res['threads']} thread(s), batch 1, seq {SEQ}; medians of {res['rounds']} interleaved rounds. "
        "Saving = 1 − new/old (positive: less time).",
        "",
        "| norm, (1, 128, D) | runtime | decomposed RMSNorm | fuse-norm | saving | LayerNorm "
        "| ln-to-rmsnorm norm | saving | same, unit_weight=true | saving |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["per_norm"]:
        for rt, t in (("eager", p["eager_us"]), ("onnxruntime opset 18", p["ort_us"]["18"]),
                      ("onnxruntime opset 23", p["ort_us"]["23"])):
            lines.append(
                f"| D={p['features']} | {rt} | {t['rms_decomposed']} µs | {t['rms_fused']} µs | "
                f"{_pct(t['rms_fused'], t['rms_decomposed'])} | {t['layernorm']} µs | {t['rms_no_affine']} µs | "
                f"{_pct(t['rms_no_affine'], t['layernorm'])} | {t['rms_unit_weight']} µs | "
                f"{_pct(t['rms_unit_weight'], t['layernorm'])} |"
            )
    lines += ["", "| model | pass | runtime | original | rewritten | saving | parity vs fp64 |", "|---|---|---|---|---|---|---|"]
    for m in res["models"]:
        for rt, t in (("eager", m["eager_ms"]), ("onnxruntime opset 18", m["ort_ms"]["18"]),
                      ("onnxruntime opset 23", m["ort_ms"]["23"])):
            lines.append(f"| {m['model']} | {m['pass']} | {rt} | {t['original']} ms | {t['rewritten']} ms | "
                         f"{_pct(t['rewritten'], t['original'])} | {m['parity_rel_err_vs_fp64']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        per = [per_norm(dim, args.rounds, args.threads, tmp) for dim in (768, 2048)]
        gpt = whole_model(f"GPT-2-small width, {args.layers} layers", gpt2_small(args.layers),
                          lambda gm: LnToRmsNorm()(gm), args.rounds, args.threads, tmp)
        gpt["pass"] = "ln-to-rmsnorm"
        gpt_ones = whole_model(f"GPT-2-small width, {args.layers} layers", gpt2_small(args.layers),
                               lambda gm: LnToRmsNorm(unit_weight=True)(gm), args.rounds, args.threads, tmp)
        gpt_ones["pass"] = "ln-to-rmsnorm:unit_weight=true"
        llama = whole_model(f"Llama-style 768 wide, {args.layers} layers", llama_style(args.layers),
                            lambda gm: FuseNorm()(gm), args.rounds, args.threads, tmp)
        llama["pass"] = "fuse-norm"
    res = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "threads": args.threads, "rounds": args.rounds,
        "seq": SEQ, "per_norm": per, "models": [gpt, gpt_ones, llama], "seconds": round(time.perf_counter() - start, 1),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "norms.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "norms.md").write_text(md)
    print(md)
    print(f"({res['seconds']} s)")


if __name__ == "__main__":
    main()
