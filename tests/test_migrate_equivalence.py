"""``migrate`` never changes what a program does: each program shape that once changed meaning, as a
runnable program, run before and after every mode, with the outputs compared.

The programs under ``tests/fixtures/migrate_equivalence`` print what they do (which branch, which class,
dtypes, a few losses). Before: each runs as ``python -m ampcompat run`` runs it (the import alias on).
After ``--write``, ``--to-native`` and ``--write`` then ``--to-native``: each runs with plain ``python``
and must print the same lines (losses within float rounding, since O1 under ``torch.autocast`` is not
bit-for-bit ampcompat's O1). Programs that ran without Apex (optional Apex, no Apex at all) also run
with ``apex`` and ``ampcompat`` impossible to import, before and after, and must agree there too; and a
``--to-native`` output that imports neither must run that way with the same output as before.
Every mode run a second time changes nothing.

Each program runs in a fork of one warm interpreter (torch imported once), so the default matrix
stays within seconds; the slow marker adds last round's trees (``migrate_tree``, ``legacy_scripts``).
"""
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import pytest

from ampcompat.tools.migrate.alias_line import ALIAS_STATEMENTS, GUARDED_ALIAS_LINES
from _migrate_runs import run_all, run_migrate

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
PROGRAMS = FIXTURES / "migrate_equivalence"
MODES = {"write": ["--write"], "to-native": ["--to-native"], "write+to-native": ["--write", "--to-native"]}


@dataclass(frozen=True)
class Program:
    """One program of a fixture tree.

    Attributes:
        script: its path relative to the tree.
        args: command-line arguments.
        runs_without_apex: the original runs (and prints what it does) where Apex cannot be imported.
    """

    script: str
    args: Tuple[str, ...] = ()
    runs_without_apex: bool = False
    rel_tol: float = 2e-3


@dataclass
class Tree:
    """A fixture tree and the programs in it.

    Attributes:
        native_flags: added to every ``--to-native`` run over the tree (``--opt-level O1``).
    """

    folder: Path
    programs: List[Program] = field(default_factory=list)
    native_flags: Tuple[str, ...] = ()


