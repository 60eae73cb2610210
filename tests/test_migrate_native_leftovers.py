"""``--to-native`` leftovers of single real files: gradient reads after every micro-batch of gradient accumulation
(Swin's logged gradient norm, :mod:`native_reads`).

The fixture programs train like their originals in ``test_migrate_equivalence.py`` (``TRAINING_LOOPS``: t30 with
accumulation 1 and 2+, clipping on and off, O0); here are the properties behaviour alone does not show: what the added
context manager does to gradients, and the shapes that must stay on ampcompat.
"""
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from ampcompat.tools.migrate import native_reads
from _migrate_runs import REPO, run_migrate

LOOPS = REPO / "tests" / "fixtures" / "to_native_loops"


def _helper():
    namespace = {}
    exec("import contextlib\n" + "\n".join(native_reads.helper_lines("unscaled_gradients")), namespace)
    return namespace["unscaled_gradients"]


def _scaled_setup(scale=2.0**16):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(model(torch.randn(5, 4)).square().sum()).backward()
    return model, optimizer, scaler


def test_the_helper_shows_unscaled_gradients_and_puts_the_same_tensors_back():
    model, optimizer, scaler = _scaled_setup()
    before = [(p.grad, p.grad.clone()) for p in model.parameters()]
    seen = []
    with _helper()(scaler, optimizer):
        seen = [p.grad.clone() for p in model.parameters()]
    for (tensor, values), shown, param in zip(before, seen, model.parameters()):
        assert param.grad is tensor and torch.equal(param.grad, values)  # bit for bit, same object
        assert torch.equal(shown, values / scaler.get_scale())


def test_a_block_that_changes_the_gradients_keeps_its_change_scaled_back():
    model, optimizer, scaler = _scaled_setup()
    originals = [p.grad for p in model.parameters()]
    expected = [p.grad / scaler.get_scale() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    with _helper()(scaler, optimizer):
        returned = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert torch.allclose(returned, norm)
    for param, original, unscaled in zip(model.parameters(), originals, expected):
        assert param.grad is original
        assert torch.allclose(param.grad, unscaled * (0.01 / norm) * scaler.get_scale(), rtol=1e-5)


def test_a_disabled_scaler_leaves_everything_alone():
    model, optimizer, _ = _scaled_setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.grad for p in model.parameters()]
    with _helper()(scaler, optimizer):
        assert all(p.grad is g for p, g in zip(model.parameters(), before))


LOOP = """
import torch
from apex import amp

def gradient_norm(parameters):
    return sum(p.grad.norm().item() ** 2 for p in parameters) ** 0.5

def train(model, optimizer, data, accumulation):
    model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
    for idx, (x, y) in enumerate(data):
        loss = torch.nn.functional.mse_loss(model(x), y)
        with amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        {read}
        if (idx + 1) % accumulation == 0:
            optimizer.step()
            optimizer.zero_grad()
"""


def _convert(tmp_path: Path, read: str) -> str:
    path = tmp_path / "loop.py"
    path.write_text(LOOP.replace("{read}", read))
    code, out = run_migrate([tmp_path, "--to-native"])
    assert code == 0, out
    return path.read_text()


def test_a_read_through_master_params_converts(tmp_path):
    text = _convert(tmp_path, "norm = gradient_norm(amp.master_params(optimizer))")
    assert "apex" not in text and "TODO(ampcompat)" not in text
    assert "with unscaled_gradients(scaler, optimizer):\n            norm = gradient_norm(" in text
    assert text.count("def unscaled_gradients(") == 1 and "import contextlib" in text
    compile(text, "loop.py", "exec")


@pytest.mark.parametrize("read", [
    "norm = sum(p.grad.norm() for p in model.parameters())",  # .grad of parameters it did not name
    "for p in amp.master_params(optimizer): print(p.grad.norm())",  # a block, not one statement
    "norm = gradient_norm(model.parameters())",  # not through amp.master_params
])
def test_reads_the_helper_cannot_cover_stay_on_ampcompat(tmp_path, read):
    text = _convert(tmp_path, read)
    assert "unscaled_gradients" not in text
    assert "TODO(ampcompat): this reads gradients after a backward pass that is not always followed" in text


def test_a_second_run_changes_nothing(tmp_path):
    shutil.copy(LOOPS / "_loops.py", tmp_path / "_loops.py")
    shutil.copy(LOOPS / "t30_logged_grad_norm.py", tmp_path / "t30.py")
    code, out = run_migrate([tmp_path, "--to-native", "--opt-level", "O1"])
    assert code == 0, out
    first = (tmp_path / "t30.py").read_text()
    assert "from apex" not in first and "TODO(ampcompat)" not in first
    code, out = run_migrate([tmp_path, "--to-native", "--opt-level", "O1"])
    assert code == 0 and (tmp_path / "t30.py").read_text() == first


