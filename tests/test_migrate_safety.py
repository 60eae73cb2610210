"""``migrate`` is safe on real codebases: it never crashes, and never breaks code silently.

* any file CPython accepts is processed (odd but valid syntax, encodings, line endings) and only
  Apex lines change; the standard library and torch's sources go through with no change at all;
* ``--write`` keeps checks for Apex by name working (the program still takes its Apex path) and
  lists them; a tree of Apex-era patterns trains to the same losses after it;
* ``--to-native`` keeps names other code needs and reports every import it removed or left; its O1
  output trains with plain PyTorch, importing neither apex nor ampcompat;
* usage errors are one line and exit 2; the summary says what happened.
"""
import ast
import difflib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from ampcompat.tools import migrate
from ampcompat.tools.migrate.alias_line import ALIAS_LINE, GUARDED_ALIAS_LINES
from ampcompat.tools.migrate.edits import split_lines
from ampcompat.tools.migrate.progress import Progress
from ampcompat.tools.migrate.scanner import scan
from ampcompat.tools.migrate.sources import iter_python_files, load_source
from ampcompat.tools.migrate.to_native import to_native

REPO = Path(__file__).resolve().parents[1]
TREE = REPO / "tests" / "fixtures" / "migrate_tree"
INTERNAL = "internal error"

# Valid Python that tripped or could trip a tokenizer-based rewriter. Each has an Apex import.
ODD_FILES = {
    "no_final_newline_in_block": b"import torch\nfrom apex import amp\n\ndef f(x):\n    return amp.initialize(x)",
    "crlf": b"from apex import amp\r\nimport apex_C\r\nx = amp\r\n",
    "cr_only": b"from apex import amp\rx = amp.scale_loss\r",
    "bom": b"\xef\xbb\xbffrom apex.parallel import DistributedDataParallel as DDP\nm = DDP\n",
    "tabs": b"if True:\n\tfrom apex import amp\n\tx = amp\n",
    "form_feeds": b"\x0cimport apex\n\x0c\ndef f():\n    import amp_C\x0c\n    return amp_C + \x0c 1\n\x0cclass A: pass\n",
    "continuations": b"from apex \\\n  import amp\nimport apex.\\\nparallel\nx = (1 +\n 2)\n",
    "fstrings": b"from apex import amp\nx = f\"{amp!r:>{10}} {'a' + f'{1}'}\"\n",
    "match": b"from apex import amp\nmatch amp:\n    case {'k': [1, *rest]}:\n        pass\n    case _:\n        pass\n",
    "latin1_cookie": "# -*- coding: latin-1 -*-\nfrom apex import amp\ns = 'caf\xe9'\n".encode("latin-1"),
    "cp1252_cookie": "# coding: cp1252\nimport apex\nx = '\u20ac'\n".encode("cp1252"),
    "semicolons": b"import os; from apex import amp; import amp_C\nif 1: import apex\n",
    "non_ascii_columns": "s='\u00e9\u00e9'; from apex import amp; y = amp.initialize\n".encode(),
    "parenthesised": b"from apex.optimizers import (FusedAdam,  # c\n    FusedSGD)\nFusedAdam([], lr=1)\n",
    "ends_in_continued_expression": b"x = 1 + \\\n 2\nimport apex",
    "nfkc_identifier": "import \uff41\uff50\uff45\uff58\nx = \uff41\uff50\uff45\uff58.amp\n".encode(),
    "decorated_first": b"@staticmethod\ndef f(): pass\nfrom apex import amp\n",
    "docstring_and_future": b'"""Doc."""\nfrom __future__ import annotations\nfrom apex import amp\n',
}


def run_cli(argv, capsys):
    code = migrate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def apex_line_numbers(text):
    """1-based numbers of the lines of statements that mention an Apex module (what a rewrite may touch)."""
    lines = lines_of(text)
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If, ast.Match)):
            span = range(node.lineno, node.end_lineno + 1)
            if any(word in lines[i - 1] for i in span for word in ("apex", "amp_C", "\uff41\uff50\uff45\uff58")):
                found.update(span)
    return found


