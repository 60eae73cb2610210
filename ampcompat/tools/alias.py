"""The opt-in ``apex`` import alias: legacy Apex imports resolve to ampcompat's modules.

After :func:`install_apex_alias`, unchanged legacy code works::

    from apex import amp                         # ampcompat.amp, the very same module object
    from apex.amp._amp_state import _amp_state   # import paths under apex.* map to ampcompat.*
    from apex.parallel import DistributedDataParallel
    import amp_C                                 # ampcompat.amp_C
    pickle.load(f)                               # pickles naming apex.amp.scaler.LossScaler load

Names are mapped, not copied: ``apex.X.Y`` is ``sys.modules["ampcompat.X.Y"]`` itself, imported on
first use, so state is shared and nothing is imported before it is asked for. A name ampcompat does
not provide fails with the usual ``ModuleNotFoundError``.

When a real NVIDIA Apex is installed (apex 25.07+ still ships ``apex.optimizers`` and
``apex.normalization``), ``import apex`` gives that package and ampcompat only supplies what it lacks
(``amp``, ``fp16_utils``, ``parallel``; ``amp_C`` when no compiled extension is found). The unrelated
PyPI project that is also called ``apex`` (a Pyramid add-on) is not mistaken for it.

While the alias is active, ``apex`` is also an installed distribution (``apex`` 0.1) to
``importlib.metadata``, ``pkg_resources`` and what builds on them, as libraries check for Apex that way
(see :mod:`ampcompat.tools.apex_metadata`); ``apex.__file__``, ``__path__`` and ``__version__`` exist.

The alias is process-wide and opt-in: without this call ampcompat never creates a module named
``apex``. ``python -m ampcompat run`` installs it and extends it to the child processes the script
starts (see :func:`enable_alias_in_child_processes`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
from importlib.machinery import ModuleSpec
from typing import Any, Callable, Iterator, List, MutableMapping, Optional, Sequence, Tuple

from . import apex_metadata

ALIAS_ENV_VAR = "AMPCOMPAT_APEX_ALIAS"
"""Set to ``1`` in a child's environment, it makes ``_bootstrap/sitecustomize.py`` install the alias."""

APEX_SUBPACKAGES = ("amp", "fp16_utils", "parallel", "optimizers", "normalization", "multi_tensor_apply",
                    "contrib", "mlp", "fused_dense", "transformer", "RNN", "pyprof", "reparameterization")
"""The modules under ``apex`` that ampcompat stands in for (``apex.<name>`` -> ``ampcompat.<name>``).

Some of them (``transformer``, ``RNN``, ...) only stand in to refuse: importing them raises
``ampcompat._not_provided.ApexModuleNotProvided``, a ``ModuleNotFoundError`` naming the replacement."""

APEX_STAR_EXPORTS = ("amp", "fp16_utils", "optimizers", "normalization", "transformer", "parallel")
"""Apex's ``apex.__all__``: what ``from apex import *`` bound in Apex."""

_TOP_LEVEL_ALIASES = {"amp_C": "ampcompat.amp_C", "apex_C": "ampcompat.apex_C"}
"""Apex's top-level compiled extensions that ampcompat provides in Python."""

_BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")


def _target_of(alias_name: str) -> str:
    """``apex.amp.scaler`` -> ``ampcompat.amp.scaler``; ``amp_C`` -> ``ampcompat.amp_C``."""
    if alias_name in _TOP_LEVEL_ALIASES:
        return _TOP_LEVEL_ALIASES[alias_name]
    return "ampcompat" + alias_name[len("apex"):]


def _is_ours(finder: Any) -> bool:
    return getattr(finder, "_ampcompat_alias", False)


def _find_elsewhere(name: str, path: Optional[Sequence[str]]) -> Optional[ModuleSpec]:
    """The spec the import system would find for ``name`` if the alias were not installed."""
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or _is_ours(finder):
            continue
        spec = find_spec(name, path)
        if spec is not None:
            return spec
    return None