ISSUE_SHAPES = Tree(PROGRAMS, [
    Program("s01_scopes.py"),
    Program("s01_either_import.py", ("--apex",)),
    Program("s01_either_import.py", runs_without_apex=True),
    Program("s02_guard_kept.py"),
    Program("s02_guard_txl.py", runs_without_apex=True),
    Program("s02_guard_txl.py", ("O2",), runs_without_apex=True),
    Program("s02_guard_native.py"),
    Program("s03_optional.py", runs_without_apex=True),
    Program("s04_setup_argv.py", ("apex", "--version"), runs_without_apex=True),
    Program("s05_star.py"),
    Program("s06_header_comment.py"),
    Program("s06_decorated_first.py"),
    Program("s09_value_uses.py"),
    Program("s11_extensions.py"),
])
O2_TOLERANCE = 2e-2
"""O2 code (and FP16_Optimizer) becomes O1's native recipe: FP32 weights under autocast instead of FP16 weights with
FP32 masters, so the losses differ by FP16 rounding of the weights (documented; a few 1e-4 on these programs)."""
TRAINING_LOOPS = Tree(FIXTURES / "to_native_loops", [
    Program("t01_hf_fp16_flag.py", ("--fp16",)),
    Program("t01_hf_fp16_flag.py", ("--fp16", "--gradient_accumulation_steps", "2")),
    Program("t02_imagenet_functions.py"),
    Program("t03_trainer_class.py"),
    Program("t04_micro_batches.py"),
    Program("t05_losses_and_optimizers.py"),
    Program("t06_optional_apex.py"),
    Program("t07_o2_literal.py", rel_tol=O2_TOLERANCE),
    Program("t08_fp16_optimizer.py", rel_tol=O2_TOLERANCE),
    Program("t09_checkpoint.py"),
    Program("t11_second_backward.py"),
    Program("t12_inference.py"),
    Program("t13_clip_every_micro_batch.py", ("--fp16",)),
    Program("t13_clip_every_micro_batch.py", ("--fp16", "--gradient_accumulation_steps", "3")),
    Program("t14_fp16_optimizer_loss_scale_flag.py", ("--loss_scale", "0"), rel_tol=O2_TOLERANCE),
    Program("t14_fp16_optimizer_loss_scale_flag.py", ("--loss_scale", "128"), rel_tol=O2_TOLERANCE),
    Program("t15_fp16_flag_and_loss_scale_flag.py", ("--fp16", "--loss_scale", "128"), rel_tol=O2_TOLERANCE),
    Program("t15_fp16_flag_and_loss_scale_flag.py", ("--fp16", "--gradient_accumulation_steps", "2"),
            rel_tol=O2_TOLERANCE),
    Program("t15_fp16_flag_and_loss_scale_flag.py", ("--gradient_accumulation_steps", "2")),
    Program("t16_fp16_optimizer_2019_fused_adam.py", ("--fp16",), rel_tol=O2_TOLERANCE),
    Program("t16_fp16_optimizer_2019_fused_adam.py", ("--fp16", "--bias_correction", "1", "--loss_scale", "128",
                                                      "--gradient_accumulation_steps", "2"), rel_tol=O2_TOLERANCE),
    Program("t16_fp16_optimizer_2019_fused_adam.py"),
    Program("t17_larc_sgd_o1.py"),
    Program("t18_fused_adam_no_bias_correction_o1.py"),
    Program("t30_logged_grad_norm.py"),
    Program("t30_logged_grad_norm.py", ("--accumulation_steps", "2")),
    Program("t30_logged_grad_norm.py", ("--accumulation_steps", "3", "--clip_grad", "0.05")),
    Program("t30_logged_grad_norm.py", ("--clip_grad", "0.05")),
    Program("t30_logged_grad_norm.py", ("--opt_level", "O0", "--accumulation_steps", "2")),
    Program("t31_checkpoint_amp_object.py"),
    Program("t31_checkpoint_amp_object.py", ("--syncbn_process_group_size", "0", "--apex_loss_scale", "1024")),
    Program("t31_checkpoint_amp_object.py", ("--use_fp16", "0")),
    Program("t32_inference_handoff.py"),
    Program("t32_inference_handoff.py", ("--precision", "fp32")),
    Program("t20_bert_squad_clipper.py", rel_tol=O2_TOLERANCE),
    Program("t20_bert_squad_clipper.py", ("--gradient_accumulation_steps", "2"), rel_tol=O2_TOLERANCE),
    Program("t21_ema_and_flag.py"),
    Program("t22_fastspeech_pyprof.py", ("--use_amp",)),
    Program("t22_fastspeech_pyprof.py"),
    Program("t23_bert_glue_optional_optimizer.py", ("--fp16",), rel_tol=O2_TOLERANCE),
    Program("t23_bert_glue_optional_optimizer.py", ("--fp16", "--eval_only"), rel_tol=O2_TOLERANCE),
    Program("t23_bert_glue_optional_optimizer.py"),
    Program("t24_timm_style.py"),
    Program("t24_timm_style.py", ("--clip-grad", "0.5")),
    Program("t25_gnmt_style.py", ("--iter-size", "2", "--grad-clip", "0.5"), rel_tol=O2_TOLERANCE),
    Program("t25_gnmt_style.py", ("--iter-size", "1"), rel_tol=O2_TOLERANCE),
    Program("k01_library_runs_apex.py"),
    Program("k02_contrib_kernel.py"),
    Program("k03_norm_subclass.py"),
], native_flags=("--opt-level", "O1"))
LAST_ROUND = [
    Tree(FIXTURES / "migrate_tree" / "write", [Program("train.py", rel_tol=O2_TOLERANCE)]),  # O2: O1's recipe natively
    Tree(FIXTURES / "migrate_tree" / "native", [Program("train_o1.py")]),
    Tree(FIXTURES / "legacy_scripts", [Program(name, ("--steps", "2")) for name in (
        "bert_style.py", "dcgan_style.py", "fp16_optimizer_style.py", "hf_trainer_style.py", "imagenet_style.py",
        "simple_o1.py", "timm_style.py", "transformer_o1.py")]),
]

