"""Exact source positions and text splicing, so a rewrite touches only the bytes it means to.

``ast`` reports columns as UTF-8 byte offsets within a line; ``tokenize`` and Python strings count
characters. :class:`SourceText` converts both to absolute character offsets into the original text,
with lines split exactly where Python's own tokenizer splits them (``\\r\\n``, ``\\r``, ``\\n``; not
form feeds), and :func:`apply_edits` splices replacements in at those offsets.
"""
from __future__ import annotations

import ast
import bisect
import re
import tokenize
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> List[str]:
    """``text`` cut into lines where Python's tokenizer cuts them, each keeping its line break."""
    starts = [0] + [match.end() for match in _LINE_BREAK.finditer(text)]
    lines = [text[start:end] for start, end in zip(starts, starts[1:] + [len(text)])]
    return lines if lines[-1] else lines[:-1]


@dataclass(frozen=True)
class Edit:
    """Replace ``text[start:end]`` with ``replacement`` (``start == end`` inserts)."""

    start: int
    end: int
    replacement: str


def apply_edits(text: str, edits: Iterable[Edit]) -> str:
    """Return ``text`` with every edit applied.

    Insertions at the same offset keep the order they were given in.

    Raises:
        ValueError: two edits overlap (a bug in the caller: nothing is applied).
    """
    ordered = sorted(enumerate(edits), key=lambda item: (item[1].start, item[1].end, item[0]))
    pieces: List[str] = []
    position = 0
    for _, edit in ordered:
        if edit.start < position:
            raise ValueError(f"overlapping edits at offset {edit.start}")
        pieces.append(text[position : edit.start])
        pieces.append(edit.replacement)
        position = edit.end
    pieces.append(text[position:])
    return "".join(pieces)


class SourceText:
    """Line and offset arithmetic over one source text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.line_starts = [0] + [match.end() for match in _LINE_BREAK.finditer(text)]
        self._tokens: Optional[List[tokenize.TokenInfo]] = None
        self._token_starts: List[int] = []

    # -- lines ---------------------------------------------------------------------------------
    def line_start(self, lineno: int) -> int:
        """Offset of the first character of line ``lineno`` (1-based).

        A line past the last one starts at the end of the text: that is where the tokenizer places
        the ``NEWLINE``/``DEDENT``/``ENDMARKER`` tokens it adds to a file without a final line break.
        """
        if lineno > len(self.line_starts):
            return len(self.text)
        return self.line_starts[lineno - 1]

    def line_end(self, lineno: int) -> int:
        """Offset just past line ``lineno``'s line break (or the end of the text)."""
        return self.line_starts[lineno] if lineno < len(self.line_starts) else len(self.text)

    def line(self, lineno: int) -> str:
        """Line ``lineno`` without its line break."""
        return self.text[self.line_start(lineno) : self.line_end(lineno)].rstrip("\r\n")

    def newline(self, lineno: int) -> str:
        """The line break that ends line ``lineno`` (the file's first one if this line has none)."""
        raw = self.text[self.line_start(lineno) : self.line_end(lineno)]
        ending = raw[len(raw.rstrip("\r\n")) :]
        if ending:
            return ending
        match = _LINE_BREAK.search(self.text)
        return match.group(0) if match else "\n"

    def indentation(self, lineno: int) -> str:
        """The leading whitespace of line ``lineno``."""
        line = self.line(lineno)
        return line[: len(line) - len(line.lstrip(" \t\f"))]

    # -- nodes ---------------------------------------------------------------------------------
    def offset(self, lineno: int, byte_col: int) -> int:
        """Absolute character offset of an ``ast`` position (UTF-8 byte column)."""
        line = self.line(lineno)
        prefix = line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore")
        return self.line_start(lineno) + len(prefix)

    def span(self, node: ast.AST) -> Tuple[int, int]:
        """``(start, end)`` character offsets of ``node``."""
        return (
            self.offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
            self.offset(node.end_lineno, node.end_col_offset),  # type: ignore[attr-defined]
        )

    def segment(self, node: ast.AST) -> str:
        """The exact source text of ``node``."""
        start, end = self.span(node)
        return self.text[start:end]

    def owns_lines(self, node: ast.stmt) -> bool:
        """Whether ``node`` starts its first line and nothing but a comment follows it on its last.

        Only such statements can have whole lines inserted before or after them, or be replaced
        line-wise, without disturbing a neighbour on the same line (``a; b`` or ``if x: b``).
        """
        after = self.text[self.span(node)[1] : self.line_end(node.end_lineno)].strip()  # type: ignore[arg-type]
        return self.starts_line(node) and (after == "" or after.startswith("#"))

    def starts_line(self, node: ast.stmt) -> bool:
        """Whether only indentation precedes ``node`` on its first line."""
        before = self.text[self.line_start(node.lineno) : self.offset(node.lineno, node.col_offset)]
        return before.strip(" \t\f") == ""

    # -- tokens --------------------------------------------------------------------------------
    def tokens(self) -> List[tokenize.TokenInfo]:
        """All tokens of the text (computed once).

        Raises:
            tokenize.TokenError, SyntaxError: the text cannot be tokenized.
        """
        if self._tokens is None:
            lines = iter(split_lines(self.text))
            self._tokens = list(tokenize.generate_tokens(lambda: next(lines, "")))
            self._token_starts = [self.token_offset(token.start) for token in self._tokens]
        return self._tokens

    def token_offset(self, position: Tuple[int, int]) -> int:
        """Absolute character offset of a ``tokenize`` ``(row, col)`` position (clamped to the text)."""
        row, col = position
        return min(self.line_start(row) + col, len(self.text))

    def tokens_in(self, start: int, end: int) -> List[tokenize.TokenInfo]:
        """The tokens lying entirely inside ``[start, end)``."""
        tokens = self.tokens()
        found = []
        for index in range(bisect.bisect_left(self._token_starts, start), len(tokens)):
            if self._token_starts[index] >= end:
                break
            token = tokens[index]
            if token.type != tokenize.ENDMARKER and self.token_offset(token.end) <= end:
                found.append(token)
        return found

    def comments_in(self, start: int, end: int) -> List[str]:
        """The comments (``# ...`` text) inside ``[start, end)``, in order."""
        return [tok.string for tok in self.tokens_in(start, end) if tok.type == tokenize.COMMENT]