def _is_nvidia_apex(spec: ModuleSpec) -> bool:
    """Whether a package found under the name ``apex`` is NVIDIA's (it has one of Apex's subpackages)."""
    locations = spec.submodule_search_locations
    if not locations:
        return False
    return any(_find_elsewhere("apex." + name, list(locations)) is not None for name in APEX_SUBPACKAGES)


def _import_apex_submodule(package: str, name: str) -> types.ModuleType:
    """Import ``package.name`` for an attribute lookup: a missing module is an ``AttributeError``."""
    full_name = package + "." + name
    try:
        return importlib.import_module(full_name)
    except ModuleNotFoundError as exc:
        from .._not_provided import ApexModuleNotProvided

        if isinstance(exc, ApexModuleNotProvided):  # hasattr(apex, "transformer") is False, with the reason
            raise AttributeError(f"module {package!r} has no attribute {name!r}: {exc}") from exc
        if exc.name != full_name:
            raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None


def _available_subpackages() -> List[str]:
    return [name for name in APEX_SUBPACKAGES if importlib.util.find_spec("ampcompat." + name) is not None]


class _ApexPackage(types.ModuleType):
    """The ``apex`` package when no real Apex is installed: its subpackages load on first attribute use."""

    def __dir__(self) -> List[str]:
        return sorted(set(super().__dir__()) | set(_available_subpackages()))


class DeprecatedFeatureWarning(FutureWarning):
    """``apex.DeprecatedFeatureWarning``: the category Apex (2022-2025) gave its deprecation warnings.

    ampcompat never emits it; it exists so that code filtering it (``warnings.filterwarnings("ignore",
    category=apex.DeprecatedFeatureWarning)``) keeps working under the alias.
    """


class _ApexPackageLoader:
    """Creates :class:`_ApexPackage` with the one attribute of Apex's own ``__init__`` that code uses."""

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        module = _ApexPackage(spec.name, "NVIDIA Apex's removed modules, provided by ampcompat (ampcompat.tools.alias).")
        module.__version__ = apex_metadata.VERSION
        _supply_missing_subpackages(module)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.DeprecatedFeatureWarning = DeprecatedFeatureWarning
        module.__all__ = provided_star_exports()


def provided_star_exports() -> List[str]:
    """Apex's ``__all__`` less the modules ampcompat refuses (``transformer``): what ``from apex import *``
    binds under the alias. A refused name in ``__all__`` would make the whole star import fail."""
    from .._not_provided import NOT_PROVIDED

    return [name for name in APEX_STAR_EXPORTS if f"apex.{name}" not in NOT_PROVIDED]


class _AliasLoader:
    """Loads ``apex.X`` as the module object ``ampcompat.X`` itself.

    The import system stamps the alias spec onto whatever :meth:`create_module` returns; the target's
    own ``__spec__`` is put back so ``ampcompat.X`` keeps its identity (relative imports, reloads).
    """

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        target = importlib.import_module(spec.loader_state["target"])
        spec.loader_state["target_spec"] = target.__spec__
        return target

    def exec_module(self, module: types.ModuleType) -> None:
        alias_spec = module.__spec__
        module.__spec__ = alias_spec.loader_state["target_spec"]
        _alias_loaded_submodules(alias_spec.name, alias_spec.loader_state["target"])


def _alias_loaded_submodules(alias: str, target: str) -> None:
    """Register ``alias.Y`` for every ``target.Y`` already imported.

    Without this, a later ``import apex.amp._amp_state`` would go through the import system, which
    ends by binding the submodule as an attribute of its parent -- replacing ``amp._amp_state`` (the
    state object) by the module. Modules imported before their package finished initialising are
    exactly the ones a package may have rebound like that, and they are all in ``sys.modules`` now.
    """
    prefix = target + "."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix):
            sys.modules.setdefault(alias + name[len(target):], module)


