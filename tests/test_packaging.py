"""What ``pip install .`` ships: every module of the source tree, and the two README commands' inputs."""
import re
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_folder_with_modules_is_a_package_setup_py_finds():
    """A folder without ``__init__.py`` is left out of the wheel by ``find_packages`` (it was: ``tools/``)."""
    folders = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "ampcompat").rglob("*.py")}
    assert folders <= set(find_packages(str(REPO), include=["ampcompat", "ampcompat.*"]))


def test_readme_starts_with_the_two_commands_ci_runs():
    """``.ci/run`` runs the first two indented ``pip install`` lines of the README: the main job, then the tests."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^    (pip install .*)$", readme, re.M)[:2]
    assert [command.split(" && ")[1] for command in commands] == [
        "python -m ampcompat run examples/legacy_apex_lm.py", "python -m pytest -q"]
    for command in commands:
        install = command.split(" && ")[0].split()
        assert "torch==2.13.0" in install and "numpy" in install  # torch warns at every import without numpy
    assert readme.index(commands[1]) < readme.index("## What it is")
