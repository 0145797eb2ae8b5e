"""The package's import graph: no cycles, and the data path runs one way.

Every `import` and `from ... import` inside rdjax, at any depth of the code (function-
level imports included), is an edge, except under `if __name__ == "__main__":`: those
run only when a module is executed as a script (`python -m rdjax.predict` hands over to
rdjax.cli), never when it is imported, so they cannot close a cycle. A cycle fails, and so does an edge from a module
to one further along the data path (files -> data -> features -> step -> maps ->
metrics -> outputs), as ranked below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rdjax

PACKAGE = Path(rdjax.__file__).parent

# Each module's place on the data path; a module may import only from lower ranks.
RANKS = [
    {"rdjax.errors", "rdjax.registry"},
    {"rdjax.weights", "rdjax.sharding", "rdjax.configs"},
    {
        "rdjax.models.lowering",
        "rdjax.models.layers",
        "rdjax.models.resnet",
        "rdjax.models.rd4ad",
        "rdjax.models.sinkhorn",
        "rdjax.models.rdpp",
        "rdjax.models",
    },
    {"rdjax.config"},
    {"rdjax.workdir"},
    {
        "rdjax.data.preprocess",
        "rdjax.data.pipeline",
        "rdjax.data",
        "rdjax.data.mvtec",
        "rdjax.data.layouts",
        "rdjax.data.novelty",
        "rdjax.data.synthetic",
    },
    {"rdjax.teacher", "rdjax.features"},
    {"rdjax.steps"},
    {"rdjax.maps", "rdjax.tiling"},
    {"rdjax.metrics", "rdjax.calibration"},
    {"rdjax.evaluation"},
    {"rdjax.outputs", "rdjax.report", "rdjax.webpage", "rdjax.evaluators"},
    {"rdjax.train", "rdjax.inference"},
    {"rdjax.predict", "rdjax.export", "rdjax.port"},
    {"rdjax.cli"},
    {"rdjax.main", "rdjax"},
]
RANK = {m: i for i, group in enumerate(RANKS) for m in group}


def module_name(path: Path) -> str:
    parts = ("rdjax",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts}


def _is_main_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)


def _imports(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _is_main_block(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def edges() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
                ]
            else:
                continue
            graph[name] |= {t for t in targets if t in known and t != name}
    return graph


def test_every_module_has_a_rank():
    assert set(modules()) <= set(RANK), sorted(set(modules()) - set(RANK))


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
    backwards = [f"{a} -> {b}" for a, targets in edges().items() for b in targets if RANK[b] > RANK[a]]
    assert not backwards, backwards


def test_the_check_finds_a_cycle(tmp_path, monkeypatch):
    """The detector itself: two modules that import each other are reported."""
    pkg = tmp_path / "rdjax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from rdjax import registry\n")
    (pkg / "registry.py").write_text(
        "def f():\n    import rdjax.errors\n\n\nif __name__ == '__main__':\n    import rdjax\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert edges() == {"rdjax": set(), "rdjax.errors": {"rdjax.registry"}, "rdjax.registry": {"rdjax.errors"}}
    try:
        test_there_is_no_import_cycle()
    except AssertionError as e:
        assert "import cycle: rdjax.errors -> rdjax.registry -> rdjax.errors" in str(e)
    else:
        raise AssertionError("the cycle was not found")
