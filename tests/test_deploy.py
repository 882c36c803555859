"""Outputs that deploy anywhere (issue 11).

* ``.pt2`` programs of Hugging Face models return plain tensors and load and run with ``torch``
  alone, in a process that never imports transformers; their output names are in the archive.
* normrewrite reads back every ``.pt2`` it writes, those keeping the model's output classes too,
  without importing the model's library (``inspect`` and ``convert`` in a fresh process).
* ``--dynamic`` ONNX of rotary models (Llama, Mistral-style GQA, Phi-style partial rotary) and
  BERT runs at any batch and sequence size, checked in onnxruntime and in torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from models import bert, llama, randomize_norms, token_ids
from torch import nn

import normrewrite
from normrewrite import emit
from normrewrite.cli import main
from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.errors import LoadError
from normrewrite.load.specs import StandIn, register_stand_ins, spec_types
from normrewrite.trace import trace
from normrewrite.verify.onnxruntime import other_size, relative_error, session

OUTPUT_NAMES = {"bert": ["last_hidden_state", "pooler_output"], "llama": ["last_hidden_state"]}


def run_fresh(script: str, cwd: Path) -> Any:
    """Run ``script`` in a new interpreter and return the JSON it prints last; it must not have
    imported transformers (checked at its end)."""
    code = textwrap.dedent(script) + textwrap.dedent("""
        assert not any(m.split(".")[0] == "transformers" for m in sys.modules), "imported transformers"
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel64(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float((y.detach().double() - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """For an HF BERT and Llama saved with save_pretrained: the CLI's ``.pt2`` (outputs
    flattened), a ``.pt2`` keeping the output classes, the example input and fp64 references."""
    d = tmp_path_factory.mktemp("deploy")
    x = token_ids(batch=1, seq=16)
    torch.save({"x": x}, d / "x.pt")
    found: dict[str, Any] = {"dir": d, "x": x}
    for name, build in (("bert", bert), ("llama", llama)):
        model = build(layers=1)
        model.save_pretrained(d / name)
        res = CliRunner().invoke(
            main, ["convert", str(d / name), "-p", "fuse-norm", "-o", str(d / f"{name}.pt2"),
                   "--report", str(d / f"{name}.json")]
        )
        assert res.exit_code == 0, res.output
        report = json.loads((d / f"{name}.json").read_text())
        assert report["program_outputs"] == OUTPUT_NAMES[name] and report["outputs_flattened"] is True
        gm = trace(model, (x,), "export").graph_module
        native = emit.export_program(gm, (x,), keep_output_classes=True)
        written = emit.write_pt2(native, d / f"{name}.native.pt2")
        assert written.outputs == emit.Outputs(tuple(OUTPUT_NAMES[name]), flattened=False)
        with torch.no_grad():
            ref = model.double()(x)
        found[name] = [ref[k] for k in OUTPUT_NAMES[name]]
    return found


def test_hf_pt2_loads_and_runs_with_torch_alone(programs: dict[str, Any]) -> None:
    d = programs["dir"]
    got = run_fresh(
        """
        import json, sys, torch
        x = torch.load("x.pt")["x"]
        out = {}
        for name in ("bert", "llama"):
            ep = torch.export.load(f"{name}.pt2")
            y = ep.module()(x)
            extra = {"normrewrite/outputs.json": ""}
            torch.export.load(f"{name}.pt2", extra_files=extra)
            torch.save(list(y), f"{name}.y.pt")
            out[name] = {"type": type(y).__name__, "meta": json.loads(extra["normrewrite/outputs.json"])}
        print(json.dumps(out))
        """,
        d,
    )
    for name, names in OUTPUT_NAMES.items():
        assert got[name]["type"] == "tuple"
        meta = got[name]["meta"]
        assert meta["outputs"] == names and meta["flattened"] is True
        assert meta["normrewrite"] == normrewrite.__version__
        ys = torch.load(d / f"{name}.y.pt")
        assert len(ys) == len(programs[name])
        for ref, y in zip(programs[name], ys, strict=True):
            assert y.shape == ref.shape and rel64(ref, y) <= 1e-5


def test_normrewrite_reads_back_its_own_pt2_in_a_fresh_process(programs: dict[str, Any]) -> None:
    """inspect and convert on default and native-class programs, without transformers: native
    classes come back as stand-ins (field names kept), flattened on re-export by default and
    written with the original spec when kept."""
    d = programs["dir"]
    got = run_fresh(
        """
        import json, sys, torch
        from normrewrite.cli import main
        x = torch.load("x.pt")["x"]
        out = {}
        for stem in ("bert", "bert.native", "llama", "llama.native"):
            for args in (["inspect", f"{stem}.pt2"],
                         ["convert", f"{stem}.pt2", "-p", "fold-bn", "-o", f"{stem}.again.pt2"]):
                try:
                    main(args, standalone_mode=False)
                except SystemExit as e:
                    assert not e.code, (args, e.code)
            extra = {"normrewrite/outputs.json": ""}
            ep = torch.export.load(f"{stem}.again.pt2", extra_files=extra)
            y = ep.module()(x)
            torch.save(list(y), f"{stem}.again.y.pt")
            out[stem] = json.loads(extra["normrewrite/outputs.json"])["outputs"]
        native = torch.export.load("bert.native.pt2").module()(x)
        out["native"] = [type(native).__name__, type(native).__module__, list(native)]
        # re-exported keeping the (stand-in) classes: the same output spec as the original
        from pathlib import Path
        from torch.utils._pytree import treespec_dumps
        from normrewrite import emit
        from normrewrite.load.pt2 import load_pt2
        loaded = load_pt2(Path("bert.native.pt2"), None, seed=0)
        again = emit.export_program(loaded.module, (x,), keep_output_classes=True)
        out["same_spec"] = treespec_dumps(again.call_spec.out_spec) == treespec_dumps(
            loaded.exported.call_spec.out_spec)
        print(json.dumps(out))
        """,
        d,
    )
    assert got["same_spec"] is True
    assert got["native"] == [
        "BaseModelOutputWithPoolingAndCrossAttentions",
        "normrewrite.load.specs",
        ["last_hidden_state", "pooler_output"],
    ]
    for stem in ("bert", "bert.native", "llama", "llama.native"):
        name = stem.split(".")[0]
        assert got[stem] == OUTPUT_NAMES[name]
        ys = torch.load(d / f"{stem}.again.y.pt")
        for ref, y in zip(programs[name], ys, strict=True):
            assert rel64(ref, y) <= 1e-5


def test_stand_ins_and_spec_vetting() -> None:
    name = "some_library_not_installed.outputs.Out"
    spec = json.dumps(
        [1, {"type": name, "context": '["a", "b"]', "children_spec": [
            {"type": None, "context": None, "children_spec": []},
            {"type": None, "context": None, "children_spec": []},
        ]}]
    )  # fmt: skip
    assert spec_types(spec) == {name}
    assert register_stand_ins({name, "builtins.tuple"}) == [name]
    assert register_stand_ins({name}) == []  # registered once
    from torch.utils import _pytree as pytree

    tree = pytree.treespec_loads(spec)
    value = pytree.tree_unflatten([torch.zeros(1), torch.ones(1)], tree)
    assert isinstance(value, StandIn) and type(value).__name__ == "Out"
    assert list(value) == ["a", "b"] and torch.equal(value.b, torch.ones(1))
    assert pytree.treespec_dumps(pytree.tree_structure(value)) == spec
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(value)[0]]
    assert paths == ["['a']", "['b']"]
    enum = json.dumps(
        [1, {"type": "builtins.dict", "children_spec": [],
             "context": json.dumps([{"__enum__": True, "fqn": "os:sep", "name": "x"}])}]
    )  # fmt: skip
    with pytest.raises(LoadError, match="enum"):
        spec_types(enum)


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return {"sum": x + 1, "nested": (x * 2, [x - 1])}


def test_flattened_outputs_keep_names_and_state_dict_keys() -> None:
    x = torch.randn(2, 3)
    gm = trace(Pair(), (x,), "fx").graph_module
    ep = emit.export_program(gm, (x,))
    assert emit.output_names(ep) == emit.Outputs(("sum", "nested.0", "nested.1.0"), True)
    y = ep.module()(x)
    assert isinstance(y, tuple) and len(y) == 3 and torch.equal(y[2], x - 1)
    assert ep.graph_signature.user_inputs == ("x",)  # the input keeps its name
    model = randomize_norms(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))).eval()
    gm = trace(model, (x,), "export").graph_module
    ep = emit.export_program(gm, (x,))
    assert list(ep.state_dict) == list(model.state_dict())  # no wrapper prefix
    assert emit.output_names(ep) == emit.Outputs(("output",), True)
    assert torch.equal(ep.module()(x), model(x))  # a lone tensor stays a tensor


