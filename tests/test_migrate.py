"""``ampcompat migrate``: the report, ``--write`` (imports only, byte-exact, idempotent) and ``--to-native``.

The legacy scripts under ``tests/fixtures/legacy_scripts`` carry ``# expect: api=verdict`` comments
naming every Apex use on their line; the scanner must find exactly those. Scripts are run in
subprocesses (``--steps N`` prints ``LOSS <step> <value>`` lines) so each gets a fresh interpreter.
"""
import ast
import collections
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest
import torch

from ampcompat.tools import migrate
from ampcompat.tools.migrate import catalogue
from ampcompat.tools.migrate.alias_line import ALIAS_LINE, ALIAS_STATEMENTS, GUARDED_ALIAS_LINES
from ampcompat.tools.migrate.scanner import scan
from ampcompat.tools.migrate.sources import SkippedFile, load_source
from ampcompat.tools.migrate.to_native import to_native

from _migrate_runs import WarmRunner

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "legacy_scripts"
BAD_FILES = {
    "py2_syntax_error.py": "syntax error on line 6: Missing parentheses in call to 'print'. Did you mean print(...)?",
    "latin1_no_cookie.py": "not valid UTF-8: byte 0xee on line 1; convert the file to UTF-8 or declare its "
                           "encoding (PEP 263)",
}
SCRIPTS = sorted(p.name for p in FIXTURES.glob("*.py") if p.name not in BAD_FILES)
O1_TWINS = ["simple_o1.py", "transformer_o1.py"]


# --- helpers ---------------------------------------------------------------------------------------
def expected_uses(path):
    """Counter of (line, api, verdict) from the file's ``# expect:`` comments."""
    found = collections.Counter()
    with tokenize.open(path) as handle:
        for token in tokenize.generate_tokens(handle.readline):
            if token.type == tokenize.COMMENT and token.string.startswith("# expect:"):
                for item in token.string[len("# expect:"):].split(","):
                    api, verdict = item.strip().split("=")
                    found[(token.start[0], api, verdict)] += 1
    return found


def scanned_uses(path):
    source = load_source(str(path))
    assert not isinstance(source, SkippedFile), source
    return collections.Counter((u.line, u.api, u.verdict.key) for u in scan(source).uses)


def run_main(argv, capsys):
    code = migrate.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def copy_fixtures(tmp_path, names=None):
    target = tmp_path / "scripts"
    target.mkdir(parents=True)
    for path in FIXTURES.glob("*.py"):
        if names is None or path.name in names:
            shutil.copyfile(path, target / path.name)
    return target


def import_lines(text):
    """Line numbers covered by import statements."""
    lines = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def ampcompat_modules_imported(path):
    """The ampcompat modules a (rewritten) script imports: what it needs to run."""
    modules = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.split(".")[0] == "ampcompat")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ampcompat":
            modules.add(node.module)
            modules.update(f"{node.module}.{a.name}" for a in node.names
                           if node.module == "ampcompat" and a.name in catalogue.MAPPED_PACKAGES)
    return modules


def require(modules):
    for module in sorted(modules):
        importlib.import_module(module)  # a rewritten import that names a missing module fails here


class ScriptRunner:
    """Runs scripts like ``python script.py --steps N``, each in a fresh fork of a warm interpreter.

    Starting Python and importing torch dominates a tiny script's run time; forking a process that
    has already done so gives every script its own process (own amp state, own autocast state) at a
    fraction of the cost.
    """

    def __init__(self):
        self.runner = WarmRunner()

    def run(self, path, steps, absent=False):
        """The LOSS rows the script prints; ``absent``: ``apex`` and ``ampcompat`` cannot be imported, so a
        script importing either fails."""
        reply = self.runner.run({"script": str(path), "args": ["--steps", str(steps)],
                                 "env": "absent" if absent else "plain"})
        assert reply["code"] == 0, reply["output"]
        return [line.split()[2:] for line in reply["output"].splitlines() if line.startswith("LOSS ")]

    def close(self):
        self.runner.close()


@pytest.fixture(scope="module")
def scripts():
    runner = ScriptRunner()
    yield runner
    runner.close()


# --- the report ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_scan_finds_every_use_with_its_verdict(name):
    expected = expected_uses(FIXTURES / name)
    assert expected, "every fixture marks its Apex uses"
    assert scanned_uses(FIXTURES / name) == expected


def test_text_report_lists_uses_skips_and_summary(capsys):
    code, out, _ = run_main([FIXTURES], capsys)
    assert code == 0
    lines = out.splitlines()
    uses = [use for name in SCRIPTS for use in scan(load_source(str(FIXTURES / name))).uses]
    for use in uses:
        line = f"{use.path}:{use.line}:{use.col}: {use.api} — {use.verdict.value}"
        assert any(text.startswith(line) for text in lines), line
    for name, reason in BAD_FILES.items():
        assert f"{FIXTURES / name}: skipped: {reason}" in lines
    counts = collections.Counter(use.verdict for use in uses)
    assert lines[-1] == (
        f"{len(SCRIPTS) + len(BAD_FILES)} files: {len(SCRIPTS)} scanned, {len(BAD_FILES)} skipped; "
        f"{len(uses)} Apex uses: {counts[catalogue.Verdict.SUPPORTED]} run unchanged, "
        f"{counts[catalogue.Verdict.DIFFERENCE]} run with a noted difference, "
        f"{counts[catalogue.Verdict.UNSUPPORTED]} not supported."
    )