class _AugmentingLoader:
    """Loads a real Apex with its own loader, then lets it supply the modules it lacks from ampcompat."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # Leave no trace of this wrapper on the real package.
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _supply_missing_subpackages(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _supply_missing_subpackages(package: types.ModuleType) -> None:
    """Give an ``apex`` package a module ``__getattr__`` that imports ``apex.<name>`` on first use.

    On a real Apex, whatever it lacks is then found by the alias finder; what it has stays its own.
    A ``__getattr__`` the package already defines is consulted for every other name.
    """
    previous = package.__dict__.get("__getattr__")
    if getattr(previous, "_ampcompat_alias", False):
        return  # already supplied

    def __getattr__(name: str) -> Any:
        missing: Optional[AttributeError] = None
        if name in APEX_SUBPACKAGES:
            try:
                return _import_apex_submodule(package.__name__, name)
            except AttributeError as exc:
                missing = exc
        if previous is not None:
            return previous(name)
        raise missing or AttributeError(f"module {package.__name__!r} has no attribute {name!r}")

    __getattr__._ampcompat_alias = True  # type: ignore[attr-defined]
    __getattr__._ampcompat_previous = previous  # type: ignore[attr-defined]
    package.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _withdraw_supplied_subpackages(package: types.ModuleType) -> None:
    """Undo :func:`_supply_missing_subpackages` and drop the ampcompat modules bound on ``package``."""
    hook = package.__dict__.get("__getattr__")
    if getattr(hook, "_ampcompat_alias", False):
        previous: Optional[Callable[[str], Any]] = hook._ampcompat_previous
        if previous is None:
            del package.__getattr__
        else:
            package.__getattr__ = previous  # type: ignore[attr-defined]
    for name in APEX_SUBPACKAGES:
        value = package.__dict__.get(name)
        if value is not None and value is sys.modules.get("ampcompat." + name):
            delattr(package, name)


class _ApexAliasFinder:
    """``sys.meta_path`` finder that maps ``apex``, ``apex.*`` and ``amp_C`` onto ampcompat."""

    _ampcompat_alias = True

    def __init__(self) -> None:
        self._package_loader = _ApexPackageLoader()
        self._alias_loader = _AliasLoader()

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[types.ModuleType] = None) -> Optional[ModuleSpec]:
        if fullname == "apex":
            return self._find_apex_package()
        if fullname in _TOP_LEVEL_ALIASES:
            # A compiled extension of a real Apex build wins over ampcompat's Python version.
            if _find_elsewhere(fullname, path) is not None:
                return None
            return self._alias_spec(fullname)
        if fullname.startswith("apex."):
            return self._find_apex_submodule(fullname, path)
        return apex_metadata.find_pkg_resources_spec(fullname, path, _top_level_names())

    def find_distributions(self, context: Any = None) -> Iterator[Any]:
        """``importlib.metadata``'s hook: ``apex`` 0.1 is installed while the alias is (see ``apex_metadata``)."""
        return apex_metadata.find_apex_distributions(context, _top_level_names())

    def _find_apex_package(self) -> ModuleSpec:
        real = _find_elsewhere("apex", None)
        if real is not None and real.loader is not None and _is_nvidia_apex(real):
            real.loader = _AugmentingLoader(real.loader)
            return real
        return _stand_in_package_spec(self._package_loader)

    def _find_apex_submodule(self, fullname: str, path: Optional[Sequence[str]]) -> Optional[ModuleSpec]:
        parent_name, _, child = fullname.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is None:
            return None
        if parent_name == "apex":
            if child not in APEX_SUBPACKAGES:
                return None
            if not isinstance(parent, _ApexPackage) and _find_elsewhere(fullname, path) is not None:
                return None  # the real Apex has this one: keep it
        elif parent is not sys.modules.get(_target_of(parent_name)):
            return None  # inside a module of the real Apex
        return self._alias_spec(fullname)

    def _alias_spec(self, fullname: str) -> Optional[ModuleSpec]:
        target = _target_of(fullname)
        target_spec = importlib.util.find_spec(target)
        if target_spec is None:
            return None
        return ModuleSpec(fullname, self._alias_loader, origin=target_spec.origin,
                          loader_state={"target": target},
                          is_package=target_spec.submodule_search_locations is not None)


