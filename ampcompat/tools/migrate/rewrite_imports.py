"""The ``--write`` codemod: point Apex imports at ampcompat and change no other byte.

Only the module names inside import statements are replaced, at their exact positions, so
comments, parentheses, line breaks and every other line stay as they were:

=================================  ===============================================
``from apex import amp``           ``from ampcompat import amp``
``from apex.parallel import DDP``  ``from ampcompat.parallel import DDP``
``import apex``                    ``import ampcompat as apex``
``import apex.parallel``           ``import ampcompat.parallel, ampcompat as apex``
``import apex.amp as amp``         ``import ampcompat.amp as amp``
``import amp_C``                   ``import ampcompat.amp_C as amp_C``
``from apex import *``             ``from ampcompat import amp, fp16_utils, ...``
=================================  ===============================================

Every later ``apex.x.y`` / ``amp.z`` reference then finds the same names in ampcompat. The result
imports nothing from ``apex``, so running the codemod again changes nothing. Imports of Apex parts
ampcompat does not provide (``apex.transformer``, ``apex.contrib.sparsity``: they refuse at import;
Apex's compiled extensions such as ``fused_layer_norm_cuda``) are left alone and reported. The alias
line (:mod:`alias_line`) keeps checks for Apex by name answering as before; it is guarded by ``try``
when the file's Apex imports were all optional, so the file still runs where ampcompat is absent.
"""
from __future__ import annotations

import ast
import tokenize
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ampcompat.tools.alias import provided_star_exports

from . import catalogue
from .edits import Edit, SourceText, apply_edits
from .alias_line import ALIAS_STATEMENTS, alias_line_edit
from .scanner import ScanResult, Use, runs_unconditionally


@dataclass(frozen=True)
class Note:
    """Something the rewrite left alone, and why."""

    line: int
    col: int
    message: str


@dataclass(frozen=True)
class ImportRewrite:
    """The outcome for one file: the new text, the edits made, and what was left alone."""

    text: str
    edits: Tuple[Edit, ...]
    notes: Tuple[Note, ...]


def rewrite_imports(result: ScanResult) -> ImportRewrite:
    """Rewrite every Apex import in a scanned file to its ampcompat equivalent.

    Args:
        result: the scan of the file.

    Returns:
        The new text (identical to the old one when there was nothing to do) and notes for the
        imports that were left alone.
    """
    edits: List[Edit] = []
    notes: List[Note] = []
    checks = [use for use in result.uses if use.kind in ("string", "check")]
    if not checks and not any(use.kind == "import" and use.via == "apex" for use in result.uses):
        return ImportRewrite(result.text.text, (), ())
    for node in result.nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            import_statement_edits(result.text, node, edits, notes)
    if edits or checks:
        keep_apex_findable(result, checks, edits, notes)
    notes.sort(key=lambda note: (note.line, note.col))
    return ImportRewrite(apply_edits(result.text.text, edits), tuple(edits), tuple(notes))


def apex_imports_are_optional(result: ScanResult) -> bool:
    """Whether the file ran without Apex: none of its Apex imports runs unconditionally at module level
    (each sits in a ``try`` with an ``except ImportError`` fallback, an ``if``, a function, ...)."""
    tree = result.source.tree
    return not any(use.kind == "import" and use.via == "apex" and runs_unconditionally(use.node, tree, result.parents)
                   for use in result.uses)


def keep_apex_findable(result: ScanResult, checks: List[Use], edits: List[Edit], notes: List[Note]) -> None:
    """Add the alias line (see :mod:`alias_line`) unless the file has it, and note every check by name."""
    tree, text = result.source.tree, result.text
    present = bool(result.alias_statements)
    placed = None if present else alias_line_edit(text, tree, guarded=apex_imports_are_optional(result))
    if placed is not None:
        edits.append(placed[0])
        notes.append(Note(placed[1], 1, f"added `{ALIAS_STATEMENTS}` above this line: `apex` stays importable and "
                                        "registered, so checks for Apex by name (here, in other files, in libraries) "
                                        "still find it"))
    elif not present:
        notes.append(Note(1, 1, f"could not place `{ALIAS_STATEMENTS}` at the top of this module: add it there by "
                                "hand, or checks for Apex by name will not find it"))
    for check in checks:
        spelled = " ".join(text.segment(check.node).split())
        spelled = spelled if len(spelled) <= 60 else spelled[:57] + "..."
        outcome = ("it still finds Apex through the alias line at the top of this file" if present or placed
                   else "it will not find Apex until the alias line is added")
        notes.append(Note(check.line, check.col, f"checks for Apex by name (`{spelled}`): {outcome}"))


def import_statement_edits(text: SourceText, node: ast.stmt, edits: List[Edit], notes: List[Note]) -> None:
    """Append the edits that point one import statement's Apex modules at ampcompat.

    Args:
        text: the file's text.
        node: an ``Import`` or ``ImportFrom`` statement (others are ignored).
        edits: receives the edits.
        notes: receives a note for each Apex import left alone.
    """
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in catalogue.EXTENSION_MODULES:
                notes.append(note_at(text, node, f"left `import {alias.name}` unchanged: "
                                                 f"{catalogue.extension_advice(alias.name)[0]}"))
        if not any(_is_apex_import(alias.name) for alias in node.names):
            return
        for alias, name_tokens in zip(node.names, _alias_name_tokens(text, node)):
            _rewrite_import_alias(text, node, alias, name_tokens, edits, notes)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        extension = node.module.split(".")[0]
        if extension in catalogue.EXTENSION_MODULES:
            notes.append(note_at(text, node, f"left `from {node.module} import ...` unchanged: "
                                             f"{catalogue.extension_advice(extension)[0]}"))
            return
        _rewrite_import_from(text, node, edits, notes)


