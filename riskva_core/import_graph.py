"""What code a piece of RisKVA really runs: the import graph read from the source with ``ast``.

Imports inside functions count as much as module-level ones: the code imports its heavy
dependencies where it uses them, which ``modulefinder`` style tracing of a module's top level
would miss. Two uses:

- Dagster code versions (riskva_assets/asset_metadata.py): an asset's version is a hash of the
  repository files its function reaches through imports, so the list cannot drift from the code;
- pinned requirements of a registered model (registry/client.py): the installed versions of the
  distributions the pyfunc's modules import.
"""
from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_PACKAGES = ("riskva_core", "riskva_assets")


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of a local module (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``), else None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(nodes: Iterable[ast.AST], module: str, is_package: bool, root: Path = REPO_ROOT) -> set[str]:
    """Fully qualified modules imported anywhere under ``nodes`` (relative imports resolved;
    ``from pkg import sub`` names the submodule when it is one)."""
    found: set[str] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, node.module] if node.module else anchor)
                else:
                    base = node.module or ""
                found.add(base)
                if base.split(".")[0] in LOCAL_PACKAGES:
                    found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", root))
    return found


def closure(modules: Iterable[str], root: Path = REPO_ROOT,
            follow: tuple[str, ...] = LOCAL_PACKAGES) -> tuple[set[Path], set[str]]:
    """(local source files, external top-level modules) reachable from ``modules`` through imports.

    A module brings its parent packages' ``__init__.py`` (Python runs them on import). Local
    modules outside ``follow`` (packages or modules) are counted but their imports not followed.
    """
    files: set[Path] = set()
    external: set[str] = set()
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        top = name.split(".")[0]
        if top not in LOCAL_PACKAGES:
            external.add(top)
            continue
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        file = module_file(name, root)
        if file is None:
            continue
        files.add(file)
        if not any(name == f or name.startswith(f + ".") for f in follow):
            continue
        todo.extend(_module_imports(file.read_bytes(), file, name, root))
    return files, external


# Every Dagster process (webserver, code server, daemon, each CLI call) computes all assets' code
# versions at import, and the assets' closures share most of riskva_core: one parse per file content
# and process, not one per asset (the import of the definitions went from 3.5 to 2.0 s of CPU). The
# key is the file's bytes, so an edited file is parsed again, even in a long-lived `dagster dev`.
@functools.lru_cache(maxsize=4096)
def _module_imports(source: bytes, file: Path, name: str, root: Path) -> frozenset[str]:
    tree = ast.parse(source, filename=str(file))
    return frozenset(imported_names([tree], name, file.name == "__init__.py", root))


def function_closure(file: Path, function: str, root: Path = REPO_ROOT,
                     follow: tuple[str, ...] = LOCAL_PACKAGES) -> tuple[set[Path], set[str]]:
    """What ``function`` of ``file`` reaches: the imports inside it and inside the same-module
    functions it calls, plus the module-level imports of names it uses (not the whole module)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    module = _module_name(file, root)
    is_package = file.name == "__init__.py"
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    bound: dict[str, set[str]] = {}  # module-level name → the modules its import statement names
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = imported_names([node], module, is_package, root)
            for alias in node.names:
                bound.setdefault((alias.asname or alias.name).split(".")[0], set()).update(targets)
    reached: set[str] = set()
    todo, visited = [function], set()
    while todo:
        name = todo.pop()
        if name in visited or name not in functions:
            continue
        visited.add(name)
        body = functions[name]
        reached |= imported_names([body], module, is_package, root)
        for node in ast.walk(body):
            if isinstance(node, ast.Name):
                todo.append(node.id)
                reached |= bound.get(node.id, set())
    return closure(reached, root, follow)


def distributions(top_level: Iterable[str]) -> set[str]:
    """Installed distributions providing these top-level modules (stdlib and unknown ones left out)."""
    from importlib import metadata

    providers = metadata.packages_distributions()
    names = set()
    for module in top_level:
        if module in sys.stdlib_module_names or module == "__future__":
            continue
        names.update(providers.get(module, ()))
    return names
