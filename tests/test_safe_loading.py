"""Safe loading: no unpickling without --trust-pickle (also inside .pt2 archives), no remote code,
ONNX external data confined to the model's directory, and bad files of every accepted format fail
with one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import models
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from normrewrite.cli import main
from normrewrite.errors import LoadError
from normrewrite.load import load
from normrewrite.load.pt2 import check_pt2
from normrewrite.load.safety import check_external_data


class _Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def _one_line_error(code: int, output: str) -> None:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert code != 0, output
    assert len(lines) == 1, output
    assert "Traceback" not in output and "internal error" not in output, output


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pt2")
    ep = torch.export.export(_net(), (torch.randn(1, 3, 8, 8),))
    path = d / "net.pt2"
    torch.export.save(ep, str(path))
    return path


def _rewrite_zip(src: Path, dest: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info, data)


# --------------------------------------------------------------------------- pickles


def test_pickled_module_refused_with_safe_alternatives(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_net(), path)
    code, out = _cli("convert", str(path), "--input", "1x3x8x8", "-o", str(tmp_path / "o.pt2"))
    _one_line_error(code, out)
    for word in (
        "refusing to unpickle",
        "safetensors",
        "weights_only=True",
        ".pt2",
        "Hugging Face",
        "--trust-pickle",
    ):
        assert word in out, word
    assert not (tmp_path / "o.pt2").exists()


def test_trust_pickle_loads_a_module(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_net(), path)
    code, out = _cli(
        "convert",
        str(path),
        "--trust-pickle",
        "--input",
        "1x3x8x8",
        "-p",
        "fold-bn",
        "-o",
        str(tmp_path / "o.pt2"),
        "-q",
    )
    assert code == 0, out
    assert (tmp_path / "o.pt2").exists()
    with pytest.raises(LoadError, match="--input"):
        load(path, trust_pickle=True)
    # a state dict is not a module: say what to do instead
    torch.save(_net().state_dict(), tmp_path / "sd.pt")
    code, out = _cli(
        "convert",
        str(tmp_path / "sd.pt"),
        "--trust-pickle",
        "--input",
        "1x3x8x8",
        "-o",
        str(tmp_path / "o2.pt2"),
    )
    _one_line_error(code, out)
    assert "state dict" in out


def test_malicious_pickle_never_runs_without_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        path = tmp_path / f"evil{suffix}"
        path.write_bytes(pickle.dumps(_Evil(str(marker))))
        code, out = _cli("inspect", str(path), "--input", "1x3x8x8")
        _one_line_error(code, out)
        assert not marker.exists()


@pytest.mark.parametrize("target", ["sample_inputs/model.pt", "weights_config.json", "opaque"])
def test_pt2_with_pickled_payload_is_refused(tmp_path: Path, pt2_file: Path, target: str) -> None:
    """torch.export.load (torch 2.13) would unpickle these with weights_only=False."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    if target == "sample_inputs/model.pt":
        _rewrite_zip(pt2_file, evil, {"sample_inputs/model.pt": pickle.dumps(_Evil(str(marker)))})
    elif target == "weights_config.json":
        with zipfile.ZipFile(pt2_file) as z:
            name = next(n for n in z.namelist() if n.endswith("weights_config.json"))
            cfg = json.loads(z.read(name))
        first = next(iter(cfg["config"]))
        cfg["config"][first]["use_pickle"] = True
        _rewrite_zip(pt2_file, evil, {"weights_config.json": json.dumps(cfg).encode()})
    else:
        with zipfile.ZipFile(pt2_file) as z:
            name = next(n for n in z.namelist() if n.endswith("constants_config.json"))
            cfg = json.loads(z.read(name))
        cfg["config"]["evil"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": False,
        }
        _rewrite_zip(pt2_file, evil, {"constants_config.json": json.dumps(cfg).encode()})
    code, out = _cli("inspect", str(evil))
    _one_line_error(code, out)
    assert "unpickle" in out and "--trust-pickle" in out
    assert not marker.exists()
    with pytest.raises(LoadError):
        check_pt2(evil)


