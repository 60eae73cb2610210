"""Everything amp prints honours ``verbosity``, and ``AMPCOMPAT_VERBOSITY`` overrides it.

Apex's documentation says ``verbosity=0`` silences amp, but its ``load_state_dict`` printed its
entry-count warning regardless. Here every line goes through one function; the environment
variable lets a script run unchanged under ``python -m ampcompat run`` silence the options block
(or turn it on) without editing its ``amp.initialize(...)`` call.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ampcompat import amp

from _models import batches, make_mlp

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "AMPCOMPAT_VERBOSITY"


def _initialize(verbosity: int, level: str = "O2"):
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level=level, verbosity=verbosity)
    return model, opt


def _every_kind_of_line(model, opt) -> None:
    """Make amp print each kind of line it has: Apex's load warnings and the overflow message."""
    amp.load_state_dict({"loss_scaler0": {"loss_scale": 8.0, "unskipped": 0},
                         "loss_scaler1": {"loss_scale": 8.0, "unskipped": 0}})
    (x, y), = batches(1)
    with amp.scale_loss(F.cross_entropy(model(x), y) * float("inf"), opt) as scaled:
        scaled.backward()
    opt.step()


LINES_AT_1 = ["Warning: state_dict contains 2 entries, while 1 loss_scalers are used",
              "Skipping loss_scaler[1], since num_losses was set to 1",
              "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 4.0"]


@pytest.mark.parametrize("verbosity,expected", [(1, LINES_AT_1), (0, [])])
def test_every_line_follows_verbosity(verbosity, expected, capsys):
    model, opt = _initialize(verbosity)
    capsys.readouterr()
    _every_kind_of_line(model, opt)
    assert capsys.readouterr().out.splitlines() == expected


@pytest.mark.parametrize("variable,argument,prints", [("0", 1, False), ("1", 0, True), ("", 0, False),
                                                      (" 1 ", 0, True)])
def test_environment_variable_overrides_the_argument(variable, argument, prints, monkeypatch, capsys):
    monkeypatch.setenv(ENV, variable)
    model, opt = _initialize(argument)
    block = capsys.readouterr().out
    assert block.startswith("Selected optimization level O2:") == prints and (block == "") != prints
    _every_kind_of_line(model, opt)
    assert capsys.readouterr().out.splitlines() == (LINES_AT_1 if prints else [])
    assert amp._amp_state.verbosity == (1 if prints else 0)  # legacy code reading it sees what is in effect


def test_environment_variable_two_reaches_o1(monkeypatch):
    monkeypatch.setenv(ENV, "2")
    _initialize(1, level="O1")
    assert amp._amp_state.verbosity == 2 and amp._amp_state.handle.verbose


@pytest.mark.parametrize("verbosity", [0, 1])
def test_hard_override_warning_follows_verbosity(verbosity, capsys):
    """Apex's ``hard_override`` turns its option errors into printed warnings; they follow verbosity too."""
    amp._amp_state.hard_override = True
    model = make_mlp(d_hidden=16)
    amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O1", master_weights=True,
                   verbosity=verbosity)
    warning = "Warning:  It doesn't make sense to use master_weights with O1."
    assert (warning in capsys.readouterr().out) == bool(verbosity)


_SCRIPT = """
import os
import torch
from apex import amp

amp.initialize(torch.nn.Linear(4, 4), opt_level="O2")  # Apex's default verbosity=1
amp.load_state_dict({})
print("verbosity in effect:", amp._amp_state.verbosity)
del os.environ["AMPCOMPAT_VERBOSITY"]
amp.initialize(torch.nn.Linear(4, 4), opt_level="O2")
"""


def test_run_command_passes_the_variable_to_an_unchanged_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key not in ("AMPCOMPAT_APEX_ALIAS", "PYTHONPATH")}
    env.update(PYTHONPATH=_REPO_ROOT, AMPCOMPAT_VERBOSITY="0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "ampcompat", "run", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Silent while the variable is set; the same call prints Apex's block once it is gone.
    assert done.stdout.startswith("verbosity in effect: 0\nSelected optimization level O2:"), done.stdout
    assert "Warning: state_dict" not in done.stdout and done.stdout.count("Selected optimization level") == 1
