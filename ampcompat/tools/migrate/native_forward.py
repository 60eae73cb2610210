"""The part of a forward pass that runs outside the branch computing the loss, for ``torch.autocast`` too.

:func:`native_regions.forward_region` finds the statements that compute the loss in the block of the
backward pass (or of the ``if``/``with`` around it). A loop that branches only for the loss (Swin's 2021
``main.py``)::

    outputs = model(samples)
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        loss = criterion(outputs, targets)
        ...
        with amp.scale_loss(loss, optimizer) as scaled_loss:

computes the model's output before the ``if``: under Apex's O1 it ran cast (O1 patched torch everywhere),
so natively it belongs under autocast as well, or the model would run in FP32. Here the names that region
reads and its own block does not set before it are followed out through the ``if``/``with`` blocks around
it, back to the previous backward pass, and the statements there that compute them (input tensors made or
moved aside) form one more region per enclosing block.
"""
from __future__ import annotations

import ast
from typing import Collection, List, Set, Union

from .edits import SourceText
from .native_regions import Region, creates_data, is_backward_or_amp, reads_names
from .syntax import Parents, block_of, stored_names

_CLIMB = (ast.If, ast.With, ast.AsyncWith)


def outer_regions(text: SourceText, parents: Parents, region: Region, amp_nodes: Collection[int]
                  ) -> Union[List[Region], str]:
    """The regions, innermost first, of enclosing blocks that compute what ``region`` reads.

    Args:
        text: the file's text.
        parents: its parent links.
        region: the statements (first, last) that compute the loss, from :func:`native_regions.forward_region`.
        amp_nodes: ``id()`` of amp call nodes, which must not sit inside a region.

    Returns:
        The regions (empty when everything is computed in the region's own block), or why they cannot be
        wrapped.
    """
    first, last = region
    block, index = block_of(first, parents)
    end = next(j for j, item in enumerate(block) if item is last)
    needed = _read_before_set(block[index : end + 1])
    for item in block[:index]:
        needed -= stored_names(item)
    found: List[Region] = []
    current: ast.AST = first
    while needed:
        owner = parents.get(current)
        if not isinstance(owner, _CLIMB):
            break
        current = owner
        outer, position = block_of(owner, parents)  # type: ignore[arg-type]
        barrier = next((j for j in range(position - 1, -1, -1) if is_backward_or_amp(outer[j], amp_nodes)), -1)
        stores = [j for j in range(position - 1, barrier, -1) if stored_names(outer[j]) & needed]
        if not stores:
            continue
        last_index = first_index = stores[0]
        wanted = set(needed)
        wanted |= reads_names(outer[last_index])
        for j in range(last_index - 1, barrier, -1):
            if stored_names(outer[j]) & wanted:
                first_index = j
                wanted |= reads_names(outer[j])
        statements = outer[first_index : last_index + 1]
        while len(statements) > 1 and (creates_data(statements[0]) or not stored_names(statements[0]) & wanted):
            statements = statements[1:]
        if len(statements) == 1 and creates_data(statements[0]):
            statements = []  # only inputs made or moved: nothing to cast
        if statements:
            problem = _problem(text, statements)
            if problem:
                return problem + "; put the forward pass under torch.autocast by hand"
            found.append((statements[0], statements[-1]))
        for item in outer[: position]:
            needed -= stored_names(item)
    return found


def _read_before_set(statements: List[ast.stmt]) -> Set[str]:
    """Names the statements read before (or without) setting them themselves."""
    read: Set[str] = set()
    written: Set[str] = set()
    for statement in statements:
        read |= reads_names(statement) - written
        written |= stored_names(statement)
    return read


def _problem(text: SourceText, statements: List[ast.stmt]) -> str:
    if not all(text.owns_lines(item) for item in statements):
        return "a statement of the forward pass (before the branch that computes the loss) shares a line with other code"
    for item in statements:
        for node in ast.walk(item):
            if isinstance(node, (ast.Return, ast.Break, ast.Continue, ast.Yield, ast.YieldFrom)):
                return "the forward pass before the branch that computes the loss can leave its block"
            is_string = isinstance(node, ast.JoinedStr) or (
                isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))
            if is_string and node.lineno != node.end_lineno:  # type: ignore[attr-defined]
                return "the forward pass before the branch that computes the loss contains a multi-line string"
    return ""
