"""``migrate`` over whole repositories: what it walks, what it skips and why, and what ``--check`` fails on.

* ``--exclude GLOB`` (repeatable) leaves files and folders out; virtual environments and installed
  packages are reported as not scanned unless named as a PATH;
* notebooks are scanned cell by cell (``NOTEBOOK:cell N:LINE:COL``) and never rewritten;
* a symlink found in a folder whose target lies outside the folders given is scanned, not rewritten;
* a file that cannot be decoded and does not mention Apex is counted as skipped but does not fail
  ``--check``; a NUL byte is reported at its line; Apex's compiled extensions are reported with what
  to use instead.
"""
import json
import os
import textwrap
from pathlib import Path

import pytest

from ampcompat.tools import migrate
from ampcompat.tools.migrate import catalogue


def run(argv, capsys):
    code = migrate.main([str(a) for a in argv])
    return code, capsys.readouterr().out


def make_tree(root: Path, files: dict) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content))
    return root


def scanned_paths(out, root):
    return sorted({line.split(":", 1)[0][len(str(root)) + 1:] for line in out.splitlines()
                   if line.startswith(str(root)) and " — " in line})


def test_exclude_globs_match_names_and_relative_paths(tmp_path, capsys):
    names = ("train.py", "tests/test_train.py", "examples/old/run.py", "examples/new.py", "proto/model_pb2.py")
    root = make_tree(tmp_path / "repo", {name: "from apex import amp\n" for name in names})
    code, out = run([root, "--exclude", "tests", "--exclude", "examples/old", "--exclude", "*_pb2.py"], capsys)
    assert code == 0
    assert scanned_paths(out, root) == ["examples/new.py", "train.py"]
    assert out.splitlines()[-1].startswith("2 files: 2 scanned")


def test_virtual_environments_and_installed_packages_are_not_walked_unless_named(tmp_path, capsys):
    root = make_tree(tmp_path / "repo", {
        "train.py": "from apex import amp\n",
        "venv/pyvenv.cfg": "home = /usr/bin\n",
        "venv/lib/python3.11/site-packages/apex/__init__.py": "import amp_C\n",
        "env/conda-meta/history": "",
        "env/lib/mod.py": "import apex\n",
        "vendor/site-packages/pkg.py": "import apex\n",
    })
    code, out = run([root], capsys)
    assert scanned_paths(out, root) == ["train.py"]
    assert f"{root / 'venv'}: not scanned: a virtual environment (it has pyvenv.cfg); name it as a PATH to scan it" in out
    assert f"{root / 'env'}: not scanned: a conda environment" in out
    assert f"{root / 'vendor' / 'site-packages'}: not scanned: installed packages (site-packages)" in out
    code, out = run([root / "venv"], capsys)  # named explicitly: scanned
    assert "apex/__init__.py" in out and "amp_C" in out
    code, out = run([root, "--format", "json"], capsys)
    assert {Path(item["path"]).name for item in json.loads(out)["not_scanned"]} == {"venv", "env", "site-packages"}


def _notebook(cells):
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True),
         **({"outputs": [], "execution_count": None} if kind == "code" else {})}
        for kind, source in cells]})


