"""The package's import graph: no cycles, and the data path runs one way.

Every `import` and `from ... import` inside rdjax, at any depth of the code (function-
level imports included), is an edge, except under `if __name__ == "__main__":` (run
only as a script) and `if TYPE_CHECKING:` (never run): neither can close a cycle. A
registry is an edge too: `Registry(kind, package, attribute)` imports any module of
``package`` by name, so the module that builds it has an edge to every one of them. A
cycle fails, and so does an edge from a module to one further along the data path
(files -> data -> features -> step -> maps -> metrics -> outputs), as ranked below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rdjax

PACKAGE = Path(rdjax.__file__).parent

# The packages in the order the data path runs: a module may import from its own package
# (without a cycle) and from the packages before it, never from one after it. A top-level
# module is a package of its own.
LAYERS = [
    {"rdjax.errors", "rdjax.modes", "rdjax.pytrees"},
    {"rdjax.config", "rdjax.compat"},
    {"rdjax.runtime"},  # sharding, weights, train state, workdir, the XLA cache, distributed start
    {"rdjax.models"},
    {"rdjax.data"},
    {"rdjax.scoring"},  # maps, tiling, passes, metrics, thresholds, router
    {"rdjax.outputs"},  # tables, pictures, the report sheet, the web page
    {"rdjax.evaluators"},
    {"rdjax.registry"},  # it reaches every model, dataset and evaluator module
    {"rdjax.train"},
    {"rdjax.deploy"},  # the predictor (rdjax.load), predict, export, package, port
    {"rdjax.serve"},
    {"rdjax.cli"},
    {"rdjax.main", "rdjax.__main__", "rdjax"},
]
LAYER = {package: i for i, group in enumerate(LAYERS) for package in group}


def layer(module: str) -> int:
    """The layer of a module's package (rdjax.scoring.maps -> rdjax.scoring's)."""
    parts = module.split(".")
    return LAYER[".".join(parts[:2])] if ".".join(parts[:2]) in LAYER else LAYER[module]


def module_name(path: Path) -> str:
    parts = ("rdjax",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts}


def _never_imported(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` and `if TYPE_CHECKING:` blocks."""
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return ("__main__" in test and "__name__" in test) or test in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _never_imported(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _registry_packages(tree: ast.AST) -> set[str]:
    """The packages of the `Registry(kind, package, attribute)` calls in a module."""
    return {
        node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Registry"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
    }


def edges() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
                ]
            else:
                continue
            graph[name] |= {t for t in targets if t in known and t != name}
        for package in _registry_packages(tree):
            graph[name] |= {m for m in known if m.startswith(package + ".") and m != name}
    return graph


def test_every_module_is_in_a_layer():
    unplaced = [m for m in modules() if ".".join(m.split(".")[:2]) not in LAYER and m not in LAYER]
    assert not unplaced, unplaced


def test_there_is_no_import_cycle():
    graph = edges()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, (
                "import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]) if nxt in stack else nxt
            )
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_follow_the_data_path():
    backwards = [f"{a} -> {b}" for a, targets in edges().items() for b in targets if layer(b) > layer(a)]
    assert not backwards, backwards


def _find_cycle() -> str:
    try:
        test_there_is_no_import_cycle()
    except AssertionError as e:
        return str(e)
    raise AssertionError("the cycle was not found")


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    """The detector itself, on a deliberately cyclic toy package: the cycle closes through
    an import inside a function; script-only and type-checking imports are no edges."""
    pkg = tmp_path / "rdjax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from rdjax import registry\n")
    (pkg / "registry.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import rdjax\n\n\n"
        "def f():\n    import rdjax.errors\n\n\nif __name__ == '__main__':\n    import rdjax\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert edges() == {"rdjax": set(), "rdjax.errors": {"rdjax.registry"}, "rdjax.registry": {"rdjax.errors"}}
    assert "import cycle: rdjax.errors -> rdjax.registry -> rdjax.errors" in _find_cycle()


def test_the_check_finds_a_cycle_through_a_registry(tmp_path, monkeypatch):
    """A plug-in module that imports the registry which loads it by name is a cycle, though
    no import statement names the plug-in."""
    pkg = tmp_path / "rdjax"
    (pkg / "plugins").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "plugins" / "__init__.py").write_text("")
    (pkg / "plugins" / "toy.py").write_text("from rdjax.registry import THINGS\n")
    (pkg / "registry.py").write_text('THINGS = Registry("thing", "rdjax.plugins", "THING")\n')
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert edges()["rdjax.registry"] == {"rdjax.plugins.toy"}
    assert "import cycle: rdjax.plugins.toy -> rdjax.registry -> rdjax.plugins.toy" in _find_cycle()
