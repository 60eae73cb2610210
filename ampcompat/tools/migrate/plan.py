"""The edit plan of one ``--to-native`` rewrite: source edits, TODO comments, and what was converted.

The converters in :mod:`native_amp` and :mod:`native_calls` describe their changes through this
object; nothing touches the text until :meth:`RewritePlan.render`, which places every TODO comment
on its own line above the statement it concerns (unless that very comment is already there: a second
run adds nothing) and the imports the new code needs at the top of the module.
"""
from __future__ import annotations

import ast
import bisect
import textwrap
from typing import Dict, List, Optional, Set, Tuple

from .edits import Edit, apply_edits
from .rewrite_imports import Note
from .scanner import ScanResult, Use
from .syntax import BLOCK_FIELDS, statement_of

TODO_PREFIX = "# TODO(ampcompat): "
_CONTINUATION = "#   "
_TODO_WIDTH = 100


class RewritePlan:
    """Accumulates the changes for one file.

    Attributes:
        result: the scan the plan is based on.
        edits: source edits (non-overlapping).
        converted: ids of the use nodes now expressed in plain PyTorch.
        uses_torch: whether generated code refers to ``torch``.
    """

    def __init__(self, result: ScanResult) -> None:
        self.result = result
        self.text = result.text
        self.parents = result.parents
        self.edits: List[Edit] = []
        self.converted: Set[int] = set()
        self.uses_torch = False
        self.modules: Set[str] = set()
        """Modules the new code refers to by name (``functools``); ``torch`` is :attr:`uses_torch`."""
        self.notes: List[Note] = []
        self.stand_ins: Dict[str, str] = {}
        self.helpers_added: Dict[str, int] = {}  # module-level definitions added to the file: name -> offset
        """Apex name -> the torch object its import binds instead where reads of it remain (``apex.amp`` ->
        ``torch.amp`` for ``amp is not None`` checks)."""
        self._todos: List[Tuple[ast.stmt, str]] = []
        self._superseding: List[Edit] = []
        self._wrapped: List[Tuple[int, int, str, Edit]] = []
        """Regions put in a new block: first and last line, the indentation unit added, the header's edit."""
        self._taken = set(_identifiers(result.nodes))
        self._fresh: Dict[str, str] = {}

    # -- names ---------------------------------------------------------------------------------
    def fresh_name(self, wanted: str) -> str:
        """``wanted``, or ``wanted_native``, ... -- a name the file does not use yet (stable per file)."""
        if wanted not in self._fresh:
            name, counter = wanted, 1
            while name in self._taken:
                name = f"{wanted}_native" if counter == 1 else f"{wanted}_native{counter}"
                counter += 1
            self._taken.add(name)
            self._fresh[wanted] = name
        return self._fresh[wanted]

    # -- bookkeeping ---------------------------------------------------------------------------
    def mark_converted(self, use: Use) -> None:
        self.converted.add(id(use.node))

    def is_converted(self, use: Use) -> bool:
        return id(use.node) in self.converted

    def statement(self, node: ast.AST) -> ast.stmt:
        return statement_of(node, self.parents)

    # -- edits ---------------------------------------------------------------------------------
    def replace(self, node: ast.AST, replacement: str) -> None:
        """Replace the exact source text of ``node``."""
        start, end = self.text.span(node)
        self.edits.append(Edit(start, end, replacement))

    def replace_statement(self, statement: ast.stmt, lines: List[str]) -> None:
        """Replace the whole lines of a statement that owns them with ``lines`` (indented like it).

        Comments inside the replaced lines are kept, each on its own line above the new code, except
        ``TODO(ampcompat)`` comments an earlier run left there or just above: the code they were about is
        being rewritten.
        """
        text = self.text
        indent = text.indentation(statement.lineno)
        newline = text.newline(statement.lineno)
        start = text.line_start(self._stale_todos_above(statement.lineno))
        end = text.line_end(statement.end_lineno)  # type: ignore[arg-type]
        comments = _without_todos(text.comments_in(text.line_start(statement.lineno), end))
        body = newline.join(indent + line for line in comments + lines)
        if body and text.text[start:end].endswith(("\n", "\r")):
            body += newline
        self.edits.append(Edit(start, end, body))

    def supersede_statement(self, statement: ast.stmt, lines: List[str]) -> None:
        """Replace a statement that owns its lines, and every other edit inside it, with ``lines``.

        For a statement whose whole content goes away (an ``if`` that only guarded an import and
        ``amp.initialize``): the edits other rewrites planned inside it are dropped at render time.
        """
        self.replace_statement(statement, lines)
        self._superseding.append(self.edits[-1])

    def is_superseded(self, node: ast.AST) -> bool:
        """Whether ``node`` lies in text a :meth:`supersede_statement` replaces."""
        start, end = self.text.span(node)
        return any(edit.start <= start and end <= edit.end for edit in self._superseding)

    def remove_statement(self, statement: ast.stmt) -> None:
        """Remove the lines of a statement that owns them (its comments stay, each on its own line)."""
        self.replace_statement(statement, [])

    def insert_at(self, offset: int, text: str) -> None:
        """Insert ``text`` at ``offset`` of the original text."""
        self.edits.append(Edit(offset, offset, text))

    def wrap_in_block(self, first: ast.stmt, last: ast.stmt, header: str) -> None:
        """Put the lines from ``first`` to ``last`` under ``header`` (e.g. ``with torch.autocast(...):``).

        Only zero-width insertions are made (the header line, one indentation unit per line), so
        rewrites inside the wrapped lines stay independent of the wrapping.
        """
        indent = self.text.indentation(first.lineno)
        unit = "\t" if "\t" in indent else "    "
        start = self.text.line_start(first.lineno)
        header_edit = Edit(start, start, indent + header + self.text.newline(first.lineno))
        self.edits.append(header_edit)
        for lineno in range(first.lineno, last.end_lineno + 1):  # type: ignore[operator]
            if self.text.line(lineno).strip():
                self.edits.append(Edit(self.text.line_start(lineno), self.text.line_start(lineno), unit))
        self._wrapped.append((first.lineno, last.end_lineno, unit, header_edit))  # type: ignore[arg-type]

    def insert_lines_before(self, statement: ast.stmt, lines: List[str]) -> None:
        """Insert ``lines`` above ``statement``, at its indentation."""
        indent = self.text.indentation(statement.lineno)
        newline = self.text.newline(statement.lineno)
        start = self.text.line_start(statement.lineno)
        self.edits.append(Edit(start, start, "".join(indent + line + newline for line in lines)))

    def todo(self, node: ast.AST, message: str) -> None:
        """Leave ``# TODO(ampcompat): message`` above the statement holding ``node``."""
        anchor = self._line_owning_statement(self.statement(node))
        if (anchor, message) not in self._todos:
            self._todos.append((anchor, message))

    def note(self, node: ast.AST, message: str) -> None:
        """Report ``message`` at ``node`` without leaving a comment in the file."""
        start = self.text.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        self.notes.append(Note(node.lineno, start - self.text.line_start(node.lineno) + 1, message))  # type: ignore

    def todo_notes(self) -> List[Note]:
        """The TODOs as notes positioned in the original file."""
        notes = []
        for anchor, message in self._todos:
            start = self.text.offset(anchor.lineno, anchor.col_offset)
            col = start - self.text.line_start(anchor.lineno) + 1
            notes.append(Note(anchor.lineno, col, "TODO(ampcompat): " + message))
        return sorted(notes, key=lambda note: (note.line, note.col))

    def render(self, top: Optional[Tuple[int, str]] = None) -> str:
        """The new text: every edit applied and every TODO comment inserted.

        Args:
            top: ``(offset, text)`` to insert at the top of the module (imports the new code needs). If
                the offset falls inside text another edit replaces, it moves to that edit's start.
        """
        comments = []
        headers: Dict[int, Edit] = {}
        for anchor, message in self._todos:
            position, indent = self._comment_position(anchor)
            newline = self.text.newline(anchor.lineno)
            region = self._wrapping(anchor.lineno) if position == self.text.line_start(anchor.lineno) else None
            if region is not None:  # inside a new block: the comment goes in it, above its statement
                indent += region[2]
            lines = [indent + line for line in todo_lines(message, indent)]
            if self._comment_above(position, lines):
                continue
            text = "".join(line + newline for line in lines)
            if region is not None and region[0] == anchor.lineno:  # the block's first statement: after its header
                header = headers.get(id(region[3]), region[3])
                headers[id(region[3])] = Edit(header.start, header.end, header.replacement + text)
            else:
                comments.append(Edit(position, position, text))
        edits_now = [headers.get(id(edit), edit) for edit in self.edits]
        kept = [edit for edit in edits_now if not any(_inside(edit, outer) for outer in self._superseding)]
        edits = comments + kept + self._passes_for_emptied_blocks(kept)
        if top is not None:
            offset, insertion = top
            covering = [edit.start for edit in self.edits if edit.start < offset < edit.end]
            if covering:  # the first statement is being removed: go where its removal starts
                gap = self.text.text[min(covering):offset]
                insertion = (gap if not gap.strip() else "") + insertion  # keep the blank line it took along
                offset = min(covering)
            edits.insert(0, Edit(offset, offset, insertion))
        # Comments first: at a shared offset they then land above whatever else is inserted there.
        return apply_edits(self.text.text, edits)

    def _passes_for_emptied_blocks(self, edits: List[Edit]) -> List[Edit]:
        """A ``pass`` for each block whose every statement ``edits`` remove without putting code back.

        Rewriters decide on their own statements: one removes ``import apex`` and another the
        ``apex.amp.register_half_function(...)`` after it, and together they would leave ``try:`` empty.
        """
        removals = [edit for edit in edits if edit.start < edit.end and _code_free(edit.replacement)]
        if not removals:
            return []

        def removal_of(node: ast.AST) -> Optional[Edit]:
            start, end = self.text.span(node)
            return next((edit for edit in removals if edit.start <= start and end <= edit.end), None)

        passes = []
        for node in self.result.nodes:
            blocks = [getattr(node, name, None) for name in BLOCK_FIELDS]
            blocks = [block for block in blocks if isinstance(block, list) and block and isinstance(block[0], ast.stmt)]
            if not blocks or not hasattr(node, "end_lineno") or removal_of(node) is not None:  # module, or gone whole
                continue
            for block in blocks:
                covering = [removal_of(statement) for statement in block]
                if all(edit is not None for edit in covering):
                    first = block[0]
                    indent, newline = self.text.indentation(first.lineno), self.text.newline(first.lineno)
                    start = min(edit.start for edit in covering)  # type: ignore[union-attr]
                    passes.append(Edit(start, start, indent + "pass" + newline))
        return passes

    def _comment_above(self, position: int, lines: List[str]) -> bool:
        """Whether ``lines`` already stand, in order, in the comment lines just above ``position``."""
        above: List[str] = []
        lineno = bisect.bisect_right(self.text.line_starts, position) - 1
        while lineno >= 1 and self.text.line(lineno).lstrip(" \t\f").startswith("#"):
            above.insert(0, self.text.line(lineno))
            lineno -= 1
        return any(above[i : i + len(lines)] == lines for i in range(len(above) - len(lines) + 1))

    # -- helpers -------------------------------------------------------------------------------
    def _stale_todos_above(self, lineno: int) -> int:
        """The first line of the ``TODO(ampcompat)`` comments right above line ``lineno`` (``lineno`` if none)."""
        first = lineno
        above = lineno - 1
        while above >= 1:
            line = self.text.line(above).strip()
            if line.startswith(TODO_PREFIX):
                first = above
            elif not line.startswith(_CONTINUATION):
                break
            above -= 1
        return first

    def _line_owning_statement(self, statement: ast.stmt) -> ast.stmt:
        """The innermost statement, from ``statement`` outwards, that starts its own line.

        A statement after ``;`` on a module's top level has no such parent: a comment line above its
        line is still valid there, so it is its own anchor.
        """
        current = statement
        while not self.text.starts_line(current):
            parent = self.parents.get(current)
            while parent is not None and not isinstance(parent, ast.stmt):
                parent = self.parents.get(parent)
            if parent is None:
                return current
            current = parent
        return current

    def _wrapping(self, lineno: int) -> Optional[Tuple[int, int, str, Edit]]:
        """The region put in a new block that holds line ``lineno``, if any."""
        return next((region for region in self._wrapped if region[0] <= lineno <= region[1]), None)

    def _comment_position(self, anchor: ast.stmt) -> Tuple[int, str]:
        """Where a comment line above ``anchor`` goes, and its indentation.

        That is the anchor's line start, unless the line lies in lines that are rewritten as a whole:
        then the comment goes above those lines. (A line wrapped in a new block keeps its comment right
        above it, inside the block: see :meth:`render`.)
        """
        lineno = anchor.lineno
        while True:
            position = self.text.line_start(lineno)
            covering = [edit.start for edit in self.edits if edit.start < position < edit.end]
            if not covering:
                return position, self.text.indentation(lineno)
            lineno = bisect.bisect_right(self.text.line_starts, min(covering))


