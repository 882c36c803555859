"""Loading models from what a user hands the CLI: factories (file and package), Hugging Face
``save_pretrained`` directories (offline; default inputs from the config), ``.pt2`` programs; and
the refusals (``.onnx`` not yet, pickles, remote code, missing or corrupt files)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from normrewrite.errors import LoadError
from normrewrite.load import load
from normrewrite.load.inputs import InputSpec

FACTORY = """
import torch
from torch import nn

def pair():
    return nn.Linear(4, 2), torch.ones(3, 4)

def module_only():
    return nn.Linear(4, 2)

def raises():
    raise ValueError("no weights here")
"""


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    f = tmp_path / "factories.py"
    f.write_text(textwrap.dedent(FACTORY))
    return f


def test_file_factory_pair(factory_file: Path) -> None:
    m = load(f"{factory_file}:pair")
    assert isinstance(m.module, nn.Linear) and m.source == "factory" and m.input_origin == "factory"
    assert len(m.example_inputs) == 1 and torch.equal(m.example_inputs[0], torch.ones(3, 4))


def test_file_factory_with_given_inputs(factory_file: Path) -> None:
    m = load(f"{factory_file}:module_only", [InputSpec((5, 4))])
    assert m.input_origin == "given" and m.example_inputs[0].shape == (5, 4)
    # --input overrides the factory's own inputs
    assert load(f"{factory_file}:pair", [InputSpec((2, 4))]).example_inputs[0].shape == (2, 4)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("{f}:module_only", "gave no example inputs; pass --input"),
        ("{f}:raises", "factory .* raised ValueError: no weights here"),
        ("{f}:missing", "has no attribute 'missing'"),
        ("{f}:1bad", "bad factory reference"),
        ("{d}/nope.py:build", "no such file"),
        ("no_such_pkg_xyz.models:build", "cannot import module 'no_such_pkg_xyz.models'"),
    ],
)
def test_factory_errors(ref: str, message: str, factory_file: Path) -> None:
    with pytest.raises(LoadError, match=message):
        load(ref.format(f=factory_file, d=factory_file.parent))


def test_package_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mypkg_nr_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load("mypkg_nr_test.models:pair")
    assert isinstance(m.module, nn.Linear) and m.description == "mypkg_nr_test.models:pair"


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models import bert, resnet

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in (
        ("resnet", resnet(depths=(1, 1), hidden=(8, 16))),
        ("bert", bert(layers=1)),
    ):
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_hf_vision_default_input_from_config(hf_dirs: dict[str, Path]) -> None:
    m = load(hf_dirs["resnet"])
    assert m.source == "hf" and m.input_origin == "config" and "ResNetModel" in m.description
    [x] = m.example_inputs
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert not m.module.training


def test_hf_text_default_input_is_token_ids_below_vocab(hf_dirs: dict[str, Path]) -> None:
    m = load(hf_dirs["bert"])
    [ids] = m.example_inputs
    assert ids.dtype == torch.int64 and ids.shape == (1, 16) and int(ids.max()) < 100
    given = load(hf_dirs["bert"], [InputSpec((2, 40), torch.int64)])
    assert given.example_inputs[0].shape == (2, 40) and int(given.example_inputs[0].max()) < 100


def test_hf_loaded_weights_are_the_saved_ones(hf_dirs: dict[str, Path]) -> None:
    from models import resnet

    saved = resnet(depths=(1, 1), hidden=(8, 16)).state_dict()
    loaded = load(hf_dirs["resnet"]).module.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def _hf_copy(
    src: Path, dst: Path, *, config: dict | None = None, drop: tuple[str, ...] = ()
) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in drop:
            (dst / f.name).write_bytes(f.read_bytes())
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("auto_map", "refusing to run it without --trust-remote-code"),
        ("unknown_arch", "has no model class 'NoSuchModelXyz' for model_type 'resnet'"),
        ("not_a_model_class", "has no model class 'ResNetConfig'"),  # a class, not a model
        ("module_attribute", "has no model class 'torch'"),  # modeling_resnet imports torch
        ("not_a_name", "has no model class 'os.system'"),
        ("no_arch", "no 'architectures' entry"),
        ("not_object", "expected a JSON object"),
        ("no_weights", "no model.safetensors weights"),
        ("pickled_weights", "refusing to unpickle"),
        ("no_config", "needs a config.json"),
    ],
)
def test_hf_refusals(change: str, message: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = hf_dirs["resnet"]
    cfg = json.loads((src / "config.json").read_text())
    d = tmp_path / "m"
    if change == "auto_map":
        _hf_copy(src, d, config={**cfg, "auto_map": {"AutoModel": "modeling.Model"}})
    elif change == "unknown_arch":
        _hf_copy(src, d, config={**cfg, "architectures": ["NoSuchModelXyz"]})
    elif change == "not_a_model_class":
        _hf_copy(src, d, config={**cfg, "architectures": ["ResNetConfig"]})
    elif change == "module_attribute":
        _hf_copy(src, d, config={**cfg, "architectures": ["torch"]})
    elif change == "not_a_name":
        _hf_copy(src, d, config={**cfg, "architectures": ["os.system"]})
    elif change == "no_arch":
        _hf_copy(src, d, config={k: v for k, v in cfg.items() if k != "architectures"})
    elif change == "not_object":
        _hf_copy(src, d, drop=("config.json",))
        (d / "config.json").write_text("[1, 2]")
    elif change == "no_weights":
        _hf_copy(src, d, drop=("model.safetensors",))
    elif change == "pickled_weights":
        _hf_copy(src, d, drop=("model.safetensors",))
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    else:
        _hf_copy(src, d, drop=("config.json",))
    with pytest.raises(LoadError, match=message):
        load(d)


def _whisper_encoder_dir(path: Path) -> nn.Module:
    """A small WhisperEncoder saved with save_pretrained: its class lives only in
    transformers.models.whisper.modeling_whisper, not at transformers' top level."""
    import transformers
    from models import randomize_norms
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    assert not hasattr(transformers, "WhisperEncoder")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    model = randomize_norms(WhisperEncoder(cfg)).eval()
    model.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["WhisperEncoder"]
    return model


