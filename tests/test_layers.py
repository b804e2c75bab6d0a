"""The layer rule, read from the source (docs/architecture.md section 2, issue 27).

Every `.py` file of the parts is parsed with `ast`; every import counts, at module level or inside a
function (a lazy import that points up is still a back-edge), relative imports resolved. Two rules:

* a module imports only its own part or lower ones: planner < comm < runtime < rl < config < bench
  < launch, where `config` is the single module `pliant.config` (the job-config schema, shared by
  bench and launch); nothing imports launch;
* within one part, modules import each other without a cycle.

A failure names the file, the line and the import.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Lowest first. Each entry: layer name, its import prefix, its folder or file relative to the repo.
LAYERS: tuple[tuple[str, str, str], ...] = (
    ("planner", "pliant.planner", "planner"),
    ("comm", "pliant.comm", "comm"),
    ("runtime", "pliant.runtime", "runtime"),
    ("rl", "pliant.rl", "rl"),
    ("config", "pliant.config", "pliant/config.py"),
    ("bench", "pliant.bench", "bench"),
    ("launch", "pliant.launch", "launch"),
)
# Below every layer, importable by all: the namespace package itself, its file helpers (atomic
# writes, strict JSON: standard library only) and the bundled YAML files.
BASE: tuple[tuple[str, str], ...] = (("pliant", "pliant/__init__.py"), ("pliant.io", "pliant/io.py"),
                                     ("pliant.configs", "configs"))


@dataclass(frozen=True)
class Import:
    """One imported pliant module, as written at one place in the source."""

    source: str  # importing module, e.g. pliant.launch.cli
    target: str  # imported module, resolved to the most specific known module
    file: str  # path relative to the root
    line: int
    text: str  # the import statement, as written

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def _module_name(prefix: str, rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([prefix, *parts])


def collect_modules(root: Path, layers=LAYERS, base=BASE) -> dict[str, tuple[Path, str]]:
    """Module name -> (file, layer name) for every .py file of the parts ('' is the base layer)."""
    modules: dict[str, tuple[Path, str]] = {}
    places = [*layers, *[("", prefix, where) for prefix, where in base]]
    for layer, prefix, where in places:
        path = root / where
        if path.is_file():
            modules[prefix] = (path, layer)
        elif path.is_dir():
            for f in sorted(path.rglob("*.py")):
                if "__pycache__" not in f.parts:
                    modules[_module_name(prefix, f.relative_to(path))] = (f, layer)
    return modules


def layer_of(module: str, layers=LAYERS, base=BASE) -> str | None:
    """The layer of a pliant module name ('' for the base); None for a name outside every part."""
    best, best_len = None, -1
    for name, prefix in [(n, p) for n, p, _ in layers] + [("", p) for p, _ in base]:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = name, len(prefix)
    return best


def _statement_text(source: str, node: ast.stmt) -> str:
    return " ".join((ast.get_source_segment(source, node) or ast.unparse(node)).split())


def imports_of(module: str, path: Path, root: Path, known: set[str]) -> tuple[list[Import], list[str]]:
    """The pliant modules `module` imports (anywhere in the file), and the names it imports that do
    not exist (a stale path after a move)."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    rel = str(path.relative_to(root))
    found: list[Import] = []
    unknown: list[str] = []

    def add(name: str, node: ast.stmt) -> None:
        if name != "pliant" and not name.startswith("pliant."):
            return
        # the most specific module that exists: `pliant.rl.task.TaskSpec` -> `pliant.rl.task`
        target = name
        while target not in known and "." in target:
            target = target.rpartition(".")[0]
        if target == "pliant" and name != "pliant":
            unknown.append(f"{rel}:{node.lineno}: {_statement_text(source, node)} (no module {name})")
            return
        if target != module and (target, node.lineno) not in {(f.target, f.line) for f in found}:
            found.append(Import(module, target, rel, node.lineno, _statement_text(source, node)))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                if node.level - 1 > len(anchor) - 1:
                    unknown.append(f"{rel}:{node.lineno}: {_statement_text(source, node)} (beyond the top package)")
                    continue
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base_name = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                # `from pkg import submodule` imports the submodule; `from mod import name` imports mod
                add(sub if sub in known else base_name, node)
    return found, unknown


@functools.lru_cache(maxsize=None)
def import_graph(root: Path, layers=LAYERS, base=BASE):
    """Every module of the parts, and every pliant import among them (parsed once per tree)."""
    modules = collect_modules(root, layers, base)
    known = set(modules)
    edges: list[Import] = []
    unknown: list[str] = []
    for module, (path, _) in sorted(modules.items()):
        found, missing = imports_of(module, path, root, known)
        edges += found
        unknown += missing
    return modules, edges, unknown


def back_edges(root: Path, layers=LAYERS, base=BASE) -> list[str]:
    """Imports of a higher layer, and imports of pliant modules that do not exist."""
    rank = {name: i for i, (name, _, _) in enumerate(layers)}
    rank[""] = -1
    modules, edges, unknown = import_graph(root, layers, base)
    problems = [f"{u}: unknown pliant module" for u in unknown]
    for e in edges:
        src, dst = modules[e.source][1], layer_of(e.target, layers, base)
        if dst is not None and rank[dst] > rank[src]:
            problems.append(f"{e.where()}  [{src or 'pliant'} imports higher layer {dst}: {e.target}]")
    return problems


