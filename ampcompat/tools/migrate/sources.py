"""Finding, reading and safely rewriting the Python files ``ampcompat migrate`` is pointed at.

Nothing here executes user code. A file that cannot be read, decoded or parsed becomes a
:class:`SkippedFile` with a sentence saying why, so one bad file never stops a run; a rewrite is
written to a temporary file beside the original and moved over it in one step, so a crash or a full
disk never leaves half a file behind.

Walking a folder skips hidden folders, ``__pycache__``, what ``--exclude`` names, and -- reported as
not scanned -- virtual environments (a folder with ``pyvenv.cfg`` or ``conda-meta``) and
``site-packages``/``dist-packages``: installed packages are not the project's code. Notebooks
(``*.ipynb``) are read as the concatenation of their code cells (:mod:`notebooks`).
"""
from __future__ import annotations

import ast
import fnmatch
import io
import os
import shutil
import tempfile
import tokenize
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

from .notebooks import NotebookError, cell_position, notebook_code


@dataclass(frozen=True)
class SourceFile:
    """A Python file read and parsed without running it.

    Attributes:
        path: the path as the user gave it (or as found under a folder they gave).
        raw: the file's bytes.
        encoding: the encoding Python itself would use (PEP 263 cookie or BOM; UTF-8 otherwise).
        text: the decoded source, line endings untouched (a notebook's code cells, joined).
        tree: the parsed module.
        cells: for a notebook, ``(cell number, first line in text)`` of each code cell; empty otherwise.
    """

    path: str
    raw: bytes
    encoding: str
    text: str
    tree: ast.Module
    cells: Tuple[Tuple[int, int], ...] = ()

    @property
    def is_notebook(self) -> bool:
        return bool(self.cells) or self.path.endswith(".ipynb")

    @property
    def round_trips(self) -> bool:
        """Whether re-encoding the decoded text gives back the original bytes exactly."""
        return self.text.encode(self.encoding) == self.raw


@dataclass(frozen=True)
class PlainFile:
    """A file that was read and decoded but not parsed: its text cannot contain what was looked for."""

    path: str


@dataclass(frozen=True)
class SkippedFile:
    """A path that was not scanned (or not rewritten), and why.

    Attributes:
        path: the file.
        reason: one sentence.
        may_hold_apex: whether its bytes mention Apex (a file that cannot be decoded and does not is
            counted, but does not fail ``--check``).
    """

    path: str
    reason: str
    may_hold_apex: bool = True


@dataclass(frozen=True)
class NotScanned:
    """A folder not entered by default (a virtual environment, installed packages), and why."""

    path: str
    reason: str


def iter_python_files(paths: Iterable[str], exclude: Sequence[str] = (), notebooks: bool = True
                      ) -> Iterator[Union[str, SkippedFile, NotScanned]]:
    """Yield the Python files named by ``paths``, expanding folders recursively in sorted order.

    A file named explicitly is yielded whatever its suffix; inside folders ``*.py`` files are taken
    (and ``*.ipynb`` with ``notebooks``), and hidden folders, ``__pycache__``, folders and files that
    match an ``exclude`` pattern, virtual environments and installed-package folders are skipped.
    Folder symlinks are not followed.

    Args:
        paths: files and folders.
        exclude: shell-style patterns (``fnmatch``), each matched against a file's or folder's name
            and against its path relative to the folder given (``tests``, ``*_pb2.py``, ``examples/*``).
        notebooks: also yield notebooks found in folders.

    Yields:
        Each file's path, a :class:`SkippedFile` for a path that does not exist, or a
        :class:`NotScanned` for a folder skipped by default.
    """
    for path in paths:
        if os.path.isdir(path):
            yield from _walk_folder(path, tuple(exclude), notebooks)
        elif os.path.lexists(path):
            yield path
        else:
            yield SkippedFile(path, "no such file or directory")


def _walk_folder(folder: str, exclude: Tuple[str, ...], notebooks: bool) -> Iterator[Union[str, NotScanned]]:
    suffixes = (".py", ".ipynb") if notebooks else (".py",)
    named_installed = _within_installed_packages(folder)  # the user pointed at installed packages: walk them
    for root, dirnames, filenames in os.walk(folder):
        kept = []
        for name in sorted(dirnames):
            path = os.path.join(root, name)
            if name.startswith(".") or name == "__pycache__" or _excluded(path, folder, exclude):
                continue
            why = "" if named_installed else _installed_packages(path, name)
            if why:
                yield NotScanned(path, why)
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = os.path.join(root, name)
            if name.endswith(suffixes) and not _excluded(path, folder, exclude):
                yield path


def _excluded(path: str, folder: str, patterns: Tuple[str, ...]) -> bool:
    if not patterns:
        return False
    relative = os.path.relpath(path, folder).replace(os.sep, "/")
    name = os.path.basename(path)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(relative, p.rstrip("/")) for p in patterns)


def _installed_packages(path: str, name: str) -> str:
    """Why a folder holds installed packages rather than the project's code (``""`` if it does not)."""
    if os.path.isfile(os.path.join(path, "pyvenv.cfg")):
        return "not scanned: a virtual environment (it has pyvenv.cfg); name it as a PATH to scan it"
    if os.path.isdir(os.path.join(path, "conda-meta")):
        return "not scanned: a conda environment (it has conda-meta); name it as a PATH to scan it"
    if name in ("site-packages", "dist-packages"):
        return f"not scanned: installed packages ({name}); name it as a PATH to scan it"
    return ""


