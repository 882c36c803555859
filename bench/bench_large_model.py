"""Bench: convert a Llama-style checkpoint larger than we want to hold, on the meta device.

1. Generates (once, cached under bench/tmp/) a random Llama-style checkpoint of ≥1B parameters
   (TinyLlama-1.1B shapes by default) as safetensors shards + config.json, shard by shard.
2. Converts it with ``normrewrite convert DIR --meta -p ... -o OUT/`` in a subprocess and reports
   wall time and the subprocess's peak RSS (``ru_maxrss``) relative to the checkpoint size.
3. Verifies a sample of output tensors: each is recomputed in memory by evaluating its recipe
   chain eagerly (tensors read with the ``safetensors`` library, not normrewrite's streaming
   reader) and compared bitwise; unchanged tensors are compared bitwise with the input.

Writes bench/results/large_model.json.

    python bench/bench_large_model.py                 # 1.1B params, fp32 (4.4 GB)
    python bench/bench_large_model.py --layers 2      # a quick dry run
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DEFAULT_PASSES = ["fuse-norm", "fold-norm-affine"]  # folding needs the fused norm op


# Runs the CLI and prints the process's peak RSS (VmHWM: per address space, reset at exec, so the
# bench's own memory does not leak into it the way ru_maxrss does across fork+exec).
_MEASURED = """
import sys, transformers, normrewrite.stream
from normrewrite.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print(int(hwm) * 1024)
"""


def _config(args: argparse.Namespace) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "use_cache": False,
        "torch_dtype": args.dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def generate(dest: Path, args: argparse.Namespace) -> dict:
    """Random weights, written shard by shard (never more than one shard in memory)."""
    import transformers
    from safetensors.torch import save_file

    cfg = _config(args)
    stamp = dest / "bench-config.json"
    if stamp.exists() and json.loads(stamp.read_text()) == cfg:
        return cfg
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    config = transformers.LlamaConfig(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    )
    config.architectures = cfg["architectures"]
    config.save_pretrained(dest)
    with torch.device("meta"):
        shapes = [
            (n, tuple(p.shape)) for n, p in transformers.LlamaForCausalLM(config).named_parameters()
        ]
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    limit = 1 << 30
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[list[str]] = [[]]
    # plan shards by size first, then fill one at a time
    for n, shape in shapes:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if size and size + nbytes > limit:
            names.append([])
            size = 0
        names[-1].append(n)
        size += nbytes
    del shards
    total = len(names)
    weight_map = {}
    lookup = dict(shapes)
    for i, group in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        shard = {}
        for n in group:
            t = torch.randn(lookup[n], generator=g)
            t = t * 0.5 + 1.0 if n.endswith("norm.weight") else t * 0.02
            shard[n] = t.to(dtype)
            weight_map[n] = fname
        save_file(shard, str(dest / fname), metadata={"format": "pt"})
        del shard
        print(f"  wrote {fname}", flush=True)
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}, indent=1)
    )
    stamp.write_text(json.dumps(cfg))
    return cfg


def verify_sample(src: Path, out: Path, passes: list[str], n: int, seed: int = 0) -> dict:
    """Recompute ``n`` output tensors eagerly from the input and compare bitwise."""
    from safetensors import safe_open

    from normrewrite.passes import REGISTRY
    from normrewrite.stream.meta import load_meta, rewrite_on_meta
    from normrewrite.stream.plan import RecipeOutput, Source, make_plan
    from normrewrite.stream.progress import NoProgress

    meta = load_meta(src, None, None, "auto", False)
    pipeline = [REGISTRY.create(p) for p in passes]
    rw = rewrite_on_meta(meta.module, meta.inputs, meta.tracer, pipeline, NoProgress(), {}, 0.0)
    ckpt = meta.ckpt
    plan = make_plan(
        rw.before, rw.result.graph_module, rw.ctx.recipes, ckpt.keys(), keymap=meta.keymap
    )

    in_index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out_index_file = out / "model.safetensors.index.json"
    out_index = (
        json.loads(out_index_file.read_text())["weight_map"]
        if out_index_file.exists()
        else dict.fromkeys(plan.outputs, "model.safetensors")
    )

    def read(d: Path, index: dict, key: str) -> torch.Tensor:
        with safe_open(str(d / index[key]), framework="pt") as f:
            return f.get_tensor(key)

    memo: dict = {}

    def value(ref) -> torch.Tensor:
        if isinstance(ref, Source):
            return read(src, in_index, plan.source_keys[ref.name])
        if ref not in memo:
            recipe, ins = plan.recipes[ref.recipe]
            vals = recipe.fn(*(value(r) for r in ins))
            vals = (vals,) if isinstance(vals, torch.Tensor) else vals
            for j, v in enumerate(vals):
                memo[RecipeOutput(ref.recipe, j)] = v
        return memo[ref]

    rng = random.Random(seed)
    changed = [k for k, (ref, _, _) in plan.outputs.items() if isinstance(ref, RecipeOutput)]
    same = [k for k, (ref, _, _) in plan.outputs.items() if isinstance(ref, Source)]
    sample = rng.sample(changed, min(n, len(changed))) + rng.sample(same, min(n, len(same)))
    bad = []
    for key in sample:
        memo.clear()
        with torch.no_grad():
            want = value(plan.outputs[key][0])
        got = read(out, out_index, key)
        if want.dtype != got.dtype or not torch.equal(want, got):
            bad.append(key)
    return {
        "rewritten_sampled": min(n, len(changed)),
        "unchanged_sampled": min(n, len(same)),
        "rewritten_total": len(changed),
        "unchanged_total": len(same),
        "mismatches": bad,
        "recipes": len(plan.recipes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--passes",
        default=None,
        help="comma separated; default: fuse-norm,fold-norm-affine (those registered)",
    )
    ap.add_argument("--shard-size", type=int, default=256 << 20, help="output --max-shard-size (bytes)")
    ap.add_argument("--sample", type=int, default=12, help="tensors of each kind to verify")
    ap.add_argument("--workdir", type=Path, default=ROOT / "tmp" / "large_model")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "large_model.json")
    args = ap.parse_args()

    from normrewrite.passes import REGISTRY

    wanted = args.passes.split(",") if args.passes else DEFAULT_PASSES
    passes = [p for p in wanted if p.partition(":")[0] in REGISTRY]
    missing = [p for p in wanted if p not in passes]
    src, out = args.workdir / "src", args.workdir / "out"
    print(f"generating {src} ...", flush=True)
    t = time.perf_counter()
    cfg = generate(src, args)
    gen_s = time.perf_counter() - t
    ckpt_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    params = ckpt_bytes // torch.empty((), dtype=getattr(torch, args.dtype)).element_size()

    argv = [
        "convert",
        str(src),
        "--meta",
        "-o",
        f"{out}/",
        "--force",
        "--max-shard-size",
        str(args.shard_size),
        "-q",
    ]
    for p in passes:
        argv += ["-p", p]
    print("converting: normrewrite", " ".join(argv), flush=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"conversion failed: {proc.stderr.strip()[-2000:]}")
    peak = int(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "normrewrite.json").read_text())
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    # baseline: the same interpreter importing torch + transformers + normrewrite, nothing else
    base = subprocess.run(
        [sys.executable, "-c", _MEASURED, "--version"], capture_output=True, text=True
    )
    baseline = int(base.stdout.strip().splitlines()[-1])

    print("verifying a sample ...", flush=True)
    check = verify_sample(src, out, passes, args.sample)
    result = {
        "model": f"Llama-style, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}, {args.dtype}",
        "parameters": int(params),
        "checkpoint_bytes": ckpt_bytes,
        "output_bytes": out_bytes,
        "passes": passes,
        "passes_not_registered": missing,
        "changes": {k: len(v) for k, v in manifest["changes"].items()},
        "wall_seconds": round(wall, 2),
        "peak_rss_bytes": peak,
        "peak_rss_over_checkpoint": round(peak / ckpt_bytes, 3),
        "goal_peak_rss_over_checkpoint": 0.5,
        "baseline_rss_bytes_imports_only": baseline,
        "generate_seconds": round(gen_s, 1),
        "verification": check,
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if check["mismatches"]:
        sys.exit(f"verification failed for {check['mismatches']}")


if __name__ == "__main__":
    main()
