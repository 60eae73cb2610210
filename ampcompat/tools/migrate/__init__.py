"""``python -m ampcompat migrate PATH...``: find Apex uses, and move code to ampcompat or to plain PyTorch.

Three modes, all static (user code is parsed, never run):

* default -- report every Apex use with its verdict under ampcompat (``--format json`` for tools;
  ``--check`` exits 1 when a use will not run on ampcompat or a file that mentions Apex could not be
  read, for CI);
* ``--write`` -- point Apex imports at ampcompat, changing no other byte of the file;
* ``--to-native`` -- rewrite the common patterns to ``torch.autocast`` / ``torch.amp.GradScaler`` /
  ``torch.optim`` / ``torch.nn``, leaving ``# TODO(ampcompat): ...`` where a rewrite is not mechanical;
  ``--opt-level O1`` (or ``from-args``) says how to convert calls whose opt level is only known at run time.

``--diff`` shows what ``--write`` / ``--to-native`` would change instead of writing it. Files that
cannot be read, decoded or parsed are reported and skipped; a file is only ever replaced as a whole
by a rewrite that parses; every mode run twice changes nothing the second time. ``--exclude GLOB``
leaves files and folders out; virtual environments and installed packages are skipped unless named.
Notebooks are scanned, not rewritten; a symlink found in a folder whose target lies outside the
folders given is scanned, not rewritten.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from typing import Dict, List, Optional, Sequence, Set, Union

from .edits import split_lines
from .exports import exported_names
from .notebooks import cell_position
from .report import FileChange, FileNote, Report, render_json, render_text
from .progress import Progress
from .rewrite_imports import rewrite_imports
from .scanner import ScanResult, Use, might_use_apex, scan
from .sources import (NotScanned, PlainFile, SkippedFile, SourceFile, iter_python_files, linked_outside, load_source,
                      missing_paths, parses, write_source)
from .native_levels import LevelChoice, LevelChoiceError, parse_level_choice
from .native_wrappers import NO_WRAPPERS, WrapperContext, tree_wrappers
from .to_native import to_native

__all__ = ["main", "scan", "rewrite_imports", "to_native"]

_INTERNAL_ERROR = "not processed: internal error in ampcompat migrate (please report it)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ampcompat migrate",
        description="Find NVIDIA Apex uses and migrate them to ampcompat (--write) or to plain PyTorch (--to-native).",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="Python files or folders (searched recursively)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite Apex imports to ampcompat in place")
    action.add_argument("--to-native", action="store_true",
                        help="rewrite common Apex patterns to plain PyTorch in place, leaving TODO(ampcompat) comments")
    parser.add_argument("--diff", action="store_true",
                        help="with --write/--to-native: print a unified diff instead of writing")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a use will not run on ampcompat, or a file that mentions Apex could not be read")
    parser.add_argument("--opt-level", metavar="LEVEL",
                        help="with --to-native: convert amp.initialize calls whose opt_level is only known at run time "
                             "as if LEVEL (O1..O5) were written there, or keep choosing at run time (from-args, "
                             "from-args:O2=O4,...)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="skip files and folders whose name or path (relative to the folder given) matches GLOB "
                             "(repeatable; e.g. --exclude tests --exclude '*_pb2.py')")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``migrate`` command.

    Args:
        argv: the arguments after ``migrate`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 1 with ``--check`` when a use will not run or a file that mentions Apex could not
        be scanned, or when a file could not be rewritten; 2 for a usage error (including a path that
        does not exist).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.diff and not (args.write or args.to_native):
        parser.print_usage(sys.stderr)
        print("python -m ampcompat migrate: error: --diff needs --write or --to-native", file=sys.stderr)
        return 2
    choice: Optional[LevelChoice] = None
    if args.opt_level is not None:
        if not args.to_native:
            parser.print_usage(sys.stderr)
            print("python -m ampcompat migrate: error: --opt-level needs --to-native", file=sys.stderr)
            return 2
        try:
            choice = parse_level_choice(args.opt_level)
        except LevelChoiceError as exc:
            parser.print_usage(sys.stderr)
            print(f"python -m ampcompat migrate: error: {exc}", file=sys.stderr)
            return 2
    missing = missing_paths(args.paths)
    if missing:
        print(f"python -m ampcompat migrate: error: no such file or directory: {', '.join(missing)} "
              "(nothing was scanned; check the path)", file=sys.stderr)
        return 2
    mode = "write" if args.write else "to-native" if args.to_native else "report"
    report = Report(mode, dry_run=args.diff)
    found = list(iter_python_files(args.paths, args.exclude))
    report.not_scanned.extend(item for item in found if isinstance(item, NotScanned))
    files = [item for item in found if not isinstance(item, NotScanned)]
    progress = Progress(len(files), sys.stderr)
    results = _scan_all(files, report, progress)
    if mode != "report":
        progress.restart(len(results))
        context = _tree_context(results, report, mode)
        wrappers = tree_wrappers(results, choice) if mode == "to-native" else {}
        folders = [path for path in args.paths if os.path.isdir(path)]
        named = set(args.paths)
        for result in results:
            progress.advance("rewriting")
            change = _kept_as_is(result, folders, named) or _migrate_file(
                result, mode, args.diff, report, context, choice, wrappers.get(result.source.path, NO_WRAPPERS))
            if change is None:
                report.failed.append(result.source.path)
            else:
                report.changes.append(change)
    progress.finish()
    output = render_json(report) if args.format == "json" else render_text(report, args.diff)
    sys.stdout.write(output)
    if report.failed:
        return 1
    if args.check and (report.has_unsupported or report.has_unreadable_apex):
        return 1
    return 0


def _scan_all(files: Sequence[Union[str, SkippedFile]], report: Report, progress: Progress) -> List[ScanResult]:
    """Read every file; parse and scan those that can hold an Apex use. Returns the scans with uses."""
    results = []
    for item in files:
        progress.advance("reading")
        if isinstance(item, SkippedFile):
            report.skipped.append(item)
            continue
        source = load_source(item, might_use_apex)
        if isinstance(source, SkippedFile):
            report.skipped.append(source)
            continue
        report.scanned.append(source.path)
        if isinstance(source, PlainFile):
            report.plain.append(source.path)
            continue
        try:
            result = scan(source)
        except Exception as exc:  # a scanner bug must not end the run for every other file
            report.scanned.pop()
            report.skipped.append(SkippedFile(source.path, f"{_INTERNAL_ERROR} while scanning: {exc!r}"))
            continue
        report.uses.extend(_in_cells(result.uses, source))
        results.append(result)
    return results


def _in_cells(uses: List[Use], source: SourceFile) -> List[Use]:
    """A notebook's uses positioned by cell and line within the cell."""
    if not source.cells:
        return uses
    placed = []
    for use in uses:
        cell, line = cell_position(source.cells, use.line)
        placed.append(dataclasses.replace(use, line=line, cell=cell))
    return placed