def test_clean_pt2_passes_the_check(pt2_file: Path) -> None:
    check_pt2(pt2_file)
    assert load(pt2_file).source == "pt2"


# --------------------------------------------------------------------------- Hugging Face


def test_hf_remote_code_refused_and_offline(tmp_path: Path) -> None:
    import transformers  # noqa: F401 - a test dependency: fail, never skip
    _hf_dir(tmp_path / "bert")
    conf = json.loads((tmp_path / "bert" / "config.json").read_text())
    conf["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tmp_path / "bert" / "config.json").write_text(json.dumps(conf))
    (tmp_path / "bert" / "modeling_evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    code, out = _cli("inspect", str(tmp_path / "bert"))
    _one_line_error(code, out)
    assert "--trust-remote-code" in out and not (tmp_path / "pwned").exists()
    del conf["auto_map"]
    (tmp_path / "bert" / "config.json").write_text(json.dumps(conf))
    load(tmp_path / "bert")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set before transformers could reach out


# --------------------------------------------------------------------------- ONNX external data


def _onnx_with_external(d: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    path = d / "m.onnx"
    onnx.save_model(
        helper.make_model(g),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    return path


def _set_location(path: Path, **fields: str) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key in fields:
            entry.value = fields.pop(entry.key)
    for k, v in fields.items():
        proto.graph.initializer[0].external_data.add(key=k, value=v)
    onnx.save(proto, str(path))


def test_external_data_inside_the_directory_is_accepted(tmp_path: Path) -> None:
    path = _onnx_with_external(tmp_path)
    assert check_external_data(path) == [(tmp_path / "w.bin").resolve()]


@pytest.mark.parametrize(
    "location, reason",
    [
        ("/etc/passwd", "absolute"),
        ("C:\\Windows\\win.ini", "absolute"),
        ("../w.bin", ".."),
        ("sub/../../w.bin", ".."),
        ("..\\w.bin", ".."),
        ("missing.bin", "does not exist"),
        ("link.bin", "symbolic link"),
        ("linkdir/w.bin", "symbolic link"),
        ("sub", "not a regular file"),
    ],
)
def test_external_data_escaping_the_directory_is_refused(
    tmp_path: Path, location: str, reason: str
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = _onnx_with_external(model_dir)
    (model_dir / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(model_dir / "w.bin", outside / "w.bin")
    (model_dir / "link.bin").symlink_to(outside / "w.bin")
    (model_dir / "linkdir").symlink_to(outside)
    _set_location(path, location=location)
    with pytest.raises(LoadError, match=reason.replace(".", r"\.")) as e:
        check_external_data(path)
    assert "\n" not in str(e.value) and "'W'" in str(e.value)
    if location == "../w.bin":  # and the loaders refuse it: nothing outside the directory is read
        code, out = _cli("convert", str(path), "-o", str(tmp_path / "o.onnx"))
        _one_line_error(code, out)
        assert "leaves the model's directory" in out


def test_external_data_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = _onnx_with_external(tmp_path)
    _set_location(path, length=str(10**12))
    with pytest.raises(LoadError, match="beyond the end"):
        check_external_data(path)
    _set_location(path, length="16", offset="8")
    with pytest.raises(LoadError, match="beyond the end"):
        check_external_data(path)


# --------------------------------------------------------------------------- bad files


def _patch_central_size(src: Path, dest: Path, size: int) -> None:
    """Declare a huge uncompressed size for the first entry in the central directory."""
    data = bytearray(src.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    at = struct.unpack_from("<I", data, eocd + 16)[0]  # start of the central directory
    assert data[at : at + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, at + 24, size)
    dest.write_bytes(bytes(data))


def _hf_dir(d: Path) -> Path:
    import transformers  # noqa: F401 - a test dependency: fail, never skip
    models.bert(layers=1, hidden=16).save_pretrained(d)
    return d


def _bad_files(tmp: Path, pt2_file: Path) -> dict[str, list[str]]:
    cases: dict[str, list[str]] = {}
    (tmp / "empty.pt2").write_bytes(b"")
    cases["pt2 empty"] = ["inspect", str(tmp / "empty.pt2")]
    (tmp / "magic.pt2").write_bytes(b"\x89PNG\r\n" + os.urandom(200))
    cases["pt2 wrong magic"] = ["inspect", str(tmp / "magic.pt2")]
    raw = pt2_file.read_bytes()
    (tmp / "trunc.pt2").write_bytes(raw[: len(raw) // 2])
    cases["pt2 truncated"] = ["inspect", str(tmp / "trunc.pt2")]
    with zipfile.ZipFile(tmp / "schema.pt2", "w") as z:
        z.writestr("x/hello.txt", "not a program")
    cases["pt2 wrong schema"] = ["inspect", str(tmp / "schema.pt2")]
    _rewrite_zip(pt2_file, tmp / "json.pt2", {"models/model.json": b'{"nope": 1}'})
    cases["pt2 bad program json"] = ["inspect", str(tmp / "json.pt2")]
    _patch_central_size(pt2_file, tmp / "huge.pt2", 0xFFFFFFF0)
    cases["pt2 huge declared size"] = ["inspect", str(tmp / "huge.pt2")]
    with pytest.raises(LoadError, match="declares"):
        check_pt2(tmp / "huge.pt2")

    hf = _hf_dir(tmp / "hf")
    for name, mutate in {
        "hf config not json": lambda d: (d / "config.json").write_text("{oops"),
        "hf config a list": lambda d: (d / "config.json").write_text("[1, 2]"),
        "hf unknown architecture": lambda d: (d / "config.json").write_text(
            json.dumps({"architectures": ["NoSuchModel"]})
        ),
        "hf safetensors truncated": lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:300]
        ),
        "hf safetensors huge header": lambda d: (d / "model.safetensors").write_bytes(
            struct.pack("<Q", 2**62) + b"{}"
        ),
        "hf no weights": lambda d: (d / "model.safetensors").unlink(),
    }.items():
        d = tmp / name.replace(" ", "_")
        shutil.copytree(hf, d)
        mutate(d)
        cases[name] = ["inspect", str(d)]
    d = tmp / "meta_huge"
    shutil.copytree(hf, d)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    cases["safetensors huge header (--meta)"] = [
        "convert",
        str(d),
        "--meta",
        "-o",
        str(tmp / "meta_out") + "/",
    ]

    (tmp / "bad.onnx").write_bytes(b"\x08" + os.urandom(64))
    cases["onnx garbage"] = ["inspect", str(tmp / "bad.onnx")]
    (tmp / "syntax.py").write_text("def build(:\n")
    cases["factory syntax error"] = ["inspect", f"{tmp / 'syntax.py'}:build"]
    (tmp / "raises.py").write_text("def build():\n    raise ValueError('boom')\n")
    cases["factory raises"] = ["inspect", f"{tmp / 'raises.py'}:build"]
    (tmp / "garbage.pt").write_bytes(os.urandom(100))
    cases["pickle garbage with --trust-pickle"] = [
        "inspect",
        str(tmp / "garbage.pt"),
        "--trust-pickle",
        "--input",
        "1x3",
    ]
    return cases


def test_bad_files_fail_with_one_line(tmp_path: Path, pt2_file: Path) -> None:
    failures = []
    for name, args in _bad_files(tmp_path, pt2_file).items():
        code, out = _cli(*args)
        try:
            _one_line_error(code, out)
        except AssertionError:
            failures.append(f"{name}: exit {code}: {out.strip()[:300]}")
    assert not failures, "\n".join(failures)
