"""What ampcompat actually provides for an Apex name: found by importing it, never by a list.

``apex.X.Y`` is looked up the way the ``apex`` import alias resolves it -- as ``ampcompat.X.Y`` for
the subpackages the alias maps, and ``amp_C`` / ``apex_C`` as ``ampcompat.amp_C`` / ``ampcompat.apex_C``
-- so a module or name added to ampcompat gets the right verdict with no change here. A module that
raises ``ApexModuleNotProvided`` on import (how ampcompat marks an Apex module it deliberately does
not provide) is "not provided", with that error's message, which names the replacement; so is a
callable that can only raise (a placeholder).

Importing ampcompat's modules runs no user code; results are cached per name.
"""
from __future__ import annotations

import dis
import functools
import importlib
import inspect
import types
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from ampcompat._not_provided import ApexModuleNotProvided
from ampcompat.tools.alias import APEX_STAR_EXPORTS, APEX_SUBPACKAGES  # noqa: F401 (APEX_STAR_EXPORTS: re-exported)

_TOP_LEVEL = {"amp_C": "ampcompat.amp_C", "apex_C": "ampcompat.apex_C"}


@dataclass(frozen=True)
class Lookup:
    """The outcome of looking an Apex name up in ampcompat.

    Attributes:
        name: the part of the dotted name that was resolved: up to the first object that is not a
            module (attributes of a class or object are not followed: many exist only at run time).
        found: whether ampcompat has it.
        value: the object (``None`` when not found).
        problem: why it is not provided (when ``found`` is false), or why it cannot be used (for a
            placeholder that only raises); empty otherwise.
        refused: whether it is an Apex module ampcompat refuses at import (``problem`` is that error's
            message).
    """

    name: str
    found: bool
    value: Any = None
    problem: str = ""
    refused: bool = False

    @property
    def usable(self) -> bool:
        """Found, and not a placeholder that raises when used."""
        return self.found and not self.problem


def mapped_subpackages() -> Tuple[str, ...]:
    """The ``apex.<name>`` subpackages the import alias maps onto ``ampcompat.<name>`` (some of them,
    like ``apex.transformer``, only to refuse at import)."""
    return tuple(APEX_SUBPACKAGES)


def ampcompat_module_name(apex_module: str) -> Optional[str]:
    """The ampcompat module the alias would load for ``apex_module`` (``None`` if it maps none)."""
    parts = apex_module.split(".")
    if parts[0] in _TOP_LEVEL:
        return ".".join([_TOP_LEVEL[parts[0]]] + parts[1:])
    if parts[0] != "apex":
        return None
    if len(parts) == 1:
        return "ampcompat"
    if parts[1] in mapped_subpackages():
        return "ampcompat." + ".".join(parts[1:])
    return None


@functools.lru_cache(maxsize=None)
def lookup(apex_name: str, module: Optional[str] = None) -> Lookup:
    """Find what ampcompat provides for a dotted Apex name.

    Python reads a dotted name two ways, and so does this: an import statement imports its module
    path as modules (``import apex.amp._amp_state`` is the module), while an attribute chain reads
    attributes, importing a submodule only where no attribute of that name exists
    (``amp._amp_state`` is the state object that ``apex.amp`` binds over the module).

    Args:
        apex_name: a dotted name starting with ``apex``, ``amp_C`` or ``apex_C``.
        module: the prefix of ``apex_name`` that is an imported module path (from an import statement);
            ``None`` reads the whole name as attributes from the top-level package.

    Returns:
        A :class:`Lookup`; never raises for a missing or broken module.
    """
    parts = apex_name.split(".")
    if module is None:
        start = 2 if parts[0] == "apex" and len(parts) > 1 else 1
    else:
        start = module.count(".") + 1
    value = _import(".".join(parts[:start]))
    if isinstance(value, Lookup):
        return value
    for index in range(start, len(parts)):
        if not isinstance(value, types.ModuleType):
            return _checked(".".join(parts[:index]), value)
        value = _attribute(value, parts, index)
        if isinstance(value, Lookup):
            return value
    return _checked(apex_name, value)


def _import(apex_module: str) -> Any:
    """The ampcompat module standing in for ``apex_module``, or a :class:`Lookup` saying why there is none."""
    target = ampcompat_module_name(apex_module)
    if target is None:
        first = ".".join(apex_module.split(".")[:2])
        return Lookup(apex_module, False, problem=f"ampcompat does not provide `{first}`")
    try:
        return importlib.import_module(target)
    except ApexModuleNotProvided as exc:  # how ampcompat refuses an Apex module: the message names the replacement
        return Lookup(apex_module, False, problem=str(exc), refused=True)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            missing = apex_module if exc.name == target else _apex_name_of(exc.name)
            return Lookup(apex_module, False, problem=f"ampcompat does not provide `{missing}`")
        return Lookup(apex_module, False, problem=f"importing `{apex_module}` fails: {exc}")
    except ImportError as exc:
        return Lookup(apex_module, False, problem=f"importing `{apex_module}` fails: {exc}")
    except Exception as exc:  # noqa: BLE001 -- a broken module is reported, not raised
        return Lookup(apex_module, False, problem=f"importing `{apex_module}` fails: {exc!r}")


