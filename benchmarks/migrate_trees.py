"""``ampcompat migrate`` over real source trees: internal errors, idempotence, broken files, time per mode.

    python benchmarks/migrate_trees.py /path/to/tree [/path/to/other/tree ...] [--json out.json]

For each tree it runs, each in a fresh ``python -m ampcompat migrate`` process (as a user would):

* the report (``--format json``) and ``--check``, on the tree itself (read only);
* ``--write``, ``--to-native`` and ``--write`` followed by ``--to-native``, each on a fresh copy of the
  tree in a temporary folder (the tree given is never modified), then the same mode a second time.

and prints, per tree and mode: the wall time, files changed, internal errors (must be 0), files the
second run changed again (must be 0), files that compiled before and no longer do (must be 0), and
files still importing ``apex`` or ``ampcompat`` afterwards. Then the conversion figure: of the files
that use ``amp.initialize``, ``amp.scale_loss`` or ``FP16_Optimizer``, how many ``--to-native`` leaves
importing neither ``apex`` nor ``ampcompat`` (and still compiling, and unchanged by a second run), without
``--opt-level`` and with ``--opt-level O1``; ``--figure-only`` runs just that. Nothing is fetched: the trees are folders you already have.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL = "internal error"


def _snapshot(root: str) -> Dict[str, bytes]:
    """Every ``*.py`` file under ``root`` (relative path -> bytes)."""
    found = {}
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as handle:
                        found[os.path.relpath(path, root)] = handle.read()
    return found


def _compiles(data: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trees' own SyntaxWarnings are not the point here
        try:
            compile(data, "<file>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            return False
    return True


def _migrate(args: List[str]) -> Tuple[float, dict, int]:
    """Run ``python -m ampcompat migrate ARGS --format json``: (seconds, the JSON report, exit status)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ampcompat", "migrate", *args, "--format", "json"],
                          capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"migrate {' '.join(args)} printed no JSON (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, report, proc.returncode


def _internal_errors(report: dict) -> List[str]:
    return [f"{item['path']}: {item['reason']}" for item in report["skipped"] if _INTERNAL in item["reason"]]


def _imports_apex(data: bytes) -> bool:
    import ast

    try:
        tree = ast.parse(data)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("apex", "ampcompat") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in (
                "apex", "ampcompat"):
            return True
    return False


def _rewrite_mode(tree: str, modes: List[str], work: str) -> dict:
    """Copy ``tree``, run each of ``modes`` in turn on the copy, then the last one again."""
    copy = os.path.join(work, "tree")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(tree, copy, symlinks=True)
    before = _snapshot(copy)
    seconds, errors, changed, status = 0.0, [], 0, 0
    for mode in modes:
        elapsed, report, code = _migrate([copy, mode])
        seconds += elapsed
        errors += _internal_errors(report)
        changed = report["summary"].get("changed", 0)
        status = max(status, code)
    after = _snapshot(copy)
    _, again, _ = _migrate([copy, modes[-1]])
    errors += _internal_errors(again)
    second = _snapshot(copy)
    broken = sorted(path for path, data in after.items()
                    if path in before and _compiles(before[path]) and not _compiles(data))
    return {
        "seconds": round(seconds, 2),
        "changed": changed,
        "exit": status,
        "internal_errors": errors,
        "not_idempotent": sorted(path for path in after if second.get(path) != after[path]),
        "compile_broken": broken,
        "still_import_apex_or_ampcompat": sum(1 for path, data in after.items()
                                              if after[path] != before.get(path) and _imports_apex(data)),
    }


_TRAINING_APIS = ("apex.amp.initialize", "apex.amp.scale_loss") + tuple(
    f"{module}.FP16_Optimizer" for module in ("apex.fp16_utils", "apex.fp16_utils.fp16_optimizer", "apex.optimizers",
                                              "apex.contrib.optimizers"))


def training_files(report: dict) -> Dict[str, List[str]]:
    """Relative path -> the training APIs (amp.initialize, scale_loss, FP16_Optimizer) a ``.py`` file uses."""
    found: Dict[str, List[str]] = {}
    for use in report["uses"]:
        if use["api"] in _TRAINING_APIS and use["kind"] != "import" and use["path"].endswith(".py"):
            apis = found.setdefault(use["path"], [])
            if use["api"] not in apis:
                apis.append(use["api"])
    return found


def _conversion(tree: str, files: Dict[str, List[str]], work: str, extra: List[str]) -> dict:
    """``--to-native`` (plus ``extra``) on a copy: which of ``files`` import neither apex nor ampcompat after."""
    copy = os.path.join(work, "tree")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(tree, copy, symlinks=True)
    _, report, _ = _migrate([copy, "--to-native", *extra])
    after = _snapshot(copy)
    _, again, _ = _migrate([copy, "--to-native", *extra])
    second = _snapshot(copy)
    native, kept, broken = [], [], []
    for path in sorted(files):
        relative = os.path.relpath(path, tree)
        data = after.get(relative, b"")
        (broken if not _compiles(data) else kept if _imports_apex(data) else native).append(relative)
    return {"native": native, "kept": kept, "compile_broken": broken,
            "not_idempotent": sorted(path for path in after if second.get(path) != after[path]),
            "internal_errors": _internal_errors(report) + _internal_errors(again)}


