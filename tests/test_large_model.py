"""Streamed (meta-device) conversion of checkpoints: normrewrite.stream.

The streamed result must equal the in-memory conversion tensor for tensor (bitwise: both run the
same recipe functions on the same data). Memory bounds are measured in bench/bench_large_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import normrewrite
from normrewrite import stream
from normrewrite.core.graph import get_tensor
from normrewrite.core.ops import linear_info, set_bias
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, compute_tensors
from normrewrite.errors import LoadError, PassError
from normrewrite.load.checkpoint import KeyMap, key_mapping
from normrewrite.passes import REGISTRY
from normrewrite.stream.plan import RecipeOutput


class ScaleLinears(Pass):
    """Test double: W ← 2W, b ← b + rowsum(W) on every Linear, creating missing biases.

    Not function preserving; it exercises every recipe shape the replay must handle: a tensor
    rewritten twice (run it twice), new tensors, several outputs per recipe, tied weights broken
    by a rewrite (lm_head tied to the embedding)."""

    name = "test-scale-linears"
    summary = "test double"
    exact = False

    def call(self, gm, ctx: PassContext) -> PassResult:
        changes = []
        for node in list(gm.graph.nodes):
            info = linear_info(gm, node)
            if info is None or info.weight is None:
                continue
            bias = info.bias
            if bias is None:  # a new bias is an output only: recipes read stored data alone
                w = get_tensor(gm, info.weight)
                bias = set_bias(gm, info, w.new_zeros(w.shape[0]))
                compute_tensors(
                    gm, ctx, [info.weight, bias], [info.weight], _scale_new, origin=self.name
                )
            else:
                compute_tensors(
                    gm, ctx, [info.weight, bias], [info.weight, bias], _scale, origin=self.name
                )
            changes.append(Change(info.label, "scaled"))
        gm.recompile()
        return PassResult(gm, bool(changes), changes)


def _scale(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return w * 2, b + w.double().sum(1).to(b.dtype)


def _scale_new(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return w * 2, w.double().sum(1).to(w.dtype)


def _llama(causal: bool, dtype: torch.dtype = torch.float32, tie: bool = True) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        use_cache=False,
        tie_word_embeddings=tie,
    )
    cls = transformers.LlamaForCausalLM if causal else transformers.LlamaModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1)
    return model.to(dtype)


def _in_memory(model: nn.Module, passes: list, keymap=lambda k: k) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (1, 16))
    res = normrewrite.convert(model, passes, example_inputs=(ids,), verify=False, tracer="export")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    gm = res.graph_module
    for name, t in [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]:
        if id(t) in seen or "rotary_emb" in name:
            continue
        seen.add(id(t))
        out[keymap(name)] = t.detach()
    return out


def _read_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_equals_in_memory_hf_sharded(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _llama(causal=True, dtype=dtype)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB")  # several input shards
    assert (src / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    res = stream.convert_checkpoint(
        src, [ScaleLinears(), ScaleLinears()], out, max_shard_size=30_000
    )
    assert len(res.shards) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = _read_dir(out)
    assert set(index["weight_map"]) == set(got)
    want = _in_memory(model, [ScaleLinears(), ScaleLinears()])
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    # the rewrite broke the lm_head/embedding tie: both written, and lm_head has a new bias
    assert "lm_head.bias" in got and not torch.equal(
        got["lm_head.weight"], got["model.embed_tokens.weight"]
    )
    # untouched tensors are bit-identical to the input
    orig = _read_dir(src)
    assert torch.equal(got["model.norm.weight"], orig["model.norm.weight"])
    assert (out / "config.json").exists() and (out / "normrewrite.json").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temp dirs left


def test_tied_weights_written_once_when_untouched(tmp_path: Path) -> None:
    model = _llama(causal=True)
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    res = stream.convert_checkpoint(src, [], out)
    got = _read_dir(out)
    orig = _read_dir(src)
    assert set(got) == set(orig)  # lm_head.weight stays tied, not duplicated
    assert all(torch.equal(got[k], orig[k]) for k in orig)
    assert res.plan.tied.get("lm_head.weight") == "model.embed_tokens.weight"


def test_key_prefix_mapping(tmp_path: Path) -> None:
    """A checkpoint saved without the ``model.`` prefix, converted with the CausalLM graph."""
    model = _llama(causal=True, tie=False)
    state = {k.removeprefix("model."): v.contiguous() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "weights.safetensors"
    save_file(state, str(ckpt))
    km = key_mapping([n for n, _ in model.named_parameters()], state.keys())
    assert km == KeyMap("model.", "")
    assert km.key("model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert km.key("lm_head.weight") == "lm_head.weight"
    ids = torch.randint(0, 100, (1, 16))
    out = tmp_path / "out"
    stream.convert_checkpoint(
        _llama(causal=True, tie=False),
        [ScaleLinears()],
        out,
        checkpoint=ckpt,
        example_inputs=(ids,),
        tracer="export",
    )
    got = _read_dir(out)
    want = _in_memory(model, [ScaleLinears()], keymap=km.key)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and the other way: graph without the prefix, checkpoint with it
    assert key_mapping(
        ["layers.0.w", "norm.weight"], {"model.layers.0.w", "model.norm.weight"}
    ) == KeyMap("", "model.")


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, groups=2)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_fold_bn_streamed_from_module_and_checkpoint(tmp_path: Path, tracer: str) -> None:
    torch.manual_seed(0)
    model = _CNN().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.1, 2)
            bn.weight.normal_()
            bn.bias.normal_()
    ckpt = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    x = torch.randn(1, 3, 12, 12)
    import copy

    res = stream.convert_checkpoint(
        copy.deepcopy(model),
        [REGISTRY.create("fold-bn")],
        tmp_path / "out",
        checkpoint=ckpt,
        example_inputs=(x,),
        tracer=tracer,
    )
    assert sum(len(v) for v in res.changes.values()) == 2
    got = _read_dir(tmp_path / "out")
    assert not any(k.startswith("bn") for k in got) and "conv.bias" in got
    mem = normrewrite.convert(model, ["fold-bn"], example_inputs=(x,), tracer=tracer).graph_module
    want = dict(mem.state_dict())
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the streamed weights compute the original function
    mem.load_state_dict(got)
    ref = model.double()(x.double())
    assert (mem(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    model = _llama(causal=False)
    src = tmp_path / "src"
    model.save_pretrained(src)
    # shape mismatch between config and checkpoint
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="shape"):
        stream.convert_checkpoint(src, [], tmp_path / "o1")
    # truncated safetensors
    cfg["intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LoadError, match="corrupt safetensors file"):
        stream.convert_checkpoint(src, [], tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_pass_without_recipe_is_refused(tmp_path: Path) -> None:
    class Sneaky(Pass):
        name = "test-sneaky"
        summary = "edits a weight behind compute_tensors' back"

        def call(self, gm, ctx):
            from normrewrite.core.graph import set_tensor

            set_tensor(gm, "norm.weight", torch.ones(32, device="meta"))
            return PassResult(gm, True)

    model = _llama(causal=False)
    src = tmp_path / "src"
    model.save_pretrained(src)
    with pytest.raises(PassError, match="without compute_tensors"):
        stream.convert_checkpoint(src, [Sneaky()], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_meta(tmp_path: Path) -> None:
    from normrewrite.cli import main

    model = _llama(causal=False)
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main, ["convert", str(src), "--meta", "-p", "fold-bn", "-o", f"{out}/", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert r.output == ""
    got, orig = _read_dir(out), _read_dir(src)
    assert set(got) == set(orig) and all(torch.equal(got[k], orig[k]) for k in orig)
    r = CliRunner().invoke(main, ["convert", str(src), "--meta", "-o", f"{out}/"])
    assert r.exit_code == 2 and "exists" in r.output  # a usage error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_norm_affine_and_fuse_norm_streamed(tmp_path: Path, dtype: torch.dtype) -> None:
    """The passes the large-model bench uses: streamed == in-memory, and the streamed weights
    in the rewritten graph compute the original model's function."""
    passes = ["fuse-norm", "fold-norm-affine"]  # fold needs the fused norm op
    model = _llama(causal=True, dtype=dtype, tie=False)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="30KB")
    res = stream.convert_checkpoint(
        src, [REGISTRY.create(p) for p in passes], tmp_path / "out", max_shard_size=40_000
    )
    assert sum(len(v) for v in res.changes.values()) > 0, res.changes
    if dtype == torch.float32:  # bf16 Llama: γ stays after the down-cast, nothing to fold (exact)
        assert any(isinstance(ref, RecipeOutput) for ref, _, _ in res.plan.outputs.values())
    got = _read_dir(tmp_path / "out")
    ids = torch.randint(0, 100, (1, 16))
    mem = normrewrite.convert(model, passes, example_inputs=(ids,), tracer="export")
    gm = mem.graph_module
    want = {n: t for n, t in gm.state_dict().items() if "rotary_emb" not in n}
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    import copy

    from normrewrite.verify import run

    ref = run(copy.deepcopy(model).double(), (ids,))[0]
    gm.load_state_dict(got, strict=False)
    out = run(gm, (ids,))[0].double()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def test_quiet_prints_nothing_on_hf_load(tmp_path: Path) -> None:
    """--quiet silences everything but errors, including transformers' weight-loading bars."""
    from normrewrite.cli import main

    model = _llama(causal=False)
    src = tmp_path / "src"
    model.save_pretrained(src)
    r = CliRunner().invoke(
        main, ["convert", str(src), "-p", "fuse-norm", "-o", str(tmp_path / "o.pt2"), "-q"]
    )
    assert r.exit_code == 0, r.output
    assert r.output == ""


