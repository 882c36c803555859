"""The pass registry, the files in ``passes/`` and the README's pass table stay in sync."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import normrewrite.passes as passes_pkg
from normrewrite.core.pass_infra import NamedPass, PassRegistry

ROOT = Path(__file__).resolve().parents[1]
README_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)


def registries() -> list[PassRegistry]:
    return [v for v in vars(passes_pkg).values() if isinstance(v, PassRegistry)]


def registered() -> set[type[NamedPass]]:
    return {cls for reg in registries() for cls in reg}


def defined_passes(module: object) -> set[type[NamedPass]]:
    """Concrete pass classes a module defines (not ones it imports, not abstract bases)."""
    return {
        c
        for c in vars(module).values()
        if inspect.isclass(c)
        and issubclass(c, NamedPass)
        and c.__module__ == module.__name__
        and isinstance(vars(c).get("name"), str)
    }


def pass_homes() -> list[str]:
    """Each rewrite's home in passes/: a module ``x.py`` or a package ``x/``."""
    here = ROOT / "passes"
    modules = [p.stem for p in here.glob("*.py") if p.stem != "__init__"]
    packages = [p.name for p in here.iterdir() if (p / "__init__.py").is_file()]
    return sorted(modules + packages)


def test_every_pass_home_registers_exactly_the_passes_it_defines() -> None:
    homes = pass_homes()
    assert "fold_bn" in homes and "post_to_pre" in homes
    all_registered = registered()
    for stem in homes:
        module = importlib.import_module(f"normrewrite.passes.{stem}")
        defined = defined_passes(module)
        assert defined, f"passes/{stem} defines no pass"
        mine = {c for c in all_registered if c.__module__ == module.__name__}
        assert mine == defined, f"passes/{stem}: defined {defined}, registered {mine}"
    # and nothing registered comes from outside passes/
    home_of = {
        c: c.__module__.removeprefix("normrewrite.passes.").split(".")[0] for c in all_registered
    }
    assert set(home_of.values()) <= set(homes)


def test_names_are_cli_friendly_and_documented() -> None:
    for cls in registered():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", cls.name), cls.name
        assert cls.summary and "\n" not in cls.summary, cls.name
        assert isinstance(cls.exact, bool)


def test_readme_pass_table_lists_every_registered_pass() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Passes", 1)[1].split("\n## ", 1)[0]
    rows = README_ROW.findall(section)
    names = {c.name for c in registered()}
    missing = sorted(names - set(rows))
    assert not missing, f"README pass table lacks rows for: {', '.join(missing)}"
    unknown = sorted(set(rows) - names)
    assert not unknown, f"README pass table lists unregistered passes: {', '.join(unknown)}"
    assert len(rows) == len(set(rows)), "duplicate rows in the README pass table"


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    import pytest

    from normrewrite.errors import UsageError
    from normrewrite.passes import REGISTRY, FoldBatchNorm

    with pytest.raises(ValueError, match="two passes named fold-bn"):
        PassRegistry([FoldBatchNorm, FoldBatchNorm])
    with pytest.raises(UsageError, match=r"unknown pass 'nope' \(available: .*fold-bn"):
        REGISTRY.get("nope")
    assert REGISTRY.get("fold-bn") is FoldBatchNorm and "fold-bn" in REGISTRY
    p = FoldBatchNorm(shared="clone")
    assert REGISTRY.create(p) is p
    assert REGISTRY.create("fold-bn:shared=clone").options.shared == "clone"


def test_onnx_forms_load_only_when_an_onnx_model_needs_them(tmp_path: Path) -> None:
    """A .pt2 conversion never imports onnx/onnx_ir/onnxscript (the ONNX pass forms are registered
    as "module:Class" and imported on first lookup); looking one up imports it."""
    code = textwrap.dedent(
        f"""
        import sys
        from normrewrite.cli import main
        main(["convert", "{ROOT / "examples" / "tiny_cnn.py"}:build", "-p", "fold-bn", "-q",
              "-o", "{tmp_path / "m.pt2"}"], standalone_mode=False)
        onnx = sorted({{m.split(".")[0] for m in sys.modules}} & {{"onnx", "onnx_ir", "onnxscript"}})
        print("after pt2:", onnx)
        from normrewrite.passes import ONNX_REGISTRY
        print("fold-bn" in ONNX_REGISTRY, "onnx_ir" in sys.modules)
        print(ONNX_REGISTRY.get("fold-bn").__name__, "onnx_ir" in sys.modules)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines()[-3:] == [
        "after pt2: []",
        "True False",
        "OnnxFoldBatchNorm True",
    ]
    assert (tmp_path / "m.pt2").is_file()
