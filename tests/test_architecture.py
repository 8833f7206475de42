"""The layering rules of docs/ARCHITECTURE.md, checked on the source with ``ast``:

- no import cycle among the project's modules (``src/rankwise`` and ``kernels/``), counting the
  imports inside functions too (a lazy import is still a dependency: it only hides the cycle);
- no module imports a private (``_name``) name from another module of the project;
- the study (``rankwise.world``, ``rankwise.demo``, ``rankwise.analysis``, ``rankwise.study``) sits on top: the library never
  imports it, and it uses only the library's public names;
- the kernels import nothing from ``rankwise`` outside ``rankwise.kernels`` (they are the bottom layer).

The module graph is built from the files, not by importing them, so the test needs no GPU and no
optional dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ("rankwise.world", "rankwise.demo", "rankwise.analysis", "rankwise.study")


def in_study(module: str) -> bool:
    """Whether ``module`` is one of the study's packages or inside one (``rankwise.study_tasks`` is not)."""
    return any(module == p or module.startswith(p + ".") for p in STUDY)


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module rankwise installs (``kernels/`` is ``rankwise.kernels``)."""
    mods = {}
    for base, prefix in ((ROOT / "src" / "rankwise", "rankwise"), (ROOT / "kernels", "rankwise.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    mods["rankwise._C"] = ROOT / "csrc"  # the C++ extension: a leaf, it imports nothing of ours
    return mods


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path, mods: dict[str, Path]):
    """(imported project module, imported names, line) for each import statement in the module, lazy ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = _package_of(name, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name.replace("kernels.", "rankwise.kernels.", 1) if alias.name.startswith(
                    "kernels.") else alias.name
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target:
                    yield target, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
                if source == "kernels" or source.startswith("kernels."):
                    source = "rankwise." + source
            if source not in mods:
                continue
            names = [a.name for a in node.names]
            attrs = [n for n in names if f"{source}.{n}" not in mods]
            if attrs:  # names defined by (or re-exported from) the module itself
                yield source, attrs, node.lineno
            for n in names:  # ``from pkg import submodule``: a dependency on the submodule alone
                if f"{source}.{n}" in mods:
                    yield f"{source}.{n}", [], node.lineno


@pytest.fixture(scope="module")
def graph():
    mods = project_modules()
    edges = {m: {} for m in mods}
    private = []
    for name, path in mods.items():
        if path.is_dir():
            continue
        for target, names, line in imports(name, path, mods):
            if target != name:
                edges[name].setdefault(target, line)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != name and f"{target}.{n}" not in mods:
                    private.append(f"{path.relative_to(ROOT)}:{line} imports {n} from {target}")
    return mods, edges, private


def strongly_connected(edges):
    """Tarjan's algorithm, iterative: the components with more than one module (cycles)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_graph_sees_the_imports_it_should(graph):
    """Guards the checker itself: known edges, lazy and relative ones included, are found."""
    mods, edges, _ = graph
    assert "rankwise.kernels.lora_linear" in mods and "rankwise.analysis.runs" in mods
    assert "rankwise.kernels.lora_linear" in edges["rankwise.lora"]  # from rankwise.kernels import lora_linear
    assert "rankwise.kernels.utils" in edges["rankwise.kernels.lora_linear"]  # from .utils import ...
    assert "rankwise.train" in edges["rankwise.demo.run"]           # a lazy import inside a function
    assert strongly_connected({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_cycles(graph):
    _, edges, _ = graph
    cycles = strongly_connected(edges)
    detail = ["; ".join(f"{m} -> {t} (line {edges[m][t]})" for m in comp for t in edges[m] if t in comp)
              for comp in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_no_private_names_cross_modules(graph):
    _, _, private = graph
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def test_the_library_never_imports_the_study(graph):
    _, edges, _ = graph
    bad = [f"{m} -> {t}" for m, ts in edges.items() if not in_study(m) and m not in ("rankwise.cli",)
           for t in ts if in_study(t)]
    assert not bad, "library modules importing the study: " + ", ".join(bad)


def test_the_kernels_are_the_bottom_layer(graph):
    _, edges, _ = graph
    bad = [f"{m} -> {t}" for m, ts in edges.items() if m.startswith("rankwise.kernels")
           for t in ts if not t.startswith("rankwise.kernels")]
    assert not bad, "kernels importing the layers above them: " + ", ".join(bad)
