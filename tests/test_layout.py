"""The package layout is the architecture: these rules are read from the imports (AST), so a
change that breaks one fails CI instead of waiting for review.

- stage packages (data, synth, model, train, evaluate, registry) import each other without cycles;
- data/ is the bottom stage: it never imports model/, train/, evaluate/ or registry/;
- train/ never imports registry/ (training knows nothing of MLflow's registry);
- nothing in riskva_core imports Dagster; modules stay short enough to read.
Lazy imports inside functions count: they are dependencies all the same.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "riskva_core"
STAGES = ("data", "synth", "model", "train", "evaluate", "registry")
FORBIDDEN = {
    "data": {"model", "train", "evaluate", "registry", "synth"},
    "synth": {"model", "train", "evaluate", "registry"},
    "train": {"registry", "evaluate"},
    "model": {"train", "evaluate", "registry"},
}
MAX_LINES = 450


def _imports(path: Path, root: Path = CORE.parent) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "riskva_core" and len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return None


def _modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _stage_graph() -> dict[str, dict[str, list[str]]]:
    """stage → imported stage → the files that make the edge."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in _modules():
        src = _stage("riskva_core." + ".".join(path.relative_to(CORE).with_suffix("").parts))
        if src is None:
            continue
        for module in _imports(path):
            dst = _stage(module)
            if dst is not None and dst != src:
                graph[src][dst].append(str(path.relative_to(CORE.parent)))
    return graph


def test_every_stage_is_a_package_and_the_rules_name_real_stages():
    for stage in STAGES:
        assert (CORE / stage / "__init__.py").is_file(), f"riskva_core/{stage}/ is not a package"
    assert set(FORBIDDEN) <= set(STAGES)
    # the graph is not vacuous: the reader sees the edges that exist
    graph = _stage_graph()
    assert "data" in graph["train"] and "model" in graph["train"]
    assert "evaluate" in graph["registry"]


def test_forbidden_stage_imports():
    graph = _stage_graph()
    bad = [f"{src} → {dst} ({', '.join(sorted(set(files)))})"
           for src, banned in FORBIDDEN.items() for dst, files in graph[src].items() if dst in banned]
    assert not bad, "stage import rules broken:\n" + "\n".join(bad)


def test_no_import_cycles_between_stages():
    graph = {src: set(dsts) for src, dsts in _stage_graph().items()}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(" → ".join(trail[trail.index(node):] + [node]))
            return
        visiting.add(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        visiting.discard(node)
        done.add(node)

    for stage in STAGES:
        visit(stage, [])
    assert not cycles, "import cycles between stage packages: " + "; ".join(cycles)


def test_core_never_imports_dagster():
    offenders = [str(p.relative_to(CORE.parent)) for p in _modules()
                 if any(m == "dagster" or m.startswith(("dagster.", "dagster_")) for m in _imports(p))]
    assert not offenders, f"riskva_core must stay free of Dagster: {offenders}"


def test_modules_stay_readable():
    long = {str(p.relative_to(CORE.parent)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_the_rule_reader_sees_lazy_and_relative_imports(tmp_path):
    # The checker itself: an import inside a function and a relative import both count.
    probe = tmp_path / "riskva_core" / "data" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ..registry import client\n    import riskva_core.train.sft\n", encoding="utf-8")
    found = _imports(probe, root=tmp_path)
    assert "riskva_core.registry" in found and "riskva_core.train.sft" in found