def test_json_report_matches_the_scan(capsys):
    code, out, _ = run_main([FIXTURES, "--format", "json"], capsys)
    assert code == 0
    payload = json.loads(out)
    got = collections.Counter((Path(u["path"]).name, u["line"], u["api"], u["verdict"]) for u in payload["uses"])
    want = collections.Counter((name, line, api, verdict) for name in SCRIPTS
                               for (line, api, verdict), n in expected_uses(FIXTURES / name).items() for _ in range(n))
    assert got == want
    assert {Path(s["path"]).name: s["reason"] for s in payload["skipped"]} == BAD_FILES
    summary = payload["summary"]
    assert summary["uses"] == len(payload["uses"]) == sum(summary[v.key] for v in catalogue.Verdict)
    assert (summary["scanned"], summary["skipped"]) == (len(SCRIPTS), len(BAD_FILES))
    use = next(u for u in payload["uses"] if u["api"] == "apex.amp.initialize" and u["path"].endswith("simple_o1.py"))
    assert use["native"] == catalogue.ENTRIES["apex.amp.initialize"].native
    assert use["verdict_text"] == "runs with a noted difference" and use["reason"].startswith("O1 casts through")


def test_check_fails_on_unsupported_uses_and_unreadable_files(capsys, tmp_path):
    assert run_main([FIXTURES / "simple_o1.py", "--check"], capsys)[0] == 0
    # bert_style imports the refused apex.contrib.sparsity inside try/except ImportError: its fallback runs.
    assert run_main([FIXTURES / "bert_style.py", "--check"], capsys)[0] == 0
    refused = tmp_path / "refused.py"
    refused.write_text("from apex.contrib.sparsity import ASP\nASP.prune_trained_model(model, optimizer)\n")
    assert run_main([refused, "--check"], capsys)[0] == 1
    assert run_main([FIXTURES / "py2_syntax_error.py", FIXTURES / "simple_o1.py", "--check"], capsys)[0] == 1
    assert run_main([FIXTURES], capsys)[0] == 0  # without --check the report never fails


def test_verdicts_follow_the_arguments(tmp_path):
    path = tmp_path / "levels.py"
    path.write_text(textwrap.dedent("""\
        from apex import amp
        amp.initialize(m, o, opt_level="O2")
        amp.initialize(m, o, opt_level="O2", loss_scale=128.0)
        amp.initialize(m, o)
        amp.initialize(m, o, opt_level="O5")
        amp.initialize(m, o, opt_level="01")
        amp.initialize(m, o, enabled=False, opt_level="O1")
        handle = amp.init()
        handle.scale_loss(loss, opt)
        amp.no_such_name()
    """))
    verdicts = [(u.line, u.api, u.verdict.key) for u in scan(load_source(str(path))).uses if u.kind != "import"]
    assert verdicts == [
        (2, "apex.amp.initialize", "supported"),
        (3, "apex.amp.initialize", "difference"),
        (4, "apex.amp.initialize", "difference"),
        (5, "apex.amp.initialize", "difference"),
        (6, "apex.amp.initialize", "unsupported"),
        (7, "apex.amp.initialize", "supported"),
        (8, "apex.amp.init", "difference"),
        (9, "apex.amp.init().scale_loss", "unsupported"),
        (10, "apex.amp.no_such_name", "unsupported"),
    ]


def test_scanner_sees_aliases_strings_and_private_attributes(tmp_path):
    path = tmp_path / "mixed.py"
    path.write_text(textwrap.dedent("""\
        import importlib.util, sys
        import apex.parallel as par
        from ampcompat import amp as compat_amp
        from apex.fp16_utils import *
        import ampcompat
        def to_python_float(x):  # shadows the star import: not Apex's
            return x
        par.SyncBatchNorm(4)
        compat_amp.scale_loss
        clip_grad_norm(p, 1.0)
        to_python_float(3)
        if importlib.util.find_spec("apex") is None or "amp_C" not in sys.modules:
            pass
        hasattr(opt, "_amp_stash")
        opt._amp_stash.lazy_init_called = True
        ampcompat.reset()
    """))
    uses = [(u.line, u.api, u.via, u.kind) for u in scan(load_source(str(path))).uses]
    assert uses == [
        (2, "apex.parallel", "apex", "import"),
        (3, "apex.amp", "ampcompat", "import"),
        (4, "apex.fp16_utils", "apex", "import"),
        (8, "apex.parallel.SyncBatchNorm", "apex", "call"),
        (9, "apex.amp.scale_loss", "ampcompat", "reference"),
        (10, "apex.fp16_utils.clip_grad_norm", "apex", "call"),
        (12, "apex", "apex", "string"),
        (12, "amp_C", "apex", "string"),
        (14, "optimizer._amp_stash", "apex", "attribute"),
        (15, "optimizer._amp_stash", "apex", "attribute"),
    ]


