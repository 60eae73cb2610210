"""The package's shape: imports go one way, from the tools down to the process state, with no cycles.

The import graph is read from the source with ``ast`` (imports inside functions count, and so do
``importlib.import_module("ampcompat...")`` calls with a literal name), so a deferred import cannot
hide a cycle or an upward dependency. The layers are those drawn in ``docs/architecture.md``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import importlib
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from apex_module_paths import ADVISED_NOT_PROVIDED, APEX_DEEP_PATHS, APEX_PUBLIC_NAMES

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ampcompat"
ARCHITECTURE_DOC = PACKAGE_DIR.parent / "docs" / "architecture.md"

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("foundation", ("ampcompat._version", "ampcompat.amp.process_state")),
    ("amp mechanisms", ("ampcompat.amp.opt_levels", "ampcompat.amp.scaler", "ampcompat.amp.model_casting",
                        "ampcompat.amp.o1_autocast", "ampcompat.amp.o1_op_lists", "ampcompat.amp.optimizer_lifecycle")),
    ("optimizer patching", ("ampcompat.amp.master_weights",)),
    ("per-backward and old API", ("ampcompat.amp.scaled_backward", "ampcompat.amp.legacy_handle")),
    ("initialize", ("ampcompat.amp.initialization",)),
    ("apex.amp surface", ("ampcompat.amp",)),
    ("Apex's neighbours", ("ampcompat",)),  # every other module outside amp/ and tools/
    ("tools", ("ampcompat.tools",)),
    ("entry points", ("ampcompat.__init__", "ampcompat.__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1 and parts != ["ampcompat", "__init__"]:
        parts = parts[:-1]
    return ".".join(parts)


def _all_modules() -> Dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


MODULES = _all_modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _known(name: str) -> str:
    """The module an import of ``name`` loads (``ampcompat`` itself is its ``__init__``)."""
    return "ampcompat.__init__" if name == "ampcompat" else name


def _resolve(node: ast.ImportFrom, importer: str) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    if importer == "ampcompat.__init__":
        base = ["ampcompat"]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of(name: str, path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, name)
            for alias in node.names:
                submodule = target + "." + alias.name
                yield submodule if submodule in MODULES else target
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value


def import_graph() -> Dict[str, Set[str]]:
    """``{module: {ampcompat modules it imports}}`` for every module of the package."""
    graph: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        edges = {_known(target) for target in _imports_of(name, path)
                 if target == "ampcompat" or target.startswith("ampcompat.")}
        graph[name] = {edge for edge in edges if edge in MODULES and edge != name}
    return graph


def layer_of(module: str) -> int:
    """Index into LAYERS of the most specific prefix that names ``module``."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, module
    return best


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # ampcompat.__init__ imports the alias inside install_apex_alias(), and __main__ the runner inside _run().
    assert "ampcompat.tools.alias" in graph["ampcompat.__init__"]
    assert "ampcompat.tools.runner" in graph["ampcompat.__main__"]


def test_cycle_detection_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_every_import_goes_down_the_layers():
    upward = [(importer, layer_of(importer), target, layer_of(target))
              for importer, targets in import_graph().items() for target in targets
              if layer_of(target) > layer_of(importer)]
    assert upward == [], "\n".join(f"{a} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]})" for a, la, b, lb in upward)


def test_every_amp_core_module_has_a_layer_of_its_own():
    # A new module in amp/ must be placed in LAYERS (and in docs/architecture.md), not fall into "apex.amp surface".
    apex_paths = {"ampcompat.amp", "ampcompat.amp._amp_state", "ampcompat.amp._process_optimizer", "ampcompat.amp.amp",
                  "ampcompat.amp.frontend", "ampcompat.amp.handle", "ampcompat.amp.opt"}
    unplaced = [name for name in MODULES if name.startswith("ampcompat.amp.") and name not in apex_paths
                and LAYERS[layer_of(name)][0] == "apex.amp surface"]
    assert unplaced == []


@pytest.mark.parametrize("alias_module", ["_amp_state", "_process_optimizer", "amp", "frontend", "handle", "opt"])
def test_apex_module_paths_are_thin_aliases(alias_module):
    # Apex's own module names under amp/ only re-export: no definitions of their own.
    tree = ast.parse(MODULES["ampcompat.amp." + alias_module].read_text(encoding="utf-8"))
    definitions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    assert definitions == []


def test_architecture_doc_names_every_module_and_only_existing_ones():
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`(ampcompat/[\w/]+\.py)`", text))
    existing = {str(path.relative_to(PACKAGE_DIR.parent)) for path in PACKAGE_DIR.rglob("*.py")}
    core_and_tools = {p for p in existing if (p.startswith("ampcompat/amp/") or p.startswith("ampcompat/tools/"))
                      and not p.startswith("ampcompat/tools/migrate/") and not p.startswith("ampcompat/tools/_bootstrap/")}
    assert named - existing == set(), "docs/architecture.md names modules that do not exist"
    assert core_and_tools - named == set(), "docs/architecture.md misses these modules"


@pytest.mark.parametrize("module", sorted(name for name in MODULES if "_bootstrap" not in name and "__main__" not in name))
def test_every_module_imports(module):
    from ampcompat._not_provided import ApexModuleNotProvided

    try:
        importlib.import_module(module.replace(".__init__", ""))
    except ApexModuleNotProvided:  # Apex paths ampcompat answers with advice (apex.transformer, ...)
        pass


# --- public and Apex import paths ------------------------------------------------------------------

README = PACKAGE_DIR.parent / "README.md"

_RESOLVE_EVERY_PATH = """
import importlib, sys
import ampcompat

ampcompat.install_apex_alias()
paths, advised = sys.argv[1].split(","), sys.argv[2].split(",")


def resolve(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ModuleNotFoundError(name)


failed = []
for name in paths:
    try:
        resolve(name)
        if name in advised:
            failed.append(name + ": resolved, but it is meant to refuse with advice")
    except ImportError as error:
        if name not in advised or "ampcompat" not in str(error):
            failed.append(name + ": " + repr(error))
    except Exception as error:
        failed.append(name + ": " + repr(error))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _documented_paths() -> List[str]:
    """Apex's paths (tests/apex_module_paths.py) and every dotted apex/ampcompat/amp_C path the README names."""
    readme = README.read_text(encoding="utf-8")
    # "apex.optimizers.Fused*" is a pattern, not a path: a name directly followed by "*" is left out.
    found = re.findall(r"\b((?:apex|ampcompat|amp_C)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?![A-Za-z0-9_*])", readme)
    return sorted(set(found) | set(APEX_PUBLIC_NAMES) | set(APEX_DEEP_PATHS) | set(ADVISED_NOT_PROVIDED))


def test_every_apex_module_path_and_every_path_in_the_readme_resolves_under_the_alias():
    paths = _documented_paths()
    assert "apex.amp._amp_state" in paths and "ampcompat.install_apex_alias" in paths
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)}
    result = subprocess.run([sys.executable, "-c", _RESOLVE_EVERY_PATH, ",".join(paths), ",".join(ADVISED_NOT_PROVIDED)],
                            capture_output=True, text=True, cwd=PACKAGE_DIR.parent, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
