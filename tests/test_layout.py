"""Packaging and layering: the pass library installs as ``graphopt.passes`` (no top-level
``passes``), the core never imports it except through the one loader, and no import cycle
comes back. Imports inside functions count too; ``if TYPE_CHECKING:`` imports do not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
LOADER = "graphopt.passbase"  # passbase.pass_library() is the one place that loads the library
# lazy imports that close a loop on purpose, each with its reason
ALLOWED = {
    (LOADER, "graphopt.passes"): "the loader: registry() imports the library on first use",
}


def _module(p: Path) -> str:
    parts = list(p.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["graphopt", "passes"] + parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str]):
    """Every module of ours that ``tree`` imports (skipping ``if TYPE_CHECKING:`` blocks)."""
    pkg = module if is_pkg else module.rsplit(".", 1)[0]

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            yield child
            yield from walk(child)

    for node in walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            names = subs or [base]
        for t in names:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module and not module.startswith(t + "."):  # a package's own parents run anyway
                yield t


def import_graph() -> nx.DiGraph:
    files = list((ROOT / "graphopt").rglob("*.py")) + list((ROOT / "passes").rglob("*.py"))
    mods = {_module(p): p for p in files}
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for m, p in mods.items():
        for t in _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", set(mods)):
            g.add_edge(m, t)
    return g


def test_core_imports_the_pass_library_only_through_the_loader():
    g = import_graph()
    offenders = [(a, b) for a, b in g.edges if b.startswith("graphopt.passes") and not a.startswith("graphopt.passes")
                 and (a, b) not in ALLOWED]
    assert offenders == []


def test_no_import_cycle():
    g = import_graph()
    g.remove_edges_from([e for e in ALLOWED if g.has_edge(*e)])
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert cycles == []


def test_the_checker_sees_a_cycle():
    """The checks above can fail: a lazy import from the IR up into the pass library is caught."""
    g = import_graph()
    g.add_edge("graphopt.ir", "graphopt.passes.quantize")
    assert any(len(c) > 1 for c in nx.strongly_connected_components(g))


def test_installed_as_graphopt_passes_without_a_top_level_passes(tmp_path):
    code = ("import importlib.util, graphopt.passes as p, pathlib;"
            "print(importlib.util.find_spec('passes') is None, pathlib.Path(p.__file__).parent.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "passes"]


def _scheme_class_names() -> set[str]:
    from graphopt.quantizers import Quantizer, schemes

    names, todo = set(), list(schemes().values())
    while todo:  # the registered schemes and every class between them and Quantizer
        cls = todo.pop()
        if cls is not Quantizer and issubclass(cls, Quantizer) and cls.__name__ not in names:
            names.add(cls.__name__)
            todo.extend(cls.__mro__[1:])
    return names


def quantizer_rule_offenders(files) -> list[str]:
    """Where a pass reaches past the ``Quantizer`` interface: it imports a concrete scheme class or
    a scheme's own module, or probes a quantizer with getattr/hasattr for one of the interface's
    attributes (the interface has them all, with defaults)."""
    from graphopt.quantizers import Quantizer

    classes = _scheme_class_names()
    interface = {n for n in dir(Quantizer) if not n.startswith("__")}
    from graphopt.quantizers import schemes

    # every module that defines a scheme class (one per scheme, plus the zoo's shared base)
    scheme_modules = {c.__module__ for c in schemes().values()} | {"graphopt.quantizers.zoo"}
    out = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphopt.quantizers"):
                if node.module in scheme_modules:
                    out.append(f"{p.name}: imports {node.module}")
                out += [f"{p.name}: imports scheme class {a.name}" for a in node.names if a.name in classes]
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in interface):
                out.append(f"{p.name}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return out


def test_passes_ask_quantizers_through_the_interface_only():
    assert quantizer_rule_offenders(sorted((ROOT / "passes").glob("*.py"))) == []


def test_the_quantizer_rule_sees_a_leak(tmp_path):
    leak = tmp_path / "leaky.py"
    leak.write_text("from graphopt.quantizers import Uniform\nfrom graphopt.quantizers.zoo import Pow2\n"
                    "def f(q):\n    return getattr(q, 'bit_range', (1, 16))\n")
    assert quantizer_rule_offenders([leak]) == ["leaky.py: imports scheme class Uniform",
                                                "leaky.py: imports graphopt.quantizers.zoo",
                                                "leaky.py: imports scheme class Pow2", "leaky.py:4: getattr(..., 'bit_range')"]