def test_the_report_follows_scopes_and_branches(tmp_path, capsys):
    """A name is Apex's only where its Apex binding reaches."""
    path = tmp_path / "scopes.py"
    path.write_text(textwrap.dedent("""\
        from apex import amp
        def wrap(model, fp16, local_rank):
            if fp16:
                from apex.parallel import DistributedDataParallel
                return DistributedDataParallel(model)
            else:
                from torch.nn.parallel import DistributedDataParallel
                return DistributedDataParallel(model, device_ids=[local_rank])
        def scaler():
            from torch.cuda import amp
            return amp.GradScaler()
        def convert(model, apex):
            apex.parallel.convert_syncbn_model(model)
        try:
            from apex.parallel import DistributedDataParallel as DDP
        except ImportError:
            from torch.nn.parallel import DistributedDataParallel as DDP
        DDP(net)
    """))
    uses = [(u.line, u.api, u.kind, u.exclusive) for u in scan(load_source(str(path))).uses]
    assert uses == [
        (1, "apex.amp", "import", True),
        (4, "apex.parallel.DistributedDataParallel", "import", True),
        (5, "apex.parallel.DistributedDataParallel", "call", True),
        (15, "apex.parallel.DistributedDataParallel", "import", True),
        (18, "apex.parallel.DistributedDataParallel", "call", False),  # the fallback may reach it too
    ]
    assert run_main([path, "--check"], capsys)[0] == 0


# --- bad input ---------------------------------------------------------------------------------------
def test_bad_files_are_reported_and_skipped(capsys, tmp_path, monkeypatch):
    folder = copy_fixtures(tmp_path, {"simple_o1.py", *BAD_FILES})
    (folder / "nul.py").write_bytes(b"import apex\x00\n")
    (folder / "cookie.py").write_bytes(b"# -*- coding: klingon -*-\nimport apex\n")
    (folder / "dangling.py").symlink_to(folder / "missing-target.py")
    (folder / "locked.py").write_text("from apex import amp\n")
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("locked.py"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in ("dangling.py", "locked.py")}
    code, out, _ = run_main([folder, "--write"], capsys)
    assert code == 0
    reasons = dict(line.split(": skipped: ") for line in out.splitlines() if ": skipped: " in line)
    assert "null bytes" in reasons.pop(str(folder / "nul.py"))
    assert reasons == {
        **{str(folder / name): reason for name, reason in BAD_FILES.items()},
        str(folder / "cookie.py"): "bad encoding declaration: unknown encoding: klingon",
        str(folder / "dangling.py"): "cannot read the file: No such file or directory",
        str(folder / "locked.py"): "cannot read the file: Permission denied",
    }
    for name, data in before.items():  # the readable script was rewritten, nothing else touched
        assert ((folder / name).read_bytes() == data) == (name != "simple_o1.py"), name


def test_a_failed_write_leaves_the_original_and_no_temporary_file(capsys, tmp_path, monkeypatch):
    folder = copy_fixtures(tmp_path, {"simple_o1.py"})
    original = (folder / "simple_o1.py").read_bytes()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    code, out, _ = run_main([folder, "--write"], capsys)
    assert code == 1
    assert f"{folder / 'simple_o1.py'}: skipped: could not write the file: [Errno 28] No space left on device" in out
    assert (folder / "simple_o1.py").read_bytes() == original
    assert sorted(p.name for p in folder.iterdir()) == ["simple_o1.py"]


def test_usage_errors_exit_2(capsys):
    assert run_main(["--diff", FIXTURES], capsys)[0] == 2
    assert run_main(["--write", "--to-native", FIXTURES], capsys)[0] == 2
    assert run_main([], capsys)[0] == 2


@pytest.mark.parametrize("command, script, code", [  # a subprocess each: the second under --full
    (["-m", "ampcompat", "migrate"], "bert_style.py", 0),  # --check: the refused import is optional
    pytest.param(["-m", "ampcompat.tools.migrate"], "simple_o1.py", 0, marks=pytest.mark.slow),
])
def test_module_entry_points(command, script, code):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *command, str(FIXTURES / script), "--format", "json", "--check"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    got = collections.Counter((u["line"], u["api"], u["verdict"]) for u in json.loads(proc.stdout)["uses"])
    assert got == expected_uses(FIXTURES / script)


# --- --write -------------------------------------------------------------------------------------------
def test_write_changes_only_import_lines_and_is_idempotent(capsys, tmp_path):
    folder = copy_fixtures(tmp_path)
    code, out, _ = run_main([folder, "--write"], capsys)
    assert code == 0
    guarded = {"timm_style.py"}  # every Apex import in a try with an ImportError fallback: Apex was optional
    for name in SCRIPTS:
        old, new = (FIXTURES / name).read_text(), (folder / name).read_text()
        assert old != new, name
        old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
        block = [line + "\n" for line in (GUARDED_ALIAS_LINES if name in guarded else [ALIAS_LINE])]
        added = [i for i in range(len(new_lines)) if new_lines[i : i + len(block)] == block]
        assert len(added) == 1, name  # unindented: at module level
        assert f"{folder / name}:{added[0] + 1}:1: added `{ALIAS_STATEMENTS}` above this line" in out, name
        del new_lines[added[0] : added[0] + len(block)]
        new = "".join(new_lines)
        assert len(old_lines) == len(new_lines)
        changed = {i + 1 for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b}
        assert changed <= import_lines(old) & import_lines(new), name
        remaining = [u for u in scan(load_source(str(folder / name))).uses if u.kind == "import" and u.via == "apex"]
        assert [u.api for u in remaining] == (["apex.contrib.sparsity.ASP"] if name == "bert_style.py" else []), name
    for name in BAD_FILES:
        assert (folder / name).read_bytes() == (FIXTURES / name).read_bytes()
    note = "left `from apex.contrib.sparsity import ...` unchanged: apex.contrib.sparsity is not provided by ampcompat"
    assert f"{folder / 'bert_style.py'}:19:5: {note}" in out
    assert "import ampcompat.apex_C as apex_C  # expect" in (folder / "bert_style.py").read_text()

    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, _ = run_main([folder, "--write"], capsys)
    assert code == 0 and out.splitlines()[-1].endswith("Imports rewritten in 0 files.")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot


