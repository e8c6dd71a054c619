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


def rundir_names() -> tuple[set[str], set[str]]:
    """(file and marker names of RUN/, its directory names), as pipeline.rundir.RunDir defines them."""
    from pipeline.rundir import RunDir

    names = {v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str)}
    return {n for n in names if "." in n or n.isupper()}, {n for n in names if "." not in n and not n.isupper()}


def rundir_spellings(tree: ast.Module) -> list[str]:
    """Where a module spells a run-directory name itself: a file or marker name as a string, or a
    directory name joined onto a path (`x / "snapshots"`)."""
    files, dirs = rundir_names()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in files:
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in dirs | files:
            found.append(f"line {node.lineno}: / {node.right.value!r}")
    return found


def test_no_run_directory_name_is_spelled_outside_its_module():
    files, dirs = rundir_names()
    assert {"FINISHED", "PREEMPTED", "STOP", "config.yaml", "metrics.jsonl", "best.json"} <= files
    assert {"snapshots", "checkpoints", "samples", "tb"} <= dirs
    spelled = {name: where for name, tree in modules().items()
               if name != "pipeline.rundir" and (where := rundir_spellings(tree))}
    # torch hub's own checkpoints folder (where DINOv2 weights may lie), not RUN's.
    assert all(w.endswith("/ 'checkpoints'") for w in spelled.pop("pipeline.metrics.features", []))
    assert spelled == {}
    # The check sees a spelling when there is one.
    assert rundir_spellings(ast.parse('p = run_dir / "snapshots"\nq = "FINISHED"')) == [
        "line 1: / 'snapshots'", "line 2: 'FINISHED'"]


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return names[1:] if names and names[0] in ("self", "cls") else names


def test_training_functions_take_at_most_six_parameters_and_the_loop_fits_a_screen():
    mods = modules()
    wide = [f"{name}.{fn.name} ({len(parameters(fn))})" for name, tree in mods.items()
            if name.startswith("pipeline.training") for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(parameters(fn)) > 6]
    assert wide == []
    loop = next(fn for fn in ast.walk(mods["pipeline.training.loop"])
                if isinstance(fn, ast.FunctionDef) and fn.name == "training_loop")
    assert loop.end_lineno - loop.lineno + 1 <= 130
