"""Misuse catalogue, part two: the mistakes made around ``amp.initialize``, checkpoints and resuming.

Each case makes one mistake a user makes (the state calls before ``initialize``, a wrong object
handed to ``amp.load_state_dict``, an impossible option, a second ``initialize`` of one model,
``scale_loss(loss, None)``) and checks three things: the exact exception type, its message, and
that the models, the optimizers and amp's global state are exactly as before (values, dtypes,
identities, hooks, amp's options and loss scalers: ``_amp_snapshot``). ``tests/test_misuse.py``
holds the mistakes of the training step itself. docs/reliability.md lists both catalogues with
the message each mistake gets.

Every check in ampcompat is an explicit ``raise``, never an ``assert``: the last test runs both
catalogues again under ``python -O``, in one subprocess.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ampcompat
from ampcompat import amp
from ampcompat.amp.state_validation import AmpNotInitializedError

from _amp_snapshot import differences, snapshot
from _models import batches, make_mlp

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 5},
         "loss_scaler1": {"loss_scale": 2048.0, "unskipped": 6}}


def _pair(seed: int = 0):
    model = make_mlp(seed=seed, d_hidden=16)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _trained(level: str = "O2", num_losses: int = 2, verbosity: int = 1):
    """A pair through ``initialize`` and one step, its scalers at the distinctive values of SAVED."""
    model, opt = _pair()
    amp.initialize(model, opt, opt_level=level, loss_scale="dynamic", num_losses=num_losses, verbosity=verbosity)
    (x, y), = batches(1)
    with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
        scaled.backward()
    opt.step()
    for scaler, entry in zip(amp._amp_state.loss_scalers, SAVED.values()):
        scaler._loss_scale, scaler._unskipped = entry["loss_scale"], entry["unskipped"]
    return model, opt


def _raises_exactly(error: type, pattern: str, call, *args, **kwargs) -> BaseException:
    """Run ``call``; it must raise exactly ``error`` (not a subclass) with ``pattern`` in its message."""
    with pytest.raises(BaseException) as info:
        call(*args, **kwargs)
    assert type(info.value) is error, "raised {}: {}".format(type(info.value).__name__, info.value)
    assert re.search(pattern, str(info.value)), str(info.value)
    return info.value


# --- amp state before initialize -----------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: amp.state_dict(),
    lambda: amp.load_state_dict(dict(SAVED)),
], ids=["state_dict", "load_state_dict"])
@pytest.mark.parametrize("history", ["never", "refused_initialize"])
def test_state_calls_before_initialize_say_to_call_it_first(call, history):
    model, opt = _pair()
    if history == "refused_initialize":
        with pytest.raises(ValueError):
            amp.initialize(model, opt, opt_level="O2", num_losses=0, verbosity=0)
    before = snapshot([model], [opt])
    err = _raises_exactly(AmpNotInitializedError, r"called before amp\.initialize.*Call model, optimizer = "
                          r"amp\.initialize\(model, optimizer, opt_level=\.\.\.\) first", call)
    assert isinstance(err, RuntimeError) and isinstance(err, AttributeError)  # Apex raised AttributeError
    assert differences(before, snapshot([model], [opt])) == []
    assert not hasattr(amp._amp_state, "loss_scalers")


def test_scale_loss_before_initialize_keeps_apex_error():
    model, opt = _pair()
    (x, y), = batches(1)
    loss = F.cross_entropy(model(x), y)
    before = snapshot([model], [opt])
    _raises_exactly(RuntimeError, r"^Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized",
                    lambda: amp.scale_loss(loss, opt).__enter__())
    assert differences(before, snapshot([model], [opt])) == []


# --- amp.load_state_dict with the wrong thing -----------------------------------------------------------

def _grad_scaler_state():
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    return scaler.state_dict()


BAD_STATES = [
    ("string", "garbage", TypeError, r"expects the dict amp\.state_dict\(\) returned, .*found 'garbage' \(str\)"),
    ("none", None, TypeError, r"expects the dict amp\.state_dict\(\) returned, .*found None \(NoneType\)"),
    ("list", [SAVED["loss_scaler0"]], TypeError, r"found .* \(list\)"),
    ("grad_scaler", _grad_scaler_state(), RuntimeError,
     r'^Error\(s\) in loading state_dict\. Unexpected key\(s\) in state_dict: "scale", .*torch\.amp\.GradScaler '
     r'state dict.*ampcompat\.grad_scaler_to_amp_state\(state, num_losses=2\)'),
    ("whole_checkpoint", {"model": {}, "optimizer": {}, "amp": dict(SAVED)}, RuntimeError,
     r'^Error\(s\) in loading state_dict\. Unexpected key\(s\) in state_dict: "model", "optimizer", "amp"\. .*'
     r"checkpoint\['amp'\]"),
    ("unexpected_key_after_a_good_entry", {"loss_scaler0": {"loss_scale": 8.0, "unskipped": 0}, "x": 1},
     RuntimeError, r'^Error\(s\) in loading state_dict\. Unexpected key\(s\) in state_dict: "x"\. $'),
    ("string_scale", {"loss_scaler0": {"loss_scale": "x", "unskipped": 0}}, TypeError,
     r"entry 'loss_scaler0': loss_scale must be a number, found 'x' \(str\)"),
    ("bool_scale", {"loss_scaler0": {"loss_scale": True, "unskipped": 0}}, TypeError,
     r"entry 'loss_scaler0': loss_scale must be a number, found True \(bool\)"),
    ("tensor_scale", {"loss_scaler0": {"loss_scale": torch.tensor(8.0), "unskipped": 0}}, TypeError,
     r"entry 'loss_scaler0': loss_scale must be a number"),
    ("zero_scale", {"loss_scaler0": {"loss_scale": 0.0, "unskipped": 0}}, ValueError,
     r"entry 'loss_scaler0': loss_scale must be a finite number above 0, found 0\.0"),
    ("negative_scale", {"loss_scaler0": {"loss_scale": -5.0, "unskipped": 0}}, ValueError,
     r"loss_scale must be a finite number above 0, found -5\.0"),
    ("nan_scale", {"loss_scaler0": {"loss_scale": math.nan, "unskipped": 0}}, ValueError,
     r"loss_scale must be a finite number above 0, found nan"),
    ("inf_scale", {"loss_scaler0": {"loss_scale": math.inf, "unskipped": 0}}, ValueError,
     r"loss_scale must be a finite number above 0, found inf"),
    ("scale_beyond_float32", {"loss_scaler0": {"loss_scale": 1e39, "unskipped": 0}}, ValueError,
     r"entry 'loss_scaler0': loss_scale must be at most 3\.40282e\+38 \(float32's largest value"),
    ("missing_unskipped", {"loss_scaler0": {"loss_scale": 8.0}}, ValueError,
     r"entry 'loss_scaler0' has no 'unskipped'"),
    ("missing_loss_scale", {"loss_scaler0": {"unskipped": 3}}, ValueError,
     r"entry 'loss_scaler0' has no 'loss_scale'"),
    ("negative_unskipped", {"loss_scaler0": {"loss_scale": 8.0, "unskipped": -1}}, ValueError,
     r"unskipped must be a whole number of at least 0, found -1"),
    ("fractional_unskipped", {"loss_scaler0": {"loss_scale": 8.0, "unskipped": 2.5}}, ValueError,
     r"unskipped must be a whole number of at least 0, found 2\.5"),
    ("string_unskipped", {"loss_scaler0": {"loss_scale": 8.0, "unskipped": "3"}}, TypeError,
     r"unskipped must be an int, found '3' \(str\)"),
    ("entry_not_a_dict", {"loss_scaler0": 8.0}, TypeError,
     r"entry 'loss_scaler0' must be a dict .*found 8\.0 \(float\)"),
    # The first entry is fine: a load that stopped at the bad second one would have changed scaler 0.
    ("second_entry_bad", {"loss_scaler0": {"loss_scale": 8.0, "unskipped": 1},
                          "loss_scaler1": {"loss_scale": "x", "unskipped": 0}}, TypeError,
     r"entry 'loss_scaler1': loss_scale must be a number"),
]


@pytest.mark.parametrize("bad,error,message", [case[1:] for case in BAD_STATES], ids=[case[0] for case in BAD_STATES])
def test_refused_load_state_dict_changes_nothing_and_prints_nothing(bad, error, message, capsys):
    model, opt = _trained()
    saved = amp.state_dict()
    before = snapshot([model], [opt])
    capsys.readouterr()
    _raises_exactly(error, message, amp.load_state_dict, bad)
    assert amp.state_dict() == saved == SAVED
    assert differences(before, snapshot([model], [opt])) == []
    assert capsys.readouterr().out == ""  # not even Apex's entry-count warning: the load never started


# --- amp.initialize with impossible options -------------------------------------------------------------

BAD_OPTIONS = [
    ("loss_scale_zero", dict(loss_scale=0.0), ValueError,
     r"^loss_scale must be 'dynamic' or a finite number above 0, found loss_scale=0\.0"),
    ("loss_scale_negative", dict(loss_scale=-5.0), ValueError, r"found loss_scale=-5\.0"),
    ("loss_scale_nan", dict(loss_scale=math.nan), ValueError, r"found loss_scale=nan"),
    ("loss_scale_inf", dict(loss_scale=math.inf), ValueError, r"found loss_scale=inf"),
    ("loss_scale_inf_string", dict(loss_scale="inf"), ValueError, r"found loss_scale='inf'"),
    ("loss_scale_zero_string", dict(loss_scale="0"), ValueError, r"found loss_scale='0'"),
    ("loss_scale_word", dict(loss_scale="banana"), ValueError,
     r"^loss_scale must be 'dynamic' or a number \(a float such as 128\.0, or a string such as '128\.0'\), "
     r"found loss_scale='banana'$"),
    ("loss_scale_bool", dict(loss_scale=True), TypeError, r"found loss_scale=True"),
    ("loss_scale_beyond_float32", dict(loss_scale=1e39), ValueError,
     r"^loss_scale must be at most 3\.40282e\+38 \(float32's largest value.*found loss_scale=1e\+39"),
    ("max_beyond_float32", dict(max_loss_scale=1e39), ValueError, r"^max_loss_scale must be at most 3\.40282e\+38"),
    ("min_above_max", dict(min_loss_scale=2.0 ** 20, max_loss_scale=2.0 ** 10), ValueError,
     r"^min_loss_scale \(1048576\.0\) is above max_loss_scale \(1024\.0\)"),
    ("min_negative", dict(min_loss_scale=-1.0), ValueError,
     r"^min_loss_scale must be a finite number above 0, found min_loss_scale=-1\.0"),
    ("max_nan", dict(max_loss_scale=math.nan), ValueError,
     r"^max_loss_scale must be a finite number above 0, found max_loss_scale=nan"),
    ("max_none", dict(max_loss_scale=None), TypeError, r"^max_loss_scale must be a number, found max_loss_scale=None"),
    ("max_string", dict(max_loss_scale="65536"), TypeError, r"^max_loss_scale must be a number"),
    ("num_losses_zero", dict(num_losses=0), ValueError, r"^num_losses must be at least 1 .*found num_losses=0"),
    ("num_losses_float", dict(num_losses=1.5), TypeError, r"^num_losses must be an int, found num_losses=1\.5"),
    ("num_losses_bool", dict(num_losses=True), TypeError, r"^num_losses must be an int, found num_losses=True"),
    ("master_weights_yes", dict(master_weights="yes"), TypeError,
     r"^master_weights must be a boolean, the string 'True' or 'False', or None, found master_weights='yes'$"),
    ("keep_batchnorm_fp32_no", dict(opt_level="O3", keep_batchnorm_fp32="no"), AssertionError,
     r"^keep_batchnorm_fp32 must be a boolean, the string 'True' or 'False', or None, found keep_batchnorm_fp32=no$"),
    ("cast_model_type_string", dict(cast_model_type="float16"), TypeError,
     r"^cast_model_type must be a floating-point torch\.dtype .*found cast_model_type='float16'"),
    ("cast_model_type_int_dtype", dict(cast_model_type=torch.int8), TypeError, r"found cast_model_type=torch\.int8"),
    ("cast_model_type_true", dict(cast_model_type=True), TypeError, r"found cast_model_type=True"),
    ("cast_model_outputs_string", dict(cast_model_outputs="float16"), TypeError,
     r"^cast_model_outputs must be a floating-point torch\.dtype"),
    ("verbosity_string", dict(verbosity="0"), TypeError, r"^verbosity must be an int \(0, 1 or 2\), found verbosity='0'"),
    # Apex's own checks, for the record (tests/test_initialize.py pins their full text).
    ("o1_with_master_weights", dict(opt_level="O1", master_weights=True), RuntimeError,
     r"^It doesn't make sense to use master_weights with O1"),
    ("unknown_level", dict(opt_level="02"), RuntimeError, r"^Unexpected optimization level 02"),
]


@pytest.mark.parametrize("kwargs,error,message", [case[1:] for case in BAD_OPTIONS],
                         ids=[case[0] for case in BAD_OPTIONS])
def test_refused_initialize_changes_nothing(kwargs, error, message):
    first_model, first_opt = _trained()
    model, opt = _pair(seed=1)
    kwargs = dict(dict(opt_level="O2", verbosity=1), **kwargs)
    before = snapshot([first_model, model], [first_opt, opt])
    _raises_exactly(error, message, amp.initialize, model, opt, **kwargs)
    assert differences(before, snapshot([first_model, model], [first_opt, opt])) == []
    assert amp.state_dict() == SAVED


def test_malformed_verbosity_variable_refuses_initialize(monkeypatch):
    first_model, first_opt = _trained()
    model, opt = _pair(seed=1)
    monkeypatch.setenv("AMPCOMPAT_VERBOSITY", "loud")
    before = snapshot([first_model, model], [first_opt, opt])
    _raises_exactly(ValueError, r"^AMPCOMPAT_VERBOSITY must be an integer .*found AMPCOMPAT_VERBOSITY='loud'",
                    amp.initialize, model, opt, opt_level="O2")
    assert differences(before, snapshot([first_model, model], [first_opt, opt])) == []


def test_disabled_initialize_still_checks_verbosity_but_nothing_else():
    model, opt = _pair()
    assert amp.initialize(model, opt, enabled=False, num_losses=0, loss_scale=-1.0) == (model, opt)  # Apex
    _raises_exactly(TypeError, r"^verbosity must be an int", amp.initialize, model, opt, enabled=False, verbosity="1")


# --- values Apex accepted that keep working ----------------------------------------------------------

def test_apex_spellings_are_still_accepted():
    model, opt = _pair()
    amp.initialize(model, opt, opt_level="O2", loss_scale="128.0", keep_batchnorm_fp32="False",
                   master_weights="True", min_loss_scale=0, max_loss_scale=2 ** 20, num_losses=2, verbosity=0)
    props = amp._amp_state.opt_properties
    assert props.loss_scale == 128.0 and props.keep_batchnorm_fp32 is False and props.master_weights is True
    assert model.bn.weight.dtype == torch.float16  # "False" really means False: BatchNorm cast too
    assert amp.state_dict()["loss_scaler1"] == {"loss_scale": 128.0, "unskipped": 0}


def test_master_weights_string_false_turns_masters_off():
    """Apex used the string's truth, so "False" turned master weights on; it now means what it says."""
    model, opt = _pair()
    amp.initialize(model, opt, opt_level="O2", master_weights="False", verbosity=0)
    assert amp._amp_state.opt_properties.master_weights is False
    assert all(p.dtype != torch.float32 for p in amp.master_params(opt) if p.dim() == 2)


