"""amp.initialize: return shapes and identity, option validation, printed block, bad input."""
import pytest
import torch

import ampcompat
from ampcompat import amp

from _models import make_mlp

O1_BLOCK = """Selected optimization level O1:  Insert automatic casts around Pytorch functions and Tensor methods.

Defaults for this optimization level are:
enabled                : True
opt_level              : O1
cast_model_type        : None
patch_torch_functions  : True
keep_batchnorm_fp32    : None
master_weights         : None
loss_scale             : dynamic
Processing user overrides (additional kwargs that are not None)...
After processing overrides, optimization options are:
enabled                : True
opt_level              : O1
cast_model_type        : None
patch_torch_functions  : True
keep_batchnorm_fp32    : None
master_weights         : None
loss_scale             : dynamic
"""

O3_OVERRIDDEN_BLOCK = """Selected optimization level O3:  Pure FP16 training.
Defaults for this optimization level are:
enabled                : True
opt_level              : O3
cast_model_type        : torch.float16
patch_torch_functions  : False
keep_batchnorm_fp32    : False
master_weights         : False
loss_scale             : 1.0
Processing user overrides (additional kwargs that are not None)...
After processing overrides, optimization options are:
enabled                : True
opt_level              : O3
cast_model_type        : torch.float16
patch_torch_functions  : False
keep_batchnorm_fp32    : True
master_weights         : False
loss_scale             : 128.0
"""


def _model_opt():
    model = make_mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_printed_block_o1_is_apex_byte_for_byte(capsys):
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O1")
    assert capsys.readouterr().out == O1_BLOCK


def test_printed_block_after_overrides(capsys):
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O3", keep_batchnorm_fp32="True", loss_scale="128.0")
    assert capsys.readouterr().out == O3_OVERRIDDEN_BLOCK


def test_verbosity_zero_is_silent(capsys):
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O2", verbosity=0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("level,expected", [
    ("O0", dict(cast_model_type=torch.float32, patch_torch_functions=False, keep_batchnorm_fp32=None,
                master_weights=False, loss_scale=1.0)),
    ("O1", dict(cast_model_type=None, patch_torch_functions=True, keep_batchnorm_fp32=None,
                master_weights=None, loss_scale="dynamic")),
    ("O2", dict(cast_model_type=torch.float16, patch_torch_functions=False, keep_batchnorm_fp32=True,
                master_weights=True, loss_scale="dynamic")),
    ("O3", dict(cast_model_type=torch.float16, patch_torch_functions=False, keep_batchnorm_fp32=False,
                master_weights=False, loss_scale=1.0)),
    ("O4", dict(cast_model_type=None, patch_torch_functions=True, patch_torch_functions_type=torch.bfloat16,
                keep_batchnorm_fp32=None, master_weights=None, loss_scale=1.0)),
    ("O5", dict(cast_model_type=torch.bfloat16, patch_torch_functions=None, keep_batchnorm_fp32=True,
                master_weights=True, loss_scale=1.0)),
])
def test_opt_level_defaults(level, expected):
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level=level, verbosity=0)
    props = amp._amp_state.opt_properties
    assert props.enabled is True and props.opt_level == level
    for key, value in expected.items():
        assert getattr(props, key) == value, key


