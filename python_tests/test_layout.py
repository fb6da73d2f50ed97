"""The package's layers point one way (docs/layout.md): no import circle between epa_ext's own
modules, and no module imports another one's private name.

Read from the source with ``ast``, nothing is imported: an import inside a function counts as
much as one at the top, since it closes the same circle, only later.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "epa_ext"
# Modules that exist only once built, with no .py source to find.
COMPILED_MODULES = {"epa_ext._C"}


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(package: Path) -> dict[str, Path]:
    """Every module of the package (package __init__ files named for their package) -> its file."""
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def imports(module: str, path: Path, modules: set[str]) -> list[tuple[str, str | None, int]]:
    """(epa_ext module imported, name taken from it or None for the module itself, line) for each
    import in ``path``, at any depth; relative imports resolved, imports from outside epa_ext left out."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules or submodule in COMPILED_MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return [(target, name, line) for target, name, line in found if target in modules or target in COMPILED_MODULES]


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """(each module -> the epa_ext modules it imports, the imports of another module's private names)."""
    files = sources(package)
    graph: dict[str, set[str]] = {}
    private = []
    for module, path in files.items():
        graph[module] = set()
        for target, name, line in imports(module, path, set(files)):
            if target != module:
                graph[module].add(target)
            if name is not None and name.startswith("_") and not name.startswith("__"):
                private.append(f"{path.relative_to(package.parent)}:{line} imports {name} from {target}")
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search; modules in sorted order
    so the report is the same on every run)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all it reaches is explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_relative_function_level_and_private_imports(tmp_path):
    """The parser on a made-up package: a circle closed by an import inside a function, and a
    private name taken from a sibling, both found; a private module and public names are fine."""
    package = tmp_path / "epa_ext"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import public\nfrom . import _C\n")
    (package / "a.py").write_text("from ._leaf import CONSTANT\nfrom .sub.b import _private\npublic = 1\n")
    (package / "_leaf.py").write_text("import math\nCONSTANT = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("import epa_ext._leaf\n\ndef later():\n    from ..a import public\n")

    graph, private = import_graph(package)

    assert graph["epa_ext"] == {"epa_ext.a", "epa_ext._C"}
    assert graph["epa_ext.a"] == {"epa_ext._leaf", "epa_ext.sub.b"}
    assert graph["epa_ext.sub.b"] == {"epa_ext._leaf", "epa_ext.a"}
    assert find_cycle(graph) == ["epa_ext.a", "epa_ext.sub.b", "epa_ext.a"]
    assert private == ["epa_ext/a.py:2 imports _private from epa_ext.sub.b"]


def test_no_import_circle():
    """Function-level imports included: a circle means the layers below know the layers above,
    and the order in which modules may be imported becomes fragile."""
    graph, _ = import_graph()
    assert len(graph) > 20, "the parser found too few of epa_ext's modules"
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}; move what both sides need into a module below them"


def test_no_module_imports_a_private_name_of_another():
    """What several modules share is public in the module that holds it (the leaf module
    epa_ext/_kernel_contract.py for the ops' shared constants and checks); a private name is its
    module's own."""
    _, private = import_graph()
    assert not private, "private names imported across modules (make them public in a shared module):\n" + "\n".join(
        private)


# What each package may not import (docs/layout.md): the preference core is framework-free and under
# both trainers; the TRL integration adapts to the core, not to epa-train.
FORBIDDEN = {"epa_ext.preference": ("epa_ext.train", "epa_ext.integrations", "epa_ext.experiment"),
             "epa_ext.integrations": ("epa_ext.train", "epa_ext.experiment"),
             "epa_ext.train": ("epa_ext.integrations", "epa_ext.experiment")}


def test_the_core_and_the_trl_integration_import_nothing_from_epa_train():
    graph, _ = import_graph()
    assert any(m.startswith("epa_ext.preference.") for m in graph) and "epa_ext.integrations.trl.trainer" in graph
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                   for package, forbidden in FORBIDDEN.items() if module.startswith(package + ".")
                   and target.startswith(forbidden))
    assert not wrong, wrong
