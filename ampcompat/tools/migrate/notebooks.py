"""Jupyter notebooks (``*.ipynb``) as Python source: their code cells, one after the other.

``migrate`` scans a notebook's code cells as one module, in order (cells run top to bottom, so a
name imported in one cell is used in the next), and reports each use as ``NOTEBOOK:cell N:LINE:COL``.
IPython syntax that is not Python -- ``%magic`` and ``!shell`` lines, ``name?`` help, ``%%cell``
magics -- is blanked out first (each line becomes ``pass`` or an empty line, so line numbers stay).
Notebooks are scanned, never rewritten.
"""
from __future__ import annotations

import json
from typing import List, Sequence, Tuple


class NotebookError(ValueError):
    """The file is not a notebook ``migrate`` can read (not JSON, or no ``cells`` list)."""


def notebook_code(raw: bytes) -> Tuple[str, Tuple[Tuple[int, int], ...]]:
    """The code cells of a notebook as one Python text, and where each cell starts in it.

    Args:
        raw: the ``.ipynb`` file's bytes.

    Returns:
        ``(text, cells)``: ``cells`` holds ``(cell number, first line)`` per code cell, the number
        counting every cell from 1 as the notebook shows them.

    Raises:
        NotebookError: the bytes are not a notebook.
    """
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotebookError(f"not valid JSON ({exc})") from None
    cells = document.get("cells") if isinstance(document, dict) else None
    if not isinstance(cells, list):
        raise NotebookError("no list of cells (nbformat 4 is expected)")
    lines: List[str] = []
    starts: List[Tuple[int, int]] = []
    for number, cell in enumerate(cells, start=1):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        text = "".join(source) if isinstance(source, list) else str(source)
        starts.append((number, len(lines) + 1))
        lines.extend(_python_lines(text.splitlines()))
    return "".join(line + "\n" for line in lines), tuple(starts)


def _python_lines(lines: Sequence[str]) -> List[str]:
    """The cell's lines with IPython-only syntax blanked (same number of lines)."""
    if lines and lines[0].lstrip().startswith("%%"):
        return [""] * len(lines)  # a cell magic: the cell is not Python
    result = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(("%", "!")) or (stripped.endswith("?") and not stripped.startswith("#")):
            result.append(line[: len(line) - len(line.lstrip())] + "pass")
        else:
            result.append(line)
    return result


def cell_position(cells: Sequence[Tuple[int, int]], line: int) -> Tuple[int, int]:
    """``(cell number, line within the cell)`` of a line of :func:`notebook_code`'s text."""
    number, first = cells[0] if cells else (1, 1)
    for candidate, start in cells:
        if start > line:
            break
        number, first = candidate, start
    return number, line - first + 1
