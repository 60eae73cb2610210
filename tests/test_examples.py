"""The README's main job and ten-line example run, learn, and say so.

``examples/legacy_apex_lm.py`` says ``from apex import amp``. It is run two ways, each in a fresh
interpreter: through ``python -m ampcompat run`` (the opt-in apex alias: the README's main command,
which must print no warning, ours or another package's), and with a hand-made module alias
(``sys.modules["apex.amp"] = ampcompat.amp``), which needs nothing but ``ampcompat.amp``.
"""
import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _stderr import split_stderr

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "legacy_apex_lm.py"
QUICK = ["--device", "cpu", "--steps", "8", "--eval-interval", "4", "--log-interval", "4", "--batch-size", "8",
         "--seq-len", "32"]

_INITIAL = re.compile(r"^initial: val_loss=(?P<val>\S+)$", re.M)
_FINAL = re.compile(r"^final: train_loss=(?P<train>\S+) val_loss=(?P<val>\S+) loss_scale=(?P<scale>\S+) "
                    r"steps/s=(?P<speed>\S+) resume=(?P<resume>matches|MISMATCH)$", re.M)
_RESUMED = re.compile(r"^resumed: .*val_loss=(?P<val>\S+) \((?P<verdict>matches|MISMATCH)\)$", re.M)
_STEP = re.compile(r"^step +(?P<step>\d+)/(?P<steps>\d+)  train_loss (?P<loss>\S+)  loss_scale \S+  \d+ ms/step", re.M)
_BANNER = "Selected optimization level "

_MODULE_ALIAS = textwrap.dedent("""
    import runpy, sys, types
    from ampcompat import amp
    apex = types.ModuleType("apex")
    apex.amp = amp
    sys.modules["apex"] = apex
    sys.modules["apex.amp"] = amp
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _run(argv):
    env = dict(os.environ)
    env.pop("AMPCOMPAT_APEX_ALIAS", None)  # each test decides itself whether an alias is installed
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable] + argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _outcome(proc) -> dict:
    """Exit status 0 and the parsed initial/final/resumed lines of the example's output."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    initial, final, resumed = _INITIAL.search(proc.stdout), _FINAL.search(proc.stdout), _RESUMED.search(proc.stdout)
    assert initial and final and resumed, proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("final: "), "the final line must be the summary"
    assert proc.stdout.count(_BANNER) == 1, "amp's options are printed for the first initialize, not on resume"
    assert float(final["speed"]) > 0 and final["resume"] == resumed["verdict"]
    return {
        "initial_val": float(initial["val"]),
        "final_train": float(final["train"]),
        "final_val": float(final["val"]),
        "loss_scale": float(final["scale"]),
        "resumed_val": float(resumed["val"]),
        "resumed_verdict": resumed["verdict"],
    }


def _assert_learned_and_resumed(result: dict) -> None:
    assert result["final_val"] < result["initial_val"] - 0.3, result
    assert result["final_train"] < result["initial_val"], result
    assert result["resumed_verdict"] == "matches"
    assert result["resumed_val"] == pytest.approx(result["final_val"], abs=1e-4)


def test_example_is_unchanged_legacy_apex_code():
    source = EXAMPLE.read_text()
    code = source.split('"""', 2)[2]  # everything after the module docstring
    assert "from apex import amp" in code
    assert "ampcompat" not in code
    for call in ("amp.initialize(", "amp.scale_loss(", "amp.master_params(", "amp.state_dict()",
                 "amp.load_state_dict("):
        assert call in code


def test_the_readme_main_command_says_what_it_does_and_prints_no_warning():
    """``python -m ampcompat run examples/legacy_apex_lm.py``, made short: device first, progress from step 1."""
    proc = _run(["-m", "ampcompat", "run", "examples/legacy_apex_lm.py"] + QUICK)
    kept, foreign = split_stderr(proc.stderr)
    assert foreign == [], ("another package warned: install what the README's commands install "
                           "(torch's wheel warns at every import without numpy)")
    assert kept == ""
    result = _outcome(proc)
    _assert_learned_and_resumed(result)
    # O1's dynamic scale starts at 2**16 and only ever halves (or doubles after 2000 clean steps).
    assert result["loss_scale"] <= 2.0 ** 16 and math.log2(result["loss_scale"]).is_integer()
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: cpu (")
    assert lines[1].startswith("data: reading ")  # said before the (short) wait for the corpus
    steps = [int(match["step"]) for match in _STEP.finditer(proc.stdout)]
    assert steps == [1, 4, 8]  # the first step at once, then every --log-interval/--eval-interval step
    # O1's dynamic scale starts at 2**16 and only ever halves (or doubles after 2000 clean steps).
    assert result["loss_scale"] <= 2.0 ** 16 and math.log2(result["loss_scale"]).is_integer()


@pytest.mark.slow  # a training subprocess each; the README's main command runs the same script by default
@pytest.mark.parametrize(
    "flags, expected_scale",
    [
        # Apex's imagenet recipe: string overrides straight from argparse.
        (["--opt-level", "O2", "--keep-batchnorm-fp32", "True", "--loss-scale", "128.0"], 128.0),
        (["--opt-level", "O5"], 1.0),  # bf16 O2: no loss scaling
    ],
    ids=["O2-static-128", "O5-bf16"],
)
def test_runs_with_a_hand_made_module_alias(flags, expected_scale):
    result = _outcome(_run(["-c", _MODULE_ALIAS, str(EXAMPLE)] + flags + QUICK))
    _assert_learned_and_resumed(result)
    assert result["loss_scale"] == expected_scale


def test_without_any_alias_the_legacy_import_fails_as_it_does_today():
    if importlib.util.find_spec("apex") is not None:
        pytest.skip("a package named apex is installed here")
    proc = _run([str(EXAMPLE), "--steps", "1"])
    assert proc.returncode != 0
    assert "No module named 'apex'" in proc.stderr


def test_the_readme_ten_line_example_trains_and_prints_its_loss():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Ten lines"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", 10)]
    proc = _run(["-c", "import torch; torch.manual_seed(0)\n" + code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(_BANNER + "O2") == 1
    losses = [float(value) for value in re.findall(r"^step \d: loss (\S+)$", proc.stdout, re.M)]
    assert len(losses) == 10
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # one batch, AdamW: falls
