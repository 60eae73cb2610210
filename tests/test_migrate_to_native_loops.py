"""``migrate --to-native`` on real training loops: the level option, checkpoints, runtime levels, the
GradScaler's unscaling and skip-aware schedulers, and what stays on ampcompat.

The shapes themselves train like the originals in ``test_migrate_equivalence.py`` (``TRAINING_LOOPS``); here are the
properties behaviour alone does not show, each checked by running the converted code.
"""
import shutil
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import ampcompat
from ampcompat.tools.migrate.native_checkpoint import helper_lines
from ampcompat.tools.migrate.native_levels import LevelChoiceError, parse_level_choice
from ampcompat.tools.migrate.scanner import scan
from ampcompat.tools.migrate.sources import load_source
from ampcompat.tools.migrate.to_native import to_native
from _migrate_runs import REPO, run_all, run_migrate

LOOPS = REPO / "tests" / "fixtures" / "to_native_loops"


def converted(tmp_path: Path, names, *flags: str) -> Path:
    """Copy the named fixture programs (and their helpers) and run ``--to-native FLAGS`` on the copy."""
    folder = tmp_path / "converted"
    folder.mkdir(exist_ok=True)
    for name in list(names) + ["_loops.py", "lr_search.py"]:
        shutil.copy(LOOPS / name, folder / name)
    code, out = run_migrate([folder, "--to-native", *flags])
    assert code == 0, out
    return folder


def run(script: Path, *args: str, env: str = "absent") -> dict:
    return run_all([{"script": str(script), "args": list(args), "env": env}])[0]


def lines(output: str, *tags: str):
    return [line for line in output.splitlines() if line.split(" ", 1)[0] in tags]


# --- the option -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, assumed, from_args", [("O1", "O1", False), ("O5", "O5", False),
                                                      ("from-args", None, True), ("from-args:O2=O4", None, True)])
def test_opt_level_values(text, assumed, from_args):
    choice = parse_level_choice(text)
    assert (choice.assumed, choice.from_args) == (assumed, from_args)
    if text.endswith("O2=O4"):
        assert choice.mapping["O2"] == "O4" and choice.mapping["O3"] == "O1"


@pytest.mark.parametrize("text, message", [
    ("O0", "--opt-level must be O1, O2, O3, O4, O5 or from-args[:LEVEL=LEVEL,...], not 'O0'"),
    ("01", "--opt-level must be O1, O2, O3, O4, O5 or from-args[:LEVEL=LEVEL,...], not '01'"),
    ("from-args:O2", "--opt-level from-args:O2: 'O2' is not LEVEL=LEVEL with levels O0 to O5"),
    ("from-args:O2=O9", "--opt-level from-args:O2=O9: 'O2=O9' is not LEVEL=LEVEL with levels O0 to O5"),
])
def test_bad_opt_level_values_are_refused_with_what_to_pass(text, message):
    with pytest.raises(LevelChoiceError) as error:
        parse_level_choice(text)
    assert str(error.value) == message


def test_opt_level_is_a_usage_error_without_to_native(tmp_path, capsys):
    from ampcompat.tools import migrate
    assert migrate.main([str(LOOPS), "--write", "--opt-level", "O1"]) == 2
    assert "--opt-level needs --to-native" in capsys.readouterr().err
    assert migrate.main([str(LOOPS), "--to-native", "--opt-level", "O7"]) == 2


def test_without_the_option_the_summary_counts_the_files_it_would_convert(tmp_path):
    """Runtime levels stay on ampcompat without --opt-level, each with the advice at its line, and the summary line
    says how many files --opt-level O1 would leave with neither Apex nor ampcompat (t01, t02, t06, t10, t13)."""
    names = [path.name for path in LOOPS.glob("t*.py")]
    folder = tmp_path / "loops"
    shutil.copytree(LOOPS, folder)
    code, out = run_migrate([folder, "--to-native"])
    assert code == 0, out
    assert out.splitlines()[-1].endswith("5 files would convert fully with --opt-level O1 (the opt_level is only "
                                         "known at run time).")
    assert "t01_hf_fp16_flag.py:20:9: TODO(ampcompat): opt_level is only known at run time (it is not a literal); " \
           "rerun with --opt-level O1" in out
    code, out = run_migrate([folder, "--to-native", "--opt-level", "O1"])
    assert code == 0 and "would convert fully" not in out
    assert all("ampcompat" not in (folder / name).read_text() for name in names)


