"""Run a script or a module as ``__main__`` the way the ``python`` command does, for ``ampcompat run``.

What the script sees matches ``python script.py args`` / ``python -m module args``: ``sys.argv``,
``sys.path[0]`` (the script's directory, or the working directory for ``-m``), ``__name__``,
``__file__`` (absolute) and ``__spec__``. The result is the exit status ``python`` would have
returned: 0, the ``sys.exit`` code, or 1 after printing the traceback of an uncaught exception
through ``sys.excepthook``. ``KeyboardInterrupt`` propagates, as it does out of ``python``. A folder,
zip file or package with no ``__main__`` to run gets one line and status 1, as from ``python``.
"""
from __future__ import annotations

import builtins
import importlib.util
import io
import os
import runpy
import sys
import types
import zipfile
from importlib.machinery import SourceFileLoader
from typing import Callable, Optional, Sequence

_PROG = "python -m ampcompat run"
# Code file names of this runner and of runpy (frozen into the interpreter since Python 3.11).
_OWN_FRAMES = {__file__, runpy.__file__, "<frozen runpy>"}


def run_path(path: str, args: Sequence[str]) -> int:
    """Run the script ``path`` (a source or compiled file, or a directory / zip file with ``__main__.py``).

    Args:
        path: the script, as the user typed it (it becomes ``sys.argv[0]``).
        args: the script's arguments, ``sys.argv[1:]``.

    Returns:
        The exit status; 2 when ``path`` cannot be opened (as ``python``).
    """
    absolute = os.path.abspath(path)
    sys.argv[:] = [path, *args]
    if os.path.isdir(absolute) or zipfile.is_zipfile(absolute):
        _set_script_directory(absolute)
        return _exit_status(lambda: runpy.run_path(path, run_name="__main__"))
    if absolute.endswith(".pyc"):
        _set_script_directory(os.path.dirname(os.path.realpath(absolute)))
        return _exit_status(lambda: runpy.run_path(path, run_name="__main__"))
    try:
        with io.open_code(absolute) as script:
            source = script.read()
    except OSError as exc:
        print(f"{_PROG}: can't open file {absolute!r}: [Errno {exc.errno}] {exc.strerror}", file=sys.stderr)
        return 2
    _set_script_directory(os.path.dirname(os.path.realpath(absolute)))
    return _exit_status(lambda: _exec_as_main(source, absolute))


def run_module(name: str, args: Sequence[str]) -> int:
    """Run module ``name`` as ``python -m name args`` would (packages run their ``__main__``).

    Args:
        name: the module's absolute dotted name.
        args: its arguments, ``sys.argv[1:]``; ``sys.argv[0]`` becomes the module's file.

    Returns:
        The exit status; 1 when there is no such module (as ``python -m``).
    """
    sys.argv[:] = [name, *args]
    _set_script_directory(os.getcwd())
    missing = _exit_status(lambda: _require_module(name))
    if missing:
        return missing
    return _exit_status(lambda: runpy.run_module(name, run_name="__main__", alter_sys=True))


def _require_module(name: str) -> None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        print(f"{_PROG}: No module named {name}", file=sys.stderr)
        raise SystemExit(1)


def _set_script_directory(directory: str) -> None:
    """Put ``directory`` where ``python`` puts the script's: ``sys.path[0]`` (nowhere under ``-P``)."""
    if getattr(sys.flags, "safe_path", False):
        return
    if sys.path:
        sys.path[0] = directory
    else:
        sys.path.append(directory)


def _exec_as_main(source: bytes, path: str) -> None:
    """Execute a script in a fresh ``__main__`` module, which stays ``__main__`` afterwards (as in ``python``)."""
    code = compile(source, path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=path,
        __cached__=None,
        __loader__=SourceFileLoader("__main__", path),
        __package__=None,
        __spec__=None,
        __builtins__=builtins,
    )
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def _exit_status(run: Callable[[], object]) -> int:
    try:
        run()
    except SystemExit as exc:
        return _system_exit_status(exc.code)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B902 -- report anything the script lets escape, as python does
        trimmed = _without_own_frames(exc.__traceback__)
        if trimmed is None and isinstance(exc, ImportError):
            # runpy found nothing to run (a folder or zip without __main__.py, a package without
            # __main__): one line, as python prints, since no code of the user's ran.
            print(f"{_PROG}: {exc}", file=sys.stderr)
            return 1
        sys.excepthook(type(exc), exc.with_traceback(trimmed), trimmed)
        return 1
    return 0


def _system_exit_status(code: object) -> int:
    """``sys.exit(code)``'s status: None is 0, an int is itself, anything else is printed and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _without_own_frames(tb: Optional[types.TracebackType]) -> Optional[types.TracebackType]:
    """Drop the leading traceback entries of this runner and of :mod:`runpy`: the user's start at their script."""
    while tb is not None and tb.tb_frame.f_code.co_filename in _OWN_FRAMES:
        tb = tb.tb_next
    return tb
