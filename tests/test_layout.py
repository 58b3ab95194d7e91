"""The package layout is the architecture: these rules are read from the imports (AST), so a
change that breaks one fails CI instead of waiting for review.

- stage packages (data, synth, model, train, evaluate, registry) import each other without cycles;
- data/ is the bottom stage: it never imports model/, train/, evaluate/ or registry/;
- train/ never imports registry/ (training knows nothing of MLflow's registry);
- launch/ (how a training job is started) may use data/, model/ and train/; no stage imports launch/;
- feedback/ (the loop from the field) may use data/, model/, evaluate/ and registry/; nothing in
  riskva_core imports feedback/ (only riskva_assets does: it closes the loop, nothing depends on it);
- nothing in riskva_core imports Dagster, dagster_pipes included (the rank entry that reports
  through it is riskva_assets/pipes_rank.py); modules stay short enough to read;
- the module import graph of riskva_core and riskva_assets has no cycle;
- no underscore (private) method or module of dagster, dagster-ray or dagster-k8s is overridden,
  called or imported: an upgrade would break it silently.
Lazy imports inside functions count: they are dependencies all the same.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "riskva_core"
STAGES = ("data", "synth", "model", "train", "evaluate", "registry", "launch", "feedback")
FORBIDDEN = {
    "data": {"model", "train", "evaluate", "registry", "synth", "launch", "feedback"},
    "synth": {"model", "train", "evaluate", "registry", "launch", "feedback"},
    "train": {"registry", "evaluate", "launch", "feedback"},
    "model": {"train", "evaluate", "registry", "launch", "feedback"},
    "evaluate": {"launch", "feedback"},
    "registry": {"launch", "feedback"},
    "launch": {"evaluate", "registry", "synth", "feedback"},
    "feedback": {"synth", "train", "launch"},
}
DAGSTER_LIBS = ("dagster", "dagster_ray", "dagster_k8s")
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


def test_only_the_dagster_layer_imports_feedback():
    """feedback/ closes the loop: shared modules (cli, paths, ...) do not reach into it either."""
    offenders = [str(p.relative_to(CORE.parent)) for p in _modules()
                 if _stage("riskva_core." + ".".join(p.relative_to(CORE).with_suffix("").parts)) != "feedback"
                 and any(m == "riskva_core.feedback" or m.startswith("riskva_core.feedback.") for m in _imports(p))]
    assert not offenders, f"only riskva_assets may import riskva_core.feedback: {offenders}"
    assert "data" in _stage_graph()["feedback"]  # not vacuous: feedback is read


def test_core_never_imports_dagster():
    def dagster(module: str) -> bool:  # dagster, dagster_pipes, dagster_ray, dagster_k8s, ...
        return module == "dagster" or module.startswith(("dagster.", "dagster_"))

    offenders = [str(p.relative_to(CORE.parent)) for p in _modules() if any(dagster(m) for m in _imports(p))]
    assert not offenders, f"riskva_core must stay free of Dagster (Pipes included): {offenders}"
    # Not vacuous: the Pipes code lives in riskva_assets, and the rank entry there imports no dagster
    # (each rank would load the whole Dagster package for nothing).
    rank_entry = _imports(CORE.parent / "riskva_assets" / "pipes_rank.py")
    assert "dagster_pipes" in rank_entry and not any(m == "dagster" or m.startswith("dagster.") for m in rank_entry)


def _module_graph() -> dict[str, set[str]]:
    """module → the riskva_core/riskva_assets modules it imports (a package import names its __init__)."""
    files = [*_modules(), *sorted((CORE.parent / "riskva_assets").rglob("*.py"))]
    names = {".".join(p.relative_to(CORE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {}
    for name, path in names.items():
        deps = set()
        for module in _imports(path):
            while module and module not in names:  # `from pkg.mod import name`: the module is the prefix
                module = module.rpartition(".")[0]
            if module and module != name:
                deps.add(module)
        graph[name] = deps
    return graph


def test_no_import_cycle_between_modules():
    graph = _module_graph()
    assert "riskva_assets.launch_resources" in graph["riskva_assets.resources"]  # not vacuous
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycles.append(" → ".join(trail[trail.index(node):] + [node]))
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])
    # a package's __init__ importing its own submodules is how packages work, not a cycle of design
    cycles = [c for c in cycles if not all(m.startswith(c.split(" → ")[0] + ".") for m in c.split(" → ")[1:-1])]
    assert not cycles, "import cycles: " + "; ".join(cycles)


def _private_uses(path: Path) -> list[str]:
    """Underscore names of dagster, dagster-ray or dagster-k8s that ``path`` imports, overrides or calls."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    upstream: set[str] = set()  # local names bound to those libraries' modules and classes
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in DAGSTER_LIBS:
                    upstream.add(alias.asname or alias.name.split(".")[0])
                    if any(p.startswith("_") for p in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in DAGSTER_LIBS:
            upstream.update(alias.asname or alias.name for alias in node.names)
            private = [n for n in [*node.module.split("."), *(a.name for a in node.names)] if n.startswith("_")]
            if private:
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(private)}")

    def private(name: str) -> bool:
        return name.startswith("_") and not name.endswith("__")

    def rooted_upstream(expr: ast.AST) -> bool:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return isinstance(expr, ast.Name) and expr.id in upstream

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(rooted_upstream(b) for b in node.bases):
            found += [f"line {f.lineno}: {node.name}.{f.name} overrides a private method"
                      for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(f.name)]
            found += [f"line {n.lineno}: super().{n.attr} in {node.name}" for n in ast.walk(node)
                      if isinstance(n, ast.Attribute) and private(n.attr) and isinstance(n.value, ast.Call)
                      and getattr(n.value.func, "id", "") == "super"]
        elif isinstance(node, ast.Attribute) and private(node.attr) and rooted_upstream(node.value):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_no_private_dagster_api_is_overridden_called_or_imported():
    files = [*_modules(), *sorted((CORE.parent / "riskva_assets").rglob("*.py"))]
    bad = {str(p.relative_to(CORE.parent)): uses for p in files if (uses := _private_uses(p))}
    assert not bad, f"private dagster/dagster-ray/dagster-k8s APIs used (public extension points only): {bad}"


def test_the_private_api_reader_sees_overrides_calls_and_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import dagster as dg\nfrom dagster._core.errors import X\nfrom dagster_ray import PipesRayJobClient\n"
                     "class C(PipesRayJobClient):\n    def _terminate(self, c, j):\n        super()._terminate(c, j)\n"
                     "    def _mine(self):\n        return dg._check\n", encoding="utf-8")
    found = " ".join(_private_uses(probe))
    assert "dagster._core.errors" in found and "C._terminate overrides" in found and "C._mine" in found
    assert "super()._terminate in C" in found and "._check" in found


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
