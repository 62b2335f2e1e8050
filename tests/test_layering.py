"""The package's modules import one another without a circle: every arrow runs one way.

The walk reads every ``import`` in the source, the ones inside functions too (a lazy import hides a
circle from Python but not from the next reader), and keeps the arrows between the package's own
modules. A circle fails the test with the arrows that close it.
"""

import ast
from pathlib import Path

import lightning_quantum

PACKAGE = Path(lightning_quantum.__file__).parent


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: the package modules it imports}`` for every ``.py`` file under ``root``.

    An import of a package's name (``lightning_quantum.callbacks``) is an arrow to its ``__init__``;
    a module's own package ``__init__`` files are left out (Python runs them first anyway), as is
    the top-level ``__init__``, which re-exports everything.
    """
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path

    def owner(dotted: str) -> str | None:  # the module a dotted name lives in
        while dotted not in modules and "." in dotted:
            dotted = dotted.rsplit(".", 1)[0]
        return dotted if dotted in modules else None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith(package + "."):
                    continue
                to = owner(target)
                if to is not None and to != name and to != package and not name.startswith(to + "."):
                    graph[name].add(to)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as the modules along it (first and last the same), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_package_imports_in_one_direction():
    cycle = find_cycle(import_graph(PACKAGE, "lightning_quantum"))
    assert cycle is None, "import circle: " + " -> ".join(cycle) + f" (the arrow {cycle[-2]} -> {cycle[-1]} closes it)"


def test_the_walk_finds_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.c import g\n    return g()\n")
    (pkg / "c.py").write_text("import pkg.a\n\ndef g():\n    return 1\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(pkg, "pkg")) is None


def test_no_function_body_is_over_80_lines():
    """A function's body (its docstring aside) fits on a screen; a longer one is split where its steps are."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                docstring = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
                first = body[1] if docstring and len(body) > 1 else body[0]
                lines = node.end_lineno - first.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE)}::{node.name} ({lines} lines)")
    assert not long, long


def test_the_floors_point_down():
    """The shared helpers (``_*.py``) import only one another; quantization does not reach into pruning;
    nothing but the apps imports the apps."""
    graph = import_graph(PACKAGE, "lightning_quantum")
    arrows = [(a, b) for a, targets in graph.items() for b in targets]

    def private(name):
        return name.rsplit(".", 1)[-1].startswith("_") and name.count(".") == 1

    up = [f"{a} -> {b}" for a, b in arrows if private(a) and not private(b)]
    up += [f"{a} -> {b}" for a, b in arrows if ".quantization." in a and ".pruning." in b]
    up += [f"{a} -> {b}" for a, b in arrows if ".apps." in b and ".apps." not in a]
    assert not up, up
