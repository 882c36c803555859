"""Healing after post-to-pre: output error of a small BERT before and after STEPS distillation steps.

Converts a Hugging Face ``BertModel`` (random weights, small config, norm parameters randomised
like the test models) with ``post-to-pre:heal=STEPS`` for several STEPS and records the error of
the converted model against the original — on the example inputs (max |Δ| / max |y|, the measure
``verify`` reports) and on a held-out random batch (relative RMS) — plus the wall time.
Writes ``bench/results/heal_post_to_pre.json`` and ``.md``.

    python bench/heal_post_to_pre.py [--steps 0,50,200,500] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    import models

    import normrewrite

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="0,50,200,500")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)

    model = models.bert(layers=args.layers, hidden=args.hidden, heads=4)
    inputs = (models.token_ids(batch=4, seq=32),)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        spec = f"post-to-pre:heal={steps},lr={args.lr}" if steps else "post-to-pre"
        start = time.perf_counter()
        result = normrewrite.convert(model, [spec], example_inputs=inputs)
        seconds = time.perf_counter() - start
        notes = result.report.passes[0].notes
        heal_note = next((n for n in notes if n.startswith("healed")), None)
        heldout = None
        if heal_note:
            heldout = heal_note.rsplit("held-out inputs ", 1)[1].split(" (")[0]
        rows.append(
            {
                "steps": steps,
                "example_max_rel_err": result.report.verify.max_rel_err,
                "heldout_rel_rms_before_after": heldout,
                "seconds": round(seconds, 1),
            }
        )
        print(rows[-1], flush=True)

    out = {
        "model": f"BertModel, {args.layers} layers, hidden {args.hidden}, vocab 100 (tests/models.py)",
        "inputs": "token ids 4x32",
        "lr": args.lr,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads",
        "rows": rows,
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "heal_post_to_pre.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# post-to-pre healing — {out['model']}, inputs {out['inputs']}, Adam lr {args.lr}",
        "",
        "| heal steps | max rel err on example inputs | held-out rel RMS (before → after) | time (s) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['example_max_rel_err']:.3g} | {r['heldout_rel_rms_before_after'] or '-'} "
            f"| {r['seconds']} |"
        )
    lines += ["", f"Machine: {out['machine']}. Times are wall clock for the whole conversion."]
    (results / "heal_post_to_pre.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