# --- the forward pass before the branch that computes the loss (native_forward) --------------------------------
BRANCHED = """
import torch
from apex import amp

def train(model, optimizer, data, accumulation):
    model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
    {before}
    for idx, (x, y) in enumerate(data):
        x = x.to("cpu")
        {forward}
        if accumulation > 1:
            loss = torch.nn.functional.mse_loss(outputs, y) / accumulation
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
        else:
            loss = torch.nn.functional.mse_loss(outputs, y)
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
        optimizer.step()
"""


def _branched(tmp_path: Path, forward: str, before: str = "pass", report: bool = False):
    path = tmp_path / "branched.py"
    path.write_text(BRANCHED.replace("{forward}", forward).replace("{before}", before))
    code, out = run_migrate([tmp_path, "--to-native"])
    assert code == 0, out
    return (path.read_text(), out) if report else path.read_text()


def test_the_model_call_before_the_loss_branch_goes_under_autocast_once(tmp_path):
    text = _branched(tmp_path, "outputs = model(x)")
    assert "apex" not in text and "TODO(ampcompat)" not in text
    assert text.count("        with torch.autocast(amp_device_type, dtype=torch.float16):\n"
                      "            outputs = model(x)\n") == 1
    assert "x = x.to(\"cpu\")\n        with" in text  # moving the input stays outside
    compile(text, "branched.py", "exec")


def test_a_forward_pass_sharing_its_line_stays_on_ampcompat(tmp_path):
    text, out = _branched(tmp_path, "outputs = model(x); print(1)", report=True)
    assert "TODO(ampcompat): a statement of the forward pass (before the branch that computes the loss) shares a " \
           "line" in out
    assert "amp.scale_loss(" in text and "with torch.autocast" not in text


def test_statements_before_the_loop_are_not_wrapped(tmp_path):
    text = _branched(tmp_path, "pass", before="outputs = model(torch.zeros(1))")
    assert "    outputs = model(torch.zeros(1))\n" in text
    assert text.count("torch.autocast(") == 2  # the two loss computations only


# --- amp.initialize without an optimizer at O2/O3: Apex's model casts (native_inference) -----------------------
def _casts():
    from ampcompat.tools.migrate import native_inference
    namespace = {"torch": torch}
    exec("import collections.abc\n" + "\n".join(native_inference.helper_lines("fp16_model_casts")), namespace)
    return namespace["fp16_model_casts"]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
                               ).eval()


@pytest.mark.parametrize("level, keep", [("O2", True), ("O3", False), ("O2", False)])
def test_the_model_casts_match_ampcompats_apex_levels(level, keep):
    import ampcompat.amp as amp
    reference = amp.initialize(_net(), opt_level=level, keep_batchnorm_fp32=keep, verbosity=0)
    ours = _casts().apply(_net(), keep_batchnorm_fp32=keep)
    x = torch.randn(5, 6, dtype=torch.float64)
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
        assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)
        assert torch.equal(ours(input=x), expected)  # keyword inputs are cast too
    state, reference_state = ours.state_dict(), reference.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in reference_state.items()}


def _inference(tmp_path: Path, call: str):
    path = tmp_path / "infer.py"
    path.write_text("import torch\nfrom apex import amp\n\n\ndef evaluate(model, evaluator):\n"
                    f"    model = {call}\n    return evaluator.predict(model)\n")
    code, out = run_migrate([tmp_path, "--to-native"])
    assert code == 0, out
    return path.read_text(), out


@pytest.mark.parametrize("call, keep", [('amp.initialize(model, opt_level="O2")', True),
                                        ('amp.initialize(model, opt_level="O3")', False),
                                        ('amp.initialize(model, opt_level="O2", keep_batchnorm_fp32=False)', False)])
def test_o2_and_o3_inference_handed_to_other_code_converts(tmp_path, call, keep):
    text, _ = _inference(tmp_path, call)
    assert "apex" not in text and "TODO(ampcompat)" not in text
    assert f"    model = fp16_model_casts.apply(model, keep_batchnorm_fp32={keep})\n" in text
    assert "import collections.abc" in text and text.count("class fp16_model_casts") == 1
    compile(text, "infer.py", "exec")


@pytest.mark.parametrize("call, reason", [
    ('amp.initialize(model, opt_level="O1")', "the model is handed to other code here"),
    ('amp.initialize(model, opt_level="O2", cast_model_outputs=torch.float16)', "sets `cast_model_outputs`"),
    ('amp.initialize(model, opt_level="O2", keep_batchnorm_fp32=flag)', "keep_batchnorm_fp32 is not a literal"),
])
def test_inference_the_casts_cannot_cover_stays_on_ampcompat(tmp_path, call, reason):
    text, out = _inference(tmp_path, call)
    assert "fp16_model_casts" not in text and reason in out