def without_alias_line(lines, encoded=False):
    """``lines`` less the alias line ``--write`` adds, in either of its forms (``encoded``: lines are bytes)."""
    guarded = [line.encode() if encoded else line for line in GUARDED_ALIAS_LINES]
    for index in range(len(lines)):
        if lines[index : index + len(guarded)] == guarded:
            return lines[:index] + lines[index + len(guarded):]
    return [line for line in lines if line != (ALIAS_LINE.encode() if encoded else ALIAS_LINE)]


def has_alias_line(text):
    return without_alias_line(lines_of(text)) != lines_of(text)


def lines_of(text):
    """The lines as Python numbers them (form feeds and vertical tabs do not end a line)."""
    return [line.rstrip("\r\n") for line in split_lines(text)]


def changed_old_lines(old_lines, new_lines):
    """1-based numbers of the old lines a diff replaces or deletes."""
    changed = set()
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes():
        if tag != "equal":
            changed.update(range(i1 + 1, max(i2, i1 + 1) + 1))
    return changed


# --- 1. never crash ------------------------------------------------------------------------------------
def test_the_issue_repro_file_without_a_final_newline(tmp_path, capsys):
    path = tmp_path / "a.py"
    path.write_bytes(b"import torch\n\ndef f(x):\n    return x")
    for mode in ("--write", "--to-native"):
        code, out, _ = run_cli([path, mode], capsys)
        assert code == 0 and "skipped" not in out.replace("0 skipped", ""), out
        assert path.read_bytes() == b"import torch\n\ndef f(x):\n    return x"


@pytest.mark.parametrize("name", sorted(ODD_FILES))
@pytest.mark.parametrize("mode", ["--write", "--to-native"])
def test_odd_but_valid_files_are_rewritten_only_at_apex_lines(tmp_path, capsys, name, mode):
    data = ODD_FILES[name]
    compile(data, name, "exec")  # the fixture itself is valid Python
    path = tmp_path / f"{name}.py"
    path.write_bytes(data)
    code, out, _ = run_cli([path, mode], capsys)
    assert code == 0 and INTERNAL not in out and ": skipped: " not in out, out
    new = path.read_bytes()
    compile(new, name, "exec")
    source = load_source(str(path))
    old_text = data.decode(source.encoding)
    new_text = new.decode(source.encoding)
    if mode == "--write":
        new_lines = without_alias_line(lines_of(new_text))
        changed = changed_old_lines(lines_of(old_text), new_lines)
        assert changed and changed <= apex_line_numbers(old_text), (changed, new_text)
        assert run_cli([path, mode], capsys)[0] == 0 and path.read_bytes() == new  # idempotent


def _stdlib_and_torch():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = sorted(str(p) for p in stdlib.iterdir() if p.name not in ("site-packages", "dist-packages"))
    return roots + [str(Path(torch.__file__).parent)]


@pytest.mark.parametrize("mode", ["--write", "--to-native"])
def test_stdlib_and_torch_sources_go_through_untouched(capsys, mode):
    """The corpus of the running Python: no internal error, no change (none of it uses Apex)."""
    roots = _stdlib_and_torch()
    code, out, err = run_cli([*roots, mode, "--diff"], capsys)
    assert code == 0
    assert INTERNAL not in out
    skipped = [line for line in out.splitlines() if ": skipped: " in line]
    # Files CPython itself rejects (test data in Lib/test) are all that may be skipped.
    for line in skipped:
        path = line.split(": skipped: ")[0]
        with pytest.raises((SyntaxError, ValueError)):
            compile(Path(path).read_bytes(), path, "exec")
    diffs = [line for line in out.splitlines() if line.startswith("+++ ")]
    for line in diffs:  # a file that is changed must have an Apex use
        assert "apex" in Path(line[4:]).read_text(errors="replace")
    summary = out.splitlines()[-1]
    assert summary.startswith(f"{len(list(iter_python_files(roots)))} files")