def _inside(edit: Edit, outer: Edit) -> bool:
    """Whether ``edit`` lies within what ``outer`` replaces (an insertion at either end of it does not)."""
    if edit is outer:
        return False
    if edit.start == edit.end:
        return outer.start < edit.start < outer.end
    return outer.start <= edit.start and edit.end <= outer.end


def _code_free(replacement: str) -> bool:
    """Whether ``replacement`` holds nothing but blank lines and comments."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in replacement.splitlines())


def _without_todos(comments: List[str]) -> List[str]:
    """``comments`` without ``TODO(ampcompat)`` comments and their continuation lines."""
    kept: List[str] = []
    in_todo = False
    for comment in comments:
        in_todo = comment.startswith(TODO_PREFIX) or (in_todo and comment.startswith(_CONTINUATION))
        if not in_todo:
            kept.append(comment)
    return kept


def todo_lines(message: str, indent: str = "") -> List[str]:
    """``# TODO(ampcompat): message`` wrapped to the line width left after ``indent``."""
    return textwrap.wrap(message, _TODO_WIDTH - len(indent), initial_indent=TODO_PREFIX,
                         subsequent_indent="#   ", break_on_hyphens=False)


def _identifiers(nodes: List[ast.AST]) -> Set[str]:
    found: Set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.alias):
            found.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
    return found
