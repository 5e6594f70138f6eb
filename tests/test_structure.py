"""The package's import graph: dependencies point one way, and private names stay private.

Read from the source with `ast` (nothing is imported, so this runs in well under a second), counting
imports inside functions too: a lazy import is still a dependency, and a cycle through one is what
makes a layer impossible to read, test or reuse without the layers above it (STYLE.md, "Layers").
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "nemo_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name `from <level dots><name> import ...` in `module` refers to."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


class ModuleImports:
    """What one module imports from the package: the modules it depends on and the private names it reaches.

    An import of `a.b.c` depends on `a.b.c` and, from outside package `a.b`, on `a.b`'s __init__ too (it
    runs first). A module's own enclosing packages are not counted: Python initialises them before the
    module whatever it imports, so they are no choice of its. The top-level package is lazy (its
    __init__ imports nothing), so it is never an edge.
    """

    def __init__(self, name: str, path: Path, modules: set[str]):
        self.name, self.modules = name, modules
        self.is_package = path.name == "__init__.py"
        self.edges: dict[str, int] = {}       # module -> first line importing it
        self.private: list[str] = []          # "line N: uses m._x"
        self.aliases: dict[str, str] = {}     # local name -> package module it is bound to
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self._import(node)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                self._attribute(node)

    def _own_packages(self) -> set[str]:
        parts = self.name.split(".")
        own = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        return own if self.is_package else own - {self.name}

    def _depend(self, module: str, line: int):
        """Edges to `module` and the packages above it that this module does not sit inside."""
        parts = module.split(".")
        own = self._own_packages()
        for i in range(2, len(parts) + 1):  # from 2: never the lazy top-level package
            target = ".".join(parts[:i])
            named = i == len(parts)  # asked for by name (`from a.b import name_in_init`): always an edge
            if target in self.modules and target != self.name and (named or target not in own):
                self.edges.setdefault(target, line)

    def _import(self, node: ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] != PACKAGE:
                continue
            self._depend(alias.name, node.lineno)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:  # `import a.b.c` binds `a`; attribute chains from it are resolved below
                self.aliases[PACKAGE] = PACKAGE

    def _import_from(self, node: ast.ImportFrom):
        base = _absolute(self.name, self.is_package, node.level, node.module)
        if base.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            full = f"{base}.{alias.name}"
            if full in self.modules:  # `from pkg import submodule`
                self._depend(full, node.lineno)
                self.aliases[alias.asname or alias.name] = full
            else:                     # a name defined in module `base`
                self._depend(base, node.lineno)
                if _is_private(alias.name) and base != self.name:
                    self.private.append(f"line {node.lineno}: from {base} import {alias.name}")

    def _attribute(self, node: ast.Attribute):
        if not _is_private(node.attr):
            return
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in self.aliases:
            return
        target = ".".join([self.aliases[value.id]] + chain[::-1])
        if target in self.modules and target != self.name:
            self.private.append(f"line {node.lineno}: uses {target}.{node.attr}")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(root: Path = ROOT) -> dict[str, ModuleImports]:
    files = module_files(root)
    return {name: ModuleImports(name, path, set(files)) for name, path in files.items()}


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle [a, b, ..., a] in the directed graph, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(edges):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(edges[start])))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child, 0) == 1:
                return path[path.index(child):] + [child]
            elif state.get(child, 0) == 0:
                state[child] = 1
                stack.append((child, iter(sorted(edges.get(child, ())))))
                path.append(child)
    return None


def _describe(cycle: list[str], graph: dict[str, ModuleImports]) -> str:
    return " -> ".join(f"{a} (line {graph[a].edges[b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and f"{PACKAGE}.checkpoint" in graph  # the walk found the package
    edges = {name: m.edges for name, m in graph.items()}
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle: {_describe(cycle, graph)}"


def test_no_module_uses_another_modules_private_names():
    uses = [f"{m.name}: {use}" for m in import_graph().values() for use in m.private]
    assert not uses, "private names used across modules (give them a public name where they belong):\n  " \
        + "\n  ".join(uses)


def test_the_storage_layer_does_not_import_the_layers_above():
    # checkpoint/ reads and writes weights and run directories; it loads, converts and exports without
    # the training, evaluation or generation code (they import it, never the reverse). It does use the
    # model's definition (model, lora, fp8, quant_base: the param tree a run holds) and the tokenizer (a
    # GGUF export writes its vocabulary); hf-fp8 calibration, which runs the model on data, is handed in
    # from above (ExportOptions.calibrate).
    above = {f"{PACKAGE}.{m}" for m in ("trainer", "train_loop", "plan", "evaluate", "tool_eval", "generate",
                                        "chat", "preference", "convert", "aot", "distributed", "metrics",
                                        "calibration", "data", "streaming", "packing", "records", "losses")}
    graph = import_graph()
    wrong = [f"{name} imports {dep} (line {line})" for name, m in graph.items()
             if name.startswith(f"{PACKAGE}.checkpoint") for dep, line in m.edges.items() if dep in above]
    assert not wrong, "\n".join(wrong)


def test_submodules_import_their_siblings_not_their_package():
    # A package's __init__ gathers its submodules' public names for callers outside; a submodule that
    # imports it back depends on all its siblings at once (and on the order __init__ imports them in).
    graph = import_graph()
    wrong = [f"{name} imports {name.rsplit('.', 1)[0]} (line {m.edges[name.rsplit('.', 1)[0]]})"
             for name, m in graph.items() if not m.is_package and name.rsplit(".", 1)[0] in m.edges]
    assert not wrong, "import the sibling module instead:\n" + "\n".join(wrong)


def test_the_graph_reader_sees_lazy_imports_cycles_and_private_names(tmp_path):
    # The checks above pass on a clean package; this shows they would fail on a dirty one.
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from nemo_jax.sub.low import thing\n")
    (pkg / "sub" / "low.py").write_text("def thing():\n    from nemo_jax.high import run\n    return run\n")
    (pkg / "high.py").write_text("import nemo_jax.sub.low as L\nfrom . import other\n"
                                 "def run():\n    return L._hidden, other\n")
    (pkg / "other.py").write_text("from nemo_jax.high import _secret\nfrom nemo_jax import sub\n"
                                  "x = sub.low._y\n")
    graph = import_graph(pkg)
    assert graph["nemo_jax.sub.low"].edges == {"nemo_jax.high": 2}  # inside a function
    assert graph["nemo_jax.high"].edges == {"nemo_jax.sub": 1, "nemo_jax.sub.low": 1, "nemo_jax.other": 2}
    assert "nemo_jax.sub" not in graph["nemo_jax.sub.low"].edges    # its own package is not a choice...
    (pkg / "sub" / "side.py").write_text("from nemo_jax.sub import thing\n")
    assert import_graph(pkg)["nemo_jax.sub.side"].edges == {"nemo_jax.sub": 1}  # ...but a name from its __init__ is
    cycle = find_cycle({n: m.edges for n, m in graph.items()})
    assert cycle is not None and cycle[0] == cycle[-1] and "nemo_jax.high" in cycle
    assert graph["nemo_jax.high"].private == ["line 4: uses nemo_jax.sub.low._hidden"]
    assert graph["nemo_jax.other"].private == ["line 1: from nemo_jax.high import _secret",
                                               "line 3: uses nemo_jax.sub.low._y"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
