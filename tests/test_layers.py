"""Which way prunescope's imports point (issue #18): every import goes to a lower layer.

The modules are parsed with :mod:`ast` (imports inside functions included, ``if TYPE_CHECKING:`` blocks
excluded: they never run) and four things are checked:

* every import between subpackages (``prunescope.<first name>``) points to a lower layer of :data:`LAYERS`
  (the README's "Architecture" diagram), so there is no cycle either;
* function-local imports of prunescope modules outside the CLI (``cli.py``, ``commands/``), which hide
  the real import graph from a reader of the module's import block, stay under a small ceiling;
* no private name (``_x``) is imported from another subpackage.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import prunescope

ROOT = Path(prunescope.__file__).parent

#: the layers, lowest first; a subpackage imports only from layers below its own (one layer may hold several
#: subpackages that do not import each other)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",), ("_io",), ("ops",), ("graph",), ("topology",), ("masks",), ("removal",), ("flops", "narrow"),
    ("sensitivity", "knapsack"), ("report", "examples"), ("commands",), ("cli",),
)
#: Function-local prunescope imports outside the CLI: 93 before session 15, 67 after it, 1 since session 16
#: (flops/counter.py reaches flops/effective.py, which builds on the counter). Never raise it.
MAX_LOCAL_IMPORTS = 1
MAX_PRIVATE_IMPORTS = 0


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (``from ..x import y`` inside ``mod``)."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, inside a function) for every import that runs, skipping ``if TYPE_CHECKING:`` blocks."""
    def walk(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    yield from walk(ast.Module(body=[c], type_ignores=[]), local)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            yield from walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.Lambda)))
    yield from walk(tree, False)


def _subpackage(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def measure():
    """(edges between subpackages, function-local imports, private cross-package imports)."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    local: list[str] = []
    private: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(ROOT).as_posix()
        in_cli = rel == "cli.py" or rel.startswith("commands/")
        for node, is_local in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                base = _resolve(mod, is_pkg, node)
                targets = [(base, a.name) for a in node.names]
            for target, name in targets:
                if target != "prunescope" and not target.startswith("prunescope."):
                    continue
                sub = ROOT.joinpath(*target.split(".")[1:], name or "")
                full = f"{target}.{name}" if name and (sub.with_suffix(".py").exists() or sub.is_dir()) else target
                src, dst = _subpackage(mod), _subpackage(full)
                where = f"{rel}:{node.lineno} {full}" + (f" import {name}" if name else "")
                if src and dst and src != dst:
                    edges[(src, dst)].append(where)
                if is_local and not in_cli and (not local or not local[-1].startswith(f"{rel}:{node.lineno} ")):
                    local.append(where)  # one per import statement
                if name and name.startswith("_") and not name.startswith("__") and src != dst:
                    private.append(where)
    return edges, local, private


def cycles(edges) -> set[tuple[str, str]]:
    """Pairs of subpackages that reach each other (a path both ways), each pair sorted."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)

    def reach(a):
        seen, todo = set(), [a]
        while todo:
            for n in graph[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    r = {a: reach(a) for a in list(graph)}
    return {tuple(sorted((a, b))) for a in r for b in r[a] if a != b and a in r.get(b, ())}


def _layer_graph(edges) -> str:
    out = defaultdict(set)
    for a, b in edges:
        out[a].add(b)
    return "\n".join(f"  {a or '(root)'} -> {', '.join(sorted(out[a]))}" for a in sorted(out))


def _rank(sub: str) -> int:
    for i, layer in enumerate(LAYERS):
        if sub in layer:
            return i
    raise AssertionError(f"subpackage {sub!r} is in no layer of LAYERS: add it (and to the README's diagram)")


def test_imports_point_down():
    edges, local, private = measure()
    graph = _layer_graph(edges)
    upward = [f"{a} -> {b}: {where[0]}" for (a, b), where in sorted(edges.items()) if _rank(b) >= _rank(a)]
    assert not upward, ("imports that do not point to a lower layer (move the thing imported down, or the "
                        "importer up):\n  " + "\n  ".join(upward) + f"\nlayer graph:\n{graph}")
    assert not cycles(edges)
    assert len(local) <= MAX_LOCAL_IMPORTS, (
        f"{len(local)} function-local prunescope imports outside the CLI (ceiling {MAX_LOCAL_IMPORTS}); move them "
        "to the import block (lazy imports are for optional third-party packages):\n  " + "\n  ".join(local)
        + f"\nlayer graph:\n{graph}")
    assert len(private) <= MAX_PRIVATE_IMPORTS, (
        f"{len(private)} private names imported across subpackages (ceiling {MAX_PRIVATE_IMPORTS}):\n  "
        + "\n  ".join(private) + f"\nlayer graph:\n{graph}")


def test_every_subpackage_has_a_layer():
    names = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert names == {n for layer in LAYERS for n in layer}


def test_the_measure_sees_what_it_claims_to():
    """The parser finds local imports, relative imports and cycles (guards the ratchet against a measure that
    always returns zero)."""
    edges, local, private = measure()
    assert edges, "no import between subpackages found: the parser is broken"
    assert ("report", "flops") in edges and ("narrow", "removal") in edges
    assert cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == {
        ("a", "b"), ("a", "c"), ("b", "c")}
    tree = ast.parse("from . import x\nif TYPE_CHECKING:\n    import prunescope.y\ndef f():\n    import prunescope.z\n")
    found = [(type(n).__name__, is_local) for n, is_local in _imports(tree)]
    assert found == [("ImportFrom", False), ("Import", True)]