def _stdlib_corpus(full):
    """The standard library's own files: a fixed sample, or (``full``) every file CPython compiles."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not full:  # every 16th top-level module and every 4th of the email package (about 16 files)
        return sorted(stdlib.glob("*.py"))[::16] + sorted((stdlib / "email").glob("*.py"))[::4]
    skip = {"site-packages", "dist-packages", "lib2to3", "test", "tests", "idle_test"}  # test data: odd on purpose
    return sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))


_MODES = {"write": ["--write"], "to-native": ["--to-native"], "write+to-native": ["--write", "--to-native"]}


@pytest.mark.parametrize("corpus", ["sample", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", list(_MODES))
def test_stdlib_files_with_an_apex_import_added_change_only_there_and_only_once(tmp_path, capsys, mode, corpus):
    """Real-world syntax through the rewriters: the stdlib, each file given Apex imports; every mode changes
    only those lines (and the alias line), and a second run changes nothing."""
    injected = "\nfrom apex.parallel import DistributedDataParallel as DDP\nimport amp_C\n"
    originals = {}
    for index, path in enumerate(_stdlib_corpus(corpus == "full")):
        target = tmp_path / f"{index:04d}_{path.name}"
        data = path.read_bytes()
        try:
            compile(data, str(path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            continue
        target.write_bytes(data + injected.encode())
        originals[target] = data + injected.encode()
    for args in _MODES[mode]:
        code, out, _ = run_cli([tmp_path, args], capsys)
        assert code == 0 and INTERNAL not in out and ": skipped: " not in out, out[-2000:]
    assert len(originals) > (50 if corpus == "full" else 12)
    first = {}
    for path, data in originals.items():
        new = first[path] = path.read_bytes()
        assert new != data, path.name
        compile(new, path.name, "exec", dont_inherit=True)
        old_lines = data.splitlines()
        new_lines = without_alias_line(new.splitlines(), encoded=True)
        kept = len(old_lines) - (2 if mode == "write" else 3)
        assert new_lines[:kept] == old_lines[:kept], path.name
    code, out, _ = run_cli([tmp_path, _MODES[mode][-1]], capsys)
    assert code == 0, out[-2000:]
    assert [p.name for p, data in first.items() if p.read_bytes() != data] == []


def test_every_mode_twice_over_the_fixture_tree_changes_nothing_the_second_time(tmp_path, capsys):
    """Every fixture of the suite (Apex-era scripts, the alias's fake Apex packages, odd files) in every mode."""
    for mode, steps in _MODES.items():
        tree = tmp_path / mode
        shutil.copytree(REPO / "tests" / "fixtures", tree, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        for args in steps:
            code, out, _ = run_cli([tree, args], capsys)
            assert INTERNAL not in out and code == 0, out[-3000:]
        first = {p: p.read_bytes() for p in tree.rglob("*.py")}
        code, out, _ = run_cli([tree, steps[-1]], capsys)
        assert code == 0 and INTERNAL not in out, out[-3000:]
        changed = sorted(str(p.relative_to(tree)) for p, data in first.items() if p.read_bytes() != data)
        assert changed == [], (mode, changed)
        for path, data in first.items():
            original = REPO / "tests" / "fixtures" / path.relative_to(tree)
            if data != original.read_bytes():
                compile(data, str(path), "exec", dont_inherit=True)  # whatever was rewritten still compiles


def test_an_unparsable_file_without_apex_is_not_read_further(tmp_path, capsys):
    (tmp_path / "py2.py").write_text("print 'hello'\n")
    (tmp_path / "py2_apex.py").write_text("import apex\nprint 'apex'\n")
    code, out, _ = run_cli([tmp_path, "--check"], capsys)
    assert code == 1
    assert [line.split(": skipped: ")[0] for line in out.splitlines() if ": skipped: " in line] == [
        str(tmp_path / "py2_apex.py")]


# --- 6. usage errors and summaries ------------------------------------------------------------------
def test_a_path_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "real.py").write_text("from apex import amp\n")
    code, out, err = run_cli([tmp_path / "real.py", tmp_path / "nonexistent_dir", "--write"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no such file or directory" in err and "nonexistent_dir" in err
    assert (tmp_path / "real.py").read_text() == "from apex import amp\n"  # nothing was done


@pytest.mark.parametrize("mode, written, dry", [
    ("--write", "Imports rewritten in 1 file.", "Would rewrite imports in 1 file (nothing written)."),
    ("--to-native", "Rewritten to plain PyTorch: 1 file.", "Would rewrite 1 file to plain PyTorch (nothing written)."),
])
def test_summary_says_what_happened(tmp_path, capsys, mode, written, dry):
    path = tmp_path / "x.py"
    path.write_text("from apex.fp16_utils import to_python_float\ny = to_python_float(x)\n")
    assert run_cli([path, mode, "--diff"], capsys)[1].splitlines()[-1].endswith(dry)
    assert path.read_text().startswith("from apex")
    assert run_cli([path, mode], capsys)[1].splitlines()[-1].endswith(written)


def test_progress_is_quiet_for_short_runs_and_periodic_for_long_ones():
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(100, stream, clock=lambda: now[0])
    for _ in range(10):
        progress.advance("reading")
    assert stream.getvalue() == ""
    now[0] = 3.0
    progress.advance("reading")
    now[0] = 4.0
    progress.advance("reading")  # within the log interval: no new line
    now[0] = 14.0
    progress.advance("reading")
    assert stream.getvalue().splitlines() == ["migrate: reading 11/100 files (3 s)",
                                              "migrate: reading 13/100 files (14 s)"]


def test_o1_rewrite_leaves_data_creation_outside_autocast(tmp_path):
    path = tmp_path / "t.py"
    path.write_text(textwrap.dedent("""\
        import torch
        from apex import amp
        model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
        for step in range(3):
            x = torch.randn(8, 16, device=device)
            y = torch.randint(0, 4, (8,)).to(device)
            hidden = model.encoder(x)
            loss = criterion(model.head(hidden), y)
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            optimizer.step()
    """))
    lines = to_native(scan(load_source(str(path)))).text.splitlines()
    header = next(i for i, line in enumerate(lines) if "torch.autocast" in line)
    assert lines[header - 2:header + 3] == [
        "    x = torch.randn(8, 16, device=device)",
        "    y = torch.randint(0, 4, (8,)).to(device)",
        "    with torch.autocast(amp_device_type, dtype=torch.float16):",
        "        hidden = model.encoder(x)",
        "        loss = criterion(model.head(hidden), y)",
    ]


# --- 2. checks for Apex by name ----------------------------------------------------------------------------
def test_checks_for_apex_by_name_are_found(tmp_path):
    path = tmp_path / "checks.py"
    path.write_text(textwrap.dedent("""\
        import importlib.metadata, importlib.util, sys
        import pkg_resources
        from transformers.utils import is_apex_available
        a = "apex" in sys.modules
        b = importlib.util.find_spec("apex")
        c = importlib.metadata.version("apex")
        d = pkg_resources.get_distribution("apex")
        e = is_apex_available()
        f = "apex" in {pkg.key for pkg in pkg_resources.working_set}
        g = args.amp == "apex"
        h = ApexScaler()
    """))
    found = [(u.line, u.kind) for u in scan(load_source(str(path))).uses]
    assert found == [(4, "string"), (5, "string"), (6, "string"), (7, "string"), (8, "check"), (9, "string")]


def _python(args, cwd, extra_path=()):
    env = {k: v for k, v in os.environ.items() if k not in ("AMPCOMPAT_APEX_ALIAS", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), str(REPO)])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two training subprocesses; --write's scripts also train in test_migrate.py by default
def test_write_keeps_the_apex_path_and_the_losses(tmp_path, capsys):
    original = _python(["-m", "ampcompat", "run", "train.py"], TREE / "write")
    assert original.returncode == 0, original.stderr
    assert "PATH apex" in original.stdout and original.stdout.count("LOSS") == 3

    work = tmp_path / "write"
    shutil.copytree(TREE / "write", work)
    code, out, _ = run_cli([work, "--write"], capsys)
    assert code == 0
    for line in ("train.py:19:31: checks for Apex by name (`\"apex\" not in sys.modules`)",
                 "train.py:21:12: checks for Apex by name (`apex_available()`)",
                 "utils.py:20:37: checks for Apex by name (`importlib.util.find_spec(\"apex\")`)",
                 "utils.py:25:43: checks for Apex by name (`importlib.metadata.version(\"apex\")`)",
                 "utils.py:14:5: left `from apex.contrib.sparsity import ...` unchanged: apex.contrib.sparsity is "
                 "not provided by ampcompat"):
        assert f"{work}/{line}" in out, line
    for name in ("train.py", "models.py", "utils.py"):
        assert has_alias_line((work / name).read_text()), name

    rewritten = _python(["train.py"], work)  # plain python: no alias from a runner
    assert rewritten.returncode == 0, rewritten.stderr
    assert rewritten.stdout == original.stdout


_NO_APEX = r"""
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("apex", "amp_C", "apex_C", "ampcompat"):
            raise ImportError(f"{name} is blocked: the native rewrite must not need it")
        return None
sys.meta_path.insert(0, Blocker())
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("apex", "amp_C", "apex_C", "ampcompat"))
assert not leaked, leaked
"""


@pytest.mark.slow  # two training subprocesses; test_migrate.py's O1 twins prove --to-native trains alike by default
def test_to_native_o1_tree_trains_with_plain_pytorch(tmp_path, capsys):
    original = _python(["-m", "ampcompat", "run", "train_o1.py"], TREE / "native")
    assert original.returncode == 0, original.stderr

    work = tmp_path / "native"
    shutil.copytree(TREE / "native", work)
    code, out, _ = run_cli([work, "--to-native"], capsys)
    assert code == 0
    assert f"{work}/train_o1.py:3:1: removed `import apex.amp as amp`" in out
    assert f"{work}/train_o1.py:9:5: removed `FusedSGD` from `apex.optimizers`" in out
    assert f"{work}/layers.py:5:5: `FusedLayerNorm as LayerNorm` from `apex.normalization` now binds " \
           "`torch.nn.LayerNorm`" in out
    layers = (work / "layers.py").read_text()
    assert "try:\n    from torch.nn import LayerNorm\nexcept ImportError:\n    from torch.nn import LayerNorm\n" in layers

    native = _python(["-c", _NO_APEX, "train_o1.py"], work)
    assert native.returncode == 0, native.stderr
    losses = [[float(v) for v in line.split()[1:]] for line in native.stdout.splitlines() if line.startswith("LOSS")]
    expected = [[float(v) for v in line.split()[1:]] for line in original.stdout.splitlines() if line.startswith("LOSS")]
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-4, atol=1e-6)


def test_to_native_keeps_exported_and_fallback_names_and_never_drops_unmappable_imports(tmp_path, capsys):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "compat.py").write_text(textwrap.dedent("""\
        try:
            from apex.normalization import FusedLayerNorm as LayerNorm
        except ImportError:
            from torch.nn import LayerNorm
        from apex.optimizers import FusedAdam
        from apex.fp16_utils import to_python_float
        import amp_C
        import apex.transformer
        from apex.contrib.sparsity import ASP
        from apex.contrib import xentropy, sparsity
    """))
    (package / "train.py").write_text("from .compat import LayerNorm, FusedAdam\nimport torch\n"
                                      "opt = FusedAdam(torch.nn.Linear(2, 2).parameters(), lr=0.1)\n")
    code, out, _ = run_cli([tmp_path, "--to-native"], capsys)
    assert code == 0
    compat = (package / "compat.py").read_text()
    assert compat.splitlines() == [
        ALIAS_LINE,  # FusedAdam stays on ampcompat: `apex` stays registered, as `--write` keeps it
        "try:",
        "    from torch.nn import LayerNorm",
        "except ImportError:",
        "    from torch.nn import LayerNorm",
        "from ampcompat.optimizers import FusedAdam",
        "import amp_C",
        "import apex.transformer",
        "from apex.contrib.sparsity import ASP",
        "from apex.contrib import sparsity",
    ]
    prefix = re.compile(re.escape(str(package / "compat.py")) + r":(\d+):\d+: ")
    notes = {prefix.match(line).group(1): line for line in out.splitlines() if prefix.match(line)}
    assert set(notes) == {"1", "2", "5", "6", "7", "8", "9", "10"}  # every import has its line in the report
    assert "added `import ampcompat; ampcompat.install_apex_alias(); import apex` above this line" in notes["1"]
    assert "another scanned file imports `FusedAdam`" in notes["5"]
    assert "removed `to_python_float`" in notes["6"]
    assert "left `import amp_C` as it was" in notes["7"]
    assert "left `import apex.transformer` as it was: apex.transformer is not provided by ampcompat" in notes["8"]
    assert "left `ASP` from `apex.contrib.sparsity` as it was: apex.contrib.sparsity is not provided" in notes["9"]
    assert f"{package / 'compat.py'}:10:1: removed `xentropy` from `apex.contrib`" in out  # provided, unused
    assert f"{package / 'compat.py'}:10:1: left `sparsity` from `apex.contrib` as it was" in out
    # The tree still imports and runs (ampcompat where nothing native stands in).
    result = _python(["-c", "import pkg.train, pkg.compat; print(pkg.compat.LayerNorm is __import__('torch').nn.LayerNorm)"],
                     tmp_path)
    # `import amp_C`, left in place, imports through the alias line; the refused apex.transformer fails, as reported.
    assert result.returncode != 0 and "apex.transformer is not provided by ampcompat" in result.stderr
    (package / "compat.py").write_text("\n".join(compat.splitlines()[:7]) + "\n")
    result = _python(["-c", "import pkg.train, pkg.compat; print(pkg.compat.LayerNorm is __import__('torch').nn.LayerNorm)"],
                     tmp_path)
    assert result.returncode == 0 and result.stdout == "True\n", result.stderr