def test_hf_class_found_through_the_model_type_registry(tmp_path: Path) -> None:
    """``architectures: [WhisperEncoder]`` (model_type whisper) resolves through transformers'
    model-type registry and converts end to end; the written program matches the original."""
    from click.testing import CliRunner

    from normrewrite.cli import main

    model = _whisper_encoder_dir(tmp_path / "enc")
    out, report = tmp_path / "enc.pt2", tmp_path / "r.json"
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(tmp_path / "enc"),
            "--input",
            "1x8x32",
            "-p",
            "fuse-norm",
            "-o",
            str(out),
            "--report",
            str(report),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["model"].startswith("WhisperEncoder") and rep["source"] == "hf"
    assert rep["verify"]["passed"] is True
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.double()(x.double()).last_hidden_state
        got = torch.export.load(str(out)).module()(x)[0]
    assert float((got.double() - want).abs().max() / want.abs().max()) <= 1e-5


# ------------------------------------------------ config against checkpoint (issue 10, items 8, 10)


def _legit(name: str) -> nn.Module:
    import models
    import transformers

    if name == "gpt2-lm-head":  # lm_head tied to wte: saved once
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(models.gpt2().config).eval()
    return {"bert": models.bert, "llama": models.llama, "resnet": models.resnet}[name]()


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2-lm-head", "resnet"])
def test_hf_config_check_accepts_real_checkpoints(name: str, tmp_path: Path) -> None:
    from normrewrite.load.checkpoint import Checkpoint
    from normrewrite.load.hf import build_on_meta

    model = _legit(name)
    model.save_pretrained(tmp_path / "m")
    meta = build_on_meta(tmp_path / "m", Checkpoint(tmp_path / "m"))
    assert all(t.device.type == "meta" for t in meta.module.state_dict().values())
    loaded = load(tmp_path / "m").module.state_dict()
    want = model.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)


def test_hf_config_check_accepts_a_base_model_checkpoint_under_a_head(tmp_path: Path) -> None:
    """Keys saved from LlamaModel (``layers.0...``), config naming LlamaForCausalLM with a tied
    head: the ``model.`` prefix and the tie are legitimate."""
    import models

    from normrewrite.load.checkpoint import Checkpoint, KeyMap
    from normrewrite.load.hf import build_on_meta

    base = models.llama()
    base.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    meta = build_on_meta(tmp_path / "m", Checkpoint(tmp_path / "m"))
    assert meta.keymap == KeyMap("model.", "")
    head = load(tmp_path / "m").module
    assert torch.equal(head.model.layers[1].mlp.up_proj.weight, base.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (3, r"no tensor layers\.2\.\S+ \(the model's layers\.2\."),  # one layer more: precise
        (1, r"the model has no tensor for its layers\.1\."),  # one layer fewer
        (100000, r"more than \d+ tensors, .*num_hidden_layers=100000.*no layers\.2\."),
    ],
    ids=["one-layer-more", "one-layer-fewer", "hostile-100000-layers"],
)
def test_hf_config_not_matching_checkpoint_is_refused(
    layers: int, message: str, tmp_path: Path
) -> None:
    import time

    import models

    models.llama(layers=2).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    start = time.perf_counter()
    with pytest.raises(LoadError, match=message) as e:
        load(tmp_path / "m")
    assert time.perf_counter() - start < 30 and "\n" not in str(e.value)