def migrate_copy(tree: Tree, mode: str, work: Path) -> Tuple[Path, str]:
    """Copy ``tree`` under ``work``, run ``mode`` on the copy, then once more: the second run changes nothing."""
    target = work / mode / tree.folder.name
    shutil.copytree(tree.folder, target, ignore=shutil.ignore_patterns("__pycache__"))
    reports = []
    def flags(args: str) -> List[str]:
        return [args, *tree.native_flags] if args == "--to-native" else [args]

    for args in MODES[mode]:
        code, out = run_migrate([target, *flags(args)])
        reports.append(out)
        assert code == 0, out
    first = {p: p.read_bytes() for p in target.rglob("*.py")}
    code, out = run_migrate([target, *flags(MODES[mode][-1])])
    assert code == 0, out
    changed = [str(p.relative_to(target)) for p in target.rglob("*.py") if p.read_bytes() != first[p]]
    assert not changed, f"a second {mode} run changed {changed}"
    return target, "".join(reports)


def imports_apex_or_ampcompat(path: Path) -> bool:
    text = path.read_text()
    return any(f"import {name}" in text or f"from {name}" in text for name in ("apex", "ampcompat", "amp_C"))


_AMP_BANNER = re.compile(r"^(Selected optimization level |Defaults for this optimization level are:|Processing user "
                         r"overrides|After processing overrides, optimization options are:|\w+\s+: \S|$|"
                         r"Warning:  FP16_Optimizer is deprecated|ampcompat: FP16_Optimizer keeps working|"
                         r"fp16_optimizer is designed to only work with apex.optimizers|To update, use updated optimizers)")
"""The option block ``amp.initialize`` prints (``verbosity=1``) and FP16_Optimizer's deprecation warning: Apex's log,
gone with Apex under ``--to-native``."""


def program_lines(output: str) -> List[str]:
    return [line for line in output.splitlines() if not _AMP_BANNER.match(line)]


def lines_match(before: str, after: str, rel_tol: float = 2e-3) -> bool:
    """Same lines (amp's option block aside); numbers on LOSS/NORM/WEIGHTS lines equal within ``rel_tol`` (float
    rounding of O1 natively vs on ampcompat)."""
    old, new = program_lines(before), program_lines(after)
    if len(old) != len(new):
        return False
    for a, b in zip(old, new):
        if a == b:
            continue
        words_a, words_b = a.split(), b.split()
        if not (words_a and words_a[0] in ("LOSS", "NORM", "GRADNORM", "WEIGHTS", "LR", "DTYPE")
                and len(words_a) == len(words_b)):
            return False
        for x, y in zip(words_a, words_b):
            if x != y and not math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-5):
                return False
    return True


def _matrix(trees: List[Tree], tmp_path_factory):
    """Migrate every tree in every mode and run everything: {(tree, program, mode, env): output}."""
    work = tmp_path_factory.mktemp("equivalence")
    requests, keys = [], []
    natives = set()

    def add(key, script: Path, program: Program, env: str) -> None:
        keys.append(key)
        requests.append({"script": str(script), "args": list(program.args), "env": env})

    reports = {}
    for tree in trees:
        for program in tree.programs:
            add((tree.folder.name, program, "original", "alias"), tree.folder / program.script, program, "alias")
            if program.runs_without_apex:
                add((tree.folder.name, program, "original", "absent"), tree.folder / program.script, program, "absent")
        for mode in MODES:
            target, report = migrate_copy(tree, mode, work)
            reports[(tree.folder.name, mode)] = (target, report)
            for program in tree.programs:
                script = target / program.script
                add((tree.folder.name, program, mode, "plain"), script, program, "plain")
                native = mode != "write" and not imports_apex_or_ampcompat(script)
                if program.runs_without_apex or native:
                    add((tree.folder.name, program, mode, "absent"), script, program, "absent")
                if native:
                    natives.add((tree.folder.name, program, mode, "native"))
    outputs = dict(zip(keys, run_all(requests)))
    outputs.update((key, {}) for key in natives)
    return outputs, reports