def test_return_shapes_and_identity():
    model, opt = _model_opt()
    assert amp.initialize(model, opt_level="O0", verbosity=0) is model
    ampcompat.reset()
    model, opt = _model_opt()
    m, o = amp.initialize(model, opt, opt_level="O1", verbosity=0)
    assert m is model and o is opt
    ampcompat.reset()
    model, opt = _model_opt()
    empty = []
    m, o = amp.initialize(model, empty, opt_level="O1", verbosity=0)
    assert m is model and o is empty
    ampcompat.reset()
    models = [make_mlp(seed=1), make_mlp(seed=2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    ms, os_ = amp.initialize(models, opts, opt_level="O2", verbosity=0)
    assert ms is models and os_ is opts
    ampcompat.reset()
    models = [make_mlp(seed=1)]
    single = torch.optim.SGD(models[0].parameters(), lr=0.1)
    ms, o = amp.initialize(models, single, opt_level="O2", verbosity=0)
    assert ms is models and o is single


def test_disabled_returns_inputs_untouched_and_scale_loss_yields_loss():
    model, opt = _model_opt()
    before = [p.clone() for p in model.parameters()]
    sentinel = object()
    assert amp.initialize(model, sentinel, enabled=False) == (model, sentinel)
    assert not hasattr(opt, "_amp_stash")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert amp._amp_state.opt_properties.enabled is False
    loss = model(torch.randn(4, 8)).sum()
    with amp.scale_loss(loss, opt) as scaled:
        assert scaled is loss


def test_scale_loss_before_initialize_raises_apex_message():
    loss = torch.ones((), requires_grad=True)
    with pytest.raises(RuntimeError) as err:
        with amp.scale_loss(loss, None):
            pass
    assert str(err.value) == (
        "Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized.  model, optimizer = "
        "amp.initialize(model, optimizer, opt_level=...) must be called before `with amp.scale_loss`."
    )


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(opt_level="01"), RuntimeError,
     # Apex's sentence, then ampcompat's two extra levels.
     "Unexpected optimization level 01. Options are 'O0', 'O1', 'O2', 'O3'.  Note that in `O0`, `O1`, etc., "
     "the prefix O is the letter O, not the number zero. ampcompat also accepts 'O4' and 'O5' (O1 and O2 in "
     "bfloat16, as in ROCm Apex)."),
    (dict(opt_level="O1", cast_model_type=torch.float16), RuntimeError,
     "O1 inserts casts around Torch functions rather than model weights, so with O1, the model weights themselves "
     "should remain FP32. If you wish to cast the model to a different type, use opt_level='O2' or 'O3'. "
     "cast_model_type was torch.float16"),
    (dict(opt_level="O2", patch_torch_functions=True), RuntimeError,
     "Currently, patch_torch_functions=True should only be set by selecting opt_level='O1'."),
    (dict(opt_level="O1", keep_batchnorm_fp32=False), RuntimeError,
     "With opt_level O1, batchnorm functions are automatically patched to run in FP32, so keep_batchnorm_fp32 "
     "should be None. keep_batchnorm_fp32 was False"),
    (dict(opt_level="O2", keep_batchnorm_fp32="yes"), AssertionError,
     "keep_batchnorm_fp32 must be a boolean, the string 'True' or 'False', or None, found keep_batchnorm_fp32=yes"),
    (dict(opt_level="O1", master_weights=True), RuntimeError,
     "It doesn't make sense to use master_weights with O1. With O1, your model weights themselves should be FP32."),
    # Apex let float()'s message through ("could not convert string to float: 'banana'"); same type, clearer.
    (dict(opt_level="O2", loss_scale="banana"), ValueError,
     "loss_scale must be 'dynamic' or a number (a float such as 128.0, or a string such as '128.0'), "
     "found loss_scale='banana'"),
    (dict(opt_level="O1", loss_scale=[128.0]), TypeError,
     "loss_scale must be 'dynamic' or a number (a float such as 128.0, or a string such as '128.0'), "
     "found loss_scale=[128.0]"),
])
def test_option_errors_are_apex_verbatim(kwargs, exc, message):
    model, opt = _model_opt()
    with pytest.raises(exc) as err:
        amp.initialize(model, opt, verbosity=0, **kwargs)
    assert str(err.value) == message
    assert not hasattr(opt, "_amp_stash")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_string_overrides_are_converted():
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O2", keep_batchnorm_fp32="False", loss_scale="128", verbosity=0)
    props = amp._amp_state.opt_properties
    assert props.keep_batchnorm_fp32 is False and props.loss_scale == 128.0
    assert amp._amp_state.loss_scalers[0].loss_scale() == 128.0
    assert amp._amp_state.loss_scalers[0].dynamic is False


def test_hard_override_turns_errors_into_printed_warnings(capsys):
    amp._amp_state.hard_override = True
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O1", master_weights=True)
    assert ("Warning:  It doesn't make sense to use master_weights with O1. With O1, your model weights themselves "
            "should be FP32.") in capsys.readouterr().out