def _kept_as_is(result: ScanResult, folders: Sequence[str], named: Set[str]) -> Optional[FileChange]:
    """A file the rewriting modes scan but never rewrite: a notebook; a symlink found in a folder given whose
    target lies outside them (a file named as a PATH is rewritten, through its link)."""
    source = result.source
    if source.is_notebook:
        why = ("not rewritten: notebooks are scanned, not rewritten; run `python -m ampcompat migrate` on it without "
               "--write/--to-native for its Apex uses, by cell and line")
    else:
        target = "" if source.path in named else linked_outside(source.path, folders)
        if not target:
            return None
        why = (f"not rewritten: a symlink to {target}, outside the folders given; name that file (or its folder) "
               "as a PATH to rewrite it")
    return FileChange(source.path, False, False, "", [FileNote(source.path, 1, 1, why)])


def _tree_context(results: Sequence[ScanResult], report: Report, mode: str) -> Dict[str, Set[str]]:
    """For ``--to-native``: path -> the names other scanned files import from it (they must stay bound)."""
    if mode != "to-native":
        return {}
    candidates = {result.source.path: set(result.bindings) for result in results}
    sources = {result.source.path: result.source for result in results}
    return exported_names(candidates, sources, report.plain)


def _migrate_file(result: ScanResult, mode: str, show_diff: bool, report: Report,
                  exported: Dict[str, Set[str]], choice: Optional[LevelChoice] = None,
                  wrappers: WrapperContext = NO_WRAPPERS) -> Optional[FileChange]:
    """Rewrite one file; ``None`` (with the reason in ``report.skipped``) if it could not be written."""
    source = result.source
    try:
        if mode == "write":
            rewrite = rewrite_imports(result)
            new_text, notes, converted = rewrite.text, rewrite.notes, 0
        else:
            native = to_native(result, exported.get(source.path, set()), choice, wrappers)
            new_text, notes, converted = native.text, native.notes, native.converted
            if native.failed:
                report.skipped.append(SkippedFile(source.path, native.failed))
                return None
            if native.level_unknown and _converts_with_a_level(result, exported.get(source.path, set()), wrappers):
                report.convert_with_level.append(source.path)
    except Exception as exc:  # a rewriter bug leaves this file alone and the run going
        report.skipped.append(SkippedFile(source.path, f"{_INTERNAL_ERROR} while rewriting: {exc!r}"))
        return None
    file_notes = [FileNote(source.path, note.line, note.col, note.message) for note in notes]
    changed = new_text != source.text
    diff = _unified_diff(source, new_text) if changed else ""
    written = False
    if changed and not show_diff:
        reason = _write(source, new_text, checked=mode == "to-native")
        if reason is not None:
            report.skipped.append(SkippedFile(source.path, reason))
            return None
        written = True
    native_state = (native.on_ampcompat, native.imports_apex) if mode == "to-native" else (False, False)
    return FileChange(source.path, changed, written, diff if show_diff else "", file_notes, converted, *native_state)


def _converts_with_a_level(result: ScanResult, exported: Set[str], wrappers: WrapperContext = NO_WRAPPERS) -> bool:
    """Whether ``--opt-level O1`` would leave the file with neither Apex nor ampcompat."""
    try:
        native = to_native(result, exported, parse_level_choice("O1"), wrappers)
    except Exception:  # the real rewrite already ran; this estimate must not end the run
        return False
    return not (native.failed or native.on_ampcompat or native.imports_apex)


def _write(source: SourceFile, new_text: str, checked: bool = False) -> Optional[str]:
    """Write ``new_text`` over the file; the reason it was not written, or ``None``.

    ``checked``: the rewriter has already parsed ``new_text`` (``--to-native`` does).
    """
    if not source.round_trips:
        return f"not rewritten: re-encoding the file as {source.encoding} would change bytes the rewrite did not touch"
    if not checked and not parses(new_text):
        return "not rewritten: the rewritten text does not parse (please report this as an ampcompat bug)"
    try:
        write_source(source, new_text)
    except (OSError, UnicodeEncodeError) as exc:
        return f"could not write the file: {exc}"
    return None


def _unified_diff(source: SourceFile, new_text: str) -> str:
    old_lines, new_lines = split_lines(source.text), split_lines(new_text)
    relative = not os.path.isabs(source.path)
    old_name, new_name = (f"a/{source.path}", f"b/{source.path}") if relative else (source.path, source.path)
    return "".join(difflib.unified_diff(old_lines, new_lines, old_name, new_name))
