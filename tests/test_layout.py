"""The package's layout keeps its promises (docs/design.md): stages import only earlier stages,
no import cycles, light ``__init__`` files, and modules and functions small enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "msdseg"

# the workflow's order: a module may import its own stage and earlier ones, never a later one
STAGES = ["foundation", "data", "plan", "model", "train", "infer", "report", "jobs"]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every ``msdseg`` module that ``path`` imports, at module level or inside a function."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "msdseg" and _exists(n))
    return found


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "foundation"


def test_no_stage_imports_a_later_stage() -> None:
    backwards = [
        f"{module} ({stage_of(module)}) imports {target} ({stage_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if STAGES.index(stage_of(target)) > STAGES.index(stage_of(module))
    ]
    assert not backwards, "imports against the workflow's order:\n" + "\n".join(backwards)


def test_no_import_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target == module or target in (module.rsplit(".", 1)[0],):
                continue  # a module naming its own package (``from . import x``) is not a cycle
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", [f"msdseg.{stage}" for stage in STAGES[1:]] + ["msdseg"])
def test_package_init_imports_no_heavy_library(package: str) -> None:
    """Every job imports a stage package; torch alone costs a second of start-up."""
    code = (
        f"import sys, {package}; "
        "print(sorted(m for m in ('torch', 'torchio', 'SimpleITK', 'pandas', 'nibabel') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", f"importing {package} loads {result.stdout.strip()}"


def _python_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "workflow" / "scripts").glob("*.py")])


def test_modules_and_functions_are_short() -> None:
    too_long = []
    for path in _python_files():
        source = path.read_text()
        if (n := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_the_graph_sees_real_imports() -> None:
    """The checks above are only as good as the graph: it must see absolute, relative and lazy imports."""
    graph = import_graph()
    assert "msdseg.model.unet" in graph["msdseg.train.loop"]  # absolute, module level
    assert "msdseg.errors" in graph["msdseg.config"]
    assert "msdseg.jobs.chunking" in graph["msdseg.jobs.resample_jobs"]  # inside a function
    assert sum(len(targets) for targets in graph.values()) > 100
