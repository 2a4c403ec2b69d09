"""The shape of the package, checked on its real import graph (not on how code is spelled).

* the layers of ``.importlinter`` (the one statement of them): no module imports a higher
  layer or an independent sibling, and every module sits in a layer;
* no import circles between modules;
* one import path per name: nothing imports a package name through a module that only
  imported it (package ``__init__`` files are the public surfaces that may);
* every module under 500 lines;
* ``lint-imports`` and ``ruff`` agree where they are installed (the ``test`` extra).

The graph holds every import, also those inside functions, and leaves out ``if
TYPE_CHECKING:`` blocks (never run), as ``lint-imports`` does with this configuration.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_mohge"
CONTRACTS = ROOT / ".importlinter"
MAX_LINES = 500


# ----------------------------------------------------------------------------- the graph
def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """importer -> {imported module: line}; ``from a import b`` imports ``a.b`` when that is a
    module, else ``a`` (what ``grimp``, behind ``lint-imports``, records)."""
    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                imported = owner(target) if target.startswith(PACKAGE) else ""
                if imported and imported != module:
                    edges.setdefault(imported, node.lineno)
    return graph


# ------------------------------------------------------------------------- the contract
def read_layers(path: Path = CONTRACTS):
    """``(layers, ignored)`` of the layers contract: layers highest first, each a list of
    ``(modules, independent)`` -- ``independent`` when the layer's modules are ``|``-separated
    -- and the ignored ``(importer, imported)`` pairs."""
    section, key, values = None, None, {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "importlinter:contract:layers":
            if not raw[0].isspace():
                key, _, first = line.partition("=")
                key = key.strip()
                values[key] = [first.strip()] if first.strip() else []
            else:
                values[key].append(line.strip())
    layers = []
    for entry in values["layers"]:
        independent = "|" in entry
        names = [n.strip() for n in entry.replace("|", ":").split(":")]
        layers.append((names, independent))
    ignored = {tuple(s.strip() for s in e.split("->")) for e in values.get("ignore_imports", [])}
    return layers, ignored


def _place(module: str, layers) -> tuple[int, str] | None:
    """``(layer index, the layer entry holding module)``, by the longest matching name."""
    best = None
    for i, (names, _) in enumerate(layers):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (i, name)
    return best


def layer_violations(graph, layers, ignored) -> list[str]:
    out = []
    for importer, edges in sorted(graph.items()):
        a = _place(importer, layers)
        for imported, line in sorted(edges.items()):
            b = _place(imported, layers)
            if a is None or b is None or (importer, imported) in ignored:
                continue
            upward = b[0] < a[0]
            sideways = (b[0] == a[0] and a[1] != b[1] and layers[a[0]][1])
            if upward or sideways:
                why = "a higher layer" if upward else "an independent sibling"
                out.append(f"{importer}:{line} imports {imported} ({why})")
    return out


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


@pytest.fixture(scope="module")
def modules():
    return package_modules()


@pytest.fixture(scope="module")
def graph(modules):
    return import_graph(modules)


def test_no_module_imports_a_higher_layer(graph):
    layers, ignored = read_layers()
    bad = layer_violations(graph, layers, ignored)
    assert not bad, "\n".join(bad)


def test_every_module_sits_in_a_layer(modules):
    layers, _ = read_layers()
    loose = [m for m in modules if m != PACKAGE and _place(m, layers) is None]
    assert not loose, f"place these in .importlinter's layers: {loose}"


def test_no_import_circles(graph):
    assert not cycles(graph), cycles(graph)


def test_the_checks_catch_a_violation(tmp_path):
    """A library module that imports cli/, and a circle, are found (the checks can fail)."""
    pkg = tmp_path / PACKAGE
    for sub in ("cli", "bench", "config"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "tool.py").write_text("from megatron_mohge.bench import runner\n")
    (pkg / "bench" / "runner.py").write_text(
        "def f():\n    from megatron_mohge.cli.tool import main\n")
    (pkg / "config" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import b\n"
        "if TYPE_CHECKING:\n    from megatron_mohge.cli import tool\n")
    (pkg / "config" / "b.py").write_text("from megatron_mohge.config.a import x\n")
    g = import_graph(package_modules(tmp_path))
    layers = [(["megatron_mohge.cli"], False), (["megatron_mohge.bench"], False),
              (["megatron_mohge.config"], False)]
    assert layer_violations(g, layers, set()) == [
        "megatron_mohge.bench.runner:2 imports megatron_mohge.cli.tool (a higher layer)"]
    assert cycles(g) == [["megatron_mohge.bench.runner", "megatron_mohge.cli.tool"],
                         ["megatron_mohge.config.a", "megatron_mohge.config.b"]]


# -------------------------------------------------------------- one import path per name
def _bound_by_import(path: Path) -> dict[str, str]:
    """Top-level names ``path`` binds by importing them from the package (name -> source)."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
            out.update({a.asname or a.name: node.module for a in node.names})
    return out


