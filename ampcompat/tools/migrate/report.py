"""What ``ampcompat migrate`` prints: the list of Apex uses, the files changed, and a summary.

Text is for people (``path:line:col: api — verdict: reason``, as compilers print diagnostics);
``--format json`` gives tools the same facts in one JSON object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from .catalogue import Verdict
from .scanner import Use
from .sources import NotScanned, SkippedFile


@dataclass(frozen=True)
class FileNote:
    """A remark about one place in a file (an import left alone, a TODO left by ``--to-native``)."""

    path: str
    line: int
    col: int
    message: str


@dataclass(frozen=True)
class FileChange:
    """The outcome of ``--write`` / ``--to-native`` for one file."""

    path: str
    changed: bool
    written: bool
    diff: str
    notes: Sequence[FileNote] = ()
    converted: int = 0
    on_ampcompat: bool = False
    """``--to-native``: the new text still needs ampcompat."""
    imports_apex: bool = False
    """``--to-native``: the new text still imports ``apex`` (or one of its compiled modules)."""


@dataclass
class Report:
    """Everything one run found and did.

    Attributes:
        mode: ``report``, ``write`` or ``to-native``.
        uses: every Apex use in the files that could be read.
        skipped: files that could not be read, parsed or written.
        changes: per-file outcomes (``write`` and ``to-native`` only).
        scanned: the files that were read and scanned.
        plain: those of ``scanned`` whose text cannot hold an Apex use (never parsed or changed).
        dry_run: ``--diff``: changes are shown, not written.
        not_scanned: folders not entered by default (virtual environments, installed packages).
        failed: files a rewrite was planned for but could not be written (they are in ``skipped`` too).
        convert_with_level: ``--to-native`` without ``--opt-level``: files whose amp calls stayed on
            ampcompat only because their opt level is chosen at run time, and that ``--opt-level O1``
            would leave with neither Apex nor ampcompat.
    """

    mode: str
    uses: List[Use] = field(default_factory=list)
    skipped: List[SkippedFile] = field(default_factory=list)
    changes: List[FileChange] = field(default_factory=list)
    scanned: List[str] = field(default_factory=list)
    plain: List[str] = field(default_factory=list)
    dry_run: bool = False
    not_scanned: List[NotScanned] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    convert_with_level: List[str] = field(default_factory=list)

    def count(self, verdict: Verdict) -> int:
        return sum(1 for use in self.uses if use.verdict is verdict)

    @property
    def has_unsupported(self) -> bool:
        return self.count(Verdict.UNSUPPORTED) > 0

    @property
    def has_unreadable_apex(self) -> bool:
        """A file that may hold Apex code could not be read or parsed (an undecodable file whose bytes
        never mention Apex is counted as skipped, but is not a failure)."""
        return any(item.may_hold_apex for item in self.skipped)

    def summary(self) -> Dict[str, int]:
        """Counts of files and uses, by verdict."""
        counts = {
            "files": len(set(self.scanned) | {s.path for s in self.skipped}),
            "scanned": len(self.scanned),
            "skipped": len(self.skipped),
            "uses": len(self.uses),
        }
        counts.update({verdict.key: self.count(verdict) for verdict in Verdict})
        if self.mode != "report":
            counts["changed"] = sum(1 for change in self.changes if change.changed)
            counts["failed"] = len(self.failed)
        if self.mode == "to-native":
            counts["on_ampcompat"] = sum(1 for change in self.changes if change.on_ampcompat)
            counts["imports_apex"] = sum(1 for change in self.changes if change.imports_apex)
            counts["convert_with_opt_level"] = len(self.convert_with_level)
        return counts


def _plural(count: int, singular: str, plural: str = "") -> str:
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def _verb(count: int, verb: str) -> str:
    return verb + "s" if count == 1 else verb


def summary_line(report: Report) -> str:
    """One sentence with the totals."""
    counts = report.summary()
    verdicts = ", ".join(
        f"{counts[v.key]} {text}"
        for v, text in (
            (Verdict.SUPPORTED, "run unchanged"),
            (Verdict.DIFFERENCE, "run with a noted difference"),
            (Verdict.UNSUPPORTED, "not supported"),
        )
    )
    line = (
        f"{_plural(counts['files'], 'file')}: {counts['scanned']} scanned, {counts['skipped']} skipped; "
        f"{_plural(counts['uses'], 'Apex use')}: {verdicts}."
    )
    files = _plural(counts.get("changed", 0), "file")
    if report.mode == "write":
        line += f" Would rewrite imports in {files} (nothing written)." if report.dry_run \
            else f" Imports rewritten in {files}."
    elif report.mode == "to-native":
        line += f" Would rewrite {files} to plain PyTorch (nothing written)." if report.dry_run \
            else f" Rewritten to plain PyTorch: {files}."
        if counts["imports_apex"]:
            line += f" {_plural(counts['imports_apex'], 'file')} still {_verb(counts['imports_apex'], 'import')} " \
                    "apex (see the notes)."
        if counts["on_ampcompat"]:
            line += f" {_plural(counts['on_ampcompat'], 'file')} still {_verb(counts['on_ampcompat'], 'use')} " \
                    "ampcompat."
        if counts["convert_with_opt_level"]:
            line += f" {_plural(counts['convert_with_opt_level'], 'file')} would convert fully with --opt-level O1 " \
                    "(the opt_level is only known at run time)."
    if counts.get("failed"):
        line += f" {_plural(counts['failed'], 'file')} could not be rewritten (see above)."
    return line


def where(use: Use) -> str:
    """``path:line:col``, or ``notebook:cell N:line:col`` in a notebook."""
    cell = f"cell {use.cell}:" if use.cell is not None else ""
    return f"{use.path}:{cell}{use.line}:{use.col}"


def render_text(report: Report, with_diff: bool) -> str:
    """The human-readable report (``with_diff``: the diffs instead of the list of uses)."""
    lines: List[str] = []
    if report.mode == "report":
        for use in report.uses:
            reason = f": {use.reason}" if use.reason else ""
            lines.append(f"{where(use)}: {use.api} — {use.verdict.value}{reason}")
    for change in report.changes:
        if with_diff:
            if change.diff:
                lines.append(change.diff.rstrip("\n"))
        elif change.written:
            if report.mode == "write":
                lines.append(f"{change.path}: imports rewritten")
            else:
                lines.append(f"{change.path}: {_plural(change.converted, 'use')} rewritten to plain PyTorch")
        for note in change.notes:
            lines.append(f"{note.path}:{note.line}:{note.col}: {note.message}")
    for skipped in report.skipped:
        lines.append(f"{skipped.path}: skipped: {skipped.reason}")
    for folder in report.not_scanned:
        lines.append(f"{folder.path}: {folder.reason}")
    lines.append(summary_line(report))
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> str:
    """The report as one JSON object (keys: mode, uses, skipped, not_scanned, files, summary)."""
    payload = {
        "mode": report.mode,
        "uses": [
            {
                "path": use.path,
                "line": use.line,
                "col": use.col,
                "api": use.api,
                "verdict": use.verdict.key,
                "verdict_text": use.verdict.value,
                "reason": use.reason,
                "native": use.native,
                "via": use.via,
                "kind": use.kind,
                **({"cell": use.cell} if use.cell is not None else {}),
            }
            for use in report.uses
        ],
        "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
        "not_scanned": [{"path": s.path, "reason": s.reason} for s in report.not_scanned],
        "files": [
            {
                "path": change.path,
                "changed": change.changed,
                "written": change.written,
                "converted": change.converted,
                **({"on_ampcompat": change.on_ampcompat, "imports_apex": change.imports_apex}
                   if report.mode == "to-native" else {}),
                "diff": change.diff,
                "notes": [{"line": n.line, "col": n.col, "message": n.message} for n in change.notes],
            }
            for change in report.changes
        ],
        "summary": report.summary(),
    }
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
