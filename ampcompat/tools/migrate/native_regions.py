"""The forward pass to put under ``torch.autocast``: the statements that compute the loss of a backward pass.

Apex's O1 cast from ``amp.initialize`` on, everywhere; the native counterpart is a ``torch.autocast``
region around the code that computes the loss. That code is found by following the names the loss
is computed from, backwards through the statements before the backward pass: in its own block, and, when
the backward pass sits in a branch (``if args.fp16: ... else: loss.backward()``) or a ``with`` block, in
the blocks around it -- back to the previous backward pass, whose forward pass (and its tensors) came
before. Statements that only create or move the input tensors are left outside.
"""
from __future__ import annotations

import ast
from typing import Collection, List, Optional, Set, Tuple, Union

from .edits import SourceText
from .syntax import Parents, block_of, loaded_names, stored_names, walk_local

_FACTORIES = {"randn", "rand", "randint", "randperm", "zeros", "ones", "full", "empty", "tensor", "arange",
              "linspace", "eye", "as_tensor", "from_numpy", "randn_like", "rand_like", "zeros_like", "ones_like",
              "full_like", "empty_like", "manual_seed"}
_MOVES = {"to", "cuda", "cpu", "float", "double", "long", "int", "half", "bfloat16", "contiguous", "view",
          "reshape", "detach", "clone", "unsqueeze", "squeeze", "pin_memory"}
_CLIMB = (ast.If, ast.With, ast.AsyncWith)

Region = Tuple[ast.stmt, ast.stmt]


def forward_region(text: SourceText, parents: Parents, statement: ast.stmt, loss_name: str,
                   amp_nodes: Collection[int]) -> Union[Region, str]:
    """The statements (first, last) of one block that compute ``loss_name`` before ``statement``.

    Args:
        text: the file's text.
        parents: its parent links.
        statement: the backward pass (``with amp.scale_loss(...)``, ``optimizer.backward(loss)``).
        loss_name: the name the loss is held in.
        amp_nodes: ``id()`` of amp call nodes, which must not sit inside the region.

    Returns:
        The region, or why there is none.
    """
    current = statement
    while True:
        block, index = block_of(current, parents)
        loss_index = next((j for j in range(index - 1, -1, -1) if loss_name in stored_names(block[j])), None)
        if loss_index is not None:
            break
        owner = parents.get(current)
        if not isinstance(owner, _CLIMB):
            return (f"`{loss_name}` is not computed in the block that runs the backward pass (it may come from another "
                    "function), so the forward pass to put under torch.autocast is not known; rewrite by hand")
        current = owner  # type: ignore[assignment]
    needed = reads_names(block[loss_index])
    first_index = loss_index
    barrier = next((j for j in range(loss_index - 1, -1, -1) if is_backward_or_amp(block[j], amp_nodes)), -1)
    for j in range(loss_index - 1, barrier, -1):  # an earlier backward pass ends the search: its tensors are made
        if stored_names(block[j]) & needed:
            first_index = j
            needed |= reads_names(block[j])
    region = block[first_index : loss_index + 1]
    while len(region) > 1 and (creates_data(region[0]) or not stored_names(region[0]) & needed):
        region = region[1:]  # inputs made before the forward pass need no autocast, other statements no wrapping
    problem = None
    if not all(text.owns_lines(item) for item in region):
        problem = "a statement of the forward pass shares a line with other code"
    elif any(id(node) in amp_nodes for item in region for node in ast.walk(item)):
        problem = "the forward pass that computes the loss also contains amp calls"
    elif any(_is_multiline_string(node) for item in region for node in ast.walk(item)):
        problem = "the forward pass contains a multi-line string, which re-indenting would change"
    if problem is not None:
        return problem + "; put the forward pass under torch.autocast by hand"
    return region[0], region[-1]


def reads_names(statement: ast.stmt) -> Set[str]:
    """Names ``statement`` reads, counting the target of ``loss /= n`` and ``loss += x`` (read, then stored)."""
    augmented = {node.target.id for node in walk_local(statement)
                 if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name)}
    return loaded_names(statement) | augmented


def overlapping(regions: List[Region], region: Region) -> Optional[Region]:
    """A region of ``regions`` that shares lines with ``region`` without being the same one."""
    first, last = region[0].lineno, region[1].end_lineno
    for other in regions:
        if other[0] is region[0] and other[1] is region[1]:
            continue
        if first <= other[1].end_lineno and other[0].lineno <= last:  # type: ignore[operator]
            return other
    return None


def is_backward_or_amp(statement: ast.stmt, amp_nodes: Collection[int]) -> bool:
    """Whether ``statement`` runs a backward pass or holds one of the amp calls (ids in ``amp_nodes``)."""
    return any(id(node) in amp_nodes or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                         and node.func.attr == "backward") for node in ast.walk(statement))


def creates_data(statement: ast.stmt) -> bool:
    """An assignment that only creates or moves tensors (``x = torch.randn(4, 8).to(device)``)."""
    if not isinstance(statement, (ast.Assign, ast.AnnAssign)) or statement.value is None:
        return False
    calls = [node for node in ast.walk(statement.value) if isinstance(node, ast.Call)]
    if not calls:
        return False
    for call in calls:
        func = call.func
        if not isinstance(func, ast.Attribute):
            return False
        is_factory = func.attr in _FACTORIES and isinstance(func.value, ast.Name) and func.value.id == "torch"
        if not is_factory and func.attr not in _MOVES:
            return False
    return True


def _is_multiline_string(node: ast.AST) -> bool:
    is_string = isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))
    return is_string and node.lineno != node.end_lineno  # type: ignore[attr-defined]