IDEMPOTENCE_SNIPPETS = {
    "dotted_module_import": "import apex.mlp\nclass Mlp(apex.mlp.MLP):\n    pass\n",
    "state_module_import": "import apex.amp._amp_state\nscale = apex.amp._amp_state.loss_scalers[0]\n",
    "star_import": "from apex import *\nmodel, opt = amp.initialize(model, opt, opt_level='O2')\n",
    "optional_amp": "try:\n    from apex import amp\nexcept ImportError:\n    amp = None\nif amp:\n    amp.init()\n",
    "blocked_o1_with_todos": "from apex import amp\nmodel, opt = amp.initialize(m, o, opt_level='O1', loss_scale=128.0)\n"
                             "with amp.scale_loss(loss, opt) as s:\n    s.backward()\n",
    "check_only": "import sys\nHAS_APEX = 'apex' in sys.modules\n",
    "value_use": "from apex.parallel import DistributedDataParallel as DDP\ndef wrap(m, w=DDP):\n    return w(m)\n",
}


@pytest.mark.parametrize("name", sorted(IDEMPOTENCE_SNIPPETS))
@pytest.mark.parametrize("mode", list(_MODES))
def test_a_second_run_changes_nothing(tmp_path, capsys, name, mode):
    path = tmp_path / f"{name}.py"
    path.write_text(IDEMPOTENCE_SNIPPETS[name])
    for args in _MODES[mode]:
        assert run_cli([path, args], capsys)[0] == 0
    first = path.read_text()
    compile(first, name, "exec")
    assert run_cli([path, _MODES[mode][-1]], capsys)[0] == 0
    assert path.read_text() == first


