"""The package's import rules (docs/architecture.md, "Import rules"), read from the source with ast. Every
import counts, the lazy ones inside functions too: a circle closed by a lazy import still makes module
initialisation order matter, and still ties the two modules together.

- No import circles in dopsd_core.
- dopsd_core never imports the lab (experiments/), the pack's nodes (nodes/) or tools/.
- ComfyUI only inside functions (lazily), except in MODULE_LEVEL_COMFY, which only ComfyUI loads.
- hosts/ is the top of the package: nothing else in dopsd_core imports it, so the core and the toy never
  need ComfyUI. The one door is the CLI's: for the ComfyUI families it imports hosts.headless, lazily.
- The training core (CORE) imports nothing from the toy package: the toy is one model among others.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dopsd_core"
HOSTS = "dopsd_core.hosts"
# ComfyUI's top-level modules (its own `nodes` module shares the pack's name: never import it absolutely)
COMFY = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "node_helpers",
         "latent_preview", "execution")
MODULE_LEVEL_COMFY = {"dopsd_core.hosts.comfy_toy"}  # the toy as ComfyUI objects: only ComfyUI imports it
NEVER = ("experiments", "nodes", "tools")  # the lab, the pack's nodes, the tools: the package's callers
TOY = "dopsd_core.toy"
# the training loop and its parts (the CLI, the family spec's toy entry and hosts/ may use the toy)
CORE = tuple(f"dopsd_core.{m}" for m in ("trainer", "run_folder", "objectives", "prior", "denoiser", "lora",
                                         "data", "optim", "schedule", "fileio", "plot", "errors", "progress"))


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module, absolute
    line: int
    lazy: bool  # inside a function body

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}{' (lazily)' if self.lazy else ''}"


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    mods = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def imports_of(module: str, path: Path, is_pkg: bool, modules: dict) -> list[Import]:
    """Every import statement of a module, wherever it is, with relative names resolved. `from x import y`
    names the submodule x.y where y is one, else x."""
    package = module if is_pkg else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = parts[:max(len(parts) - (child.level - 1), 0)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    found.append(Import(module, sub if sub in modules else target, child.lineno, lazy))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def all_imports(root: Path = ROOT, package: str = PACKAGE) -> list[Import]:
    modules = package_modules(root, package)
    return [imp for name, (path, is_pkg) in modules.items() for imp in imports_of(name, path, is_pkg, modules)]


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, Import]]:
    """module -> {imported module of the package -> the first import of it}."""
    modules = package_modules(root, package)
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in all_imports(root, package):
        if imp.target in modules and imp.target != imp.source:
            graph[imp.source].setdefault(imp.target, imp)
    return graph


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """One circle per strongly connected component of more than one module (Tarjan), as the chain of
    imports that closes it, starting at the component's first module by name."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first inside the component: the shortest chain of imports from start back to start
        paths = {start: []}
        frontier = [start]
        while frontier and start not in {w for v in frontier for w in graph[v]}:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in component and w not in paths:
                        paths[w] = paths[v] + [graph[v][w]]
                        nxt.append(w)
            frontier = nxt
        last = min(v for v in frontier if start in graph[v])
        cycles.append(paths[last] + [graph[last][start]])
    return sorted(cycles, key=lambda c: c[0].source)


def describe(cycle: list[Import]) -> str:
    return " -> ".join([cycle[0].source] + [f"{imp.target} ({imp.source}:{imp.line}{', lazy' if imp.lazy else ''})"
                                            for imp in cycle])


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# --- the checker itself, on a package written here ----------------------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checker_sees_lazy_and_relative_imports_and_names_the_circle(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .sub.c import g\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import os\nfrom .. import a\nfrom ...nodes import x\n",
        "pkg/d.py": "from .a import b\n",  # into the circle, not part of it
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"]["pkg.sub.c"].lazy and not graph["pkg.a"]["pkg.b"].lazy
    cycles = find_cycles(graph)
    assert [[(i.source, i.target) for i in c] for c in cycles] == [
        [("pkg.a", "pkg.b"), ("pkg.b", "pkg.sub.c"), ("pkg.sub.c", "pkg.a")]]
    assert describe(cycles[0]) == "pkg.a -> pkg.b (pkg.a:1) -> pkg.sub.c (pkg.b:2, lazy) -> pkg.a (pkg.sub.c:2)"
    assert {i.target for i in all_imports(tmp_path, "pkg") if i.source == "pkg.sub.c"} == {"os", "pkg.a", "nodes"}


def test_the_checker_finds_a_circle_of_two(tmp_path):
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/x.py": "import pkg.y\n",
                             "pkg/y.py": "def f():\n    from pkg.x import z\n"})
    assert [describe(c) for c in find_cycles(import_graph(tmp_path, "pkg"))] == [
        "pkg.x -> pkg.y (pkg.x:1) -> pkg.x (pkg.y:2, lazy)"]


# --- the rules, on dopsd_core -------------------------------------------------------------------------------------
def test_no_import_circles_in_the_package():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles in dopsd_core:\n" + "\n".join(describe(c) for c in cycles)


def test_the_package_never_imports_the_lab_the_nodes_or_the_tools():
    """experiments/, nodes/ and tools/ import dopsd_core, never the other way round: an installed
    package has none of them (pip installs dopsd_core alone)."""
    bad = [str(i) for i in all_imports() if any(under(i.target, n) for n in NEVER)]
    assert not bad, "\n".join(bad)


def test_comfyui_is_imported_inside_functions_only():
    modules = package_modules()
    assert MODULE_LEVEL_COMFY <= modules.keys(), "a module-level exception names a module that is gone"
    bad = [str(i) for i in all_imports() if not i.lazy and i.source not in MODULE_LEVEL_COMFY
           and any(under(i.target, c) for c in COMFY)]
    assert not bad, "ComfyUI imported at module level:\n" + "\n".join(bad)


CLI_DOOR = ("dopsd_core.cli", "dopsd_core.hosts.headless")  # the CLI runs the ComfyUI families through it


def test_nothing_below_hosts_imports_hosts():
    bad = [str(i) for i in all_imports() if under(i.target, HOSTS) and not under(i.source, HOSTS)
           and not ((i.source, i.target) == CLI_DOOR and i.lazy)]
    assert not bad, "hosts/ is the top of the package; these import it from below:\n" + "\n".join(bad)


def test_the_training_core_imports_nothing_from_the_toy_package():
    assert set(CORE) <= package_modules().keys(), "CORE names a module that is gone"
    bad = [str(i) for i in all_imports() if i.source in CORE and under(i.target, TOY)]
    assert not bad, "the training core depends on the toy:\n" + "\n".join(bad)