def _apex_name_of(ampcompat_module: str) -> str:
    """``ampcompat.parallel.x`` -> ``apex.parallel.x``; ``ampcompat.apex_C`` -> ``apex_C``."""
    rest = ampcompat_module.split(".")[1:]
    if rest and rest[0] in _TOP_LEVEL:
        return ".".join(rest)
    return ".".join(["apex"] + rest)


def _attribute(module: types.ModuleType, parts: Sequence[str], index: int) -> Any:
    """``parts[index]`` read from ``module`` as Python would: the attribute, else the submodule."""
    try:
        return getattr(module, parts[index])
    except AttributeError:
        pass
    except ApexModuleNotProvided as exc:  # a package's __getattr__ refusing a submodule (apex.contrib)
        return Lookup(".".join(parts[: index + 1]), False, problem=str(exc), refused=True)
    except Exception as exc:  # noqa: BLE001
        return Lookup(".".join(parts[: index + 1]), False, problem=f"reading it fails: {exc!r}")
    value = _import(".".join(parts[: index + 1]))
    if isinstance(value, Lookup) and value.problem.startswith("ampcompat does not provide"):
        owner = ".".join(parts[:index])
        return Lookup(value.name, False, problem=f"ampcompat's `{owner}` has no `{parts[index]}`")
    return value


def _checked(name: str, value: Any) -> Lookup:
    problem = placeholder_message(value)
    return Lookup(name, True, value, problem or "")


# --- placeholders --------------------------------------------------------------------------------------
_RETURNS = {"RETURN_VALUE", "RETURN_CONST", "YIELD_VALUE", "RETURN_GENERATOR"}


def _never_returns(function: Any) -> bool:
    """Whether a Python function's code has no way to return: every path ends in ``raise``."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    ops = {instruction.opname for instruction in dis.get_instructions(code)}
    return "RAISE_VARARGS" in ops and not ops & _RETURNS


def placeholder_message(value: Any) -> Optional[str]:
    """The error a placeholder raises when used, or ``None`` if ``value`` is not a placeholder.

    A placeholder is a function, or a class whose ``__init__``, that can only raise: ampcompat
    defines those for Apex names it does not provide, so that imports resolve and the error names
    the replacement. The message is read by calling it (safe: it cannot do anything but raise).
    """
    if isinstance(value, type):
        init = value.__dict__.get("__init__")
        if init is None or not _never_returns(init):
            return None
        function: Any = value
    elif isinstance(value, types.FunctionType) and _never_returns(value):
        function = value
    else:
        return None
    try:
        function()
    except Exception as exc:  # noqa: BLE001 -- the point is to catch what it raises
        return f"{type(exc).__name__}: {exc}"
    return None


# --- call arguments ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _signature(value: Any) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(value)
    except (TypeError, ValueError):
        return None


def call_problem(value: Any, positional: int, keywords: Sequence[str], unpacks: bool) -> Optional[str]:
    """Why calling ``value`` with these arguments raises ``TypeError``, or ``None`` if it may not.

    Args:
        value: the callable ampcompat provides.
        positional: how many positional arguments are passed (not counting ``*args``).
        keywords: the keyword names passed (not counting ``**kwargs``).
        unpacks: whether ``*args`` or ``**kwargs`` are passed too (then missing arguments are not an error).

    Returns:
        A sentence naming the rejected argument, or ``None``.
    """
    try:
        hash(value)
    except TypeError:
        return None
    signature = _signature(value)
    if signature is None:
        return None
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        accepted = None
    else:
        accepted = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY)}
    name = getattr(value, "__qualname__", getattr(value, "__name__", "it"))
    if accepted is not None:
        unknown = [keyword for keyword in keywords if keyword not in accepted]
        if unknown:
            return (f"{name}() gets an unexpected keyword argument `{unknown[0]}` (ampcompat's signature: "
                    f"{name}{signature}); remove it or pass what it meant another way")
    placeholder = object()
    try:
        if unpacks:
            signature.bind_partial(*[placeholder] * positional, **{k: placeholder for k in keywords})
        else:
            signature.bind(*[placeholder] * positional, **{k: placeholder for k in keywords})
    except TypeError as exc:
        return f"{name}(): {exc} (ampcompat's signature: {name}{signature})"
    return None


def same_object_names(names: Sequence[str]) -> Dict[int, str]:
    """``id(object) -> name`` for those of ``names`` ampcompat provides (first name wins)."""
    found: Dict[int, str] = {}
    for name in names:
        result = lookup(name)
        if result.found and not isinstance(result.value, (int, float, str, bool, type(None))):
            found.setdefault(id(result.value), name)
    return found
