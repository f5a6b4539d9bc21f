"""The shape of the package: its import graph has no cycle, the demo stays out of the library, and the way a
model turns audio into text is asked of its head kind, never tested in place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import comflp

ROOT = Path(comflp.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imported(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> set[str]:
    """The comflp modules an import statement of ``module`` reads (``from .x import y``: ``x.y`` if that is a
    module, else ``x``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    out = set()
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the comflp modules it imports anywhere in its text (top level or inside functions: a deferred
    import is still a dependency)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = set().union(*(imported(module, n, path.name == "__init__.py") for n in ast.walk(tree)
                                      if isinstance(n, (ast.Import, ast.ImportFrom))))
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order), or None: a depth-first search for a back edge."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_walker_finds_a_cycle_and_reads_relative_imports() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "comflp.model.families" in graph["comflp.model.layers"]  # from .families import ...
    assert "comflp.model" in graph["comflp.verify"]  # from .model import ... (the package)
    assert "comflp.demo.corpus" in graph["comflp.cli.options"]  # a deferred import counts


def test_the_import_graph_has_no_cycle() -> None:
    assert cycle(import_graph()) is None


def test_the_library_does_not_import_the_demo() -> None:
    """Only the command-line layer and the demo itself import ``comflp.demo`` (the embedded default)."""
    graph = import_graph()
    library = [m for m in graph if not m.startswith(("comflp.demo", "comflp.cli")) and m != "comflp.__main__"]
    assert not {m: sorted(d for d in graph[m] if d.startswith("comflp.demo")) for m in library
                if any(d.startswith("comflp.demo") for d in graph[m])}
    assert "ensure_demo_corpus" not in comflp.__all__


def test_no_encoder_decoder_test_outside_the_head_kinds_and_the_table() -> None:
    """How a model turns audio into text is asked of its head kind (:mod:`comflp.heads`); the family table
    (:mod:`comflp.model.families`) names it. Nowhere else tests whether a model is an encoder-decoder."""
    allowed = {ROOT / "heads.py", ROOT / "model" / "families.py"}
    stray = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.rglob("*.py") if p not in allowed
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"is_encoder_decoder|generative", line)]
    assert not stray
