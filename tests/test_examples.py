"""The legacy Apex-style example runs unchanged on ampcompat, learns, and resumes from its checkpoint.

``examples/legacy_apex_lm.py`` says ``from apex import amp``. It is run two ways, each in a fresh
interpreter: through ``python -m ampcompat run`` (the opt-in apex alias), and with a hand-made module
alias (``sys.modules["apex.amp"] = ampcompat.amp``), which needs nothing but ``ampcompat.amp``.
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

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "legacy_apex_lm.py"
QUICK = ["--device", "cpu", "--steps", "8", "--eval-interval", "4", "--batch-size", "8", "--seq-len", "32"]

_INITIAL = re.compile(r"^initial: val_loss=(?P<val>\S+)$", re.M)
_FINAL = re.compile(r"^final: train_loss=(?P<train>\S+) val_loss=(?P<val>\S+) loss_scale=(?P<scale>\S+)$", re.M)
_RESUMED = re.compile(r"^resumed: val_loss=(?P<val>\S+) \((?P<verdict>matches|MISMATCH)\)$", re.M)

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


def test_runs_through_python_m_ampcompat_run():
    if importlib.util.find_spec("ampcompat.tools.alias") is None:
        pytest.skip("awaiting apex alias")
    result = _outcome(_run(["-m", "ampcompat", "run", str(EXAMPLE), "--opt-level", "O1"] + QUICK))
    _assert_learned_and_resumed(result)
    # O1's dynamic scale starts at 2**16 and only ever halves (or doubles after 2000 clean steps).
    assert result["loss_scale"] <= 2.0 ** 16 and math.log2(result["loss_scale"]).is_integer()


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
