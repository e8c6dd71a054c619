"""The shape of the package, checked from its source: one-way imports and one owner per concern.

Every `import` in `pipeline/` counts, at module level or inside a function (a lazy import that
closes a cycle is still a cycle: it only moves the failure to run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "pipeline"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's own modules that `name` imports (a `from X import y` of a submodule y counts as X.y)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                pkg = name.split(".")[: len(name.split(".")) - node.level + (1 if tree_is_package(name) else 0)]
                base = ".".join(pkg + [node.module])
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    out.add(f"{base}.{a.name}")
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def tree_is_package(name: str) -> bool:
    return (REPO / Path(*name.split(".")) / "__init__.py").is_file()


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_anywhere_in_the_package():
    mods = modules()
    known = set(mods)
    # A package's __init__ is imported by each of its submodules: that edge is implicit.
    graph = {name: imports(name, tree, known) for name, tree in mods.items()}
    assert len(graph) > 30
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_floors_import_only_what_is_below_them():
    mods = modules()
    known = set(mods)
    assert imports("pipeline.errors", mods["pipeline.errors"], known) == set()
    assert imports("pipeline.config", mods["pipeline.config"], known) <= {"pipeline.errors"}
    assert imports("pipeline.io", mods["pipeline.io"], known) <= {"pipeline.errors"}
    assert imports("pipeline.dist", mods["pipeline.dist"], known) <= {"pipeline.errors"}


def uses(tree: ast.Module, dotted: str) -> bool:
    """Whether the module imports `dotted` or calls an attribute chain ending in it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == dotted or a.name.startswith(dotted + ".")
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == dotted
                                                                 or node.module.startswith(dotted + ".")):
            return True
        if isinstance(node, ast.Attribute) and ast.unparse(node) == dotted:
            return True
    return False


def test_one_owner_of_distributed_state_and_of_atomic_writes():
    mods = modules()
    assert [n for n, t in mods.items() if uses(t, "torch.distributed")] == ["pipeline.dist"]
    assert [n for n, t in mods.items() if uses(t, "os.replace")] == ["pipeline.io"]
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")
    readers = sorted(n for n, t in mods.items()
                     if any(isinstance(c, ast.Constant) and c.value in launcher_vars for c in ast.walk(t)))
    assert readers == ["pipeline.dist"]


def test_argparse_lives_in_the_cli_only():
    mods = modules()
    parsers = sorted(n for n, t in mods.items() if any(
        isinstance(c, ast.Attribute) and c.attr in ("add_argument", "add_parser", "add_subparsers")
        for c in ast.walk(t)))
    assert parsers == ["pipeline.cli"]