def _within_installed_packages(folder: str) -> bool:
    current = os.path.abspath(folder)
    while True:
        if _installed_packages(current, os.path.basename(current)):
            return True
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def linked_outside(path: str, folders: Iterable[str]) -> str:
    """For a symlink found inside one of ``folders``: its target, when that lies outside every one of
    them (a rewrite would change a file the user did not point at); else ``""``."""
    if not os.path.islink(path):
        return ""
    target = os.path.realpath(path)
    for folder in folders:
        root = os.path.realpath(folder)
        if os.path.commonpath([root, target]) == root:
            return ""
    return target


def load_source(path: str, worth_parsing: Optional[Callable[[str], bool]] = None
                ) -> Union[SourceFile, PlainFile, SkippedFile]:
    """Read, decode and parse ``path``.

    Args:
        path: a file path.
        worth_parsing: a cheap test of the decoded text; when it says no, the file is not parsed
            and a :class:`PlainFile` is returned (parsing is most of the cost of a large tree).

    Returns:
        The :class:`SourceFile`, a :class:`PlainFile`, or a :class:`SkippedFile` saying why it could
        not be read (I/O error, undecodable bytes, bad coding cookie, syntax error, null bytes).
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        return SkippedFile(path, f"cannot read the file: {exc.strerror or exc}")
    if path.endswith(".ipynb"):
        return _load_notebook(path, raw, worth_parsing)
    def may_hold_apex() -> bool:  # for files that cannot be decoded: does any byte sequence spell Apex?
        return worth_parsing is None or worth_parsing(raw.decode("latin-1"))

    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    except SyntaxError as exc:
        # Raised for an unknown or contradictory declaration, and for undecodable bytes in the
        # first two lines (where Python looks for one).
        encoding, problem = "utf-8", f"bad encoding declaration: {exc.msg}"
    else:
        problem = ""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return SkippedFile(
            path,
            f"not valid {_encoding_name(encoding)}: byte 0x{raw[exc.start]:02x} on line {line}; "
            "convert the file to UTF-8 or declare its encoding (PEP 263)",
            may_hold_apex(),
        )
    if problem:
        return SkippedFile(path, problem, may_hold_apex())
    if worth_parsing is not None and not worth_parsing(text):
        return PlainFile(path)
    tree = _parse(path, text)
    if isinstance(tree, str):
        return SkippedFile(path, tree)
    return SourceFile(path, raw, encoding, text, tree)


def _parse(path: str, text: str) -> Union[ast.Module, str]:
    """The module, or why it does not parse (with the line Python names, or the first NUL byte's)."""
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        return f"cannot parse the file: source code cannot contain null bytes (line {line})"
    try:
        return ast.parse(text, filename=path)
    except SyntaxError as exc:
        return f"syntax error on line {exc.lineno}: {exc.msg}"
    except (ValueError, RecursionError, MemoryError) as exc:
        return f"cannot parse the file: {exc}"


def _load_notebook(path: str, raw: bytes, worth_parsing: Optional[Callable[[str], bool]]
                   ) -> Union[SourceFile, PlainFile, SkippedFile]:
    try:
        text, cells = notebook_code(raw)
    except NotebookError as exc:
        return SkippedFile(path, f"cannot read the notebook: {exc}",
                           worth_parsing is None or worth_parsing(raw.decode("latin-1")))
    if worth_parsing is not None and not worth_parsing(text):
        return PlainFile(path)
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        cell, line = cell_position(cells, exc.lineno or 1)
        return SkippedFile(path, f"syntax error in cell {cell}, line {line}: {exc.msg}")
    except (ValueError, RecursionError, MemoryError) as exc:
        return SkippedFile(path, f"cannot parse the notebook's code cells: {exc}")
    return SourceFile(path, raw, "utf-8", text, tree, cells)


def _encoding_name(encoding: str) -> str:
    return "UTF-8" if encoding in ("utf-8", "utf-8-sig") else encoding


def write_source(source: SourceFile, new_text: str) -> None:
    """Replace ``source.path`` with ``new_text`` in its original encoding, atomically.

    The new content goes to a temporary file in the same folder, which takes over the original's
    permission bits and is then renamed over it: readers see the old file or the new one, never a
    mix. A symlink is followed, so the file it points to is replaced and the link stays a link.

    Args:
        source: the file as it was read.
        new_text: the complete new text.

    Raises:
        OSError: the folder is not writable, or the disk is full (the original is left as it was).
        UnicodeEncodeError: ``new_text`` cannot be written in the file's encoding.
    """
    data = new_text.encode(source.encoding)
    target = os.path.realpath(source.path)
    fd, temp_path = tempfile.mkstemp(prefix=".ampcompat-", suffix=".py.tmp", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        shutil.copymode(target, temp_path)
        os.replace(temp_path, target)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def parses(text: str) -> bool:
    """Whether ``text`` is valid Python (a last guard before any rewrite is written)."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def missing_paths(paths: Iterable[str]) -> list:
    """The paths that name nothing on disk (not even a dangling symlink)."""
    return [path for path in paths if not os.path.lexists(path)]