def test_write_preserves_every_other_byte(capsys, tmp_path):
    source = (
        "\ufeff# -*- coding: utf-8 -*-\r\n"
        "x = 'é'; from apex import amp  # déjà\r\n"
        "from apex.parallel import (DistributedDataParallel as DDP,  # keep me\r\n"
        "                           SyncBatchNorm)\r\n"
        "import os, apex.parallel as P, amp_C\r\n"
        "import apex\r\n"
        "import apex.parallel\r\n"
        "from apex \\\r\n"
        "    import fp16_utils\r\n"
        "try:\r\n"
        "\tfrom apex.amp._amp_state import _amp_state\r\n"
        "except ImportError:\r\n"
        "\t_amp_state = None\r\n"
        "from . import apex\r\n"
        "print(apex.parallel)  # apex stays apex\r\n"
    )
    path = tmp_path / "odd.py"
    path.write_bytes(source.encode("utf-8"))
    assert run_main([path, "--write"], capsys)[0] == 0
    assert path.read_bytes().decode("utf-8") == (
        "\ufeff# -*- coding: utf-8 -*-\r\n"
        f"{ALIAS_LINE}\r\n"
        "x = 'é'; from ampcompat import amp  # déjà\r\n"
        "from ampcompat.parallel import (DistributedDataParallel as DDP,  # keep me\r\n"
        "                           SyncBatchNorm)\r\n"
        "import os, ampcompat.parallel as P, ampcompat.amp_C as amp_C\r\n"
        "import ampcompat as apex\r\n"
        "import ampcompat.parallel, ampcompat as apex\r\n"
        "from ampcompat \\\r\n"
        "    import fp16_utils\r\n"
        "try:\r\n"
        "\tfrom ampcompat.amp._amp_state import _amp_state\r\n"
        "except ImportError:\r\n"
        "\t_amp_state = None\r\n"
        "from . import apex\r\n"
        "print(apex.parallel)  # apex stays apex\r\n"
    )


def test_write_keeps_what_ampcompat_lacks_and_says_why(capsys, tmp_path):
    path = tmp_path / "partial.py"
    text = ("import apex.transformer\nfrom apex.contrib.sparsity import ASP\nfrom apex.contrib import sparsity\n"
            "from apex import amp, transformer\nfrom apex import amp, bogus\n")
    path.write_text(text)
    code, out, _ = run_main([path, "--write"], capsys)
    assert code == 0 and path.read_text() == text
    refused = "{} is not provided by ampcompat: ".format
    lines = out.splitlines()
    assert lines[0].startswith(f"{path}:1:1: left `import apex.transformer` unchanged: {refused('apex.transformer')}")
    assert lines[1].startswith(f"{path}:2:1: left `from apex.contrib.sparsity import ...` unchanged: "
                               f"{refused('apex.contrib.sparsity')}")
    assert lines[2].startswith(f"{path}:3:1: left `from apex.contrib import ...` unchanged: "
                               f"{refused('apex.contrib.sparsity')}")
    assert lines[3].startswith(f"{path}:4:1: left `from apex import ...` unchanged: {refused('apex.transformer')}")
    assert lines[4] == f"{path}:5:1: left `from apex import ...` unchanged: `bogus` is not in ampcompat; split the import"
    assert all("Use " in line and " instead" in line for line in lines[:4])  # the replacement is named


def test_write_points_the_new_surfaces_at_ampcompat(capsys, tmp_path):
    path = tmp_path / "new.py"
    path.write_text("import apex_C\nfrom apex.contrib.xentropy import SoftmaxCrossEntropyLoss\n"
                    "from apex import mlp, fused_dense, contrib\nimport apex.contrib.optimizers as contrib_optim\n")
    assert run_main([path, "--write"], capsys)[0] == 0
    assert path.read_text().splitlines()[1:] == [
        "import ampcompat.apex_C as apex_C", "from ampcompat.contrib.xentropy import SoftmaxCrossEntropyLoss",
        "from ampcompat import mlp, fused_dense, contrib", "import ampcompat.contrib.optimizers as contrib_optim"]