# --- checkpoints ------------------------------------------------------------------------------------------------
def _helper():
    namespace = {}
    exec("\n".join(helper_lines("grad_scaler_state")), namespace)
    return namespace["grad_scaler_state"]


@pytest.mark.parametrize("state, loss_id", [
    ({"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}, 0),
    (OrderedDict(loss_scaler0={"loss_scale": 1024.0, "unskipped": 17}), 0),
    ({"loss_scaler0": {"loss_scale": 2.0 ** 24, "unskipped": 1999}, "loss_scaler1": {"loss_scale": 8, "unskipped": 3}},
     1),
])
def test_the_inserted_loader_converts_apex_state_as_ampcompat_does(state, loss_id):
    assert _helper()(state, loss_id) == ampcompat.amp_state_to_grad_scaler(state, loss_id)


def test_the_inserted_loader_passes_a_grad_scalers_own_state_through():
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    own = scaler.state_dict()
    assert _helper()(own) is own
    assert _helper()({}) == {}
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(_helper()({"loss_scaler0": {"loss_scale": 256.0, "unskipped": 4}}))
    assert fresh.get_scale() == 256.0 and fresh.state_dict()["_growth_tracker"] == 4


@pytest.mark.slow
def test_an_old_apex_checkpoint_loads_into_the_converted_program(tmp_path):
    """Acceptance 3: a checkpoint written under Apex (amp.state_dict() with a scale it had reached) resumes the
    converted program exactly as it resumes the original, and the state each saves afterwards is the same."""
    folder = converted(tmp_path, ["t09_checkpoint.py"])
    assert "grad_scaler_state(checkpoint[\"amp\"])" in (folder / "t09_checkpoint.py").read_text()
    first = tmp_path / "apex.pt"
    before = run(LOOPS / "t09_checkpoint.py", "--save", str(first), env="alias")
    assert before["code"] == 0, before["output"]
    checkpoint = torch.load(first, weights_only=True)
    assert set(checkpoint["amp"]) == {"loss_scaler0"}
    checkpoint["amp"]["loss_scaler0"] = {"loss_scale": 1024.0, "unskipped": 5}  # a scale it had come down to
    torch.save(checkpoint, first)
    original, native = tmp_path / "original.pt", tmp_path / "native.pt"
    runs = run_all([
        {"script": str(LOOPS / "t09_checkpoint.py"), "args": ["--resume", str(first), "--save", str(original)],
         "env": "alias"},
        {"script": str(folder / "t09_checkpoint.py"), "args": ["--resume", str(first), "--save", str(native)],
         "env": "absent"},
    ])
    assert [run["code"] for run in runs] == [0, 0], runs
    assert lines(runs[0]["output"], "LOSS", "WEIGHTS") == lines(runs[1]["output"], "LOSS", "WEIGHTS")
    apex_state = torch.load(original, weights_only=True)["amp"]
    native_state = torch.load(native, weights_only=True)["amp"]
    assert apex_state == {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 9}}
    assert native_state == ampcompat.amp_state_to_grad_scaler(apex_state)


# --- levels chosen at run time ----------------------------------------------------------------------------------
def test_from_args_keeps_the_level_a_run_time_choice(tmp_path):
    """--opt-level from-args: the converted program reads the same flag and picks the native recipe from it (O0:
    FP32, O1: FP16 autocast + GradScaler, O4: bfloat16 autocast), as the original picked its opt level."""
    folder = converted(tmp_path, ["t10_level_from_args.py"], "--opt-level", "from-args")
    text = (folder / "t10_level_from_args.py").read_text()
    assert 'amp_dtype = {"O0": None, "O1": torch.float16' in text
    levels = ["O0", "O1", "O4"]
    runs = run_all([{"script": str(script), "args": ["--opt_level", level], "env": env} for level in levels
                    for script, env in ((LOOPS / "t10_level_from_args.py", "alias"),
                                        (folder / "t10_level_from_args.py", "absent"))])
    for level, before, after in zip(levels, runs[::2], runs[1::2]):
        assert before["code"] == after["code"] == 0, (level, before, after)
        assert lines(before["output"], "DTYPE") == lines(after["output"], "DTYPE"), level
        for old, new in zip(lines(before["output"], "LOSS", "WEIGHTS"), lines(after["output"], "LOSS", "WEIGHTS")):
            assert old.split()[:-1] == new.split()[:-1]
            assert float(old.split()[-1]) == pytest.approx(float(new.split()[-1]), rel=2e-3), level


def test_a_static_loss_scale_given_at_run_time_stops_the_converted_program(tmp_path):
    """A loss scale from the command line may be static, which a GradScaler cannot be: the converted program says so
    and stops, instead of training with different numbers; dynamic (or none) trains as before."""
    folder = converted(tmp_path, ["t02_imagenet_functions.py"], "--opt-level", "O1")
    static, dynamic = run_all([
        {"script": str(folder / "t02_imagenet_functions.py"), "args": ["--loss-scale", "128.0"], "env": "absent"},
        {"script": str(folder / "t02_imagenet_functions.py"), "args": ["--loss-scale", "dynamic"], "env": "absent"},
    ])
    assert static["code"] == 1
    assert "ValueError: loss_scale='128.0': torch.amp.GradScaler has no static loss scale; leave it unset (dynamic)" \
           in static["output"]
    assert dynamic["code"] == 0 and len(lines(dynamic["output"], "LOSS")) == 4


# --- the GradScaler around the loop -----------------------------------------------------------------------------
SKIPPING_LOOP = """\
import torch
from apex import amp

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
model, optimizer = amp.initialize(model, optimizer, opt_level="O1", verbosity=0)
for step in range(3):
    x = torch.randn(8, 4)
    out = model(x)
    loss = out.float().pow(2).mean() * (float("inf") if step == 0 else 1.0)
    with amp.scale_loss(loss, optimizer) as scaled_loss:
        scaled_loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    print("LR", step, optimizer.param_groups[0]["lr"])
"""


def test_a_scheduler_after_the_step_advances_only_when_the_optimizer_stepped(tmp_path):
    """The documented difference: an overflowing first step is skipped by both; Apex's run still advanced the
    schedule, the converted one waits for a real step."""
    path = tmp_path / "skip.py"
    path.write_text(SKIPPING_LOOP)
    code, out = run_migrate([path, "--to-native"])
    assert code == 0 and "`scheduler.step()` now runs only when scaler.step stepped the optimizer" in out
    assert "    if scaler.get_scale() >= scale_before:  # the optimizer stepped\n        scheduler.step()\n" in \
        path.read_text()
    (tmp_path / "original.py").write_text(SKIPPING_LOOP)
    before, after = run_all([{"script": str(tmp_path / "original.py"), "args": [], "env": "alias"},
                             {"script": str(path), "args": [], "env": "absent"}])
    assert lines(before["output"], "LR") == ["LR 0 0.5", "LR 1 0.25", "LR 2 0.125"], before["output"]
    assert lines(after["output"], "LR") == ["LR 0 1.0", "LR 1 0.5", "LR 2 0.25"], after["output"]


# --- FP16_Optimizer's loss-scale flag: a dynamic and a static branch -------------------------------------------------
def test_a_static_loss_scale_is_pinned_and_skips_an_inf_step_where_dynamic_backs_off(tmp_path):
    """t14 builds FP16_Optimizer dynamic for --loss_scale 0 and static otherwise: converted, each branch has its own
    GradScaler and the step sets the static scale back. Under plain PyTorch a step with inf gradients is skipped in
    both (the weights stay), the static scale stays at 128 throughout while the dynamic one halves there."""
    script = "t14_fp16_optimizer_loss_scale_flag.py"
    folder = converted(tmp_path, [script])
    text = (folder / script).read_text()
    assert "apex" not in text and "ampcompat" not in text
    assert "    static_loss_scale = float(args.loss_scale)\n" in text and "    static_loss_scale = None\n" in text
    assert "scaler.update(static_loss_scale)\n" in text
    static, dynamic = run_all([{"script": str(folder / script), "args": ["--loss_scale", scale, "--inf_at", "1"],
                                "env": "absent"} for scale in ("128", "0")])
    for outcome in (static, dynamic):
        assert outcome["code"] == 0, outcome["output"]
        weights = lines(outcome["output"], "WEIGHTS")
        assert len(weights) == 4 and weights[0] == weights[1] != weights[2], outcome["output"]  # step 1 skipped
        assert lines(outcome["output"], "LOSS")[1] == "LOSS 1 inf"
    assert [float(line.split()[2]) for line in lines(static["output"], "SCALE")] == [128.0] * 4
    scales = [float(line.split()[2]) for line in lines(dynamic["output"], "SCALE")]
    assert scales[1] == scales[0] / 2 and scales[2:] == [scales[1]] * 2, scales


COUNTED_SCALE = """\
import torch
from apex.fp16_utils import FP16_Optimizer

calls = []


def loss_scale_from_config():
    calls.append(1)
    return 64


model = torch.nn.Linear(4, 2)
optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), static_loss_scale=loss_scale_from_config())
for step in range(3):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    optimizer.backward(loss)
    optimizer.step()
    print("SCALE", step, optimizer.loss_scale)
print("CALLS", len(calls))
"""


def test_a_static_loss_scale_expression_is_evaluated_once_where_the_optimizer_was_built(tmp_path):
    text, found = todos(tmp_path, COUNTED_SCALE)
    assert found == [] and "apex" not in text
    assert text.count("loss_scale_from_config()") == COUNTED_SCALE.count("loss_scale_from_config()")  # def + 1 call
    assert "static_loss_scale = float(loss_scale_from_config())\n" in text
    assert "scaler = torch.amp.GradScaler(amp_device_type, init_scale=static_loss_scale)\n" in text
    path = tmp_path / "counted.py"
    path.write_text(text)
    outcome = run(path)
    assert outcome["code"] == 0, outcome["output"]
    assert lines(outcome["output"], "SCALE", "CALLS") == ["SCALE 0 64.0", "SCALE 1 64.0", "SCALE 2 64.0", "CALLS 1"]


REBUILT = """\
import torch
from apex.fp16_utils import FP16_Optimizer
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
other = torch.optim.Adam(model.parameters())
if scale == 0:
    optimizer = FP16_Optimizer({first}, dynamic_loss_scale=True)
else:
    {target} = FP16_Optimizer({second}, static_loss_scale=scale)
loss = model(torch.randn(8, 4)).sum()
optimizer.backward(loss)
optimizer.step()
"""


@pytest.mark.parametrize("first, target, second", [
    ("optimizer", "optimizer", "other"),      # two different optimizers
    ("optimizer", "wrapped", "optimizer"),    # into two names
])
def test_fp16_optimizer_built_from_two_optimizers_or_into_two_names_stays(tmp_path, first, target, second):
    text, found = todos(tmp_path, REBUILT.format(first=first, target=target, second=second))
    assert found == ["FP16_Optimizer is built more than once in this file, and not as one build of the same optimizer "
                     "into the same name in each branch of one if/else; rewrite by hand"] * 2
    assert "optimizer.backward(loss)" in text and "GradScaler" not in text


def test_fp16_optimizer_in_an_if_without_else_or_twice_in_a_row_stays(tmp_path):
    without_else = REBUILT.format(first="optimizer", target="optimizer", second="optimizer").replace(
        "else:\n    optimizer = FP16_Optimizer", "elif scale > 0:\n    optimizer = FP16_Optimizer")
    in_a_row = REBUILT.format(first="optimizer", target="optimizer", second="optimizer").replace(
        "else:\n    optimizer = FP16_Optimizer", "optimizer = FP16_Optimizer")
    for source in (without_else, in_a_row):
        _, found = todos(tmp_path, source)
        assert len(found) == 2 and all(message.startswith("FP16_Optimizer is built more than once") for message in found)


def test_fp16_optimizer_under_a_flag_needs_a_model_read_before_the_flag(tmp_path):
    """Under `if args.fp16:` (t15, ERNIE) the GradScaler and the device are created before the `if`, the device from
    the model whose parameters the optimizer got; with no such read before it there is no device to name."""
    source = (LOOPS / "t15_fp16_flag_and_loss_scale_flag.py").read_text()
    text, found = todos(tmp_path, source)
    assert found == [] and "amp_enabled = bool(args.fp16)\namp_device_type = next(model.parameters()).device.type\n" \
        in text
    late = source.replace("torch.optim.SGD(param_groups,", "torch.optim.SGD(params(model),").replace(
        'param_groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n], "weight_decay": 0.01},\n'
        '                {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0}]\n', "")
    _, found = todos(tmp_path, late)
    assert found == ["FP16_Optimizer is built under a condition and the loop also runs without it, and no single model "
                     "whose parameters are read before that `if` gives the device; rewrite by hand"]


def todos(tmp_path, source, *flags):
    path = tmp_path / "snippet.py"
    path.write_text(textwrap.dedent(source))
    result = to_native(scan(load_source(str(path))), choice=parse_level_choice(flags[0]) if flags else None)
    return result.text, [note.message.split("TODO(ampcompat): ", 1)[1] for note in result.notes
                         if "TODO(ampcompat): " in note.message]


def test_clipping_after_every_micro_batch_clips_the_scaled_sums_and_other_reads_stay(tmp_path):
    """Swin's accumulation branch clipped the partial sums after every backward pass. A GradScaler unscales once per
    step, but clipping commutes with the scale: the scaled sums are clipped at the threshold times the scale, and a
    kept norm is divided by it (t13 trains like the original). Any other read of those partial sums has no faithful
    native form and keeps the amp calls on ampcompat, with the reason at the line."""
    loop = """\
        from apex import amp
        model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
        for idx, (x, y) in enumerate(data):
            loss = criterion(model(x), y) / steps
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            {read}
            if (idx + 1) % steps == 0:
                optimizer.step()
                optimizer.zero_grad()
    """
    text, found = todos(tmp_path, loop.format(read="norm = torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), "
                                                   "args.max_norm + 1)"))
    assert found == [] and "ampcompat" not in text
    assert '    norm = torch.nn.utils.clip_grad_norm_((p for group in optimizer.param_groups for p in group["params"]), ' \
           '(args.max_norm + 1) * scaler.get_scale()) / scaler.get_scale()\n' in text
    text, found = todos(tmp_path, loop.format(read="torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.5)"))
    assert found == [] and "clip_value=0.5 * scaler.get_scale())\n" in text
    text, found = todos(tmp_path, loop.format(read="log(sum(p.grad.norm() for p in model.parameters()))"))
    assert any(message.startswith("this reads gradients after a backward pass that is not always followed by "
                                  "optimizer.step() (gradient accumulation)") for message in found), found
    assert "from ampcompat import amp" in text


def test_clipping_before_the_accumulated_step_is_unscaled_once(tmp_path):
    text, found = todos(tmp_path, """\
        from apex import amp
        model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
        for idx, (x, y) in enumerate(data):
            loss = criterion(model(x), y) / steps
            with amp.scale_loss(loss, optimizer, delay_unscale=(idx + 1) % steps != 0) as scaled_loss:
                scaled_loss.backward()
            if (idx + 1) % steps == 0:
                torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), 5.0)
                optimizer.step()
                optimizer.zero_grad()
    """)
    assert found == []
    assert "    scaler.scale(loss).backward()\n" \
           "    if (idx + 1) % steps == 0:\n" \
           "        scaler.unscale_(optimizer)\n" \
           '        torch.nn.utils.clip_grad_norm_((p for group in optimizer.param_groups for p in group["params"]), 5.0)\n' \
           "        scaler.step(optimizer)\n" \
           "        scaler.update()\n" in text


def test_inference_only_initialize_and_a_library_running_apex_stay_with_their_reasons(tmp_path):
    _, found = todos(tmp_path, """\
        from apex import amp
        def evaluate(model, loader, evaluator):
            model = amp.initialize(model, opt_level="O1")
            return evaluator.predict(model)
    """)
    assert "the model is handed to other code here, which would run it outside torch.autocast; put its calls under " \
           "torch.autocast by hand" in found
    _, found = todos(tmp_path, (LOOPS / "lr_search.py").read_text())
    assert "uses `_amp_stash`, which amp adds to optimizers; torch.amp.GradScaler has no counterpart, rewrite this " \
           "by hand" in found


def test_o2_and_o3_say_which_recipe_they_became(tmp_path):
    for level in ("O2", "O3"):
        path = tmp_path / f"{level}.py"
        path.write_text(f"from apex import amp\nmodel, opt = amp.initialize(m, o, opt_level={level!r})\n"
                        "for x in data:\n    loss = m(x).sum()\n    with amp.scale_loss(loss, opt) as s:\n"
                        "        s.backward()\n    opt.step()\n")
        code, out = run_migrate([path, "--to-native"])
        assert code == 0
        assert f"opt_level {level} becomes O1's native recipe (an FP32 model under torch.autocast with a GradScaler)" \
            in next(line for line in out.splitlines() if line.startswith(f"{path}:2:"))
        assert "ampcompat" not in path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("t01_hf_fp16_flag.py", ()),
    ("t01_hf_fp16_flag.py", ("--fp16", "--gradient_accumulation_steps", "3")),
    ("t03_trainer_class.py", ("--no-amp",)),
    ("t06_optional_apex.py", ("--amp-opt-level", "O0")),
    ("t10_level_from_args.py", ("--opt_level", "O1")),
])
def test_the_other_paths_of_the_converted_loops(tmp_path, script, args):
    """The exhaustive matrix: the branches the default run does not take (amp off, longer accumulation)."""
    folder = converted(tmp_path, [script], "--opt-level", "O1")
    before, after = run_all([{"script": str(LOOPS / script), "args": list(args), "env": "alias"},
                             {"script": str(folder / script), "args": list(args), "env": "absent"}])
    assert before["code"] == after["code"] == 0, (before, after)
    old, new = lines(before["output"], "LOSS", "WEIGHTS", "LR"), lines(after["output"], "LOSS", "WEIGHTS", "LR")
    assert len(old) == len(new) > 0
    for a, b in zip(old, new):
        assert a.split()[:-1] == b.split()[:-1]
        assert float(a.split()[-1]) == pytest.approx(float(b.split()[-1]), rel=2e-3)