# --------------------------------------------------------------------------- ONNX with external data


def _ort_logits(path: Path, ids: torch.Tensor):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]


@pytest.mark.parametrize("tie", [True, False])
def test_meta_onnx_equals_in_memory_onnx(tmp_path: Path, tie: bool) -> None:
    """--meta ONNX (exported from the meta program, weights streamed into external data) computes
    what the in-memory conversion's ONNX computes, and its weights are the rewritten ones."""
    import numpy as np
    import onnx

    from normrewrite.load.safety import check_external_data

    passes = ["fuse-norm", "fold-norm-affine"]
    model = _llama(causal=True, tie=tie)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="30KB")
    out = tmp_path / "meta.onnx"
    res = stream.convert_checkpoint_onnx(src, passes, out)
    assert sum(len(v) for v in res.changes.values()) > 0, res.changes
    data = tmp_path / "meta.onnx.data"
    assert out.is_file() and data.is_file() and res.bytes_written == data.stat().st_size > 0
    assert check_external_data(out) == [data.resolve()] or data.resolve() in check_external_data(
        out
    )
    onnx.checker.check_model(str(out), full_check=True)
    # the big initializers live in the external file, not in the protobuf
    proto = onnx.load(str(out), load_external_data=False)
    external = {
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert "model.layers.0.self_attn.q_proj.weight.T" in external  # Transpose(W) folded lazily
    inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) <= 1024 for t in inline)  # only small constants stay inline

    ids = torch.randint(0, 100, (1, 16))
    mem = normrewrite.convert(
        model, passes, example_inputs=(ids,), tracer="export", outputs=[str(tmp_path / "mem.onnx")]
    )
    got, want = _ort_logits(out, ids), _ort_logits(tmp_path / "mem.onnx", ids)
    assert got.shape == want.shape == (1, 16, 100)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    # and the original model's function (fp64 reference)
    import copy

    from normrewrite.verify import run

    ref = run(copy.deepcopy(model).double(), (ids,))[0].numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # initializer bytes == the in-memory rewritten tensors (fold-norm-affine changed the q_proj)
    loaded = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    state = mem.graph_module.state_dict()
    w = onnx.numpy_helper.to_array(loaded["model.layers.0.self_attn.q_proj.weight.T"])
    assert np.array_equal(w, state["model.layers.0.self_attn.q_proj.weight"].numpy().T)
    assert not np.array_equal(
        w, model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy().T
    )
    assert not any(n.op_type == "Transpose" and n.input[0] in loaded for n in proto.graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mem.onnx",
        "meta.onnx",
        "meta.onnx.data",
        "src",
    ]


