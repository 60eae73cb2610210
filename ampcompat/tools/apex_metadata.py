"""The installed ``apex`` distribution that the alias presents to package-metadata lookups.

Libraries decide whether Apex is installed from its metadata, not by importing it: ``transformers``
asks ``importlib.metadata.version("apex")``, ``lightning_utilities``' ``RequirementCache("apex")``
asks ``importlib.metadata`` (older releases ``pkg_resources``). While the alias is active, its
``sys.meta_path`` finders answer those lookups with :class:`ApexDistribution` -- ``apex`` 0.1, Apex's
own version -- through :func:`find_apex_distributions`, and :func:`register_with_pkg_resources` adds
the same distribution to ``pkg_resources.working_set``.

Nothing installed is ever shadowed: when any other finder knows a distribution named ``apex`` (a real
NVIDIA Apex, say), that one answers and this module stays silent.

This module imports neither torch nor the rest of ampcompat (``ampcompat/__init__.py`` imports torch):
``_bootstrap/sitecustomize.py`` loads it by file path in every child interpreter, where metadata
lookups come before any ``import apex``.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import pathlib
import re
import sys
import types
from typing import Any, Iterable, Iterator, Optional

NAME = "apex"
VERSION = "0.1"
"""The version every NVIDIA Apex build reports (its ``setup.py`` never changed it)."""

_SUMMARY = "NVIDIA Apex's mixed-precision API, provided by ampcompat on PyTorch's native AMP"
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PKG_RESOURCES = "pkg_resources"


class ApexDistribution(importlib.metadata.Distribution):
    """Metadata of an installed ``apex`` 0.1 whose top-level modules are ``top_level``.

    It lists no files (``files`` is ``None``, as for an installation without a RECORD): its modules
    live under ``ampcompat``; ``locate_file`` resolves against the directory that holds ``ampcompat``.
    """

    def __init__(self, top_level: Iterable[str]) -> None:
        self._texts = {
            "METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\nSummary: {_SUMMARY}\n",
            "top_level.txt": "".join(name + "\n" for name in top_level),
            "INSTALLER": "ampcompat\n",
        }

    def read_text(self, filename: str) -> Optional[str]:
        return self._texts.get(filename)

    def locate_file(self, path: Any) -> pathlib.Path:
        return pathlib.Path(_PACKAGE_PARENT, path)


def _is_ours(finder: Any) -> bool:
    return getattr(finder, "_ampcompat_alias", False)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed_elsewhere() -> bool:
    """Whether a finder other than the alias's knows a distribution named ``apex`` on ``sys.path``."""
    context = importlib.metadata.DistributionFinder.Context(name=NAME)
    for finder in list(sys.meta_path):
        find = getattr(finder, "find_distributions", None)
        if find is not None and not _is_ours(finder) and next(iter(find(context)), None) is not None:
            return True
    return False


def find_apex_distributions(context: Optional[importlib.metadata.DistributionFinder.Context],
                            top_level: Iterable[str]) -> Iterator[importlib.metadata.Distribution]:
    """The ``find_distributions`` answer of the alias's finders.

    Args:
        context: what is searched for (``None``: every distribution on ``sys.path``).
        top_level: the top-level module names the alias provides (``apex``, ``amp_C``, ...).

    Returns:
        An :class:`ApexDistribution` when the search covers ``apex`` on the interpreter's own path
        and nothing installed there is called ``apex``; otherwise nothing.
    """
    if context is None:
        context = importlib.metadata.DistributionFinder.Context()
    if context.name is not None and _normalize(context.name) != NAME:
        return iter(())
    if context.path is not sys.path:
        return iter(())  # a search of chosen directories: this distribution lives in none of them
    if _installed_elsewhere():
        return iter(())
    return iter((ApexDistribution(top_level),))


# --- pkg_resources ----------------------------------------------------------------------------------

def register_with_pkg_resources(top_level: Iterable[str]) -> None:
    """Add ``apex`` 0.1 to an imported ``pkg_resources.working_set`` unless it already knows an ``apex``."""
    pkg_resources = sys.modules.get(_PKG_RESOURCES)
    working_set = getattr(pkg_resources, "working_set", None)
    if working_set is None or working_set.by_key.get(NAME) is not None or _installed_elsewhere():
        return
    distribution = pkg_resources.Distribution(location=_PACKAGE_PARENT, project_name=NAME, version=VERSION)
    distribution._ampcompat_alias = True
    working_set.add(distribution)


def withdraw_from_pkg_resources() -> None:
    """Remove what :func:`register_with_pkg_resources` added."""
    working_set = getattr(sys.modules.get(_PKG_RESOURCES), "working_set", None)
    if working_set is None or not _is_ours(working_set.by_key.get(NAME)):
        return
    del working_set.by_key[NAME]
    getattr(working_set, "normalized_to_canonical_keys", {}).pop(NAME, None)
    keys = working_set.entry_keys.get(_PACKAGE_PARENT, [])
    if NAME in keys:
        keys.remove(NAME)


class _RegisterAfterImport(importlib.abc.Loader):
    """Runs ``pkg_resources`` with its own loader, then registers the ``apex`` distribution with it."""

    def __init__(self, loader: importlib.abc.Loader, top_level: Iterable[str]) -> None:
        self._loader = loader
        self._top_level = tuple(top_level)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # no trace of this wrapper
        self._loader.exec_module(module)
        register_with_pkg_resources(self._top_level)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def find_pkg_resources_spec(fullname: str, path: Optional[Any],
                            top_level: Iterable[str]) -> Optional[importlib.machinery.ModuleSpec]:
    """For ``pkg_resources``: the spec the other finders give, loading it so it learns about ``apex``.

    ``pkg_resources`` builds its working set from the files on ``sys.path`` when it is imported; the
    alias's finders answer its import with this spec so the distribution is added right after.
    Returns ``None`` for every other name, or when ``pkg_resources`` is not installed.
    """
    if fullname != _PKG_RESOURCES:
        return None
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or _is_ours(finder):
            continue
        spec = find_spec(fullname, path)
        if spec is not None:
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisterAfterImport(spec.loader, top_level)
            return spec
    return None
