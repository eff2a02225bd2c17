"""No import circle inside ukmp: the static graph of every ``import`` / ``from ... import`` statement (module level
and inside functions alike) between ukmp modules has no cycle. ``from pkg import name`` counts as importing ``pkg``
and, when ``name`` is a module, ``pkg.name``."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def import_graph(src: Path) -> dict[str, set[str]]:
    mods = {}
    for p in (src / "ukmp").rglob("*.py"):
        name = ".".join(p.relative_to(src).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_is_not_vacuous():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_ukmp():
    graph = import_graph(SRC)
    assert len(graph) > 50 and graph["ukmp.io"] and graph["ukmp.prune.scoring"]  # the scan read the library
    assert cycles(graph) == []


# Lower layers never import higher ones: (importer prefix, imported prefix) pairs that must not occur.
FORBIDDEN = [("ukmp.data", "ukmp.eval"), ("ukmp.prune", "ukmp.baselines")]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    def under(mod: str, pkg: str) -> bool:
        return mod == pkg or mod.startswith(pkg + ".")

    return sorted((m, t) for m, ts in graph.items() for t in ts for lo, hi in FORBIDDEN if under(m, lo) and under(t, hi))


def test_layer_checker_is_not_vacuous():
    graph = {"ukmp.data.batches": {"ukmp.eval.text", "ukmp.data.textclean"}, "ukmp.prune": {"ukmp.baselines"},
             "ukmp.eval.text": {"ukmp.data.textclean"}, "ukmp.baselines.flap": {"ukmp.prune.methods"}}
    assert upward_imports(graph) == [("ukmp.data.batches", "ukmp.eval.text"), ("ukmp.prune", "ukmp.baselines")]


def test_no_upward_import_in_ukmp():
    """data never imports eval (the caption normaliser lives in ukmp.data.textclean), prune never imports the
    baselines (they register through the ``ukmp.methods`` entry points)."""
    assert upward_imports(import_graph(SRC)) == []


def test_prune_layer_finds_every_method_through_entry_points():
    """In a fresh interpreter, importing only the registry module finds UKMP and every baseline by name (the
    ``ukmp.methods`` entry points of the installed distribution), and marks the data-free ones."""
    import subprocess
    import sys

    code = ("import ukmp.prune.methods as m, sys; names = m.available_methods(); "
            "print(','.join(names)); print(m.is_data_free('magnitude_sp'), m.is_data_free('flap')); "
            "print('ukmp.baselines' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    names = set(out[0].split(","))
    assert {"ukmp", "random", "magnitude", "llm_pruner_global", "llm_pruner_local", "ecoflap_sp", "flap", "upop",
            "magnitude_sp", "wanda_sp"} <= names
    assert out[1] == "True False" and out[2] == "True"
