"""Imports point down: every `import` in tunelab/ (module level or inside a function) goes to a
module of the same layer or a lower one, and no two modules import each other, directly or through
others. Checked twice: over every import statement, and over what importing a module runs at once
(its module-level imports, and the packages above each: importing a.b.c runs a/__init__ and
a/b/__init__).

The layers, lowest first (STYLE.md principle 14):
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "tunelab"

LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["tunelab.errors", "tunelab.options", "tunelab.registry"]),
    ("config sections", ["tunelab.*.config"]),  # each section's dataclass, next to its component
    ("run config", ["tunelab.config"]),
    ("run layer", ["tunelab.run", "tunelab.run.*"]),
    ("models and data", ["tunelab.models", "tunelab.models.*", "tunelab.data", "tunelab.data.*"]),
    ("methods", ["tunelab.methods", "tunelab.methods.*"]),
    ("objectives", ["tunelab.objectives", "tunelab.objectives.*"]),
    ("evaluation", ["tunelab.eval", "tunelab.eval.*"]),
    ("data stages", ["tunelab.curate", "tunelab.curate.*"]),
    ("mechanisms", ["tunelab.mechanisms", "tunelab.mechanisms.*"]),
    ("privacy", ["tunelab.privacy", "tunelab.privacy.*"]),  # DP-SGD: what the step calls when it is on
    ("training loop", ["tunelab.training", "tunelab.training.*"]),
    ("federated", ["tunelab.federated", "tunelab.federated.*"]),  # runs the step and the loop's parts
    ("editing and retrieval", ["tunelab.editing", "tunelab.editing.*", "tunelab.rag", "tunelab.rag.*"]),
    ("users of trained runs", ["tunelab.diagnostics", "tunelab.diagnostics.*", "tunelab.report",
                               "tunelab.report.*", "tunelab.export"]),
    ("pipelines", ["tunelab.pipeline", "tunelab.pipeline.*"]),
    ("entry points", ["tunelab", "tunelab.api", "tunelab.compare", "tunelab.cli", "tunelab.__main__"]),
]
__doc__ += "".join(f"\n    {i}. {name}: {', '.join(pats)}" for i, (name, pats) in enumerate(LAYERS))


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = modules()


def _known(name: str) -> str:
    """The tunelab module an import of `name` loads (a name imported from a module is that module)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _module_level(tree: ast.Module):
    """The statements that run when the module is imported (not those inside functions or classes)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += [n for f in ("body", "orelse", "finalbody", "handlers") for n in getattr(node, f, [])]
        if isinstance(node, ast.ExceptHandler):
            todo += node.body


def imports(name: str, at_import: bool = False) -> set[str]:
    """The tunelab modules `name` imports anywhere in its body (`at_import`: at module level only)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = set()
    for node in (_module_level(tree) if at_import else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out |= {_known(a.name) for a in node.names if a.name.split(".")[0] == "tunelab"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] == "tunelab":
                out |= {_known(f"{base}.{a.name}") for a in node.names}
    return out - {name}


def with_parents(names: set[str], importer: str) -> set[str]:
    """What importing `names` from `importer` runs: each module and every package above it, but
    for the packages `importer` is itself in (a package's __init__ may import its own modules)."""
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)} - own


def layer(name: str) -> int:
    matches = [i for i, (_, pats) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(name, p) for p in pats)]
    assert matches, f"{name} is in no layer; add it to LAYERS"
    return min(matches)


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def test_imports_point_down():
    upward = sorted(f"{m} ({LAYERS[layer(m)][0]}) imports {i} ({LAYERS[layer(i)][0]})"
                    for m in MODULES for i in imports(m) if layer(i) > layer(m))
    assert not upward, "\n".join(upward)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles({m: imports(m) for m in MODULES})
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles[:10])


def test_no_cycles_in_what_an_import_runs():
    cycles = find_cycles({m: with_parents(imports(m, at_import=True), m) for m in MODULES})
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles[:10])


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks can fail: a planted upward import and a planted cycle are both reported."""
    fake = {"tunelab.errors": "from tunelab.training.loop import train\n",
            "tunelab.training.loop": "import tunelab.errors\n"}
    monkeypatch.setitem(MODULES, "tunelab.training.loop", tmp_path / "loop.py")
    monkeypatch.setitem(MODULES, "tunelab.errors", tmp_path / "errors.py")
    for name, text in fake.items():
        MODULES[name].write_text(text)
    assert "tunelab.training.loop" in imports("tunelab.errors") and layer("tunelab.training.loop") > layer("tunelab.errors")
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "tunelab.errors -> tunelab.training" in str(e)
    else:
        raise AssertionError("the planted cycle was not found")
