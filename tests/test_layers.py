"""The package's import direction. Its folders form layers, bottom to top:

0. the model and the data: the package root (the code a saved folder carries), `data/`, and the `metrics/` and
   `templates/` files that are copied or loaded on their own;
1. `features/`: the feature store, above the model it runs;
2. `training/`: above the store it reads;
3. `tools/` and the command lines (`__main__` modules and `cli*` modules of any folder).

No module imports from a layer above its own (also inside a function), no module imports a private name (leading
underscore) of another module, and no modules import each other in a loop. Read with `ast`, without importing
anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import enecg_hf

PACKAGE = Path(enecg_hf.__file__).resolve().parent
LAYERS = ("model and data", "features", "training", "tools and command lines")
FOLDER_LAYERS = {"": 0, "data": 0, "metrics": 0, "templates": 0, "features": 1, "training": 2, "tools": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def folder_of(module: str) -> str:
    """The top-level folder of `enecg_hf.<folder>.<...>`, "" for the modules at the package root."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and path.is_dir()) else ""


def layer_of(module: str) -> int:
    last = module.split(".")[-1]
    if last == "__main__" or last.startswith("cli"):
        return len(LAYERS) - 1
    folder = folder_of(module)
    assert folder in FOLDER_LAYERS, f"{module}: give the folder {folder!r} a layer in FOLDER_LAYERS"
    return FOLDER_LAYERS[folder]


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(module: str, source: str, is_package: bool = False):
    """`(line, imported module, imported name or None)` for every import of enecg_hf in `source`, at any depth."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, None) for alias in node.names if alias.name.startswith("enecg_hf"))
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("enecg_hf"):
                continue
            for alias in node.names:  # `from . import x` imports the module x, `from .m import x` a name of m
                submodule = f"{target}.{alias.name}"
                yield (node.lineno, submodule, None) if is_module(submodule) else (node.lineno, target, alias.name)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """What `source`, the code of `module`, imports against the layers."""
    found = []
    for line, target, name in imports_of(module, source, is_package):
        where = f"{module}:{line} imports {target}{'.' + name if name else ''}"
        if layer_of(target) > layer_of(module):
            found.append(f"{where}: upward, from {LAYERS[layer_of(module)]} to {LAYERS[layer_of(target)]}")
        private = [part for part in target.split(".") + [name or ""] if is_private(part)]
        if private and folder_of(target) != folder_of(module):
            found.append(f"{where}: the private name {private[0]} of another folder")
    return found


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path.read_text(), path.name == "__init__.py"


def test_no_module_imports_from_a_layer_above_or_a_private_name_of_another_folder():
    modules = list(package_modules())
    assert len(modules) > 50  # the whole package was read
    found = [v for module, source, is_package in modules for v in violations(module, source, is_package)]
    assert not found, "\n".join(found)


def test_the_layers_of_the_folders():
    assert [layer_of(m) for m in ("enecg_hf", "enecg_hf.modeling_enecg", "enecg_hf.data.builder")] == [0, 0, 0]
    assert [layer_of(m) for m in ("enecg_hf.features.store", "enecg_hf.training.run", "enecg_hf.tools.quickstart")] \
        == [1, 2, 3]
    # The command lines of the lower folders are on top.
    assert layer_of("enecg_hf.features.__main__") == layer_of("enecg_hf.features.cli") == 3
    assert layer_of("enecg_hf.data.__main__") == 3


def test_the_check_finds_upward_and_private_imports_at_any_depth():
    store = "enecg_hf.features.store"
    lazy_upward = "def f():\n    from ..training.run import main\n"
    assert violations(store, lazy_upward) == [
        f"{store}:2 imports enecg_hf.training.run.main: upward, from features to training"]
    assert violations(store, "import enecg_hf.tools.cli\n") == [
        f"{store}:1 imports enecg_hf.tools.cli: upward, from features to tools and command lines"]
    assert violations("enecg_hf.tools.quickstart", "from ..training.arguments import _helper\n") == [
        "enecg_hf.tools.quickstart:1 imports enecg_hf.training.arguments._helper: the private name _helper of "
        "another folder"]
    # Downward, within a folder (private or not), the package's dunder names, and a package's own relative imports.
    assert violations("enecg_hf.training.run", "from ..features.store import feature_store_dir\n") == []
    assert violations("enecg_hf.beats_enecg", "from .expert_features import _private_helper\n") == []
    assert violations("enecg_hf.features.store", "from .. import __version__\n") == []
    assert violations("enecg_hf.features", "from .store import CACHE_ENV\n", is_package=True) == []


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a module counts as that module), at any
    depth (imports inside functions too: they tie the modules as much)."""
    graph = {}
    for module, source, is_package in package_modules():
        graph[module] = {target for _, target, _ in imports_of(module, source, is_package) if target != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops of `graph`: its strongly connected components of two or more modules (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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


def test_the_cycle_check_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops_and_no_private_names_between_modules():
    """No modules import each other in a loop, even through an import inside a function (the configuration once
    imported the expert registry, which imports every expert, which imports the configuration); and no module takes a
    private name of another (what two modules share is public in the one that owns it)."""
    graph = import_graph()
    assert len(graph) > 50
    assert not cycles(graph), cycles(graph)
    private = [f"{module}:{line} imports {target}.{name}" for module, source, is_package in package_modules()
               for line, target, name in imports_of(module, source, is_package)
               if name and is_private(name) and target != module]
    assert not private, "\n".join(private)