def imports_through(modules: dict[str, Path], files, root: Path = ROOT) -> list[str]:
    """``file:line: name via module`` where ``name`` is taken from a non-package module of
    the package that did not define it but imported it from elsewhere in the package."""
    relays = {m: _bound_by_import(p) for m, p in modules.items() if p.name != "__init__.py"}
    out = []
    for path in files:
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> relay module, for ``from pkg import module`` / ``as``
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in relays:
                        aliases[a.asname or a.name] = full
                    elif a.name in relays.get(node.module, {}):
                        out.append(f"{path.relative_to(root)}:{node.lineno}: {a.name} via "
                                   f"{node.module} (from {relays[node.module][a.name]})")
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names
                                if a.asname and a.name in relays})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases
                    and node.attr in relays[aliases[node.value.id]]):
                relay = aliases[node.value.id]
                out.append(f"{path.relative_to(root)}:{node.lineno}: {node.attr} via {relay} "
                           f"(from {relays[relay][node.attr]})")
    return sorted(set(out))


def python_files(root: Path = ROOT) -> list[Path]:
    """The files whose imports are checked: package, tests, examples, scripts."""
    return [p for d in (PACKAGE, "tests", "examples", "scripts")
            for p in sorted((root / d).rglob("*.py"))]


def fake_package(tmp_path: Path, modules: dict[str, str], user: str) -> tuple[dict, Path]:
    """A package ``megatron_mohge`` of ``modules`` (name -> source) under ``tmp_path`` and a
    file ``user.py`` importing from it: (package_modules, user file)."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, source in modules.items():
        (pkg / f"{name}.py").write_text(source)
    (tmp_path / "user.py").write_text(user)
    return package_modules(tmp_path), tmp_path / "user.py"


def test_one_import_path_per_name(modules):
    found = imports_through(modules, python_files())
    assert not found, "import these from where they are defined:\n" + "\n".join(found)


def test_the_relay_check_catches_a_relay(tmp_path):
    mods, user = fake_package(
        tmp_path, {"home": "def f():\n    pass\n", "relay": "from megatron_mohge.home import f\n"},
        "from megatron_mohge.relay import f\nfrom megatron_mohge import relay\nrelay.f()\n")
    found = imports_through(mods, [user], root=tmp_path)
    assert found == ["user.py:1: f via megatron_mohge.relay (from megatron_mohge.home)",
                     "user.py:3: f via megatron_mohge.relay (from megatron_mohge.home)"]


def _top_level_names(path: Path) -> set[str] | None:
    """Names ``path`` binds at module level (inside top-level if / try blocks too); None when
    it defines a module ``__getattr__`` (lazy names: not checkable statically)."""
    names: set[str] = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
                         + [b for h in getattr(node, "handlers", []) for b in h.body])
    return names


def unresolved_imports(modules: dict[str, Path], files, root: Path = ROOT) -> list[str]:
    """``file:line: module.name`` for every ``from <package module> import name`` whose module
    neither binds ``name`` nor has a submodule of that name (a rename that missed a user:
    the importing module fails only when it is imported)."""
    defined = {m: _top_level_names(p) for m, p in modules.items()}
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0
                    and (node.module or "").split(".")[0] == PACKAGE):
                continue
            names = defined.get(node.module, set())  # a module that does not exist: set()
            for a in node.names:
                if a.name == "*" or f"{node.module}.{a.name}" in modules:
                    continue
                if names is not None and a.name not in names:
                    out.append(f"{path.relative_to(root)}:{node.lineno}: {node.module}.{a.name}")
    return sorted(set(out))


def test_every_package_import_names_something_that_exists(modules):
    found = unresolved_imports(modules, python_files())
    assert not found, "these names are not defined where they are imported from:\n" + "\n".join(
        found)


def test_the_import_check_catches_a_renamed_name(tmp_path):
    mods, user = fake_package(
        tmp_path, {"fmt": "def as_number(v):\n    return v\nif True:\n    X = 1\n"},
        "from megatron_mohge.fmt import _num\nfrom megatron_mohge.fmt import X\n"
        "from megatron_mohge import fmt\nfrom megatron_mohge.gone import y\n")
    found = unresolved_imports(mods, [user], root=tmp_path)
    assert found == ["user.py:1: megatron_mohge.fmt._num", "user.py:4: megatron_mohge.gone.y"]


# ---------------------------------------------------------------------------- size
def test_modules_stay_under_500_lines(modules):
    over = {m: n for m, p in modules.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not over, f"split these modules (lines): {over}"


# ------------------------------------------------------------------ the tools, if present
def _tool(name: str) -> str:
    """The ``name`` script of this interpreter's environment (or on PATH); skip without it."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e .[test])")
    return found


def test_lint_imports_keeps_the_contracts():
    proc = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_finds_nothing():
    """pyflakes' checks (unused / undefined names, redefinitions) over the whole tree; the
    rules are ``[tool.ruff]`` in pyproject.toml."""
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
