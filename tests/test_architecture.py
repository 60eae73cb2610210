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
import importlib.util
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from apex_module_paths import ADVISED_NOT_PROVIDED, APEX_DEEP_PATHS, APEX_PUBLIC_NAMES

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ampcompat"
ARCHITECTURE_DOC = PACKAGE_DIR.parent / "docs" / "architecture.md"

# Apex's neighbour packages (each at Apex's path). None imports another; they share the helpers below them.
INDEPENDENT_NEIGHBOURS: Tuple[str, ...] = (
    "ampcompat.amp_C", "ampcompat.apex_C", "ampcompat.multi_tensor_apply", "ampcompat.optimizers",
    "ampcompat.normalization", "ampcompat.parallel", "ampcompat.fp16_utils", "ampcompat.mlp", "ampcompat.fused_dense",
    "ampcompat.RNN", "ampcompat.pyprof", "ampcompat.reparameterization", "ampcompat.transformer")

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("foundation", ("ampcompat._version", "ampcompat._torch_compat", "ampcompat._multi_tensor",
                    "ampcompat.amp.verbosity", "ampcompat.amp.process_state")),
    ("amp mechanisms", ("ampcompat.amp.option_validation", "ampcompat.amp.state_validation",
                        "ampcompat.amp.opt_levels", "ampcompat.amp.scaler", "ampcompat.amp.model_casting",
                        "ampcompat.amp.o1_autocast", "ampcompat.amp.o1_op_lists", "ampcompat.amp.fused_o2")),
    ("optimizer lifecycle", ("ampcompat.amp.optimizer_lifecycle",)),
    ("gradient strategies", ("ampcompat.amp.model_gradients", "ampcompat.amp.master_weights",
                             "ampcompat.amp.fused_master_weights")),
    ("optimizer patching", ("ampcompat.amp.patched_optimizer",)),
    ("per-backward and old API", ("ampcompat.amp.scaled_backward", "ampcompat.amp.legacy_handle")),
    ("initialize", ("ampcompat.amp.initialization",)),
    ("apex.amp surface", ("ampcompat.amp",)),
    ("neighbours' shared helpers", ("ampcompat._not_provided", "ampcompat._autocast_utils")),
    ("Apex's neighbours", INDEPENDENT_NEIGHBOURS),  # mutually independent: none imports another
    ("contrib", ("ampcompat.contrib",)),  # apex.contrib builds on the neighbours (its optimizers on optimizers)
    ("unplaced", ("ampcompat",)),  # catches a new top-level module: test_every_neighbour_has_a_layer refuses it
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


def test_every_neighbour_has_a_layer():
    # A new package beside amp/ and tools/ must be placed in LAYERS (and so in the neighbours' order).
    unplaced = [name for name in MODULES if LAYERS[layer_of(name)][0] == "unplaced"]
    assert unplaced == []


def _package_of(module: str, prefixes: Tuple[str, ...]) -> str:
    return next(p for p in prefixes if module == p or module.startswith(p + "."))


def test_apexs_neighbours_are_mutually_independent():
    graph = import_graph()
    crossing = sorted((importer, target) for importer, targets in graph.items() for target in targets
                      if LAYERS[layer_of(importer)][0] == LAYERS[layer_of(target)][0] == "Apex's neighbours"
                      and _package_of(importer, INDEPENDENT_NEIGHBOURS) != _package_of(target, INDEPENDENT_NEIGHBOURS))
    assert crossing == [], "\n".join("{} imports {}".format(a, b) for a, b in crossing)


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


TRITON_MODULES = ("ampcompat.amp.fused_o2.kernels",)  # imported only when a fused O2 step runs


@pytest.mark.parametrize("module", sorted(name for name in MODULES if "_bootstrap" not in name and "__main__" not in name))
def test_every_module_imports(module):
    from ampcompat._not_provided import ApexModuleNotProvided

    if module in TRITON_MODULES and importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")

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


# --- private PyTorch APIs: only through ampcompat/_torch_compat.py ---------------------------------