@pytest.fixture(scope="module")
def issue_matrix(tmp_path_factory):
    return _matrix([ISSUE_SHAPES], tmp_path_factory)


def _compare(outputs, tree: Tree, program: Program, mode: str) -> None:
    name = tree.folder.name
    before = outputs[(name, program, "original", "alias")]
    assert before["code"] == 0, before["output"]
    after = outputs[(name, program, mode, "plain")]
    assert after["code"] == 0, after["output"]
    assert lines_match(before["output"], after["output"], program.rel_tol), (before["output"], after["output"])
    absent = outputs.get((name, program, mode, "absent"))
    if absent is None:
        return
    # Where Apex and ampcompat cannot be imported: a program that still uses them where present behaves as
    # the original did without Apex (optional stays optional); one --to-native left with neither takes the
    # path the original took under ampcompat, now in plain PyTorch.
    native = (name, program, mode, "native") in outputs
    reference = before if native else outputs[(name, program, "original", "absent")]
    assert absent["code"] == reference["code"], absent["output"]
    assert lines_match(reference["output"], absent["output"], program.rel_tol), (reference["output"], absent["output"])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("program", ISSUE_SHAPES.programs, ids=lambda p: " ".join((p.script,) + p.args))
def test_issue_shapes_behave_the_same_after_every_mode(issue_matrix, program, mode):
    outputs, _ = issue_matrix
    _compare(outputs, ISSUE_SHAPES, program, mode)


@pytest.fixture(scope="module")
def last_round_matrix(tmp_path_factory):
    return _matrix(LAST_ROUND, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tree, program", [(tree, program) for tree in LAST_ROUND for program in tree.programs],
                         ids=lambda value: getattr(value, "script", "") or value.folder.name)
def test_last_rounds_shapes_behave_the_same_after_every_mode(last_round_matrix, tree, program, mode):
    outputs, _ = last_round_matrix
    _compare(outputs, tree, program, mode)


@pytest.fixture(scope="module")
def loops_matrix(tmp_path_factory):
    return _matrix([TRAINING_LOOPS], tmp_path_factory)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("program", TRAINING_LOOPS.programs, ids=lambda p: " ".join((p.script,) + p.args))
def test_training_loops_train_the_same_after_every_mode(loops_matrix, program, mode):
    """Each real training-loop shape, converted with --to-native --opt-level O1 (and after --write), trains
    under plain PyTorch -- with Apex and ampcompat impossible to import where the conversion left neither -- to the
    original's losses (O1: float rounding; O2/FP16_Optimizer: the documented O1 recipe)."""
    outputs, _ = loops_matrix
    _compare(outputs, TRAINING_LOOPS, program, mode)


def test_training_loops_leave_apex_behind(loops_matrix):
    """Every t* shape imports neither apex nor ampcompat after --to-native --opt-level O1; the k* shapes (a library
    that calls Apex, an apex.contrib kernel, a FusedLayerNorm subclass) stay on ampcompat and say why."""
    _, reports = loops_matrix
    target, report = reports[(TRAINING_LOOPS.folder.name, "to-native")]
    for path in sorted(target.glob("*.py")):
        if path.name.startswith("t"):
            assert not imports_apex_or_ampcompat(path), path.name
            assert "TODO(ampcompat)" not in path.read_text() or path.name == "t08_fp16_optimizer.py", path.name
        elif path.name.startswith("k"):
            assert imports_apex_or_ampcompat(path), path.name
    for reason in ("k01_library_runs_apex.py:11:1: TODO(ampcompat): amp.scale_loss is not called in this file",
                   "k02_contrib_kernel.py:13:5: TODO(ampcompat): no mechanical rewrite of "
                   "`apex.contrib.xentropy.SoftmaxCrossEntropyLoss`",
                   "k03_norm_subclass.py:10:1: TODO(ampcompat): a subclass of Apex's `FusedLayerNorm`"):
        assert reason in report, reason