def conversion_figure(tree: str, report: dict, work: str) -> dict:
    """The fraction of training files ``--to-native`` converts fully, without and with ``--opt-level O1``."""
    files = training_files(report)
    return {"files": sorted(os.path.relpath(path, tree) for path in files),
            "without_opt_level": _conversion(tree, files, work, []),
            "with_opt_level_O1": _conversion(tree, files, work, ["--opt-level", "O1"])}


def measure(tree: str, work: str, figure_only: bool = False) -> dict:
    """All modes over one tree (``figure_only``: just the conversion figure)."""
    elapsed, report, _ = _migrate([tree])
    if figure_only:
        return {"tree": tree, "conversion": conversion_figure(tree, report, work)}
    check_seconds, _, check_code = _migrate([tree, "--check"])
    summary = report["summary"]
    return {
        "tree": tree,
        "files": summary["files"],
        "skipped": summary["skipped"],
        "uses": summary["uses"],
        "unsupported": summary["unsupported"],
        "report": {"seconds": round(elapsed, 2), "internal_errors": _internal_errors(report)},
        "check": {"seconds": round(check_seconds, 2), "exit": check_code},
        "write": _rewrite_mode(tree, ["--write"], work),
        "to-native": _rewrite_mode(tree, ["--to-native"], work),
        "write+to-native": _rewrite_mode(tree, ["--write", "--to-native"], work),
        "conversion": conversion_figure(tree, report, work),
    }


def _figure_table(results: List[dict]) -> str:
    rows = ["| tree | files using amp.initialize / scale_loss / FP16_Optimizer | native without --opt-level | "
            "native with --opt-level O1 |", "| --- | ---: | ---: | ---: |"]
    totals = [0, 0, 0]
    for result in results:
        figure = result["conversion"]
        counts = [len(figure["files"]), len(figure["without_opt_level"]["native"]),
                  len(figure["with_opt_level_O1"]["native"])]
        totals = [a + b for a, b in zip(totals, counts)]
        rows.append(f"| {os.path.basename(os.path.normpath(result['tree']))} | {counts[0]} | {counts[1]} | {counts[2]} |")
    share = lambda part: f"{part} ({100 * part / totals[0]:.0f}%)" if totals[0] else str(part)  # noqa: E731
    rows.append(f"| all | {totals[0]} | {share(totals[1])} | {share(totals[2])} |")
    return "\n".join(rows)


def _table(results: List[dict]) -> str:
    rows = ["| tree | files | Apex uses | mode | seconds | changed | internal errors | not idempotent | "
            "compile broken | exit |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        name = os.path.basename(os.path.normpath(result["tree"]))
        head = f"| {name} | {result['files']} | {result['uses']} "
        rows.append(head + f"| report | {result['report']['seconds']} | — | {len(result['report']['internal_errors'])} "
                           f"| — | — | 0 |")
        rows.append(f"| | | | --check | {result['check']['seconds']} | — | — | — | — | {result['check']['exit']} |")
        for mode in ("write", "to-native", "write+to-native"):
            item = result[mode]
            rows.append(f"| | | | {mode} | {item['seconds']} | {item['changed']} | {len(item['internal_errors'])} "
                        f"| {len(item['not_idempotent'])} | {len(item['compile_broken'])} | {item['exit']} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees (folders); never modified")
    parser.add_argument("--json", help="also write the full results (with file lists) here")
    parser.add_argument("--figure-only", action="store_true",
                        help="only the --to-native conversion figure (skips the timing of every mode)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="migrate-trees-") as work:
        for tree in args.trees:
            results.append(measure(os.path.abspath(tree), work, args.figure_only))
            print(f"done: {tree}", file=sys.stderr)
    if not args.figure_only:
        print(_table(results))
    print(_figure_table(results))
    _problems = ("compile_broken", "not_idempotent", "internal_errors")
    for result in results:
        for mode in ("without_opt_level", "with_opt_level_O1"):
            for key in _problems:
                for entry in result["conversion"][mode][key]:
                    print(f"{os.path.basename(result['tree'])} --to-native {mode} {key}: {entry}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    if args.figure_only:
        return 1 if any(result["conversion"][mode][key] for result in results
                        for mode in ("without_opt_level", "with_opt_level_O1") for key in _problems) else 0
    problems = 0
    for result in results:
        for mode in ("write", "to-native", "write+to-native"):
            item = result[mode]
            for key in ("internal_errors", "not_idempotent", "compile_broken"):
                for entry in item[key][:10]:
                    print(f"{os.path.basename(result['tree'])} {mode} {key}: {entry}")
                problems += len(item[key])
        problems += len(result["report"]["internal_errors"])
        problems += sum(len(result["conversion"][mode][key])
                        for mode in ("without_opt_level", "with_opt_level_O1") for key in _problems)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
