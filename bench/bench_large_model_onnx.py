"""Bench: ONNX with external data from a checkpoint larger than we want to hold (``--meta``).

Generates (once, cached under bench/tmp/) a random Llama-style checkpoint with
``bench_large_model.generate`` (default ~300M parameters, fp32), then runs

    normrewrite convert SRC --meta -p fuse-norm -p fold-norm-affine -o OUT/model.onnx

in a subprocess and reports wall time and its peak RSS (VmHWM) relative to the checkpoint size.
Verification: onnxruntime runs the written model (weights read from ``model.onnx.data``) on a
short input and its logits are compared with the original checkpoint's, computed in torch (the
passes are exact, so they must agree to float32 rounding). The result is merged into
bench/results/large_model.json under ``"onnx_from_meta"``.

    python bench/bench_large_model_onnx.py              # ~300M params (1.2 GB)
    python bench/bench_large_model_onnx.py --layers 2   # a quick dry run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_large_model import _MEASURED, DEFAULT_PASSES, generate  # noqa: E402


def parity(src: Path, model: Path, seq: int = 16) -> dict:  # the static export shape
    import numpy as np
    import onnxruntime as ort
    import transformers

    from normrewrite.load.safety import check_external_data

    check_external_data(model)
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(str(src))
    ref_model = transformers.LlamaForCausalLM(config).eval()
    for f in sorted(src.glob("*.safetensors")):  # the generated index has no "metadata" entry
        ref_model.load_state_dict(load_file(str(f)), strict=False)
    ids = torch.randint(0, ref_model.config.vocab_size, (1, seq), generator=g)
    with torch.no_grad():
        ref = ref_model(ids).logits.double().numpy()
    del ref_model
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0].astype(np.float64)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    return {"tokens": seq, "max_rel_err_vs_torch_original": err, "tolerance": 1e-4}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32"])
    ap.add_argument("--workdir", type=Path, default=ROOT / "tmp" / "large_model_onnx")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "large_model.json")
    ap.add_argument("--key", default="onnx_from_meta", help="entry of the results file to write")
    ap.add_argument(
        "--skip-parity",
        action="store_true",
        help="do not load the model into torch + onnxruntime (for checkpoints near the RAM size)",
    )
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the conversion")
    args = ap.parse_args()

    from normrewrite.passes import REGISTRY

    passes = [p for p in DEFAULT_PASSES if p in REGISTRY]
    src, out = args.workdir / "src", args.workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    cfg = generate(src, args)
    gen_s = time.perf_counter() - t
    ckpt_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    dest = out / "model.onnx"
    argv = ["convert", str(src), "--meta", "-o", str(dest), "--force", "-q"]
    for p in passes:
        argv += ["-p", p]
    print("converting: normrewrite", " ".join(argv), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, *argv],
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"conversion failed: {proc.stderr.strip()[-2000:]}")
    peak = int(proc.stdout.strip().splitlines()[-1])
    base = subprocess.run(
        [sys.executable, "-c", _MEASURED, "--version"], capture_output=True, text=True
    )
    baseline = int(base.stdout.strip().splitlines()[-1])
    data = out / "model.onnx.data"
    print("verifying with onnxruntime ...", flush=True)
    if args.skip_parity:
        from normrewrite.load.safety import check_external_data

        check_external_data(dest)
        check = {"skipped": "--skip-parity (onnx.checker full check passed during the conversion)"}
    else:
        check = parity(src, dest)
    result = {
        "model": f"Llama-style, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}, {args.dtype}",
        "parameters": ckpt_bytes // 4,
        "checkpoint_bytes": ckpt_bytes,
        "onnx_bytes": dest.stat().st_size,
        "external_data_bytes": data.stat().st_size,
        "passes": passes,
        "command": "normrewrite " + " ".join(argv),
        "wall_seconds": round(wall, 2),
        "peak_rss_bytes": peak,
        "peak_rss_over_checkpoint": round(peak / ckpt_bytes, 3),
        "baseline_rss_bytes_imports_only": baseline,
        "generate_seconds": round(gen_s, 1),
        "verification": check,
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__},
    }
    merged = json.loads(args.results.read_text()) if args.results.exists() else {}
    merged[args.key] = result
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if "tolerance" in check and not check["max_rel_err_vs_torch_original"] <= check["tolerance"]:
        sys.exit("verification failed")


if __name__ == "__main__":
    main()
