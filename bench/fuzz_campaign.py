"""Long fuzz campaign for the exact passes: thousands of random cases against fp64.

Uses the strategies and the harness of tests/test_fuzz_exact.py (same tolerance, same checks),
runs ``--examples`` cases per (pass, tracer) split between the tracers, and keeps going after a
failure (each failing case is recorded with its description, hypothesis's shrunk example first).
Writes bench/results/fuzz_campaign.json.

    python bench/fuzz_campaign.py --examples 5000
    python bench/fuzz_campaign.py --examples 1500 --passes fuse-norm swap-norm:from=batchnorm,to=frozen --append
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))


def _property(
    strategy,
    tracer: str,
    n: int,
    seed_: int,
    stats: Counter[str],
    failures: list[dict],
    worst: dict,
) -> Callable[[], None]:
    """A hypothesis test running ``n`` cases of ``strategy`` that records instead of raising."""
    import test_fuzz_exact as fz
    from hypothesis import HealthCheck, given, seed, settings

    @seed(seed_)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy())
    def prop(case: fz.ExactCase) -> None:
        stats["run"] += 1
        try:
            res = fz.run_case(case, tracer)
        except AssertionError as e:
            stats["failed"] += 1
            failures.append({"tracer": tracer, "case": case.description, "error": str(e)[:600]})
            return
        except Exception as e:  # a crash in the pass is a failure too
            stats["crashed"] += 1
            failures.append(
                {
                    "tracer": tracer,
                    "case": case.description,
                    "error": "".join(traceback.format_exception_only(e)).strip()[:600],
                }
            )
            return
        if res is None:
            stats["skipped_original_cannot_run_or_overflows"] += 1
            return
        stats["checked"] += 1
        stats[f"changes={res.changes}"] += 1
        stats[f"dtype={case.description.get('dtype')}"] += 1
        ratio = res.err_new / res.bound if res.bound else 0.0
        if ratio > worst["err_over_bound"]:
            worst.update(
                err_over_bound=ratio, err_new=res.err_new, bound=res.bound, case=case.description
            )

    return prop


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--examples", type=int, default=5000, help="cases per pass (split fx/export)")
    ap.add_argument(
        "--export-share", type=float, default=0.2, help="fraction traced with torch.export"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--passes",
        nargs="*",
        default=None,
        help="pass specs, space separated (default: every fuzzed exact pass)",
    )
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "fuzz_campaign.json")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add these passes' results to the existing results file (others kept)",
    )
    args = ap.parse_args()

    import test_fuzz_exact as fz
    import torch

    torch.set_num_threads(1)
    chosen = args.passes or list(fz.STRATEGIES)
    report: dict = {"examples_requested_per_pass": {}, "passes": {}, "seed": args.seed}
    if args.append and args.results.exists():
        report = json.loads(args.results.read_text())
        if not isinstance(report.get("examples_requested_per_pass"), dict):
            report["examples_requested_per_pass"] = dict.fromkeys(
                {k.split("/")[0] for k in report["passes"]},
                report.get("examples_requested_per_pass"),
            )
    total_fail = 0
    t0 = time.perf_counter()
    for name in chosen:
        strategy = fz.STRATEGIES[name]
        report["examples_requested_per_pass"][name] = args.examples
        for tracer, share in (("fx", 1 - args.export_share), ("export", args.export_share)):
            n = round(args.examples * share)
            if n == 0:
                continue
            stats: Counter[str] = Counter()
            failures: list[dict] = []
            worst = {"err_over_bound": 0.0}

            prop = _property(strategy, tracer, n, args.seed, stats, failures, worst)
            start = time.perf_counter()
            prop()
            secs = time.perf_counter() - start
            key = f"{name}/{tracer}"
            report["passes"][key] = {
                "examples": stats["run"],
                "checked": stats["checked"],
                "failures": stats["failed"] + stats["crashed"],
                "stats": dict(stats),
                "worst_error_over_bound": worst,
                "seconds": round(secs, 1),
                "failing_cases": failures[:20],
            }
            total_fail += stats["failed"] + stats["crashed"]
            print(
                f"{key}: {stats['run']} examples, {stats['checked']} checked, "
                f"{stats['failed'] + stats['crashed']} failures, worst err/bound "
                f"{worst['err_over_bound']:.3g} ({secs:.0f} s)",
                flush=True,
            )
    total = sum(v["examples"] for v in report["passes"].values())
    all_failures = sum(v["failures"] for v in report["passes"].values())
    report.update(
        total_examples=total,
        total_failures=all_failures,
        torch=torch.__version__,
        seconds=round(report.get("seconds", 0) * args.append + time.perf_counter() - t0, 1),
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"total: {total} examples, {all_failures} failures -> {args.results}")
    sys.exit(1 if total_fail else 0)


if __name__ == "__main__":
    main()
