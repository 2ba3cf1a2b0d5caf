"""The codebase's structural rules: no import cycle, no private JAX/Hydra API, short functions.

Imports are read from the source (module level and inside functions alike), so a cycle hidden in
a function-level import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

SOURCE = REPO_ROOT / "src" / "ntklab"
MAX_FUNCTION_LINES = 100
PRIVATE_PREFIXES = ("jax._src", "jaxlib._", "hydra._internal", "flax.core._", "optax._src")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), filename=str(path))
        for path in sorted(SOURCE.rglob("*.py"))
    }


def _imported(name: str, node: ast.AST, modules: set[str]) -> set[str]:
    """The ntklab modules an import statement of module ``name`` reaches."""
    targets: set[str] = set()
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
            package = name.split(".")
            if not _is_package(name, modules):
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
        return targets
    for candidate in candidates:
        # `from ntklab.ntk import x` reaches ntklab.ntk (its __init__), `import a.b.c` a.b.c
        while candidate and candidate not in modules:
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate.startswith("ntklab"):
            targets.add(candidate)
    return targets


def _is_package(name: str, modules: set[str]) -> bool:
    return any(other.startswith(name + ".") for other in modules)


def _graph() -> dict[str, set[str]]:
    """Module -> the ntklab modules it imports. An edge from a module to a package that contains
    it (its own ``__init__``, run before it anyway) is left out: sibling submodules importing each
    other through their package are seen as the sibling edges they are."""
    modules = _modules()
    names = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, tree in modules.items():
        for node in ast.walk(tree):
            graph[name] |= _imported(name, node, names) - {name}
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, f"import cycles (function-level imports included): {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_private_jax_or_hydra_api():
    offenders = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{name}: {m}" for m in modules if m.startswith(PRIVATE_PREFIXES)]
    assert not offenders, f"private APIs imported: {offenders}"


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        if isinstance(first.value.value, str):
            return first.end_lineno - first.lineno + 1
    return 0


def test_no_function_longer_than_a_screen():
    """Counted without the docstring: a function reads top to bottom in one screen."""
    long = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