def test_meta_onnx_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the external data was written (here: validation) leaves no file behind;
    an existing output is not overwritten without force."""
    from normrewrite.emit.onnx import pipeline
    from normrewrite.errors import EmitError, UsageError

    model = _llama(causal=False)
    src = tmp_path / "src"
    model.save_pretrained(src)

    def boom(path: Path) -> list[str]:
        assert (path.parent / "out.onnx.data").stat().st_size > 0  # it got that far
        raise EmitError("forced failure")

    monkeypatch.setattr(pipeline, "validate_file", boom)
    with pytest.raises(EmitError, match="forced"):
        stream.convert_checkpoint_onnx(src, ["fuse-norm"], tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    monkeypatch.undo()
    (tmp_path / "out.onnx.data").write_bytes(b"keep")
    with pytest.raises(UsageError, match="exists"):
        stream.convert_checkpoint_onnx(src, ["fuse-norm"], tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").read_bytes() == b"keep"


def test_cli_meta_onnx(tmp_path: Path) -> None:
    from normrewrite.cli import main

    model = _llama(causal=True)
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out.onnx"
    args = ["convert", str(src), "--meta", "-p", "fuse-norm", "-o", str(out)]
    r = CliRunner().invoke(main, [*args, "-q"])
    assert r.exit_code == 0, r.output
    assert r.output == "" and out.is_file() and (tmp_path / "out.onnx.data").is_file()
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = _ort_logits(out, ids)
    assert abs(got - want).max() <= 1e-5 * abs(want).max()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "exists" in r.output  # a usage error
    r = CliRunner().invoke(main, ["convert", str(src), "--meta", "-o", str(tmp_path / "x.pt2")])
    assert r.exit_code != 0 and "--meta" in r.output


# --------------------------------------------------------------------------- hostile inputs, report


def test_meta_refuses_overlapping_tensors(tmp_path: Path) -> None:
    """--meta reads through safetensors' own validation: a file whose tensors overlap is refused
    (it used to be accepted and to write wrong weights)."""
    from test_load import overlap_tensors

    _llama(causal=False).save_pretrained(tmp_path / "src")
    overlap_tensors(tmp_path / "src" / "model.safetensors")
    with pytest.raises(LoadError, match=r"corrupt safetensors file .*invalid offset"):
        stream.convert_checkpoint(tmp_path / "src", [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


_MEASURED = """
import sys
from normrewrite.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except Exception as e:
    print("ERROR", e)
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("HWM", int(hwm) * 1024)
"""


@pytest.mark.parametrize("meta", [False, True], ids=["in-memory", "meta"])
def test_config_with_100000_layers_fails_fast_and_small(tmp_path: Path, meta: bool) -> None:
    """config.json says 100000 layers, the checkpoint has 2: refused before the model is built
    (it used to build 5 GB+ first), naming the first layer the checkpoint lacks."""
    import subprocess
    import sys
    import time

    _llama(causal=False).save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100000}))
    args = ["convert", str(tmp_path / "src"), "-p", "fuse-norm", "-q"]
    args += ["--meta", "-o", f"{tmp_path / 'out'}/"] if meta else ["-o", str(tmp_path / "o.pt2")]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, *args], capture_output=True, text=True, timeout=300
    )
    seconds = time.perf_counter() - start
    error = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR")]
    hwm = int(proc.stdout.split("HWM")[-1])
    assert len(error) == 1 and "num_hidden_layers=100000" in error[0], proc.stdout + proc.stderr
    assert "no layers.2." in error[0]
    assert seconds < 60 and hwm < 1.5e9, (seconds, hwm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("suffix", ["/", ".onnx"])
def test_cli_meta_writes_the_report(tmp_path: Path, suffix: str) -> None:
    """--meta --report FILE: the in-memory report's schema — passes with their changes and
    skips, outputs; verification not run, with the reason."""
    from normrewrite.cli import main

    _llama(causal=True, tie=False).save_pretrained(tmp_path / "src")
    out, report = str(tmp_path / "out") + suffix, tmp_path / "r.json"
    args = ["convert", str(tmp_path / "src"), "--meta", "-p", "fuse-norm", "-p", "fold-norm-affine"]
    r = CliRunner().invoke(main, [*args, "-o", out, "--report", str(report), "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    names = [p["name"] for p in rep["passes"]]
    assert names[:2] == ["fuse-norm", "fold-norm-affine"]
    fuse = rep["passes"][0]
    assert fuse["modified"] and len(fuse["changes"]) == 5  # 2 layers x 2 norms + the final norm
    assert all({"target", "detail"} <= set(c) for c in fuse["changes"])
    assert "skipped" in fuse and rep["verify"] is None
    assert any(n.startswith("verification not run") for n in rep["notes"])
    assert Path(rep["output"]["path"]) == Path(out) and rep["output"]["format"] == (
        "onnx" if suffix == ".onnx" else "safetensors"
    )
    assert rep["source"] == "hf" and rep["input_origin"] == "config" and rep["tracer"] == "export"
    assert rep["nodes_before"] > 0 and rep["nodes_after"] > 0
