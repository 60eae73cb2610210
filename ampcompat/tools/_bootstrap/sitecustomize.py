"""Carries ampcompat's ``apex`` alias into the Python processes a ``python -m ampcompat run`` script starts.

``python -m ampcompat run`` sets ``AMPCOMPAT_APEX_ALIAS=1`` and puts this directory first on
``PYTHONPATH``, so every child interpreter (multiprocessing ``spawn`` workers, ``torchrun`` workers,
plain ``subprocess`` calls of ``python``) runs this file at start-up through :mod:`site`.

It costs next to nothing: ampcompat (and torch) are imported only when the child first imports
``apex`` or ``amp_C``. Package-metadata lookups (``importlib.metadata.version("apex")``, usually made
before any import) and ``pkg_resources`` are answered from the start by ``tools/apex_metadata.py``, a
torch-free module loaded by file path on the first such lookup. The ``sitecustomize`` this file
shadows, if any, still runs.
"""
import os
import sys

_ENV_VAR = "AMPCOMPAT_APEX_ALIAS"  # ampcompat.tools.alias.ALIAS_ENV_VAR
_TRIGGERS = ("apex", "amp_C", "apex_C")
_HERE = os.path.dirname(os.path.realpath(__file__))
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))  # the directory holding ``ampcompat``


class _InstallAliasOnFirstUse:
    """``sys.meta_path`` entry that installs the real alias finder when ``apex``/``amp_C`` is first imported."""

    _ampcompat_alias = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "pkg_resources":
            return _apex_metadata().find_pkg_resources_spec(fullname, path, _TRIGGERS)
        if fullname not in _TRIGGERS:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        alias = _import_alias_module()
        alias.install_apex_alias()
        # The import system is iterating sys.meta_path: answer for the finder that took our place.
        return alias._FINDER.find_spec(fullname, path, target)


    def find_distributions(self, context=None):
        return _apex_metadata().find_apex_distributions(context, _TRIGGERS)


def _apex_metadata():
    """``ampcompat.tools.apex_metadata``, loaded from its file without importing ``ampcompat`` (and torch)."""
    import importlib.util

    name = "ampcompat.tools.apex_metadata"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(_HERE), "apex_metadata.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the package imports this very module later
        spec.loader.exec_module(module)
    return module


def _import_alias_module():
    import importlib
    import importlib.util

    if importlib.util.find_spec("ampcompat") is None:
        # The parent ran an ampcompat that is not installed (a source checkout): use that one.
        sys.path.append(_PACKAGE_PARENT)
    return importlib.import_module("ampcompat.tools.alias")


def _run_shadowed_sitecustomize():
    """Run the ``sitecustomize`` that would have been imported without this directory on the path."""
    from importlib.machinery import PathFinder
    import importlib.util

    others = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _HERE]
    spec = PathFinder.find_spec("sitecustomize", others)
    if spec is None:
        return
    module = importlib.util.module_from_spec(spec)
    # It replaces this module once this file finishes: ``import sitecustomize`` then names it.
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get(_ENV_VAR) == "1" and not any(getattr(f, "_ampcompat_alias", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _InstallAliasOnFirstUse())
_run_shadowed_sitecustomize()