def test_registering_a_function_native_autocast_already_casts_goes_with_its_check(tmp_path):
    """Transformer-XL's `if 'apex' in sys.modules: amp.register_half_function(torch, 'einsum')`: natively einsum runs
    in FP16 under autocast already, so the registration and the check that guarded it go; others stay."""
    text, found = todos(tmp_path, """\
        import sys
        import torch
        from apex import amp

        if "apex" in sys.modules:
            amp.register_half_function(torch, "einsum")
        print(torch.einsum("ii", torch.ones(2, 2)).item())
    """)
    assert text == 'import sys\nimport torch\n\nprint(torch.einsum("ii", torch.ones(2, 2)).item())\n' and found == []
    text, found = todos(tmp_path, """\
        import torch
        from apex import amp
        amp.register_half_function(torch, "cumsum")
    """)
    assert found == ["registers a function for O1's casts; natively, cast its inputs and run it under "
                     "torch.autocast(device_type, enabled=False) (torch.amp.custom_fwd for an autograd.Function)"]


def test_a_block_two_rewrites_empty_together_keeps_a_pass(tmp_path):
    """pytorch-transformers' SQuAD scripts: one rewrite removes `import apex`, another the einsum registration after
    it; each alone leaves a statement behind, together they would leave `try:` empty (a file that no longer
    parses, which --to-native then refused to write)."""
    source = """\
        import sys
        import torch

        fp16 = len(sys.argv) > 1
        if fp16:
            try:
                import apex

                apex.amp.register_half_function(torch, "einsum")
            except ImportError:
                raise ImportError("Please install apex to use fp16 training.")
        print("EINSUM", torch.einsum("ii", torch.ones(2, 2)).item())
    """
    text, found = todos(tmp_path, source)
    assert found == [] and "apex" not in text.replace("Please install apex", "")
    assert "    try:\n        pass\n" in text and "import apex" not in text
    path = tmp_path / "converted.py"
    path.write_text(text)
    outcomes = run_all([{"script": str(path), "args": args, "env": "absent"} for args in ([], ["--fp16"])])
    for outcome in outcomes:
        assert outcome["code"] == 0 and lines(outcome["output"], "EINSUM") == ["EINSUM 2.0"], outcome