# --------------------------------------------------------------------------- dynamic ONNX


def mistral_gqa() -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                          max_position_embeddings=64, use_cache=False, sliding_window=None)  # fmt: skip
    return randomize_norms(t.MistralModel(cfg)).eval()


def phi_partial() -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.PhiConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, partial_rotary_factor=0.5,
                      use_cache=False)  # fmt: skip
    return randomize_norms(t.PhiModel(cfg)).eval()


BUILDERS = {
    "llama": lambda: llama(layers=1),
    "mistral-gqa": mistral_gqa,
    "phi-partial": phi_partial,
    "bert": lambda: bert(layers=1),
}


# every architecture at the default batch 1 (the case that used to specialise); batch 2 once per
# attention kind (rotary MHA, rotary GQA; the CLI test below runs Llama at 2x16 too)
DYNAMIC_CASES = [(a, 1) for a in BUILDERS] + [("mistral-gqa", 2), ("bert", 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "batch"), DYNAMIC_CASES)
def test_dynamic_onnx_and_pt2_run_at_other_sizes(arch: str, batch: int, tmp_path: Path) -> None:
    model = BUILDERS[arch]()
    onnx_path, pt2_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    result = normrewrite.convert(
        model,
        ["fuse-norm"],
        (token_ids(batch=batch, seq=16),),
        outputs=[onnx_path, pt2_path],
        tracer="export",
        onnx=OnnxOptions(dynamic=True),
    )
    onnx_out = result.report.outputs[0]
    note = next(n for n in onnx_out.notes if n.startswith("dynamic axes checked at "))
    assert note.startswith("dynamic axes checked at 3x24: ") and "(torch program)" in note
    proto = onnx.load(str(onnx_path), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert len(dims) == 2 and all(d.dim_param for d in dims)  # batch and sequence symbolic
    rotary = [n for n in proto.graph.node if n.op_type == "RotaryEmbedding"]
    if arch != "bert":  # every fused rotary op reads caches expanded to x's batch
        producers = {o: n.op_type for n in proto.graph.node for o in n.output}
        assert rotary and all(producers[n.input[1]] == "Expand" for n in rotary)

    ids = token_ids(batch=5, seq=11, seed=3)  # neither the example's nor the check's size
    with torch.no_grad():
        ref = model.double()(ids).last_hidden_state
    sess = session(onnx_path)
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    assert relative_error([ref.numpy()], [got.astype(np.float64)])[1] <= 1e-5
    y = torch.export.load(str(pt2_path)).module()(ids)[0]
    assert rel64(ref, y) <= 1e-5


@pytest.mark.slow
def test_cli_dynamic_llama_at_batch_2(tmp_path: Path) -> None:
    """The command of issue 11 that crashed in RotaryEmbedding."""
    llama(layers=1).save_pretrained(tmp_path / "llama")
    out = tmp_path / "l.onnx"
    res = CliRunner(env={"COLUMNS": "250"}).invoke(
        main,
        ["convert", str(tmp_path / "llama"), "-p", "fuse-norm", "--dynamic", "--input",
         "2x16:int64", "-o", str(out), "--report", str(tmp_path / "r.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    [o] = json.loads((tmp_path / "r.json").read_text())["outputs"]
    assert any(n.startswith("dynamic axes checked at 3x24") for n in o["notes"])
    assert o["onnx_max_rel_err"] <= 1e-5


def test_other_size_differs_from_example_and_tracing_size() -> None:
    assert [other_size(d) for d in (1, 2, 3, 16)] == [3, 3, 4, 24]
    assert other_size(16, upper=20) == 20
    assert other_size(64, upper=64) == 48


def test_spec_context_naming_an_enum_is_refused_before_torch_imports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch decodes spec contexts with a hook that imports the module an ``__enum__`` names:
    vetting refuses such a program and the module is never imported."""
    import zipfile

    from normrewrite.load.pt2 import load_pt2

    marker = tmp_path / "imported"
    (tmp_path / "enum_payload_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(nn.Linear(3, 2), (torch.randn(1, 3),)), str(src))
    evil = tmp_path / "evil.pt2"
    context = json.dumps({"__enum__": True, "fqn": "enum_payload_mod:E", "name": "A"})
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("models/model.json"):
                program = json.loads(data)
                sig = program["graph_module"]["module_call_graph"][0]["signature"]
                spec = json.loads(sig["in_spec"])
                spec[1]["context"] = context
                sig["in_spec"] = json.dumps(spec)
                data = json.dumps(program).encode()
            out.writestr(zipfile.ZipInfo(info.filename), data)
    with pytest.raises(LoadError, match="enum"):
        load_pt2(evil, None, seed=0)
    assert not marker.exists()


def test_keep_output_classes_through_the_cli(programs: dict[str, Any]) -> None:
    """--keep-output-classes: the program returns the model's own output class, and the report says
    so (flattened false, the same field names)."""
    d = programs["dir"]
    res = CliRunner().invoke(main, ["convert", str(d / "bert"), "-p", "fuse-norm", "--keep-output-classes",
                                    "-o", str(d / "kept.pt2"), "--report", str(d / "kept.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((d / "kept.json").read_text())
    assert report["program_outputs"] == OUTPUT_NAMES["bert"] and report["outputs_flattened"] is False
    out = torch.export.load(str(d / "kept.pt2")).module()(programs["x"])
    assert not isinstance(out, tuple) and list(out.keys()) == OUTPUT_NAMES["bert"]