TORCH_SHIMS = "ampcompat._torch_compat"
# Attribute names torch keeps private on its objects (tensors, optimizers, schedulers): any use is a use
# of a private torch API, whatever the object.
TORCH_PRIVATE_ATTRIBUTES = {"_version", "_values", "_indices", "_base", "_cdata", "_step_supports_amp_scaling",
                            "_opt_called", "_wrapped_by_lr_sched", "_get_scale_async", "_per_optimizer_states",
                            "_check_inf_per_device"}


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_torch_uses(path: Path) -> List[str]:
    """``file:line: name`` of every underscored torch name the module at ``path`` reaches."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    torch_names = set()  # local names bound to torch or one of its submodules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add(alias.asname or alias.name.split(".")[0])
                    if any(_is_private(p) for p in alias.name.split(".")):
                        found.append((node.lineno, "import " + alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                if any(_is_private(p) for p in node.module.split(".") + [alias.name]):
                    found.append((node.lineno, "from {} import {}".format(node.module, alias.name)))
                elif alias.name[:1].islower():  # a submodule or function of torch, used as a root below
                    torch_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in TORCH_PRIVATE_ATTRIBUTES:
            found.append((node.lineno, "." + node.attr))
            continue
        chain, root = [node.attr], node.value
        while isinstance(root, ast.Attribute):
            chain.append(root.attr)
            root = root.value
        if isinstance(root, ast.Name) and root.id in torch_names and _is_private(node.attr):
            found.append((node.lineno, ".".join([root.id] + chain[::-1])))
    return ["{}:{}: {}".format(path.relative_to(PACKAGE_DIR.parent), line, what) for line, what in sorted(set(found))]


def test_the_private_torch_scan_finds_planted_uses(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nimport torch.nn as nn\nfrom torch._utils import _flatten_dense_tensors\n"
                       "from torch import optim\ntorch._foreach_add_([], [])\nnn.modules.batchnorm._BatchNorm\n"
                       "optim.optimizer._get_capturable_supported_devices\nx = t._version\ntorch.ones(1)\n")
    original = PACKAGE_DIR
    try:
        globals()["PACKAGE_DIR"] = tmp_path / "pkg"
        found = [line.split(": ", 1)[1] for line in private_torch_uses(planted)]
    finally:
        globals()["PACKAGE_DIR"] = original
    assert found == ["from torch._utils import _flatten_dense_tensors", "torch._foreach_add_",
                     "nn.modules.batchnorm._BatchNorm", "optim.optimizer._get_capturable_supported_devices",
                     "._version"]


def test_private_torch_apis_are_used_only_through_the_shims_module():
    uses = [use for name, path in sorted(MODULES.items()) if name != TORCH_SHIMS for use in private_torch_uses(path)]
    assert uses == [], "use ampcompat/_torch_compat.py (add a shim with its test and reason):\n" + "\n".join(uses)


# --- the process-wide _amp_state: written by its owner only ----------------------------------------

STATE_OWNER = "ampcompat.amp.process_state"


def amp_state_writes(path: Path) -> List[str]:
    """``file:line`` of every assignment to, or deletion of, an ``_amp_state`` attribute (and of every
    ``_amp_state.__dict__`` use) in the module at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                    target.value.id == "_amp_state":
                found.append(node.lineno)
        if isinstance(node, ast.Attribute) and node.attr == "__dict__" and isinstance(node.value, ast.Name) and \
                node.value.id == "_amp_state":
            found.append(node.lineno)
    return ["{}:{}".format(path.relative_to(PACKAGE_DIR.parent), line) for line in sorted(set(found))]


def test_only_the_state_owner_writes_the_process_state():
    writes = [w for name, path in sorted(MODULES.items()) if name != STATE_OWNER for w in amp_state_writes(path)]
    assert writes == [], "go through ampcompat.amp.process_state's functions:\n" + "\n".join(writes)


# --- underscored names stay private to the module (or package) that defines them --------------------

