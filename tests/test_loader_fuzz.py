"""Mutated files (bit flips, truncation, overwritten size fields) fed to every loader.

Each case must end in success or a one-line user error (a :class:`~normrewrite.errors.LoadError`
or a one-line CLI message with exit 1/2) within a bounded time — never a traceback, an
"internal error", a hang or a crash. The cases run in one child process (so a crash in native
code fails this test instead of killing the test run), each under an alarm.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import models
import torch
from torch import nn

SECONDS_PER_CASE = 30

_RUNNER = r"""
import json, signal, sys, time, traceback
from pathlib import Path
from click.testing import CliRunner
from normrewrite.cli import main
from normrewrite.errors import NormRewriteError

class Hang(Exception):
    pass

def on_alarm(signum, frame):
    raise Hang()

signal.signal(signal.SIGALRM, on_alarm)
cases = json.loads(Path(sys.argv[1]).read_text())
limit = int(sys.argv[2])
results = []
for case in cases:
    print("CASE", case["name"], file=sys.stderr, flush=True)
    start = time.perf_counter()
    rec = {"name": case["name"]}
    signal.alarm(limit)
    try:
        if case["kind"] == "cli":
            r = CliRunner().invoke(main, case["args"])
            rec["exit"] = r.exit_code
            rec["output"] = r.output
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                rec["exception"] = "".join(traceback.format_exception(r.exception))[-1500:]
        else:
            from normrewrite import load
            from normrewrite.load.checkpoint import Checkpoint

            try:
                if case["kind"] == "hf":
                    load.load(case["args"][0])
                else:
                    ck = Checkpoint(case["args"][0])
                    for k in ck.keys():
                        ck.read(k)
                rec["exit"] = 0
            except NormRewriteError as e:
                rec["exit"] = 1
                rec["output"] = "Error: " + str(e)
    except Hang:
        rec["exception"] = f"no answer within {limit} s"
    except BaseException as e:
        rec["exception"] = "".join(traceback.format_exception(e))[-1500:]
    finally:
        signal.alarm(0)
    rec["seconds"] = round(time.perf_counter() - start, 2)
    results.append(rec)
print(json.dumps(results))
"""


def _mutations(
    data: bytes, rng: random.Random, n: int, header: int = 64
) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        b = bytearray(data)
        kind = ("truncate", "flip", "flip-header", "size-field")[i % 4]
        if kind == "truncate":
            b = b[: rng.randrange(0, len(b))]
        elif kind == "flip":
            for _ in range(rng.randint(1, 16)):
                pos = rng.randrange(len(b))
                b[pos] ^= 1 << rng.randrange(8)
        elif kind == "flip-header":
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(min(header, len(b)))
                b[pos] ^= 1 << rng.randrange(8)
        else:  # overwrite 4-8 bytes with 0xff: huge sizes/offsets wherever they were
            pos = rng.randrange(max(1, len(b) - 8))
            b[pos : pos + rng.choice((4, 8))] = b"\xff" * 8
        out.append((f"{kind}{i}", bytes(b)))
    return out


def _cases(tmp: Path) -> list[dict]:
    rng = random.Random(1234)
    cases: list[dict] = []
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    seed_pt2 = tmp / "seed.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(seed_pt2))
    raw = seed_pt2.read_bytes()
    for name, data in _mutations(raw, rng, 12, header=len(raw)):
        f = tmp / f"m_{name}.pt2"
        f.write_bytes(data)
        cases.append({"name": f"pt2 {name}", "kind": "cli", "args": ["inspect", str(f)]})

    from safetensors.torch import save_file

    seed_st = tmp / "seed.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(seed_st))
    raw = seed_st.read_bytes()
    for name, data in _mutations(raw, rng, 16, header=int.from_bytes(raw[:8], "little") + 8):
        f = tmp / f"m_{name}.safetensors"
        f.write_bytes(data)
        cases.append({"name": f"safetensors {name}", "kind": "safetensors", "args": [str(f)]})

    import transformers  # noqa: F401 - a test dependency: fail, never skip
    hf = tmp / "hf"
    models.bert(layers=1, hidden=16).save_pretrained(hf)
    st = (hf / "model.safetensors").read_bytes()
    conf = (hf / "config.json").read_bytes()
    for target, raw_, n in (("model.safetensors", st, 6), ("config.json", conf, 6)):
        for name, data in _mutations(
            raw_, rng, n, header=len(raw_) if target == "config.json" else 200
        ):
            d = tmp / f"hf_{target}_{name}"
            shutil.copytree(hf, d)
            (d / target).write_bytes(data)
            cases.append({"name": f"hf {target} {name}", "kind": "hf", "args": [str(d)]})

    import onnx  # noqa: F401 - a test dependency: fail, never skip
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(torch.randn(2, 2).numpy(), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    raw = helper.make_model(g).SerializeToString()
    for name, data in _mutations(raw, rng, 8, header=len(raw)):
        f = tmp / f"m_{name}.onnx"
        f.write_bytes(data)
        cases.append({"name": f"onnx {name}", "kind": "cli", "args": ["inspect", str(f)]})
    return cases


def test_mutated_files_never_crash_hang_or_traceback(tmp_path: Path) -> None:
    cases = _cases(tmp_path)
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(spec), str(SECONDS_PER_CASE)],
        capture_output=True,
        text=True,
        timeout=SECONDS_PER_CASE * len(cases) + 60,
    )
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("CASE ")][-1:]
    assert proc.returncode == 0, (
        f"the loader process died ({proc.returncode}) during {last}: {proc.stderr[-1500:]}"
    )
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    bad = []
    for r in results:
        out = r.get("output", "")
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        if "exception" in r:
            bad.append(f"{r['name']}: {r['exception'][-600:]}")
        elif r["exit"] not in (0, 1, 2):
            bad.append(f"{r['name']}: exit {r['exit']}")
        elif r["exit"] != 0 and (len(lines) != 1 or "internal error" in out or "Traceback" in out):
            bad.append(f"{r['name']}: {out[:400]}")
    assert not bad, "\n".join(bad)
    # the mutations did reach the loaders' error paths (the test is not vacuous)
    assert sum(r["exit"] != 0 for r in results) >= len(results) // 3
