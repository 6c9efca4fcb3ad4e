"""The package's structure, read from its source with ``ast`` (docs/architecture.md).

* the import graph of ``refattn`` has no cycle;
* every import points down the layers: leaves -> backends -> cores -> projections ->
  layers -> catalogue -> (conditioning, testing) -> (bench, verify) -> cli;
* no import sits inside a function, except of optional dependencies;
* no module-level mutable setting is read by a kernel (the old knobs are gone);
* no file of the repository refers to a file outside it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refattn"

#: Layer of each module, by the longest matching prefix; imports may only go to the same
#: layer (no cycle) or a lower one.
LAYERS = {
    "refattn._": 0,
    "refattn.typing": 0,          # type aliases only (imports nothing of refattn)
    "refattn.masks": 0,
    "refattn.rotary": 2,
    "refattn.backends": 1,
    "refattn.cores": 2,
    "refattn.projections": 3,
    "refattn.layers": 4,
    "refattn.catalog": 5,
    "refattn.conditioning": 6,
    "refattn.testing": 6,
    "refattn.distributed": 6,
    "refattn.bench": 7,
    "refattn.verify": 7,
    "refattn.cli": 8,
    "refattn.__main__": 9,
}

#: Modules an in-function import may load: optional dependencies, imported only when used.
OPTIONAL = ("torch", "jax", "cupy", "cupy_backends", "matplotlib", "dask", "distributed",
            "rich", "sklearn", "transformers", "timm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """``(target module, node, inside a function)`` of every import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            submodules = [f"{target}.{a.name}" for a in node.names
                          if f"{target}.{a.name}" in MODULES]
            if len(submodules) < len(node.names):       # names defined by the module itself
                yield target, node, id(node) in in_function
            for sub in submodules:                      # `from . import sub` imports `sub`
                yield sub, node, id(node) in in_function


def _graph():
    graph = {}
    for module in MODULES:
        graph[module] = sorted({t for t, _, _ in _imports(module) if t in MODULES and t != module})
    return graph


def _layer(module: str) -> int:
    match = max((p for p in LAYERS if module.startswith(p)), key=len, default=None)
    assert match is not None, f"{module} belongs to no layer of LAYERS"
    return LAYERS[match]


def test_the_import_graph_has_no_cycle():
    graph, index, low, stack, on_stack, cycles = _graph(), {}, {}, [], set(), []

    def visit(v):                                       # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_down_the_layers():
    upward = [(m, t) for m, targets in _graph().items() if m != "refattn"
              for t in targets if t != "refattn" and _layer(t) > _layer(m)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(
        f"  {m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for m, t in upward)
    importers_of_root = [m for m, targets in _graph().items() if "refattn" in targets
                         and _layer(m) < LAYERS["refattn.cli"]]
    assert not importers_of_root, f"modules below the CLI import the package root: " \
                                  f"{importers_of_root}"


def test_no_import_inside_a_function_except_optional_dependencies():
    found = [f"{m}:{node.lineno} imports {t}" for m in MODULES for t, node, inside in _imports(m)
             if inside and t.split(".")[0] not in OPTIONAL
             and not t.endswith(".cupy")]               # a CUDA backend module: needs CuPy
    assert not found, "imports inside functions:\n" + "\n".join(found)


def test_no_process_wide_knob_is_left():
    source = {m: p.read_text() for m, p in MODULES.items()}
    for knob in ("BLOCK_Q", "BLOCK_K", "FLOAT32_MATH", "_WRAPPED", "register_core",
                 "register_variant", "register_study", "import_module"):
        users = [m for m, text in source.items() if re.search(rf"\b{knob}\b", text)]
        assert not users, f"{knob!r} is still used by {users}"


def test_no_file_refers_outside_the_repository():
    pattern = re.compile(r"VARIANTS\.md|\.\./shared|shared/spec|shared/notes")
    offenders = []
    # the repository's own files: not the copies that tools make beside them (asv's
    # environments hold a checkout of the project, Sphinx writes build/)
    generated = {".git", ".asv", "build", "__pycache__"}
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if (path.is_file() and not parts & generated
                and not any(p.endswith(".egg-info") for p in parts) and path.suffix in
                (".py", ".md", ".toml", ".json", ".txt", ".cfg", ".cu", ".cuh", ".cpp", ".h",
                 ".rst", ".css", ".html", ".js", ".yml", ".yaml", ".sh", "")
                and path != Path(__file__)):
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in
                          enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize("page", ["architecture.md"])
def test_architecture_page_names_every_layer_and_package(page):
    text = (ROOT / "docs" / page).read_text()
    for prefix in LAYERS:
        name = prefix.removeprefix("refattn.").strip("._") or "leaves"
        assert name in text, f"docs/{page} does not describe {prefix}"