@pytest.mark.parametrize("statement, expression, target", [
    ("import apex", "apex.parallel.DistributedDataParallel", "ampcompat.parallel:DistributedDataParallel"),
    ("import apex.parallel", "apex.parallel.DistributedDataParallel", "ampcompat.parallel:DistributedDataParallel"),
    ("import apex.parallel.LARC", "apex.parallel.LARC.LARC", "ampcompat.parallel.LARC:LARC"),
    ("import apex.amp as amp", "amp.scale_loss", "ampcompat.amp:scale_loss"),
    ("import apex.fp16_utils", "apex.fp16_utils.FP16_Optimizer", "ampcompat.fp16_utils:FP16_Optimizer"),
    ("from apex import amp, optimizers", "optimizers.FusedAdam", "ampcompat.optimizers:FusedAdam"),
    ("from apex.amp import _amp_state", "_amp_state", "ampcompat.amp:_amp_state"),
    ("from apex.amp._amp_state import _amp_state", "_amp_state", "ampcompat.amp:_amp_state"),
    ("from apex.amp.scaler import LossScaler", "LossScaler", "ampcompat.amp.scaler:LossScaler"),
    ("import amp_C", "amp_C.multi_tensor_scale", "ampcompat.amp_C:multi_tensor_scale"),
    ("from apex.multi_tensor_apply import multi_tensor_applier", "multi_tensor_applier",
     "ampcompat.multi_tensor_apply:multi_tensor_applier"),
    ("from apex.normalization import FusedLayerNorm", "FusedLayerNorm", "ampcompat.normalization:FusedLayerNorm"),
])
def test_rewritten_imports_bind_ampcompat_objects(tmp_path, capsys, statement, expression, target):
    """Every later ``apex.x.y`` / ``amp.z`` reference finds ampcompat's object under the old spelling."""
    path = tmp_path / "imports.py"
    path.write_text(statement + "\n")
    assert run_main([path, "--write"], capsys)[0] == 0
    module_name, attribute = target.split(":")
    module = importlib.import_module(module_name)
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert eval(expression, namespace) is getattr(module, attribute)
    assert not [u for u in scan(load_source(str(path))).uses if u.via == "apex"]


def test_diff_prints_the_change_and_writes_nothing(capsys, tmp_path):
    folder = copy_fixtures(tmp_path, {"simple_o1.py"})
    before = (folder / "simple_o1.py").read_bytes()
    code, out, _ = run_main([folder / "simple_o1.py", "--write", "--diff"], capsys)
    assert code == 0 and (folder / "simple_o1.py").read_bytes() == before
    path = folder / "simple_o1.py"
    assert f"--- {path}\n+++ {path}\n" in out
    assert "\n-from apex import amp  # expect: apex.amp=supported\n" in out
    assert "\n+from ampcompat import amp  # expect: apex.amp=supported\n" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_written_scripts_train_three_steps(tmp_path, capsys, scripts, name):
    folder = copy_fixtures(tmp_path, {name})
    assert run_main([folder, "--write"], capsys)[0] == 0
    require(ampcompat_modules_imported(folder / name))
    losses = scripts.run(folder / name, steps=3)
    assert len(losses) == 3
    assert all(torch.isfinite(torch.tensor(float(row[0]))) for row in losses)


# --- --to-native ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", O1_TWINS)
def test_to_native_o1_matches_the_ampcompat_run(tmp_path, capsys, scripts, name):
    """Acceptance 2: the native rewrite imports neither apex nor ampcompat and trains identically.

    Both runs autocast the same forward pass and loss on the same device, scale by the same power of
    two (2**16, no overflow or growth within 10 steps) and unscale exactly, so the losses are equal
    bit for bit.
    """
    require({"ampcompat.amp", "ampcompat.parallel", "ampcompat.optimizers", "ampcompat.fp16_utils"})
    written, native = copy_fixtures(tmp_path / "w", {name}), copy_fixtures(tmp_path / "n", {name})
    assert run_main([written, "--write"], capsys)[0] == 0
    assert run_main([native, "--to-native"], capsys)[0] == 0
    text = (native / name).read_text()
    assert "TODO(ampcompat)" not in text
    modules = {a.name.split(".")[0] for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import) for a in n.names}
    modules |= {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)}
    assert not modules & {"apex", "ampcompat", "amp_C"}
    assert "torch.amp.GradScaler(amp_device_type, init_scale=2.0**16, growth_interval=2000)" in text
    assert "with torch.autocast(amp_device_type, dtype=torch.float16):" in text

    native_losses = scripts.run(native / name, steps=10, absent=True)
    ampcompat_losses = scripts.run(written / name, steps=10)
    assert len(native_losses) == 10
    torch.testing.assert_close(torch.tensor([float(r[0]) for r in native_losses]),
                               torch.tensor([float(r[0]) for r in ampcompat_losses]), rtol=0, atol=0)


def test_to_native_simple_o1_output(tmp_path, capsys):
    folder = copy_fixtures(tmp_path, {"simple_o1.py"})
    assert run_main([folder, "--to-native"], capsys)[0] == 0
    lines = (folder / "simple_o1.py").read_text().splitlines()
    start = lines.index("for step in range(args.steps):")
    assert lines[start:start + 13] == [
        "for step in range(args.steps):",
        "    optimizer.zero_grad()",
        "    # forward pass",
        "    with torch.autocast(amp_device_type, dtype=torch.float16):",
        "        output = model(x)",
        "        loss = loss_fn(output, y)",
        "    # expect: apex.amp.scale_loss=supported",
        "    scaler.scale(loss).backward()",
        "    scaler.unscale_(optimizer)",
        '    torch.nn.utils.clip_grad_norm_((p for group in optimizer.param_groups for p in group["params"]), '
        "max_norm=1.0)  # expect: apex.amp.master_params=supported",
        "    scaler.step(optimizer)",
        "    scaler.update()",
        '    print(f"LOSS {step} {loss.item()!r}")',
    ]
    assert "    model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # expect: " \
           "apex.parallel.DistributedDataParallel=difference" in lines
    assert '        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "amp": scaler.state_dict()},' \
           "  # expect: apex.amp.state_dict=supported" in lines


