"""Loading a model from what a user hands the CLI.

Accepted:

* ``path/to/file.py:factory`` and ``package.module:factory`` — the factory returns an ``nn.Module``
  or a ``(module, example_inputs)`` pair;
* a Hugging Face model directory written by ``save_pretrained`` (``config.json`` + safetensors
  weights; :mod:`normrewrite.load.hf`); the network is never used;
* a ``torch.export`` program saved as ``.pt2``, vetted first (:mod:`normrewrite.load.pt2`).

``.onnx`` files hold no torch module: ``convert``/``inspect`` rewrite them ONNX in → ONNX out
(:mod:`normrewrite.load.onnx`); here they are checked (bad files get a one-line error) and refused.
Pickled ``.pt``/``.pth``/``.bin`` modules are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normrewrite.errors import LoadError
from normrewrite.load.inputs import InputSpec, as_tuple, make_inputs


@dataclass
class LoadedModel:
    module: nn.Module
    example_inputs: tuple[Any, ...]
    source: str  # "factory" | "hf" | "pt2"
    description: str
    exported: torch.export.ExportedProgram | None = None  # for .pt2 inputs
    input_origin: str = "given"  # where example inputs came from: given/factory/config/program
    notes: list[str] = field(default_factory=list)


def load(
    ref: str | os.PathLike[str],
    inputs: Sequence[InputSpec] | None = None,
    *,
    trust_remote_code: bool = False,
    seed: int = 0,
    trust_pickle: bool = False,
    trust_native_code: bool = False,
) -> LoadedModel:
    """Load ``ref`` (see module docs). ``inputs`` overrides any example inputs the source knows.
    ``trust_pickle`` allows unpickling a ``.pt``/``.pth``/``.bin`` module (runs the file's code)
    or pickles inside a ``.pt2``; ``trust_native_code`` allows a ``.pt2`` carrying compiled code
    (:mod:`normrewrite.load.pt2`)."""
    text = os.fspath(ref)
    path = Path(text)
    if path.is_dir():
        from normrewrite.load.hf import load_hf

        loaded = load_hf(path, inputs, trust_remote_code=trust_remote_code, seed=seed)
    elif path.suffix == ".pt2":
        from normrewrite.load.pt2 import load_pt2

        loaded = load_pt2(path, inputs, seed=seed, trust_pickle=trust_pickle,
                          trust_native_code=trust_native_code)
    elif path.suffix == ".onnx":
        from normrewrite.load.onnx import load_onnx

        load_onnx(path)  # one-line errors for missing, truncated or non-ONNX files
        raise LoadError(
            f"{path}: an ONNX model has no torch module; normrewrite convert/inspect rewrite it "
            "ONNX in → ONNX out (normrewrite.convert(path, ...))"
        )
    elif path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        if not path.exists():
            raise LoadError(f"no such file: {path}")
        if trust_pickle:
            return _load_pickle(path, inputs, seed=seed)
        raise LoadError(
            f"{path}: refusing to unpickle a {path.suffix} file (pickle runs arbitrary code); "
            "use a factory with safetensors weights (or a state dict loaded with "
            "torch.load(weights_only=True)), a torch.export .pt2, or a Hugging Face directory; "
            "--trust-pickle loads it anyway if you trust its author"
        )
    elif ":" in text:
        loaded = _load_factory(text, inputs, seed=seed)
    elif path.exists():
        raise LoadError(f"{path}: unrecognised model file (expected .pt2, a directory or FILE.py:factory)")
    else:
        raise LoadError(f"no such model: {text} (expected FILE.py:factory, pkg.module:factory, a .pt2 file or a Hugging Face directory)")
    return loaded


# --------------------------------------------------------------------------- factories


def _load_factory(
    ref: str, inputs: Sequence[InputSpec] | None, *, seed: int
) -> LoadedModel:
    target, _, attr = ref.rpartition(":")
    if not target or not attr.isidentifier():
        raise LoadError(f"bad factory reference {ref!r}: expected FILE.py:factory or pkg.module:factory")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise LoadError(f"no such file: {file}")
        name = f"_normrewrite_user_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise LoadError(f"cannot import {file}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            sys.modules.pop(name, None)
            raise LoadError(f"importing {file} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            mod = importlib.import_module(target)
        except Exception as e:
            raise LoadError(f"cannot import module {target!r}: {type(e).__name__}: {e}") from e
    factory = getattr(mod, attr, None)
    if factory is None:
        raise LoadError(f"{target} has no attribute {attr!r}")
    if not callable(factory):
        raise LoadError(f"{target}:{attr} is not callable")
    try:
        made = factory()
    except Exception as e:
        raise LoadError(f"factory {ref} raised {type(e).__name__}: {e}") from e
    example: tuple[Any, ...] | None = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, example = made[0], as_tuple(made[1])
    if not isinstance(made, nn.Module):
        raise LoadError(
            f"factory {ref} returned {type(made).__name__}; expected an nn.Module or (module, example_inputs)"
        )
    origin = "factory"
    if inputs:
        example, origin = make_inputs(inputs, seed), "given"
    if example is None:
        raise LoadError(
            f"factory {ref} gave no example inputs; pass --input SHAPE[:dtype] for each model input"
        )
    return LoadedModel(made, example, "factory", ref, input_origin=origin)


# --------------------------------------------------------------------------- pickle (opt-in)


def _load_pickle(path: Path, inputs: Sequence[InputSpec] | None, *, seed: int) -> LoadedModel:
    """``torch.load(weights_only=False)`` of a whole pickled module: only with ``trust_pickle``."""
    if not inputs:
        raise LoadError(f"{path}: a pickled module carries no example inputs; pass --input SHAPE[:dtype]")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise LoadError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, nn.Module):
        what = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise LoadError(
            f"{path} holds {what}, not a module; load it into a model in a factory "
            "(torch.load(weights_only=True)) and give FILE.py:factory"
        )
    obj.eval()
    return LoadedModel(obj, make_inputs(inputs, seed), "pickle", str(path),
                       notes=[f"{path.name} was unpickled (--trust-pickle)"])


