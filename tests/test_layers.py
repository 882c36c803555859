"""Dependencies point down: each layer folder of normrewrite imports only the layers below it.

Every ``import`` / ``from … import`` in the source tree (module level or inside a function — a
lazy import is still a dependency) is resolved to the normrewrite layer it reaches, and checked
against :data:`DIRECT` (what a lower layer may import, closed downwards) and :data:`DENIED` (what a
top layer may not). Edges that today's tree has but the table forbids are listed, each with the
violation it is, in :data:`KNOWN_VIOLATIONS`; an entry that no longer occurs fails too, so the
list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
# source folder → the dotted name it is installed as (pyproject's package-dir)
SOURCES = {ROOT / "normrewrite": "normrewrite", ROOT / "passes": "normrewrite.passes"}

# the layers of normrewrite: a folder, or a top-level module, under normrewrite/
LAYERS = {"core", "analysis", "load", "verify", "emit", "passes", "stream", "pipeline", "api", "cli"}
# what a layer may import directly besides itself; it may also import whatever those may (the
# closure below): dependencies point down, and errors is the bottom every layer raises from
DIRECT: dict[str, set[str]] = {
    "core": {"errors"},  # graph access, op semantics, pass infrastructure: the bottom
    "analysis": {"core"},  # read-only analyses of a graph
    "load": {"core", "errors"},  # models and inputs in
    "verify": {"core"},  # numeric comparison
    "emit": {"core", "verify", "load", "analysis"},  # files out, each verified (outputs meet the loaders' file rules)
    "passes": {"core", "analysis", "verify", "errors"},  # rewrites
}
# layers near the top: they may import anything but these
DENIED: dict[str, set[str]] = {
    "stream": {"cli", "api", "pipeline"},  # checkpoint streaming, a configuration of the pipeline
    "pipeline": {"cli", "api"},  # the one driver: load → trace → passes → verify → emit → report
    "api": {"cli"},  # the library API: thin calls into the pipeline; the CLI is a shell over it
}
# a layer in neither table (cli, and top-level modules such as trace) is not constrained


def _closure(direct: dict[str, set[str]]) -> dict[str, set[str]]:
    out = {layer: set(allowed) for layer, allowed in direct.items()}
    changed = True
    while changed:
        changed = False
        for allowed in out.values():
            more = set().union(*(out.get(a, set()) for a in allowed)) - allowed
            if more:
                allowed |= more
                changed = True
    return out


ALLOWED = _closure(DIRECT)

# (importing module, imported module): edges the table forbids that the tree has today
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    ("normrewrite.analysis.scale_invariance.groups", "normrewrite.load.inputs"):
        "scale_invariant_params traces an nn.Module itself: its tracing belongs in api",
    ("normrewrite.analysis.scale_invariance.groups", "normrewrite.trace"):
        "scale_invariant_params traces an nn.Module itself: its tracing belongs in api",
    ("normrewrite.emit", "normrewrite.trace"):
        "emit re-traces (dynamic shapes) and silences tracer warnings through trace",
    ("normrewrite.emit", "normrewrite"):
        "emit reads normrewrite.__version__ from the package root (which imports api)",
    ("normrewrite.emit.aoti", "normrewrite.report"):
        "the AOTInductor writer builds a report record",
}  # fmt: skip


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every source file (the passes symlink read once)."""
    out: dict[str, Path] = {}
    for folder, package in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if folder.name == "normrewrite" and rel[0] == "passes":
                continue  # the symlink to ../passes
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The normrewrite modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m == "normrewrite" or m.startswith("normrewrite.")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "normrewrite"


def _edges() -> set[tuple[str, str]]:
    modules = _modules()
    known = set(modules)
    return {(m, t) for m, path in modules.items() for t in _imports(m, path, known)}


def _forbidden(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    out = set()
    for src, dst in edges:
        layer, target = layer_of(src), layer_of(dst)
        if target == layer:
            continue
        if target in DENIED.get(layer, ()) or target not in ALLOWED.get(layer, {target}):
            out.add((src, dst))
    return out


def test_the_walk_sees_the_tree() -> None:
    """The walk finds every layer and resolves real edges (a broken walk would pass vacuously)."""
    assert {layer_of(m) for m in _modules()} >= LAYERS
    edges = _edges()
    assert ("normrewrite.pipeline.convert", "normrewrite.passes") in edges  # from normrewrite.passes import …
    assert ("normrewrite.pipeline.convert", "normrewrite.emit") in edges  # from normrewrite import emit
    assert ("normrewrite.passes", "normrewrite.passes.fold_bn") in edges  # from .fold_bn import …
    assert ("normrewrite.passes.apply_weight_norm", "normrewrite.passes.fold_bn") in edges


def test_rules_catch_an_upward_import() -> None:
    assert ALLOWED["emit"] == {"core", "verify", "load", "analysis", "errors"}  # errors through core
    assert _forbidden({("normrewrite.core.graph", "normrewrite.passes")}) == {
        ("normrewrite.core.graph", "normrewrite.passes")
    }
    assert _forbidden({("normrewrite.analysis.residual", "normrewrite.core.ops")}) == set()
    assert _forbidden({("normrewrite.api", "normrewrite.cli")}) == {
        ("normrewrite.api", "normrewrite.cli")
    }
    assert _forbidden({("normrewrite.api", "normrewrite.passes")}) == set()


def test_dependencies_point_down() -> None:
    forbidden = _forbidden(_edges())
    new = sorted(forbidden - set(KNOWN_VIOLATIONS))
    assert new == [], f"imports against the layer rules (tests/test_layers.py ALLOWED): {new}"
    fixed = sorted(set(KNOWN_VIOLATIONS) - forbidden)
    assert fixed == [], f"no longer violations: delete them from KNOWN_VIOLATIONS: {fixed}"


def test_nothing_below_passes_imports_a_pass_or_the_cli() -> None:
    """The rule the layering exists for, stated on its own: core and analysis never import a pass,
    the registry, the API or the CLI — no allowlist."""
    for src, dst in _edges():
        if layer_of(src) in ("core", "analysis"):
            assert layer_of(dst) not in ("passes", "api", "cli"), f"{src} imports {dst}"


def test_every_package_folder_is_installed() -> None:
    """pyproject lists packages explicitly (passes/ is installed as normrewrite.passes): a folder
    missing there would work in an editable checkout and be absent from a built wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in SOURCES.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if folder.name == "normrewrite" and rel[:1] == ("passes",):
                continue  # the symlink to ../passes
            found.add(".".join((package, *rel)))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed, no folder: {sorted(listed - found)}"