@pytest.mark.parametrize("name, reasons", [
    ("dcgan_style.py", ["opt_level is only known at run time", "rerun with --opt-level O1"]),
    ("bert_style.py", ["touches amp's private state", "uses `_amp_stash`, which amp adds to optimizers",
                       "no mechanical rewrite of `apex_C.unflatten`", "delay_overflow_check hands the overflow check"]),
    ("hf_trainer_style.py", ["opt_level is only known at run time", "under autocast, FusedLayerNorm returned"]),
    ("timm_style.py", ["`loss` is not computed in the block that runs the backward pass",
                       "uses the amp module itself as a value"]),
    ("fp16_optimizer_style.py", ["a checkpoint written by FP16_Optimizer.state_dict() holds its own format"]),
])
def test_to_native_leaves_todos_and_drops_nothing(tmp_path, name, reasons):
    original = scan(load_source(str(FIXTURES / name)))
    result = to_native(original)
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(result.text).readline)
                if t.type == tokenize.COMMENT]
    todo_text = " ".join(c.split("TODO(ampcompat): ", 1)[-1].lstrip("# ") for c in comments if c.startswith("#"))
    for reason in reasons:
        assert reason in " ".join(todo_text.split()), reason
    todo_notes = [n for n in result.notes if n.message.startswith("TODO(ampcompat): ")]
    assert len(todo_notes) == sum(c.startswith("# TODO(ampcompat): ") for c in comments)
    # Every use is either rewritten to torch or still there (now through ampcompat).
    remaining = collections.Counter(u.api for u in scan_text(tmp_path, result.text).uses if u.kind != "import")
    before = collections.Counter(u.api for u in original.uses if u.kind != "import")
    assert sum(before.values()) - sum(remaining.values()) == result.converted
    assert all(remaining[api] <= count for api, count in before.items())
    not_imported = ("optimizer.", "apex.amp.init()")  # attributes amp adds, a handle
    assert all(u.via == "ampcompat" or u.api.startswith(not_imported) or u.kind == "string"
               for u in scan_text(tmp_path, result.text).uses if u.kind != "import")


def scan_text(tmp_path, text):
    path = tmp_path / "rescan.py"
    path.write_text(text)
    return scan(load_source(str(path)))


@pytest.mark.parametrize("name", ["dcgan_style.py", "fp16_optimizer_style.py"])
def test_to_native_output_that_keeps_ampcompat_still_runs(tmp_path, capsys, scripts, name):
    folder = copy_fixtures(tmp_path, {name})
    assert run_main([folder, "--to-native"], capsys)[0] == 0
    require(ampcompat_modules_imported(folder / name))
    assert len(scripts.run(folder / name, steps=3)) == 3


def native(tmp_path, source, alias=None):
    """``--to-native`` of a snippet: (new text without the alias line, TODO messages).

    ``alias``: whether the alias line must be there (a file that stays on ampcompat keeps ``apex``
    registered), checked when given."""
    path = tmp_path / "snippet.py"
    path.write_text(textwrap.dedent(source))
    result = to_native(scan(load_source(str(path))))
    lines = result.text.splitlines(keepends=True)
    kept = [line for line in lines if line.rstrip("\r\n") != ALIAS_LINE]
    if alias is not None:
        assert (len(kept) < len(lines)) == alias, result.text
    return "".join(kept), [note.message.split("TODO(ampcompat): ", 1)[1] for note in result.notes
                           if note.message.startswith("TODO(ampcompat): ")]


def test_fused_adam_becomes_adamw_with_apex_defaults(tmp_path):
    text, todos = native(tmp_path, """\
        import torch
        from apex.optimizers import FusedAdam
        a = FusedAdam(params, lr=1e-3)
        b = FusedAdam(params, 1e-2, adam_w_mode=False, betas=(0.8, 0.9), set_grad_none=False)
        c = FusedAdam(params, amsgrad=True)
        d = FusedAdam(params, 1e-3, True, (0.9, 0.99))
    """, alias=True)
    assert text.splitlines()[2:] == [
        "a = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)",
        "b = torch.optim.Adam(params, 1e-2, betas=(0.8, 0.9), fused=True)",
        "# TODO(ampcompat): Apex's FusedAdam rejected amsgrad=True; keep ampcompat.optimizers.FusedAdam or",
        "#   rewrite by hand",
        "c = FusedAdam(params, amsgrad=True)",
        "# TODO(ampcompat): more than 2 positional argument(s): Apex's order differs from torch's after that;",
        "#   pass them by keyword first",
        "d = FusedAdam(params, 1e-3, True, (0.9, 0.99))",
    ]
    assert text.splitlines()[:2] == ["import torch", "from ampcompat.optimizers import FusedAdam"]
    assert len(todos) == 2


