"""A child process's stderr, split into what ampcompat and the script printed and other packages' warnings.

Some installs make third-party packages warn on import (torch without numpy prints ``Failed to
initialize NumPy`` at every start). Tests of a subprocess's stderr check what ampcompat and the script
printed; that a README install prints nothing else is checked by the main job's test in
``test_examples.py``.
"""
import re
from pathlib import Path
from typing import List, Tuple

_AMPCOMPAT = str(Path(__file__).resolve().parents[1] / "ampcompat")
# The first line of a warning as ``warnings.showwarning`` prints it: "FILE:LINE: CATEGORY: message".
_WARNING = re.compile(r"^(?P<file>.+?):\d+: \w*Warning: ")
_INSTALLED_PACKAGE = re.compile(r"[\\/](site|dist)-packages[\\/]")


def split_stderr(stderr: str) -> Tuple[str, List[str]]:
    """Split ``stderr`` into (everything but foreign warnings, the first line of each foreign warning).

    A foreign warning is one raised from an installed package's file other than ampcompat's; its
    indented source line goes with it. Warnings from ampcompat, the script or the standard library
    (``<frozen runpy>``) are kept.
    """
    kept: List[str] = []
    foreign: List[str] = []
    in_foreign = False
    for line in stderr.splitlines(keepends=True):
        match = _WARNING.match(line)
        if match:
            file = match["file"]
            in_foreign = bool(_INSTALLED_PACKAGE.search(file)) and not file.startswith(_AMPCOMPAT)
            if in_foreign:
                foreign.append(line.rstrip("\n"))
                continue
        elif in_foreign and line.startswith("  "):
            continue
        else:
            in_foreign = False
        kept.append(line)
    return "".join(kept), foreign


def own_stderr(stderr: str) -> str:
    """``stderr`` without other installed packages' warnings."""
    return split_stderr(stderr)[0]
