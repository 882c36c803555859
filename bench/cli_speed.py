"""Whole-process conversion speed: the normrewrite CLI against the plain export scripts it replaces.

HF ``BertModel`` at its default config (BERT-base, random weights), saved once with
``save_pretrained``. Each measurement is a fresh process (imports included), timed from outside, its
peak RSS read from ``os.wait4``. Interleaved rounds of four commands:

* ``plain_onnx``: import torch + transformers, ``from_pretrained``,
  ``torch.onnx.export(model, args, dynamo=True, optimize=True)``, save;
* ``cli_onnx``: ``normrewrite convert DIR -p fuse-norm -o out.onnx`` (verified, ONNX parity checked);
* ``plain_pt2``: import, ``from_pretrained``, ``torch.export.export`` + ``torch.export.save``;
* ``cli_pt2``: ``normrewrite convert DIR -p fuse-norm -o out.pt2`` (verified).

The plain scripts feed the same input the CLI derives from the config (1×16 token ids).

    python bench/cli_speed.py               # 3 rounds, writes bench/results/cli_speed.json
    python bench/cli_speed.py --rounds 1    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16  # normrewrite.load.hf.default_input for BERT

PLAIN_HEAD = f"""
import sys, torch, transformers
model = transformers.AutoModel.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(0, model.config.vocab_size, (1, {SEQ}), generator=torch.Generator().manual_seed(0))
"""
PLAIN_ONNX = (
    PLAIN_HEAD
    + """
prog = torch.onnx.export(model, (ids,), dynamo=True, optimize=True)
prog.save(sys.argv[2])
"""
)
PLAIN_PT2 = (
    PLAIN_HEAD
    + """
with torch.no_grad():
    ep = torch.export.export(model, (ids,))
torch.export.save(ep, sys.argv[2])
"""
)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return elapsed, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "all": [round(v, 3) for v in values],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", default="fuse-norm")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli_speed.json")
    args = ap.parse_args()

    import torch
    import transformers

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    tmp = Path(tempfile.mkdtemp(prefix="cli_speed_"))
    try:
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig()).eval().save_pretrained(tmp / "bert")
        (tmp / "plain_onnx.py").write_text(PLAIN_ONNX)
        (tmp / "plain_pt2.py").write_text(PLAIN_PT2)
        cli = [
            sys.executable,
            "-m",
            "normrewrite.cli",
            "convert",
            str(tmp / "bert"),
            "-p",
            args.passes,
            "--force",
            "-o",
        ]
        cmds = {
            "plain_onnx": [
                sys.executable,
                str(tmp / "plain_onnx.py"),
                str(tmp / "bert"),
                str(tmp / "p.onnx"),
            ],
            "cli_onnx": [*cli, str(tmp / "c.onnx")],
            "plain_pt2": [
                sys.executable,
                str(tmp / "plain_pt2.py"),
                str(tmp / "bert"),
                str(tmp / "p.pt2"),
            ],
            "cli_pt2": [*cli, str(tmp / "c.pt2")],
        }
        wall: dict[str, list[float]] = {n: [] for n in cmds}
        rss: dict[str, list[float]] = {n: [] for n in cmds}
        names = list(cmds)
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                t, m = run(cmds[n], env)
                wall[n].append(t)
                rss[n].append(m)
                print(f"round {r}: {n:10s} {t:6.2f} s  {m:5.2f} GB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: statistics.median(v) for n, v in wall.items()}
    med_rss = {n: statistics.median(v) for n, v in rss.items()}
    ratios = {
        f"{kind}_wall": round(med[f"cli_{kind}"] / med[f"plain_{kind}"], 3)
        for kind in ("onnx", "pt2")
    } | {
        f"{kind}_rss": round(med_rss[f"cli_{kind}"] / med_rss[f"plain_{kind}"], 3)
        for kind in ("onnx", "pt2")
    }
    result = {
        "model": "BertModel(BertConfig()) (BERT-base, random weights), input 1x16 token ids",
        "passes": args.passes,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "wall_s": {n: summary(v) for n, v in wall.items()},
        "peak_rss_gb": {n: summary(v) for n, v in rss.items()},
        "ratios_cli_over_plain": ratios,
        "targets": {k: v <= 1.2 for k, v in ratios.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios_cli_over_plain"], indent=2))


if __name__ == "__main__":
    main()
