"""The import graph of the packages (issue: seams): no circle among module-level imports, the
loss package never imports the recommender, and the registries import nothing heavy."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bear", "bear_kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The project modules ``path`` imports when it is imported (module level, outside
    ``if TYPE_CHECKING:``), relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, its own enclosing packages left out (they are
    imported before it in any case: a submodule importing its package's name is no circle)."""
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = {m for m in _imports(path) if m in modules and m not in parents | {name}}
    return graph


def test_module_imports_form_no_circle():
    graph, done, stack = _graph(), set(), []

    def visit(name):
        if name in stack:
            raise AssertionError(
                "import circle: " + " -> ".join(stack[stack.index(name) :] + [name])
            )
        if name in done:
            return
        stack.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_loss_package_never_imports_the_recommender():
    graph = _graph()
    upward = {m: sorted(d for d in deps if d.startswith("bear.") or d == "bear")
              for m, deps in graph.items() if m.startswith("bear_kernels")}  # fmt: skip
    assert all(not deps for deps in upward.values()), upward


def test_the_registries_and_the_config_import_only_light_modules():
    """What ``bear --help`` imports: the config, the protocol and the two registries, whose own
    project imports are each other's (and the lazy package fronts)."""
    graph = _graph()
    light = {"bear", "bear._lazy", "bear._version", "bear.config", "bear.protocol", "bear.losses",
             "bear.losses.registry", "bear.decoding", "bear.decoding.registry"}  # fmt: skip
    for name in light:
        assert graph[name] <= light, (name, graph[name] - light)