def test_notebooks_are_scanned_by_cell_and_never_rewritten(tmp_path, capsys):
    notebook = _notebook([
        ("markdown", "# Training with Apex"),
        ("code", "!pip install apex\n%matplotlib inline\nfrom apex import amp\nimport torch"),
        ("code", "model, opt = amp.initialize(model, opt, opt_level='O7')\nmodel?"),
    ])
    root = make_tree(tmp_path / "repo", {"train.ipynb": notebook, "plain.ipynb": _notebook([("code", "x = 1")])})
    code, out = run([root, "--check"], capsys)
    assert code == 1  # O7 is not an opt level: the notebook's use is checked like any other
    nb = root / "train.ipynb"
    assert f"{nb}:cell 2:3:18: apex.amp — runs unchanged" in out
    assert f"{nb}:cell 3:1:14: apex.amp.initialize — not supported" in out
    code, out = run([root, "--format", "json"], capsys)
    uses = json.loads(out)["uses"]
    assert {(u["cell"], u["line"], u["api"]) for u in uses} == {(2, 3, "apex.amp"), (3, 1, "apex.amp.initialize")}
    before = nb.read_bytes()
    for mode in ("--write", "--to-native"):
        code, out = run([root, mode], capsys)
        assert code == 0 and nb.read_bytes() == before
        assert f"{nb}:1:1: not rewritten: notebooks are scanned, not rewritten" in out
    (root / "broken.ipynb").write_text("{not json")
    code, out = run([root / "broken.ipynb"], capsys)
    assert "broken.ipynb: skipped: cannot read the notebook: not valid JSON" in out


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_a_symlink_out_of_the_folder_is_scanned_not_rewritten(tmp_path, capsys):
    outside = make_tree(tmp_path / "shared", {"common.py": "from apex import amp\n"})
    root = make_tree(tmp_path / "repo", {"train.py": "from apex import amp\n"})
    (root / "common.py").symlink_to(outside / "common.py")
    inside_target = make_tree(root / "pkg", {"real.py": "from apex import amp\n"})
    (root / "alias.py").symlink_to(inside_target / "real.py")
    code, out = run([root, "--write"], capsys)
    assert code == 0
    assert (outside / "common.py").read_text() == "from apex import amp\n"  # not rewritten
    assert f"{root / 'common.py'}:1:1: not rewritten: a symlink to {outside / 'common.py'}, outside the folders " \
           "given" in out
    assert "ampcompat" in (root / "train.py").read_text()
    assert "ampcompat" in (root / "pkg" / "real.py").read_text() and (root / "alias.py").is_symlink()
    code, out = run([root / "common.py", "--write"], capsys)  # named explicitly: rewritten (through the link)
    assert "ampcompat" in (outside / "common.py").read_text() and (root / "common.py").is_symlink()


def test_undecodable_files_without_apex_are_skipped_but_do_not_fail_check(tmp_path, capsys):
    root = make_tree(tmp_path / "repo", {
        "ok.py": "from apex import amp\n",
        "latin1.py": "s = 'caf\xe9'\n".encode("latin-1"),
        "binary.py": bytes(range(256)),
        "cookie.py": b"# -*- coding: klingon -*-\nx = 1\n",
    })
    code, out = run([root, "--check"], capsys)
    assert code == 0, out
    assert out.splitlines()[-1].startswith("4 files: 1 scanned, 3 skipped; 1 Apex use")
    (root / "apex_latin1.py").write_bytes("from apex import amp\ns = 'caf\xe9'\n".encode("latin-1"))
    code, out = run([root, "--check"], capsys)
    assert code == 1 and "apex_latin1.py: skipped: not valid UTF-8: byte 0xe9 on line 2" in out


def test_a_nul_byte_is_reported_at_its_line(tmp_path, capsys):
    path = tmp_path / "nul.py"
    path.write_bytes(b"import apex\nx = 1\ny = '\x00'\n")
    code, out = run([path, "--check"], capsys)
    assert code == 1
    assert f"{path}: skipped: cannot parse the file: source code cannot contain null bytes (line 3)" in out


@pytest.mark.parametrize("module", sorted(catalogue.EXTENSION_MODULES))
def test_apex_extension_imports_are_reported_with_what_to_use_instead(tmp_path, module):
    from ampcompat.tools.migrate.scanner import scan
    from ampcompat.tools.migrate.sources import load_source

    path = tmp_path / "ext.py"
    path.write_text(f"import {module}\ntry:\n    import {module} as optional\nexcept ImportError:\n    optional = None\n")
    required, optional = scan(load_source(str(path))).uses
    wrapper = catalogue.EXTENSION_MODULES[module]
    assert required.verdict is catalogue.Verdict.UNSUPPORTED and f"behind `{wrapper}`" in required.reason
    assert optional.verdict is catalogue.Verdict.DIFFERENCE and "the fallback runs" in optional.reason
    found = catalogue.resolve(wrapper, module=wrapper if catalogue.ENTRIES.get(wrapper, None) is None
                              or catalogue.ENTRIES[wrapper].kind == "module" else None)
    if found.verdict is catalogue.Verdict.UNSUPPORTED:
        assert "does not provide" in required.reason  # the replacement ampcompat lacks too: says so
    else:
        assert f"use `{wrapper}`, which ampcompat provides" in required.reason


def test_a_module_next_to_the_file_is_not_an_apex_extension(tmp_path):
    from ampcompat.tools.migrate.scanner import scan
    from ampcompat.tools.migrate.sources import load_source

    (tmp_path / "syncbn.py").write_text("def welford_mean_var(x):\n    return x\n")
    path = tmp_path / "user.py"
    path.write_text("import syncbn\n")
    assert scan(load_source(str(path))).uses == []
