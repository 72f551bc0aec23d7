"""The package's folders are its stages: each module imports only lower stages, no loop imports another, and
there are no import circles (read from the source with `ast`, so it also covers imports inside functions)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jetmoe_ft"
LOOPS = {"sft", "dpo", "kto", "orpo", "grpo", "cls", "rm"}
# Top-level modules shared by every stage, lowest first; `loading` builds the recipe's model with its adapters.
SHARED = {
    "errors": 0,
    "recipe_values": 0,
    "compat": 0,
    "config": 1,
    "assets": 1,
    "distributed": 1,
    "loading": 3.5,
}
STAGES = {"modeling": 1, "data": 2, "adapters": 3, "training": 4, "evaluation": 5, "export": 6, "planning": 6}
LEVEL_OF_LOOP, LEVEL_OF_CLI = 7, 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _level(module: str) -> float:
    parts = module.split(".")[1:]
    if not parts:
        return 0
    head = parts[0]
    if head in STAGES:
        return STAGES[head]
    if head in LOOPS:
        return LEVEL_OF_LOOP
    if head == "cli":
        return LEVEL_OF_CLI
    return SHARED[head]


def _imports(path: Path) -> set[str]:
    """jetmoe_ft modules `path` imports (relative imports resolved), anywhere in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("jetmoe_ft"):
                continue
            for alias in node.names:  # `from . import eval_gen_report` names a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("jetmoe_ft")}
    return {name for name in found if name != module}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"jetmoe_ft"}))  # the root re-exports the model
def test_a_module_imports_only_lower_stages(module):
    level = _level(module)
    higher = {target for target in GRAPH[module] if _level(target) > level and target != "jetmoe_ft"}
    if module.split(".")[-1] in LOOPS and module.count(".") == 1:
        higher |= {t for t in GRAPH[module] if t.split(".")[-1] in LOOPS and t.count(".") == 1}
    assert not higher, f"{module} (stage {level}) imports {sorted(higher)}"


def test_no_import_circles():
    def visit(name, trail):
        if name in trail:
            raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(name) :], name]))
        for target in GRAPH.get(name, ()):
            if target != "jetmoe_ft" and target in GRAPH and target not in done:
                visit(target, [*trail, name])
        done.add(name)

    done: set[str] = set()
    for name in GRAPH:
        if name != "jetmoe_ft":
            visit(name, [])


def test_the_top_level_holds_the_loops_the_cli_and_a_few_shared_modules():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == LOOPS | {"cli"} | set(SHARED), sorted(top)
    assert len(top) <= 15
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        if init.is_file():
            assert "Imports:" in ast.get_docstring(ast.parse(init.read_text())), (
                f"{stage}/__init__ says what it imports"
            )