@pytest.mark.parametrize("wrapper,name", [
    (torch.nn.DataParallel, "torch.nn.parallel.DataParallel"),
])
def test_parallel_wrapped_model_rejected(wrapper, name):
    model, opt = _model_opt()
    with pytest.raises(RuntimeError) as err:
        amp.initialize(wrapper(model), opt, opt_level="O2", verbosity=0)
    assert str(err.value) == (
        "Incoming model is an instance of {}. Parallel wrappers should only be applied to the model(s) AFTER \n"
        "the model(s) have been returned from amp.initialize.".format(name))
    assert not hasattr(opt, "_amp_stash")


def test_half_model_rejected_with_apex_message_and_nothing_patched():
    model, opt = _model_opt()
    model.fc1.half()
    with pytest.raises(RuntimeError) as err:
        amp.initialize(model, opt, opt_level="O2", verbosity=0)
    assert str(err.value) == (
        "Found param fc1.weight with type torch.HalfTensor, expected torch.FloatTensor.\n"
        "When using amp.initialize, you do not need to call .half() on your model\n"
        "before passing it, no matter what optimization level you choose.")
    assert not hasattr(opt, "_amp_stash")
    assert model.fc2.weight.dtype == torch.float32


def test_bad_container_types():
    model, opt = _model_opt()
    with pytest.raises(TypeError, match="^optimizers must be either a single optimizer or a list of optimizers.$"):
        amp.initialize(model, (opt,), verbosity=0)
    with pytest.raises(TypeError, match="^models must be either a single model or a list of models.$"):
        amp.initialize((model,), opt, verbosity=0)
    assert not hasattr(opt, "_amp_stash")


def test_same_optimizer_twice_rejected_before_anything_changes():
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    second = make_mlp(seed=3)
    with pytest.raises(RuntimeError, match="^A given optimizer should only be passed through amp.initialize once.$"):
        amp.initialize(second, opt, opt_level="O2", verbosity=0)
    assert all(p.dtype == torch.float32 for p in second.parameters())


def test_second_initialize_with_new_pair_replaces_scalers():
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    first = amp._amp_state.loss_scalers
    model2, opt2 = _model_opt()
    amp.initialize(model2, opt2, opt_level="O2", num_losses=2, verbosity=0)
    assert amp._amp_state.loss_scalers is not first and len(amp._amp_state.loss_scalers) == 2
    assert not torch.is_autocast_enabled("cpu")  # the O1 handle of the first call was retired


def test_models_on_mixed_device_types_rejected():
    model = make_mlp()
    model.fc2.to("meta")
    with pytest.raises(RuntimeError, match="several device types"):
        amp.initialize(model, opt_level="O2", verbosity=0)
    assert model.fc1.weight.dtype == torch.float32


def test_private_state_attributes_exist():
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O1", verbosity=0, min_loss_scale=2.0, max_loss_scale=2.0 ** 20)
    state = amp._amp_state
    assert state.min_loss_scale == 2.0 and state.max_loss_scale == 2.0 ** 20
    scaler = state.loss_scalers[0]
    assert scaler.loss_scale() == 2.0 ** 16 and scaler._max_loss_scale == 2.0 ** 20 and scaler._min_loss_scale == 2.0
    assert scaler._unskipped == 0 and scaler.dynamic and scaler._has_overflow is False
    assert state.handle.is_active() and state.handle._is_active
    assert opt._amp_stash.lazy_init_called is False and opt._amp_stash.already_patched is False
    assert opt._amp_stash.params_have_scaled_gradients is False
    from ampcompat.amp._amp_state import _amp_state, maybe_print, master_params, warn_or_err
    assert _amp_state is amp._amp_state and callable(maybe_print) and callable(warn_or_err)
    assert master_params is amp.master_params
    assert "state_dict" in amp.__dict__ and "load_state_dict" in amp.__dict__
    state.handle._deactivate()
    assert not torch.is_autocast_enabled("cpu")


def test_max_loss_scale_lowers_initial_dynamic_scale():
    model, opt = _model_opt()
    amp.initialize(model, opt, opt_level="O1", max_loss_scale=1024.0, verbosity=0)
    assert amp._amp_state.loss_scalers[0].loss_scale() == 1024.0
