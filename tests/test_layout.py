"""The layout: no import circle among pipelines' modules, and no module outside pipelines/tasks/ names a
task (the replica, the job and the endpoint ask the task objects instead)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The pipelines modules `path` imports when it is imported (top-level statements, under
    `if TYPE_CHECKING` too; imports inside functions run later and are left out)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    nodes = [n for top in ast.parse(path.read_text()).body
             for n in ([top] + (list(ast.walk(top)) if isinstance(top, (ast.If, ast.Try)) else []))]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if node.module:  # `from . import x` imports the submodule x (its package is the importer's own)
                found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != name}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_circle_finder_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_pipelines_modules():
    paths = sorted((ROOT / "pipelines").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports(p, modules) for p in paths}
    assert graph["pipelines.config"] >= {"pipelines.tasks"}  # the parser sees the imports
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_no_module_outside_the_tasks_names_a_task():
    from pipelines.tasks import TASKS

    named = re.compile("|".join(rf"""["']{name}["']""" for name in TASKS))
    # demo.py writes an example nightly config, which names tasks as a user's would.
    outside = [p for p in (ROOT / "pipelines").rglob("*.py")
               if (ROOT / "pipelines" / "tasks") not in p.parents and p.name != "demo.py"]
    found = [f"{p.relative_to(ROOT)}:{i}" for p in outside
             for i, line in enumerate(p.read_text().splitlines(), 1) if named.search(line)]
    assert found == []