# (importer prefix, imported name) -> why the import is allowed. "*" matches every importer.
PRIVATE_IMPORTS_ALLOWED: Dict[Tuple[str, str], str] = {
    ("*", "ampcompat.amp.process_state._amp_state"):
        "Apex's name for the process-wide state object; legacy code imports it by this name, so it is the "
        "object's only name",
    ("ampcompat.amp", "ampcompat.amp._amp_state._amp_state"):
        "Apex's apex.amp._amp_state path re-exported by the apex.amp surface",
    ("ampcompat.contrib.optimizers", "ampcompat.optimizers._fused_fp16_optimizer"):
        "apex.contrib.optimizers.FP16_Optimizer is apex.optimizers.FP16_Optimizer at another Apex path: one "
        "implementation, whose base class belongs to neither public surface",
    ("ampcompat.contrib.optimizers", "ampcompat.optimizers._legacy_adam"):
        "contrib's FusedSGD takes Apex's legacy per-group step arguments exactly as the optimizers' FusedAdam "
        "does: one parser of them, not an Apex name",
}


def _owner_allows(importer: str, owner: str) -> bool:
    return importer == owner or importer.startswith(owner + ".")


def private_imports(name: str, path: Path) -> List[str]:
    """``importer: dotted.name`` for every underscored ampcompat name ``name`` imports from outside its owner.

    ``pkg._mod`` is private to ``pkg`` (any module inside ``pkg`` may import it); ``mod._name`` (a function,
    class or variable) is private to ``mod``. Dunder names are public. Uses of an underscored attribute of an
    imported ampcompat module (``mod._helper``) count as imports.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    imported: List[Tuple[int, str]] = []
    modules_bound: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, name)
            if not (target == "ampcompat" or target.startswith("ampcompat.")):
                continue
            for alias in node.names:
                full = target + "." + alias.name
                imported.append((node.lineno, full))
                if full in MODULES:
                    modules_bound[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ampcompat."):
                    imported.append((node.lineno, alias.name))
                    if alias.asname:
                        modules_bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules_bound:
            imported.append((node.lineno, modules_bound[node.value.id] + "." + node.attr))
    refused = []
    for line, full in imported:
        parts = full.split(".")
        for i, part in enumerate(parts[1:], start=1):
            if not _is_private(part):
                continue
            prefix = ".".join(parts[:i])
            owner = prefix if _is_package(prefix) or prefix == "ampcompat" else prefix
            if _owner_allows(name, owner):
                continue
            if any(key == ".".join(parts[:i + 1]) and (who == "*" or _owner_allows(name, who))
                   for who, key in PRIVATE_IMPORTS_ALLOWED):
                continue
            refused.append("{}:{}: {}".format(name, line, ".".join(parts[:i + 1])))
            break
    return sorted(set(refused))


def test_the_private_import_scan_refuses_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from ampcompat.amp.scaler import _SMALLEST_SCALE\nfrom ampcompat.optimizers import _base\n"
                       "from ampcompat import _torch_compat\nfrom ampcompat.amp import model_casting\n"
                       "model_casting._cast_arg\nfrom ampcompat.amp.process_state import _amp_state\n")
    found = [entry.split(": ", 1)[1] for entry in private_imports("ampcompat.elsewhere", planted)]
    assert found == ["ampcompat.amp.scaler._SMALLEST_SCALE", "ampcompat.optimizers._base",
                     "ampcompat.amp.model_casting._cast_arg"]


def test_no_module_imports_another_modules_private_names():
    refused = [entry for name, path in sorted(MODULES.items()) for entry in private_imports(name, path)]
    assert refused == [], "make the name public, or list it in PRIVATE_IMPORTS_ALLOWED with the reason:\n" + \
        "\n".join(refused)


def test_architecture_doc_lists_every_lifecycle_state_in_its_table():
    from ampcompat.amp.optimizer_lifecycle import OptState

    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    section = text.split("## The optimizer lifecycle", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \|", section, re.M)
    assert rows == [state.name for state in OptState]