def _is_apex_import(name: str) -> bool:
    mapped = catalogue.apex_module(name)
    return mapped is not None and mapped[1] == "apex"


def import_alias_replacement(name: str, asname: Optional[str]) -> Optional[str]:
    """The text that replaces ``name`` in ``import name [as asname]``, or ``None`` if unmapped.

    The replacement keeps binding the same local name to the same module surface.
    """
    mapped = catalogue.apex_module(name)
    if mapped is None or mapped[1] != "apex":
        return None
    target, _ = catalogue.provided_module(name)
    if target is None:
        return None
    if asname:
        return target
    root = name.split(".")[0]
    if name == root:
        return f"{target} as {root}"
    return f"{target}, {catalogue.ampcompat_module(root)} as {root}"


def _rewrite_import_alias(text: SourceText, node: ast.Import, alias: ast.alias, name_tokens: List[tokenize.TokenInfo],
                          edits: List[Edit], notes: List[Note]) -> None:
    mapped = catalogue.apex_module(alias.name)
    if mapped is None or mapped[1] != "apex":
        return
    replacement = import_alias_replacement(alias.name, alias.asname)
    if replacement is None:
        _, why = catalogue.provided_module(alias.name)
        notes.append(note_at(text, node, f"left `import {alias.name}` unchanged: {why}"))
        return
    edits.append(Edit(text.token_offset(name_tokens[0].start), text.token_offset(name_tokens[-1].end), replacement))


def _alias_name_tokens(text: SourceText, node: ast.Import) -> List[List[tokenize.TokenInfo]]:
    """For each alias of ``import a.b as c, d``, the tokens spelling its dotted name (``a . b``)."""
    groups: List[List[tokenize.TokenInfo]] = [[]]
    in_asname = False
    start, end = text.span(node)
    for token in text.tokens_in(_end_of_keyword(text, start, end, "import"), end):
        if token.type == tokenize.OP and token.string == ",":
            groups.append([])
            in_asname = False
        elif token.type == tokenize.NAME and token.string == "as":
            in_asname = True
        elif not in_asname and (token.type == tokenize.NAME or (token.type == tokenize.OP and token.string == ".")):
            groups[-1].append(token)
    return groups


def _rewrite_import_from(text: SourceText, node: ast.ImportFrom, edits: List[Edit], notes: List[Note]) -> None:
    mapped = catalogue.apex_module(node.module)  # type: ignore[arg-type]
    if mapped is None or mapped[1] != "apex":
        return
    target, why = catalogue.provided_module(node.module)  # type: ignore[arg-type]
    if target is None:
        notes.append(note_at(text, node, f"left `from {node.module} import ...` unchanged: {why}"))
        return
    refused = [(a.name, why) for a in node.names for why in [catalogue.refused_import(node.module, a.name)] if why]
    if refused:
        notes.append(note_at(text, node, f"left `from {node.module} import ...` unchanged: {refused[0][1]}"))
        return
    if node.module == "apex":
        provided = [a.name for a in node.names if a.name == "*" or a.name in catalogue.MAPPED_PACKAGES]
        missing = [a.name for a in node.names if a.name not in provided]
        if missing:
            detail = "split the import" if provided else "ampcompat does not provide them"
            notes.append(note_at(text, node, f"left `from apex import ...` unchanged: `{'`, `'.join(missing)}` "
                                           f"{'are' if len(missing) > 1 else 'is'} not in ampcompat; {detail}"))
            return
        if provided == ["*"]:
            edits.append(_star_edit(text, node))
            return
    start, end = text.span(node)
    after_from = _end_of_keyword(text, start, end, "from")
    module_tokens = _tokens_before_keyword(text, after_from, end, "import")
    edits.append(Edit(text.token_offset(module_tokens[0].start), text.token_offset(module_tokens[-1].end), target))


def star_replacement() -> str:
    """What ``from apex import *`` becomes: Apex's ``__all__`` from ampcompat, less what it refuses."""
    return f"from ampcompat import {', '.join(provided_star_exports())}"


def _star_edit(text: SourceText, node: ast.ImportFrom) -> Edit:
    """``from apex import *`` -> ``from ampcompat import amp, fp16_utils, ...`` (a star import of ampcompat
    would bind ampcompat's own ``__all__``, not Apex's)."""
    start, end = text.span(node)
    return Edit(start, end, star_replacement())


def _end_of_keyword(text: SourceText, start: int, end: int, keyword: str) -> int:
    """Offset just past the first ``keyword`` token in ``[start, end)``."""
    token = next(t for t in text.tokens_in(start, end) if t.type == tokenize.NAME and t.string == keyword)
    return text.token_offset(token.end)


def _tokens_before_keyword(text: SourceText, start: int, end: int, keyword: str) -> List[tokenize.TokenInfo]:
    """The NAME/``.`` tokens from ``start`` up to the first ``keyword`` (or ``end``)."""
    found = []
    for token in text.tokens_in(start, end):
        if token.type == tokenize.NAME and token.string == keyword:
            break
        if token.type == tokenize.NAME or (token.type == tokenize.OP and token.string == "."):
            found.append(token)
    return found


def note_at(text: SourceText, node: ast.AST, message: str) -> Note:
    """A :class:`Note` positioned at ``node`` (1-based line and character column)."""
    start = text.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
    return Note(node.lineno, start - text.line_start(node.lineno) + 1, message)  # type: ignore[attr-defined]
