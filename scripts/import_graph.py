"""Print the project's module import graph, its cycles, its upward imports, and the largest
functions.

    python scripts/import_graph.py [--functions N]

Edges come from the source (ast), module level and function level alike (function-level
imports are marked `(lazy)`): a cycle held together by a function-level import is still a
cycle, and a lazy import is still an upward one. LAYERS below is the layer order: a module may
import its own layer and the layers under it. The last check imports `pipeline.compact` in a
fresh interpreter. Exit 1 if that loaded TensorFlow, or on any cycle, upward import, or module
missing from LAYERS.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"

# Bottom to top. A name ending in ".*" is a package with all its modules.
LAYERS = [
    ("leaf: value types, exit codes, helpers (import nothing of the project)", [
        "pipeline.types", "pipeline.exitcodes", "pipeline.atomic", "pipeline.logs",
        "pipeline.tfimport", "pipeline.flatstrings", "pipeline.sortedkeys", "pipeline.imageinfo.*",
        "pipeline.report_page",
        "pipeline.models.efficientnet_lite", "pipeline.models.torch_legacy"]),
    ("base: what every stage may use", [
        "pipeline.options", "pipeline.interrupts", "pipeline.progress", "pipeline.idset",
        "pipeline.pixels", "pipeline.storage", "pipeline.inputs", "pipeline.devices"]),
    ("stage: input listing", ["pipeline.inventory", "pipeline.sources.*"]),
    ("stage: reading and decoding", ["pipeline.pillow_decode", "pipeline.reader.*",
                                     "pipeline.thumbnails"]),
    ("stage: models and runtimes", ["pipeline.models.*", "pipeline.quantize", "pipeline.runtime"]),
    ("stage: output", ["pipeline.writer", "pipeline.doneset", "pipeline.doneindex", "pipeline.donemerge",
                       "pipeline.store.*",
                       "pipeline.rowstream", "pipeline.results"]),
    ("engines", ["pipeline.engines.*"]),
    ("commands: the library API and what each command runs", [
        "pipeline", "pipeline.config", "pipeline.run", "pipeline.compact", "pipeline.report",
        "pipeline.report_current", "pipeline.finetune.*"]),
    ("command line", ["pipeline.cli", "pipeline.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _project_module(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:  # `from .x import y`: y may be a name, not a module
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path, modules: set[str]) -> dict[str, bool]:
    """{imported project module: lazy} for one file (lazy = only inside a function)."""
    current = module_name(path)
    is_package = path.name == "__init__.py"
    found: dict[str, bool] = {}

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(current, is_package, child.level, child.module)
                # `from . import x`: an edge to the submodule x, not to the package
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in child.names]
            for name in names:
                target = _project_module(name, modules)
                if target and target != current and target.startswith(PACKAGE):
                    found[target] = found.get(target, True) and inner
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def graph() -> dict[str, dict[str, bool]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(g: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    return found


def layer_of(module: str) -> int | None:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and (module == m[:-2]
                                                     or module.startswith(m[:-1]))):
                return i
    return None


def upward_imports(g: dict[str, dict[str, bool]]) -> list[tuple[str, str, bool]]:
    """(importer, imported, lazy) for every import of a higher layer than the importer's."""
    found = []
    for module, targets in g.items():
        here = layer_of(module)
        for target, lazy in sorted(targets.items()):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                found.append((module, target, lazy))
    return found


def largest_functions(n: int) -> list[tuple[int, str]]:
    sizes = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1,
                              f"{module_name(path)}.{node.name}"))
    return sorted(sizes, reverse=True)[:n]


def loaded_by(module: str) -> tuple[bool, list[str]]:
    """(TensorFlow loaded?, project modules loaded) by importing `module` in a fresh interpreter."""
    code = (f"import sys, {module}; print('tensorflow' in sys.modules); "
            f"print(' '.join(sorted(m for m in sys.modules if m.startswith('{PACKAGE}'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    tf, modules = out.stdout.splitlines()
    return tf == "True", modules.split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", type=int, default=12, help="largest functions to list")
    args = parser.parse_args()
    g = graph()
    print("import graph (module -> project modules it imports; (lazy) = inside a function):")
    for module, targets in g.items():
        listed = ", ".join(f"{t}{' (lazy)' if lazy else ''}" for t, lazy in sorted(targets.items()))
        print(f"  {module} -> {listed or '-'}")
    found = cycles(g)
    print(f"\ncycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    print("\nlayers (bottom to top; a module imports its own layer and those below):")
    for i, (name, _) in enumerate(LAYERS):
        print(f"  {i}  {name}")
    unplaced = sorted(m for m in g if layer_of(m) is None)
    print(f"\nmodules in no layer: {len(unplaced)}")
    for module in unplaced:
        print(f"  {module}")
    upward = upward_imports(g)
    print(f"\nupward imports: {len(upward)}")
    for module, target, lazy in upward:
        print(f"  {module} ({LAYERS[layer_of(module)][0].split(':')[0]}) -> {target} "
              f"({LAYERS[layer_of(target)][0].split(':')[0]}){' (lazy)' if lazy else ''}")
    print("\nlargest functions (lines):")
    for lines, name in largest_functions(args.functions):
        print(f"  {lines:4d}  {name}")
    tf, modules = loaded_by("pipeline.compact")
    print(f"\n`import pipeline.compact` loads TensorFlow: {tf}")
    print(f"`import pipeline.compact` loads: {' '.join(modules)}")
    return 1 if found or tf or upward or unplaced else 0


if __name__ == "__main__":
    sys.exit(main())