# --- SwAV: create_syncbn_process_group (native_groups) and the amp module passed for checkpoints ----------------
def _swav(tmp_path: Path, body: str):
    path = tmp_path / "swav.py"
    path.write_text("import torch\nimport apex\n\n\ndef main(args, model, optimizer, restore):\n" +
                    textwrap.indent(textwrap.dedent(body), "    "))
    code, out = run_migrate([tmp_path, "--to-native"])
    assert code == 0, out
    return path.read_text(), out


@pytest.mark.parametrize("size, expected", [
    ("0", "group = None"),
    ("8", "group = torch.distributed.new_subgroups(8)[0]"),
    ("group_size=8", "group = torch.distributed.new_subgroups(8)[0]"),
    ("args.size", "group = (torch.distributed.new_subgroups(args.size)[0] if args.size != 0 else None)"),
])
def test_create_syncbn_process_group_becomes_new_subgroups(tmp_path, size, expected):
    text, out = _swav(tmp_path, f"group = apex.parallel.create_syncbn_process_group({size})\n")
    assert expected in text and "apex" not in text
    assert "raises ValueError instead of AssertionError" in out


@pytest.mark.parametrize("size", ["args.size * 2", "-1", "args.size, 1"])
def test_create_syncbn_process_group_it_cannot_rewrite_stays(tmp_path, size):
    text, _ = _swav(tmp_path, f"group = apex.parallel.create_syncbn_process_group({size})\n")
    assert "new_subgroups" not in text and "TODO(ampcompat)" in text


def test_new_subgroups_gives_the_group_apex_gave(tmp_path):
    import torch.distributed as dist
    from ampcompat.parallel import create_syncbn_process_group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ours, theirs = dist.new_subgroups(1)[0], create_syncbn_process_group(1)
        assert dist.get_process_group_ranks(ours) == dist.get_process_group_ranks(theirs) == [0]
        assert create_syncbn_process_group(0) is None
    finally:
        dist.destroy_process_group()


TRAINING = """
model, optimizer = apex.amp.initialize(model, optimizer, opt_level="O1")
restore("checkpoint.pth", state_dict=model, optimizer=optimizer, amp=apex.amp)
for x in args.data:
    loss = model(x).sum()
    with apex.amp.scale_loss(loss, optimizer) as scaled_loss:
        scaled_loss.backward()
    optimizer.step()
"""


def test_the_amp_module_passed_for_checkpoints_becomes_the_scalers_state(tmp_path):
    text, _ = _swav(tmp_path, TRAINING)
    assert "apex" not in text and "TODO(ampcompat)" not in text
    expected = ("amp=types.SimpleNamespace(state_dict=scaler.state_dict, load_state_dict=lambda state: "
                "scaler.load_state_dict(grad_scaler_state(state))))")
    assert expected in text and "import types" in text and text.count("def grad_scaler_state(") == 1
    # the object restores an Apex checkpoint's scale and round-trips the GradScaler's own state
    namespace = {}
    start = text.index("def grad_scaler_state(")
    exec(text[start:text.index("\n\n\n", start)], namespace)
    scaler = torch.amp.GradScaler("cpu")
    import types
    amp_object = eval(expected[len("amp="):-1], {"types": types, "scaler": scaler, **namespace})
    amp_object.load_state_dict({"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 7}})
    assert scaler.get_scale() == 1024.0 and scaler.state_dict()["_growth_tracker"] == 7
    with pytest.raises(TypeError):
        amp_object.load_state_dict({}, strict=False)  # as amp.load_state_dict did: SwAV's fallback relies on it


@pytest.mark.parametrize("use", ["handle = apex.amp", "restore(*apex.amp)"])
def test_other_uses_of_the_amp_module_stay(tmp_path, use):
    text, _ = _swav(tmp_path, TRAINING.replace('restore("checkpoint.pth", state_dict=model, optimizer=optimizer, '
                                               'amp=apex.amp)', use))
    assert "TODO(ampcompat): uses the amp module itself as a value" in text


def test_a_loss_summed_in_place_keeps_its_forward_pass_under_autocast(tmp_path):
    """SwAV: ``loss = 0``, ``loss += ...`` over crops, ``loss /= n``: the in-place updates read the loss, so the whole
    computation (the model call included) is the forward pass, not only the last division."""
    text, _ = _swav(tmp_path, """
        model, optimizer = apex.amp.initialize(model, optimizer, opt_level="O1")
        for x in args.data:
            embedding, output = model(x)
            loss = 0
            for crop in args.crops:
                loss += output[crop].sum()
            loss /= len(args.crops)
            with apex.amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            optimizer.step()
        """)
    assert "with torch.autocast(amp_device_type, dtype=torch.float16):\n            embedding, output = model(x)\n" \
           in text
    assert "                loss += output[crop].sum()\n            loss /= len(args.crops)\n        scaler" in text
