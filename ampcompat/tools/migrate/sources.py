"""Finding, reading and safely rewriting the Python files ``ampcompat migrate`` is pointed at.

Nothing here executes user code. A file that cannot be read, decoded or parsed becomes a
:class:`SkippedFile` with a sentence saying why, so one bad file never stops a run; a rewrite is
written to a temporary file beside the original and moved over it in one step, so a crash or a full
disk never leaves half a file behind.
"""
from __future__ import annotations

import ast
import io
import os
import shutil
import tempfile
import tokenize
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union


@dataclass(frozen=True)
class SourceFile:
    """A Python file read and parsed without running it.

    Attributes:
        path: the path as the user gave it (or as found under a folder they gave).
        raw: the file's bytes.
        encoding: the encoding Python itself would use (PEP 263 cookie or BOM; UTF-8 otherwise).
        text: the decoded source, line endings untouched.
        tree: the parsed module.
    """

    path: str
    raw: bytes
    encoding: str
    text: str
    tree: ast.Module

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
    """A path that was not scanned, and why."""

    path: str
    reason: str


def iter_python_files(paths: Iterable[str]) -> Iterator[Union[str, SkippedFile]]:
    """Yield the Python files named by ``paths``, expanding folders recursively in sorted order.

    A file named explicitly is yielded whatever its suffix; inside folders only ``*.py`` files are
    taken, and hidden folders and ``__pycache__`` are skipped. Folder symlinks are not followed.

    Args:
        paths: files and folders.

    Yields:
        Each file's path, or a :class:`SkippedFile` for a path that does not exist.
    """
    for path in paths:
        if os.path.isdir(path):
            yield from _walk_folder(path)
        elif os.path.lexists(path):
            yield path
        else:
            yield SkippedFile(path, "no such file or directory")


def _walk_folder(folder: str) -> Iterator[str]:
    for root, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(root, name)


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
        )
    if problem:
        return SkippedFile(path, problem)
    if worth_parsing is not None and not worth_parsing(text):
        return PlainFile(path)
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        return SkippedFile(path, f"syntax error on line {exc.lineno}: {exc.msg}")
    except (ValueError, RecursionError, MemoryError) as exc:
        return SkippedFile(path, f"cannot parse the file: {exc}")
    return SourceFile(path, raw, encoding, text, tree)


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
