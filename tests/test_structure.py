"""The package's structure: no import loops, and test fixtures stay out of the library.

Every ``import`` and ``from ... import`` of a project module is counted, at the top of a module
or inside a function alike (a loop through a function-level import still ties the modules
together and breaks as soon as someone moves the import up).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"psa_vlm": REPO / "psa_vlm", "psa_kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (resolved to modules, packages as their __init__)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_has_no_loop():
    graph = import_graph()
    assert "psa_vlm.evaluation.lm" in graph and "psa_vlm.models" in graph["psa_vlm.evaluation.lm"]
    cycle = _cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_loop_finder_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_the_test_fixtures():
    graph = import_graph()
    users = sorted(name for name, deps in graph.items() if "psa_vlm.testing" in deps)
    assert users == [], f"psa_vlm.testing is for tests and notebooks; imported by {users}"


def test_the_kernels_do_not_depend_on_the_integration():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("psa_kernels"):
            assert not any(d.startswith("psa_vlm") for d in deps), f"{name} imports {deps}"
