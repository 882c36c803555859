"""Bench: a streamed ``--meta`` conversion against its floor, over depth (issue 14, goal 1).

For each depth a random Llama-style bf16 checkpoint (hidden 1024, intermediate 2816, 16 heads,
8 KV heads, vocab 32000) is generated with ``bench_large_model.generate`` and deleted afterwards.
Then, interleaved and each in a fresh subprocess:

* the floor: a plain script that imports transformers, builds the model on ``meta`` from its
  config, ``torch.export``s it and round-trips every shard through safetensors
  ``load_file``/``save_file``;
* ``normrewrite convert DIR --meta -p fuse-norm -p fold-norm-affine -o OUT/``.

Each child reports its peak RSS (``VmHWM``); the parent times the whole process. Per depth the
ratio of the two; over depths a least-squares line (seconds per layer, intercept) for both, and
the cost per GB of checkpoint. Writes bench/results/stream_floor.json and .svg.

    python bench/stream_floor.py --quick     # depths 4, 8, 16
    python bench/stream_floor.py             # depths 4 ... 80
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from bench_large_model import generate  # noqa: E402

DEPTHS = [4, 8, 16, 32, 48, 64, 80]
QUICK = [4, 8, 16]
SHAPE = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=32000, dtype="bfloat16")
PASSES = ["fuse-norm", "fold-norm-affine"]

_HWM = """
def _hwm():
    import os
    line = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    with open(os.environ["BENCH_HWM"], "w") as f:
        f.write(str(int(line.split()[1]) * 1024))
"""

FLOOR = (
    _HWM
    + """
import json, sys, time
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.perf_counter()
import torch, transformers
from safetensors.torch import load_file, save_file
config = transformers.AutoConfig.from_pretrained(src)
cls = getattr(transformers, config.architectures[0])
with torch.device("meta"):
    model = cls(config).to(torch.bfloat16).eval()
t1 = time.perf_counter()
ids = torch.zeros(1, 16, dtype=torch.int64, device="meta")
torch.export.export(model, (ids,))
t2 = time.perf_counter()
out.mkdir(parents=True, exist_ok=True)
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(shard), str(out / shard.name), metadata={"format": "pt"})
t3 = time.perf_counter()
_hwm()
print(json.dumps({"import_build": t1 - t0, "export": t2 - t1, "roundtrip": t3 - t2}))
"""
)

CONVERT = (
    _HWM
    + """