def _strongly_connected(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on a long chain)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ.get(start, [])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, []))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def _shortest_cycle(start: str, succ: dict[str, list[str]], members: set[str]) -> list[str]:
    """A shortest cycle through `start` inside one strongly connected component (BFS)."""
    parent: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in succ.get(v, []):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in seen:
                    seen.add(w)
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def part_cycles(root: Path, layers=LAYERS, base=BASE) -> list[str]:
    """Import cycles among the modules of one part, each with its modules and import lines."""
    modules, edges, _ = import_graph(root, layers, base)
    problems = []
    for layer, _, _ in layers:
        members = sorted(m for m, (_, lay) in modules.items() if lay == layer)
        inside = [e for e in edges if modules[e.source][1] == layer and modules.get(e.target, (None, None))[1] == layer]
        succ: dict[str, list[str]] = {}
        for e in inside:
            succ.setdefault(e.source, [])
            if e.target not in succ[e.source]:
                succ[e.source].append(e.target)
        for comp in _strongly_connected(members, succ):
            if len(comp) < 2:
                continue
            comp_set = set(comp)
            cycle = _shortest_cycle(comp[0], succ, comp_set)
            lines = [f"    {e.where()}" for e in inside if e.source in comp_set and e.target in comp_set]
            problems.append(
                f"import cycle in {layer}: {' -> '.join(cycle)}\n"
                f"  modules: {', '.join(comp)}\n  imports among them:\n" + "\n".join(lines)
            )
    return problems


# ---------------------------------------------------------------------------------------------------
# The rule, on this repository.


def test_no_import_of_a_higher_layer():
    problems = back_edges(REPO)
    assert not problems, "imports that point up the layer stack (or at no module):\n" + "\n".join(problems)


def test_no_import_cycle_within_a_part():
    problems = part_cycles(REPO)
    assert not problems, "import cycles within a part:\n" + "\n".join(problems)


def test_every_part_is_scanned():
    modules = collect_modules(REPO)
    for layer, prefix, _ in LAYERS:
        assert any(lay == layer for _, lay in modules.values()), f"no module found for layer {layer} ({prefix})"
    assert len(modules) > 50


# ---------------------------------------------------------------------------------------------------
# The checker itself fails where it should (a synthetic tree).


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_reports_back_edges_lazy_and_relative(tmp_path):
    _tree(tmp_path, {
        "pliant/__init__.py": "",
        "pliant/config.py": "from pliant.rl import x\n",
        "planner/__init__.py": "",
        "planner/a.py": "import numpy\n\ndef f():\n    from pliant.runtime.b import g\n",
        "comm/__init__.py": "",
        "runtime/__init__.py": "",
        "runtime/b.py": "from .c import h\nfrom ..launch import cli\n",
        "runtime/c.py": "import pliant.config\n",
        "rl/__init__.py": "",
        "rl/x.py": "from pliant.planner.a import f\n",
        "bench/__init__.py": "",
        "bench/y.py": "from pliant.launch.gone import nothing\nfrom pliant.config import load\n",
        "launch/__init__.py": "",
        "launch/cli.py": "from pliant.bench import y\nfrom pliant.config import load\n",
    })
    problems = "\n".join(back_edges(tmp_path))
    assert "planner/a.py:4: from pliant.runtime.b import g" in problems  # lazy, inside a function
    assert "runtime/b.py:2: from ..launch import cli" in problems  # relative, resolved
    assert "runtime/c.py:1: import pliant.config" in problems  # runtime < config
    assert "bench/y.py:1: from pliant.launch.gone import nothing" in problems  # launch, and no such module
    for fine in ("pliant/config.py", "rl/x.py", "launch/cli.py", "from .c import h", "bench/y.py:2"):
        assert fine not in problems


def test_checker_reports_cycles_with_lines(tmp_path):
    _tree(tmp_path, {
        "pliant/__init__.py": "",
        "launch/__init__.py": "",
        "launch/a.py": "from pliant.launch.b import x\n",
        "launch/b.py": "def f():\n    from . import c\n",
        "launch/c.py": "import pliant.launch.a as a\n",
        "launch/d.py": "from pliant.launch import a\n",
        "rl/__init__.py": "",
        "rl/p.py": "from pliant.rl.q import y\n",
        "rl/q.py": "from pliant.rl.r import z\n",
        "rl/r.py": "",
    })
    problems = part_cycles(tmp_path)
    assert len(problems) == 1, problems
    text = problems[0]
    assert "import cycle in launch" in text
    assert "pliant.launch.a, pliant.launch.b, pliant.launch.c" in text
    assert "launch/b.py:2: from . import c" in text
    assert "launch/c.py:1: import pliant.launch.a as a" in text
    assert "launch/d.py" not in text
