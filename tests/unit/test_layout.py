"""The layout's promises (docs/layout.md): no module with several jobs, no long function, no
two modules of one name, and a model named only by its own module and the configs.

Sizes are counted here from the source, independently of any linter: a module's lines as
the file has them; a function's code lines are the lines that hold a token other than a
comment, its docstrings excluded (blank lines and comments hold none).
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import textwrap
import tokenize
from pathlib import Path

import rdjax
from rdjax import registry

PACKAGE = Path(rdjax.__file__).parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_CODE_LINES = 60
SKIPPED_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts)


def _docstring_lines(node: ast.AST) -> set[int]:
    lines: set[int] = set()
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines |= set(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The lines of ``node`` holding code: a token that is no comment, docstrings excluded."""
    text = textwrap.dedent("\n".join(source.splitlines()[node.lineno - 1 : node.end_lineno]))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in SKIPPED_TOKENS:
            lines |= {line + node.lineno - 1 for line in range(token.start[0], token.end[0] + 1)}
    return len(lines - _docstring_lines(node))


def functions(path: Path) -> list[tuple[str, int]]:
    source = path.read_text()
    return [
        (f"{path.relative_to(PACKAGE.parent)}:{n.lineno} {n.name}", code_lines(source, n))
        for n in ast.walk(ast.parse(source))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_the_code_line_count_on_a_hand_counted_function():
    source = (
        "def f(x):\n"
        '    """Doc,\n'
        '    two lines."""\n'
        "\n"
        "    # a comment\n"
        "    y = (x +\n"
        "         1)  # trailing\n"
        "    return y\n"
    )
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.FunctionDef)
    assert code_lines(source, node) == 4  # def, the two lines of y, return


def test_no_module_has_several_jobs():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_no_function_is_long():
    long = [(name, n) for p in sources() for name, n in functions(p) if n > MAX_FUNCTION_CODE_LINES]
    assert not long, long


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for p in sources():
        if p.name != "__init__.py":
            names.setdefault(p.stem, []).append(str(p.relative_to(PACKAGE)))
    packages = {p.parent.name for p in sources() if p.name == "__init__.py"}
    shared = {name: paths for name, paths in names.items() if len(paths) > 1 or name in packages}
    assert not shared, shared


def test_only_a_models_own_module_names_it():
    """A model's name as a string appears in its own module and in configs/ only: the
    registry, the port, the config checks and the outputs learn everything through the
    contract (rdjax.models.Model)."""
    models = set(registry.MODELS.names())
    assert {"rd4ad", "rdpp", "dinomaly"} <= models
    naming = [
        f"{p.relative_to(PACKAGE.parent)}:{n.lineno} {n.value!r}"
        for p in sources()
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Constant) and n.value in models and not (p.parent.name == "models" and p.stem == n.value)
    ]
    assert not naming, naming


MODULE_MENTION = re.compile(r"\brdjax(?:\.[a-z_][a-z0-9_]*)+")
PATH_MENTION = re.compile(r"\b(?:rdjax|tests|experiments|configs|scripts)/[A-Za-z0-9_/]+\.(?:py|html|js|css|sh)\b")


def _exists(name: str) -> bool:
    """A module, or an attribute of one (rdjax.scoring.maps.anomaly_map, a class's method),
    that exists: the longest importable prefix, then each further name an attribute."""
    parts = name.split(".")
    if parts[1] in rdjax.__all__:  # rdjax.load, rdjax.Predictor
        return True
    for n in range(len(parts), 1, -1):
        try:
            found = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attribute in parts[n:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def test_the_docs_name_modules_and_files_that_exist():
    """After a move, a doc that names an old module or file fails here, not in a reader's hands."""
    docs = [PACKAGE.parent / "README.md", *sorted((PACKAGE.parent / "docs").glob("*.md"))]
    stale = [
        f"{doc.name}: {name}"
        for doc in docs
        for name in sorted(set(MODULE_MENTION.findall(doc.read_text())))
        if not _exists(name.rstrip("."))
    ]
    stale += [
        f"{doc.name}: {path}"
        for doc in docs
        for path in sorted(set(PATH_MENTION.findall(doc.read_text())))
        if not (PACKAGE.parent / path).is_file()
    ]
    assert not stale, stale
