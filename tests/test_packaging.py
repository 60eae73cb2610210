"""What ``pip install .`` ships, what the README promises CI runs, and that the repository stands alone.

Every module of the source tree and ``py.typed`` are in the built package; the README's three commands
are the ones ``.ci/run`` reads; the declared torch floor is one the README's table says was tested; no
tracked file cites anything a fresh clone does not have.
"""
import re
import subprocess
import sys
from pathlib import Path
from typing import List

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_folder_with_modules_is_a_package_setup_py_finds():
    """A folder without ``__init__.py`` is left out of the wheel by ``find_packages`` (it was: ``tools/``)."""
    folders = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "ampcompat").rglob("*.py")}
    assert folders <= set(find_packages(str(REPO), include=["ampcompat", "ampcompat.*"]))


def test_readme_holds_the_three_commands_ci_runs():
    """``.ci/run`` runs the README's indented ``pip install`` lines: the main job, the tests, the full suite."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^    (pip install .*)$", readme, re.M)
    assert [command.split(" && ")[1] for command in commands] == [
        "python -m ampcompat run examples/legacy_apex_lm.py", "python -m pytest -q", "python -m pytest -q --full"]
    for command in commands[:2]:
        install = command.split(" && ")[0].split()
        assert "torch==2.13.0" in install and "numpy" in install  # torch warns at every import without numpy
    assert commands[2].split(" && ")[0] == 'pip install -e ".[test,integrations]"'
    assert readme.index(commands[2]) < readme.index("## What it is")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "git clone" in ci and "grep -E '^    pip install ' README.md" in ci


def test_the_torch_floor_is_one_in_setup_py_and_the_readme():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    floor = re.search(r'"torch>=([\d.]+)"', setup).group(1)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"any PyTorch from {floor} on works" in readme
    tested = re.findall(r"^\| ([\d.]+)(?:\+\w+)? \| ", readme[readme.index("## Tested with"):], re.M)
    assert floor in {".".join(version.split(".")[:2]) for version in tested}  # the floor is a tested release


def test_the_built_package_ships_every_module_and_py_typed(tmp_path):
    """``setup.py`` builds the package tree a wheel holds; ``py.typed`` (PEP 561) makes type checkers read
    ampcompat's annotations, and the child-process bootstrap must ship although nothing imports it."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True)
    built = {str(path.relative_to(tmp_path)) for path in (tmp_path / "ampcompat").rglob("*") if path.is_file()}
    source = {str(path.relative_to(REPO)) for path in (REPO / "ampcompat").rglob("*.py")}
    assert "ampcompat/py.typed" in built
    assert source <= built


def test_license_file_is_the_license_setup_py_declares():
    declared = re.search(r'license="([^"]+)"', (REPO / "setup.py").read_text(encoding="utf-8")).group(1)
    assert declared == "BSD-3-Clause"
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License") and "the ampcompat authors" in text


# --- the repository stands alone -------------------------------------------------------------------

# Citations of files that live outside the repository (the project's design notes and behavioural
# reference, kept beside the checkout while it was written) or of its issue tracker: a clone has none
# of them, so every fact must be said where it is used. This file, which spells the citations out to
# find them, is the one file not searched.
_OUTSIDE_CITATIONS = re.compile("|".join((
    r"\bspec\s*§", r"§\s*\d",                      # "spec §6", "§4.1"
    r"\bDESIGN(?:\.md|\s+decision)",              # "DESIGN.md", "DESIGN decision 5"
    r"\bdecisions?\s+\d",                         # "decision 10", "decisions 6-7"
    r"(?:\.\.|/work)/shared\b", r"\bshared/reference", r"apex_amp_spec\.md",
    r"\b[Ii]ssue\s+\d+\b",                        # the project's own tracker ("issue 18")
)))


def _tracked_files() -> List[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist)
        skipped = {".git", "venv", ".venv", "build", "dist", "__pycache__"}
        return [path for path in REPO.rglob("*") if path.is_file()
                and not skipped & set(path.relative_to(REPO).parts) and ".egg-info" not in str(path)]
    return [REPO / name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_cites_anything_outside_the_repository():
    found = []
    for path in _tracked_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):  # images; a file deleted but not yet committed
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE_CITATIONS.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == [], "say the fact instead of citing it:\n" + "\n".join(found)


def test_the_citation_pattern_catches_each_kind_of_citation():
    for citation in ("(spec §3, §7.2)", "see DESIGN.md", "DESIGN decision 5", "decisions 6-7",
                     "../shared/reference/x", "/work/shared", "apex_amp_spec.md", "Acceptance 3 of issue 18"):
        assert _OUTSIDE_CITATIONS.search(citation), citation
    for fine in ("importlib.util.spec_from_file_location", "a shared machine", "NVIDIA/apex#318", "issues"):
        assert not _OUTSIDE_CITATIONS.search(fine), fine