# --- the stand-in package as an installed distribution ------------------------------------------------

_AMPCOMPAT_INIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "__init__.py")


def _stand_in_package_spec(loader: _ApexPackageLoader) -> ModuleSpec:
    """The spec of ``apex`` when no real Apex is installed.

    ``apex.__file__`` is ampcompat's ``__init__.py``: the directory holding it has Apex's layout
    (``amp/``, ``fp16_utils/``, ``parallel/`` ...). ``__path__`` stays empty, so submodules come from
    the alias finder alone and no ampcompat module is imported a second time under an ``apex`` name.
    """
    spec = ModuleSpec("apex", loader, origin=_AMPCOMPAT_INIT, is_package=True)
    spec.has_location = True
    return spec


def _top_level_names() -> Tuple[str, ...]:
    """The top-level modules the ``apex`` distribution provides (its ``top_level.txt``)."""
    return ("apex", *_TOP_LEVEL_ALIASES)


_FINDER = _ApexAliasFinder()
_LOCK = threading.Lock()


def install_apex_alias() -> None:
    """Make ``import apex``, ``from apex import amp``, ``apex.*`` submodules and ``amp_C`` resolve to ampcompat.

    Idempotent and process-wide. Modules are imported when first asked for, and are the same objects
    as their ``ampcompat`` counterparts. If a real NVIDIA Apex is installed (or already imported), it
    stays ``apex`` and only the modules it lacks come from ampcompat. Pickles naming Apex classes
    (``apex.amp.scaler.LossScaler``, ``apex.fp16_utils.loss_scaler.DynamicLossScaler``) load.

    Only this process is affected: interpreters it starts (multiprocessing ``spawn`` workers,
    ``torchrun`` workers) need ``python -m ampcompat run``, which carries the alias into them.
    """
    with _LOCK:
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        apex = sys.modules.get("apex")
        if apex is not None and not isinstance(apex, _ApexPackage):
            _supply_missing_subpackages(apex)
        apex_metadata.register_with_pkg_resources(_top_level_names())


def uninstall_apex_alias() -> None:
    """Remove the alias: the finder, every ``apex``/``amp_C`` module it created, and what it gave a real Apex.

    Meant for tests. ``ampcompat`` modules themselves stay imported; code that already holds
    ``apex.amp`` keeps a working reference to ``ampcompat.amp``.
    """
    with _LOCK:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not _is_ours(finder)]  # the start-up hook's too
        for name in [n for n in sys.modules if n == "apex" or n.startswith("apex.") or n in _TOP_LEVEL_ALIASES]:
            module = sys.modules[name]
            if isinstance(module, _ApexPackage) or (name != "apex" and module is sys.modules.get(_target_of(name))):
                del sys.modules[name]
        apex = sys.modules.get("apex")
        if apex is not None:
            _withdraw_supplied_subpackages(apex)
        apex_metadata.withdraw_from_pkg_resources()


def enable_alias_in_child_processes(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Make Python processes started from now on install the alias too.

    Sets ``AMPCOMPAT_APEX_ALIAS=1`` and puts ampcompat's ``_bootstrap`` directory first on
    ``PYTHONPATH``; its ``sitecustomize.py`` installs the alias in each new interpreter when it first
    imports ``apex`` or ``amp_C`` (and still runs any ``sitecustomize`` it shadows). Interpreters
    started with ``-E``, ``-I`` or ``-S`` ignore ``PYTHONPATH`` or ``site`` and are not reached.

    Args:
        environ: the environment to change; ``os.environ`` by default.
    """
    env = os.environ if environ is None else environ
    env[ALIAS_ENV_VAR] = "1"
    current = env.get("PYTHONPATH", "")
    if current.split(os.pathsep)[0] != _BOOTSTRAP_DIR:
        env["PYTHONPATH"] = _BOOTSTRAP_DIR + (os.pathsep + current if current else "")