import sys
from normrewrite.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    _hwm()
"""
)


def run(code: str, argv: list[str], hwm: Path) -> tuple[float, int, str]:
    env = {**os.environ, "BENCH_HWM": str(hwm)}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"child failed: {proc.stderr.strip()[-3000:]}")
    return wall, int(hwm.read_text()), proc.stdout


def fit(x: list[float], y: list[float]) -> dict:
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return {"slope": round(float(slope), 4), "intercept": round(float(intercept), 3)}


def bench_depth(layers: int, work: Path, rounds: int) -> dict:
    src, out = work / "src", work / "out"
    ns = argparse.Namespace(layers=layers, **SHAPE)
    print(f"[{layers} layers] generating ...", flush=True)
    generate(src, ns)
    ckpt = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    argv = ["convert", str(src), "--meta", "-o", f"{out}/", "--force", "-q"]
    for p in PASSES:
        argv += ["-p", p]
    argv += ["--report", str(work / "report.json")]
    floor: list[tuple[float, int, dict]] = []
    conv: list[tuple[float, int]] = []
    hwm = work / "hwm"
    for r in range(rounds):
        order = ["floor", "convert"] if (r + layers // 4) % 2 == 0 else ["convert", "floor"]
        for what in order:
            shutil.rmtree(out, ignore_errors=True)
            if what == "floor":
                wall, rss, stdout = run(FLOOR, [str(src), str(out)], hwm)
                floor.append((wall, rss, json.loads(stdout.strip().splitlines()[-1])))
            else:
                wall, rss, _ = run(CONVERT, argv, hwm)
                conv.append((wall, rss))
            print(
                f"[{layers} layers] {what}: {wall:.2f} s, peak RSS {rss / 1e9:.2f} GB", flush=True
            )
    report = json.loads((work / "report.json").read_text())
    changes = {p["name"]: len(p["changes"]) for p in report["passes"]}
    skipped = {p["name"]: len(p.get("skipped", [])) for p in report["passes"]}
    shutil.rmtree(src)
    shutil.rmtree(out, ignore_errors=True)
    f_wall = statistics.median(w for w, _, _ in floor)
    c_wall = statistics.median(w for w, _ in conv)
    f_rss = max(r for _, r, _ in floor)
    c_rss = max(r for _, r in conv)
    phases = {k: round(statistics.median(p[k] for _, _, p in floor), 3) for k in floor[0][2]}
    return {
        "layers": layers,
        "checkpoint_bytes": ckpt,
        "floor_seconds": round(f_wall, 3),
        "normrewrite_seconds": round(c_wall, 3),
        "ratio": round(c_wall / f_wall, 3),
        "floor_runs": [round(w, 3) for w, _, _ in floor],
        "normrewrite_runs": [round(w, 3) for w, _ in conv],
        "floor_phases_seconds": phases,
        "floor_peak_rss_bytes": f_rss,
        "normrewrite_peak_rss_bytes": c_rss,
        "normrewrite_rss_over_checkpoint": round(c_rss / ckpt, 3),
        "changes": changes,
        "skipped": skipped,
    }


def svg(rows: list[dict], fits: dict, path: Path) -> None:
    """Both curves, wall seconds over depth, as a hand-written SVG."""
    w, h, ml, mr, mt, mb = 640, 400, 60, 20, 30, 50
    xs = [r["layers"] for r in rows]
    ys = [r["floor_seconds"] for r in rows] + [r["normrewrite_seconds"] for r in rows]
    xmax, ymax = max(xs) * 1.05, max(ys) * 1.1

    def px(x: float) -> float:
        return ml + x / xmax * (w - ml - mr)

    def py(y: float) -> float:
        return h - mb - y / ymax * (h - mt - mb)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<line x1="{ml}" y1="{py(0)}" x2="{w - mr}" y2="{py(0)}" stroke="black"/>',
        f'<line x1="{ml}" y1="{py(0)}" x2="{ml}" y2="{mt}" stroke="black"/>',
        f'<text x="{(w + ml) / 2}" y="{h - 12}" text-anchor="middle">decoder layers '
        f"(hidden 1024, bf16)</text>",
        f'<text x="15" y="{(h - mb + mt) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 15 {(h - mb + mt) / 2})">wall seconds</text>',
    ]
    step = 10 if ymax > 40 else 5
    for t in range(0, int(ymax) + 1, step):
        parts.append(
            f'<line x1="{ml}" y1="{py(t):.1f}" x2="{w - mr}" y2="{py(t):.1f}" stroke="#ddd"/>'
            f'<text x="{ml - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t}</text>'
        )
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{py(0) + 16:.1f}" text-anchor="middle">{x}</text>')
    series = [
        ("floor", "floor_seconds", "#1f77b4"),
        ("normrewrite --meta", "normrewrite_seconds", "#d62728"),
    ]
    for i, (label, key, color) in enumerate(series):
        pts = " ".join(f"{px(r['layers']):.1f},{py(r[key]):.1f}" for r in rows)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for r in rows:
            parts.append(
                f'<circle cx="{px(r["layers"]):.1f}" cy="{py(r[key]):.1f}" r="3" fill="{color}"/>'
            )
        f = fits[key.removesuffix("_seconds")]
        ly = mt + 10 + 18 * i
        parts.append(
            f'<rect x="{ml + 10}" y="{ly - 9}" width="12" height="4" fill="{color}"/>'
            f'<text x="{ml + 28}" y="{ly - 3}">{label}: {f["slope"]:.3f} s/layer + '
            f"{f['intercept']:.2f} s</text>"
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="depths 4, 8, 16 only")
    ap.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved runs of each per depth")
    ap.add_argument("--workdir", type=Path, default=ROOT / "tmp" / "stream_floor")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "stream_floor.json")
    args = ap.parse_args()
    depths = args.depths or (QUICK if args.quick else DEPTHS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [bench_depth(n, args.workdir, args.rounds) for n in depths]
    layers = [r["layers"] for r in rows]
    gb = [r["checkpoint_bytes"] / 1e9 for r in rows]
    fits = {}
    for key in ("floor", "normrewrite"):
        secs = [r[f"{key}_seconds"] for r in rows]
        fits[key] = fit(layers, secs)
        fits[key]["per_gb"] = fit(gb, secs)["slope"]
    rt = [r["floor_phases_seconds"]["roundtrip"] for r in rows]
    result = {
        "model": "Llama-style, hidden 1024, intermediate 2816, 16 heads, 8 KV heads, vocab 32000, "
        "bfloat16, 1 GiB input shards",
        "passes": PASSES,
        "command": "normrewrite convert DIR --meta -p fuse-norm -p fold-norm-affine -o OUT/",
        "rounds": args.rounds,
        "rows": rows,
        "fit_seconds_per_layer": fits,
        "checkpoint_gb_per_layer": round(float(np.polyfit(layers, gb, 1)[0]), 5),
        "floor_roundtrip_seconds_per_gb": fit(gb, rt)["slope"],
        "targets": {"ratio_max": 1.25, "rss_over_checkpoint_max": 0.3, "at_layers": [8, 32, 80]},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    svg(rows, fits, args.results.with_suffix(".svg"))
    print(json.dumps({k: result[k] for k in ("fit_seconds_per_layer",)}, indent=2))
    for r in rows:
        print(
            f"{r['layers']:3d} layers  floor {r['floor_seconds']:6.2f} s  normrewrite "
            f"{r['normrewrite_seconds']:6.2f} s  ratio {r['ratio']:.2f}  RSS/ckpt "
            f"{r['normrewrite_rss_over_checkpoint']:.2f}  changes {r['changes']}"
        )


if __name__ == "__main__":
    main()