def test_keep_batchnorm_fp32_check_is_no_assert_statement():
    """Under python -O an ``assert`` vanishes and O3 kept BatchNorm FP32 when told "no" (the last test
    runs this file under -O); here, the check holds whatever the interpreter's flags."""
    model, opt = _pair()
    with pytest.raises(AssertionError):
        amp.initialize(model, opt, opt_level="O3", keep_batchnorm_fp32="no", verbosity=0)
    assert model.bn.weight.dtype == torch.float32 and not hasattr(opt, "_amp_stash")


# --- misuse messages at the real cause -------------------------------------------------------------------

@pytest.mark.parametrize("level", ["O2", "O3", "O5"])
def test_second_initialize_of_a_cast_model_says_it_was_already_initialized(level):
    model, opt = _trained(level)
    new_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot([model], [opt, new_opt])
    err = _raises_exactly(RuntimeError, r"^This MLP was already passed through amp\.initialize, which cast its "
                          r"parameters \(param fc1\.weight is torch\.(float16|bfloat16)\)\. Pass each model through "
                          r"amp\.initialize once", amp.initialize, model, new_opt, opt_level=level, verbosity=0)
    assert ".half()" not in str(err)
    assert differences(before, snapshot([model], [opt, new_opt])) == []


def test_model_halved_by_the_user_keeps_apex_message():
    model, opt = _pair()
    model.half()
    before = snapshot([model], [opt])
    _raises_exactly(RuntimeError, r"^Found param fc1\.weight with type torch\.HalfTensor, expected torch\.FloatTensor\."
                    r"\nWhen using amp\.initialize, you do not need to call \.half\(\) on your model",
                    amp.initialize, model, opt, opt_level="O2", verbosity=0)
    assert differences(before, snapshot([model], [opt])) == []