# --- what the rewritten text looks like where behaviour alone cannot tell -------------------------------------
def migrated_text(issue_matrix, mode, script):
    _, reports = issue_matrix
    target, report = reports[(PROGRAMS.name, mode)]
    return (target / script).read_text(), report


@pytest.mark.parametrize("mode", list(MODES))
def test_a_flag_named_apex_is_no_check_and_the_file_is_never_touched(issue_matrix, mode):
    text, report = migrated_text(issue_matrix, mode, "s04_setup_argv.py")
    assert text == (PROGRAMS / "s04_setup_argv.py").read_text()
    assert "s04_setup_argv.py" not in report


def test_import_torch_goes_after_leading_comments_and_never_inside_a_decorator(issue_matrix):
    text, _ = migrated_text(issue_matrix, "to-native", "s06_header_comment.py")
    original = (PROGRAMS / "s06_header_comment.py").read_text().splitlines()
    assert text.splitlines()[:5] == original[:3] + ["import torch", "import torch.nn.functional as F"]
    text, _ = migrated_text(issue_matrix, "to-native", "s06_decorated_first.py")
    assert text.splitlines()[:2] == ["import torch", "@staticmethod"]


def test_inline_comments_of_a_removed_multi_line_import_stay(issue_matrix):
    text, report = migrated_text(issue_matrix, "to-native", "s11_extensions.py")
    assert text.splitlines()[2:5] == ["# the float of a one-element tensor", "# clipping as in 2018", "import torch"]
    target, _ = issue_matrix[1][(PROGRAMS.name, "to-native")]
    assert f"{target / 's11_extensions.py'}:8:5: left `import fused_layer_norm_cuda` as it was: `fused_layer_norm_cuda` " \
           "is Apex's compiled CUDA extension behind `apex.normalization.FusedLayerNorm`" in report


def test_write_then_to_native_drops_the_alias_line_where_nothing_needs_it(issue_matrix):
    _, reports = issue_matrix
    target, report = reports[(PROGRAMS.name, "write+to-native")]
    written, _ = reports[(PROGRAMS.name, "write")]
    for script in sorted(PROGRAMS.glob("s*.py")):
        text = (target / script.name).read_text()
        if ALIAS_STATEMENTS in (written / script.name).read_text() and not imports_apex_or_ampcompat(
                target / script.name):
            assert ALIAS_STATEMENTS not in text, script.name
            assert f"`{ALIAS_STATEMENTS}`: nothing in this file uses Apex or ampcompat any more" in \
                   next(line for line in report.splitlines() if line.startswith(f"{target / script.name}:") and
                        "removed `import ampcompat" in line), script.name
    assert not imports_apex_or_ampcompat(target / "s06_header_comment.py")


def test_check_passes_the_shapes_that_run(tmp_path):
    code, out = run_migrate([PROGRAMS, "--check"])
    assert code == 0, out
    assert "not supported" not in out.replace("0 not supported", "")


def test_the_guard_answers_kept_or_replaced(issue_matrix):
    text, report = migrated_text(issue_matrix, "to-native", "s02_guard_native.py")
    assert 'if False:\n    raise RuntimeError("APEX AMP unavailable")' in text
    assert "USE_AMP = True" in text and ALIAS_STATEMENTS not in text
    assert "this was `\"apex\" not in sys.modules`, which found Apex under ampcompat" in " ".join(
        line.lstrip("# ") for line in text.splitlines())
    text, report = migrated_text(issue_matrix, "to-native", "s02_guard_kept.py")
    assert text.splitlines()[1].startswith(ALIAS_STATEMENTS) and 'HAS_APEX = "apex" in sys.modules' in text
    assert "checks for Apex by name (`\"apex\" in sys.modules`): it still finds Apex through the alias line" in report
    text, _ = migrated_text(issue_matrix, "write", "s03_optional.py")
    assert "\n".join(text.splitlines()[1:5]) == "\n".join(GUARDED_ALIAS_LINES)  # optional Apex: a guarded line