def test_hf_checkpoint_with_overlapping_tensors_is_refused(tmp_path: Path) -> None:
    """Two tensors declared over the same bytes (the second LayerNorm reads the first one's
    weights): safetensors' own validation refuses the file before anything is loaded."""
    import models

    models.bert(layers=1).save_pretrained(tmp_path / "m")
    overlap_tensors(tmp_path / "m" / "model.safetensors")
    with pytest.raises(LoadError, match=r"corrupt safetensors file .*invalid offset"):
        load(tmp_path / "m")


def overlap_tensors(path: Path) -> None:
    """Rewrite ``path`` so a 1-D tensor's data range is the one of an earlier tensor of the same
    size (same bytes, same file size)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 1),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    first = entries[0]
    twin = next(
        (k, v)
        for k, v in entries[1:]
        if v["shape"] == first[1]["shape"] and v["dtype"] == first[1]["dtype"]
    )
    header[twin[0]]["data_offsets"] = list(first[1]["data_offsets"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


# --------------------------------------------------------------------------- .pt2 and refusals


def test_pt2_program_with_its_stored_inputs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,), strict=False), str(path))
    m = load(path)
    assert m.source == "pt2" and m.exported is not None and m.input_origin == "program"
    assert torch.equal(m.example_inputs[0], x)
    with torch.no_grad():
        torch.testing.assert_close(m.module(x), model(x))
    given = load(path, [InputSpec((2, 3, 6, 6))])
    assert given.input_origin == "given" and not torch.equal(given.example_inputs[0], x)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.pt2", b"garbage", "not a torch.export program"),
        ("m.pt", b"\x80\x04junk", "refusing to unpickle a .pt file"),
        ("m.pth", b"\x80\x04junk", "refusing to unpickle"),
        ("m.bin", b"\x80\x04junk", "refusing to unpickle"),
        ("m.txt", b"hello", "unrecognised model file"),
    ],
)
def test_file_refusals(name: str, content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LoadError, match=message):
        load(path)
    assert path.read_bytes() == content


def test_onnx_input_is_refused_clearly_or_loaded(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(LoadError, match=r"m\.onnx"):
        load(path)


@pytest.mark.parametrize("name", ["gone.pt2", "gone.onnx", "gone.pt", "gone"])
def test_missing_files(name: str, tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such"):
        load(tmp_path / name)


def test_checkpoint_keys_the_class_renames_on_load(tmp_path) -> None:
    """transformers 5 loads ViT's saved ``encoder.layer.N.attention.attention.query`` as
    ``layers.N.attention.q_proj``: the config-vs-checkpoint check and the streamed path follow the
    class's own renamings (in memory and --meta), and the streamed output loads back."""
    import transformers
    from click.testing import CliRunner
    from models import pixels, vit

    from normrewrite.cli import main

    model = vit()
    model.save_pretrained(tmp_path / "vit")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "vit"), "-p", "fold-norm-affine", "-o",
                                  str(tmp_path / "v.pt2"), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "vit"), "--meta", "-p", "fold-norm-affine",
                                  "-o", str(tmp_path / "streamed") + "/", "-q"])
    assert r.exit_code == 0, r.output
    back = transformers.ViTModel.from_pretrained(tmp_path / "streamed").eval()
    x = pixels()
    with torch.no_grad():
        want, got = model(x).last_hidden_state, back(x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_checkpoint_reuses_a_handle_within_its_read_window(tmp_path: Path, monkeypatch) -> None:
    """Reads reuse one safe_open handle (opening parses the header again) but only for
    HANDLE_WINDOW bytes: a handle keeps the pages its tensors touched resident, so it is dropped
    after the window (a handle kept for the whole replay made --meta peak RSS the checkpoint's
    size). Values read through either handle are the stored ones."""
    from safetensors.torch import save_file

    from normrewrite.load import checkpoint as ck

    stored = {f"w{i}": torch.full((256,), float(i)) for i in range(6)}  # 1 KiB each
    save_file(stored, tmp_path / "model.safetensors")
    monkeypatch.setattr(ck, "HANDLE_WINDOW", 2048)
    c = ck.Checkpoint(tmp_path / "model.safetensors")
    handles = []
    for key, want in stored.items():
        assert torch.equal(c.read(key), want)
        handles.append(c._handles[tmp_path / "model.safetensors"][0])
    # two reads (2 KiB) per handle, then a new one
    assert [handles.index(h) for h in handles] == [0, 0, 2, 2, 4, 4]