@pytest.mark.parametrize("before, after", [
    # Megatron-LM core_v0.4.0 megatron/optimizer/__init__.py: a header, a blank line, the Apex imports removed.
    ("# Copyright\n\nfrom apex.optimizers import FusedAdam as Adam\nfrom apex.optimizers import FusedSGD as SGD\n\n"
     "from megatron import get_args\nopt = Adam(params, lr=1.0)\nsgd = SGD(params, lr=1.0)\n",
     "# Copyright\n\nimport torch\n\nfrom megatron import get_args\n"
     "opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0, fused=True)\n"
     "sgd = torch.optim.SGD(params, lr=1.0, fused=True)\n"),
    ('"""Doc."""\nfrom __future__ import annotations\n# leading comment\n@decorator\ndef f():\n    pass\n'
     "from apex.fp16_utils import to_python_float\nfrom apex.optimizers import FusedSGD\n"
     "x = to_python_float(t)\no = FusedSGD(p, lr=1)\n",
     '"""Doc."""\nfrom __future__ import annotations\n# leading comment\nimport torch\n@decorator\ndef f():\n'
     "    pass\nx = t.item()\no = torch.optim.SGD(p, lr=1, fused=True)\n"),
])
def test_import_torch_lands_before_the_first_statement_whatever_is_removed_around_it(tmp_path, capsys, before, after):
    path = tmp_path / "layout.py"
    path.write_text(before)
    code, out, _ = run_cli([path, "--to-native"], capsys)
    assert code == 0, out
    assert path.read_text() == after