def test_scale_loss_with_optimizer_none_names_the_argument():
    model, opt = _trained("O2", num_losses=1)
    (x, y), = batches(1, seed=2)
    loss = F.cross_entropy(model(x), y)
    before = snapshot([model], [opt])
    _raises_exactly(TypeError, r"^amp\.scale_loss\(loss, optimizers\) got optimizers=None: pass the optimizer "
                    r"\(or the list of optimizers\) that amp\.initialize returned",
                    lambda: amp.scale_loss(loss, None).__enter__())
    assert differences(before, snapshot([model], [opt])) == []


def test_scale_loss_with_optimizer_none_still_works_where_apex_never_scaled():
    """O3's static scale of 1.0 never touches the optimizers (Apex's short-circuit): None stays legal there."""
    model = make_mlp(d_hidden=16)
    amp.initialize(model, opt_level="O3", verbosity=0)
    (x, y), = batches(1)
    loss = F.cross_entropy(model(x), y)
    with amp.scale_loss(loss, None) as scaled:
        assert scaled is loss


def test_add_param_group_with_a_non_dict_keeps_apex_error():
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O2", verbosity=0)
    before = snapshot([model], [opt])
    _raises_exactly(AssertionError, r"^param group must be a dict$", opt.add_param_group, list(model.fc2.parameters()))
    assert differences(before, snapshot([model], [opt])) == []


# --- the same catalogues under python -O ------------------------------------------------------------------

_UNDER_O = """
import sys
if __debug__:
    sys.exit("not running under python -O")
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-k", "not under_python_O",
                      "tests/test_misuse_catalogue.py", "tests/test_misuse.py"]))
"""


@pytest.mark.slow
def test_catalogues_pass_under_python_O():
    """``python -O`` strips ``assert`` statements: every check above must survive it (one subprocess)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("AMPCOMPAT_VERBOSITY", None)
    done = subprocess.run([sys.executable, "-O", "-c", _UNDER_O], cwd=_REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\b\d+ passed", done.stdout) and " failed" not in done.stdout, done.stdout[-2000:]