def test_fused_adam_of_2019_with_max_grad_norm_or_eps_inside_sqrt_gets_a_plain_torch_class(tmp_path):
    """Apex's 2019 FusedAdam clipped inside step() and could put eps under the root: torch's AdamW takes neither
    keyword, so the call constructs a plain-PyTorch class added to the file (tests/test_migrate_native_inline_optim.py
    proves it trains as ampcompat's FusedAdam)."""
    text, todos = native(tmp_path, """\
        import torch
        from apex.optimizers import FusedAdam
        params = [torch.nn.Parameter(torch.ones(2))]
        a = FusedAdam(params, lr=1e-3, max_grad_norm=1.0)
        b = FusedAdam(params, lr=1e-3, eps_inside_sqrt=True)
        c = FusedAdam(params, lr=1e-3, weight_decay=0.01)
    """, alias=False)
    assert todos == []
    assert "a = _ApexFusedAdam(params, lr=1e-3, max_grad_norm=1.0)" in text.splitlines()
    assert "c = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)" in text.splitlines()
    namespace: dict = {}
    exec(text, namespace)
    assert type(namespace["a"]).__name__ == "_ApexFusedAdam" and type(namespace["b"]).__name__ == "_ApexFusedAdam"


def test_fused_adam_rewrite_trains_like_ampcompat_fused_adam(tmp_path):
    optimizers = importlib.import_module("ampcompat.optimizers")
    text, _ = native(tmp_path, "from apex.optimizers import FusedAdam\nopt = FusedAdam(params, lr=1e-2)\n")
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    native_params = [torch.nn.Parameter(t.clone()) for t in start]
    apex_params = [torch.nn.Parameter(t.clone()) for t in start]
    namespace = {"params": native_params, "torch": torch}
    exec(text, namespace)
    pairs = [(namespace["opt"], native_params), (optimizers.FusedAdam(apex_params, lr=1e-2), apex_params)]
    for step in range(4):
        grads = [torch.randn_like(t) for t in start]
        for optimizer, params in pairs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(native_params, apex_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_norms_ddp_and_syncbn_rewrites(tmp_path):
    text, todos = native(tmp_path, """\
        import torch
        import apex
        from apex.normalization import FusedLayerNorm, FusedRMSNorm
        from apex.parallel import convert_syncbn_model, SyncBatchNorm
        ln = FusedLayerNorm(16, eps=1e-6, memory_efficient=True)
        rms = FusedRMSNorm([4, 8])
        net = convert_syncbn_model(net, process_group=group)
        bn = SyncBatchNorm(8, channel_last=True)
        ddp = apex.parallel.DistributedDataParallel(net, message_size=250000000, delay_allreduce=True,
                                                    num_allreduce_streams=1)
        ok = isinstance(ddp, apex.parallel.DistributedDataParallel)
        bad = apex.parallel.DistributedDataParallel(net, gradient_predivide_factor=8.0)
    """)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert lines == [
        "import torch",
        "import ampcompat as apex",
        "from ampcompat.parallel import SyncBatchNorm",
        "ln = torch.nn.LayerNorm(16, eps=1e-6)",
        "rms = torch.nn.RMSNorm([4, 8], eps=1e-5)",
        "net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net, process_group=group)",
        "bn = SyncBatchNorm(8, channel_last=True)",
        "ddp = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False, "
        "bucket_cap_mb=(250000000) * 4 / 2**20)",
        "ok = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)",
        "bad = apex.parallel.DistributedDataParallel(net, gradient_predivide_factor=8.0)",
    ]
    assert any("dropped num_allreduce_streams" in t for t in todos)
    assert any(t.startswith("delay_allreduce: torch DDP overlaps") for t in todos)
    assert "channel_last=True has no torch.nn.SyncBatchNorm counterpart; rewrite by hand" in todos
    assert ("gradient_predivide_factor needs a DDP communication hook in torch (register_comm_hook); "
            "rewrite by hand") in todos
    assert sum("FusedLayerNorm returned the autocast dtype" in t for t in todos) == 1


def test_fused_layer_norm_rewrite_keeps_the_state_dict(tmp_path):
    normalization = importlib.import_module("ampcompat.normalization")
    text, _ = native(tmp_path, "from apex.normalization import FusedLayerNorm\nln = FusedLayerNorm((4, 6), eps=1e-6)\n")
    namespace = {"torch": torch}
    exec(text, namespace)
    apex_ln = normalization.FusedLayerNorm((4, 6), eps=1e-6)
    with torch.no_grad():
        apex_ln.weight.uniform_()
        apex_ln.bias.uniform_()
    namespace["ln"].load_state_dict(apex_ln.state_dict())
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(namespace["ln"](x), apex_ln(x))


def test_amp_rewrite_details(tmp_path):
    text, todos = native(tmp_path, """\
        from apex import amp
        scaler = 1
        model, opt = amp.initialize(net, optimizer, opt_level="O1", verbosity=0)
        for x, y in data:
            out = model(x)
            loss = crit(out, y)
            with amp.scale_loss(loss, opt) as scaled:
                # keep this comment
                scaled.backward(retain_graph=True)
            norms = [p.grad.norm() for p in amp.master_params(opt)]
            opt.step()
            with amp.disable_casts():
                model(x)
        amp.load_state_dict(checkpoint["amp"])
    """)
    assert text.splitlines() == [
        "import torch",
        "scaler = 1",
        "model, opt = net, optimizer",
        "amp_device_type = next(net.parameters()).device.type",
        "scaler_native = torch.amp.GradScaler(amp_device_type, init_scale=2.0**16, growth_interval=2000)",
        "for x, y in data:",
        "    with torch.autocast(amp_device_type, dtype=torch.float16):",
        "        out = model(x)",
        "        loss = crit(out, y)",
        "    # keep this comment",
        "    scaler_native.scale(loss).backward(retain_graph=True)",
        "    scaler_native.unscale_(opt)",
        '    norms = [p.grad.norm() for p in (p for group in opt.param_groups for p in group["params"])]',
        "    scaler_native.step(opt)",
        "    scaler_native.update()",
        "    with torch.autocast(amp_device_type, enabled=False):",
        "        model(x)",
        "",
        "",
        "def grad_scaler_state(state, loss_id=0):",
    ] + text.splitlines()[20:27] + [
        "",
        "",
        'scaler_native.load_state_dict(grad_scaler_state(checkpoint["amp"]))',
    ]
    assert todos == []


@pytest.mark.parametrize("snippet, reason", [
    ('model, opt = amp.initialize(m, o, opt_level="O0")', "opt_level O0 is plain FP32 training"),
    ('model, opt = amp.initialize(m, o, loss_scale=128.0)', "a static loss scale"),
    ('m = amp.initialize(m, opt_level="O1")', "amp.initialize has no optimizer and the model is not called"),
    ('model = amp.initialize(m, opt_level="O1")', "the model amp.initialize returns gets another name"),
    ('model, opt = amp.initialize(m, o)', "amp.scale_loss is not called in this file"),
    ('amp._amp_state.loss_scalers[0]._loss_scale = 2**20', "touches amp's private state"),
    ('@amp.float_function\ndef nms(x):\n    return x', "registers a function for O1's casts"),
    ('def train(loss, opt):\n    with amp.scale_loss(loss, opt) as s:\n        s.backward()\n    opt.step()',
     "amp.initialize is not called in this file"),
])
def test_amp_patterns_that_stay_on_ampcompat(tmp_path, snippet, reason):
    text, todos = native(tmp_path, "from apex import amp\n" + snippet + "\n", alias=True)
    assert any(t.startswith(reason) for t in todos), todos
    assert text.splitlines()[0] == "from ampcompat import amp"


def _overlapping_edits(self, top=None):
    raise ValueError("overlapping edits at offset 3")


@pytest.mark.parametrize("broken_render", [lambda self, top=None: "def broken(:\n", _overlapping_edits])
def test_to_native_never_writes_invalid_python(tmp_path, capsys, monkeypatch, broken_render):
    folder = copy_fixtures(tmp_path, {"simple_o1.py"})
    before = (folder / "simple_o1.py").read_bytes()
    monkeypatch.setattr("ampcompat.tools.migrate.plan.RewritePlan.render", broken_render)
    code, out, _ = run_main([folder, "--to-native"], capsys)
    assert code == 1 and (folder / "simple_o1.py").read_bytes() == before
    assert "not rewritten: the native rewrite of this file came out invalid" in out
    assert out.splitlines()[-1].endswith("Rewritten to plain PyTorch: 0 files. 1 file could not be rewritten (see above).")


def test_an_internal_error_skips_the_file_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    folder = copy_fixtures(tmp_path, {"simple_o1.py", "dcgan_style.py"})

    def failing_rewrite(result):
        if result.source.path.endswith("dcgan_style.py"):
            raise RuntimeError("boom")
        return real_rewrite(result)

    real_rewrite = migrate.rewrite_imports
    monkeypatch.setattr(migrate, "rewrite_imports", failing_rewrite)
    code, out, _ = run_main([folder, "--write"], capsys)
    assert code == 1
    assert (f"{folder / 'dcgan_style.py'}: skipped: not processed: internal error in ampcompat migrate (please "
            "report it) while rewriting: RuntimeError('boom')") in out
    assert (folder / "dcgan_style.py").read_bytes() == (FIXTURES / "dcgan_style.py").read_bytes()
    assert "from ampcompat import amp" in (folder / "simple_o1.py").read_text()


@pytest.mark.parametrize("bind_models", ["models = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)]",
                                         "models = [torch.nn.Linear(4, 4) if i == 0 else torch.nn.Linear(4, 2) "
                                         "for i in range(2)]"])
def test_a_list_of_models_passed_by_name_gives_the_device_of_its_first_model(tmp_path, bind_models):
    """Apex took a list of models as well as one (XLM: ``models = [...]``, then ``amp.initialize(models, ...)``); the
    device line must not call ``.parameters()`` on the list, which raised AttributeError when the program ran."""
    text, todos = native(tmp_path, f"""\
        import torch
        from apex import amp
        {bind_models}
        opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.1)
        models, opt = amp.initialize(models, opt, opt_level="O1")
        loss = models[1](models[0](torch.randn(3, 4))).sum()
        with amp.scale_loss(loss, opt) as scaled_loss:
            scaled_loss.backward()
        opt.step()
    """, alias=False)
    assert todos == []
    assert "next(models[0].parameters()).device.type" in text
    namespace: dict = {}
    exec(text, namespace)
    assert all(p.grad is not None for m in namespace["models"] for p in m.parameters())


def test_a_model_passed_by_name_keeps_its_own_parameters_for_the_device(tmp_path):
    text, _ = native(tmp_path, """\
        import torch
        from apex import amp
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = amp.initialize(model, opt, opt_level="O1")
        loss = model(torch.randn(3, 4)).sum()
        with amp.scale_loss(loss, opt) as scaled_loss:
            scaled_loss.backward()
        opt.step()
    """, alias=False)
    assert "next(model.parameters()).device.type" in text
    exec(text, {})
