"""``migrate --to-native`` across files: a scaler wrapper class (amp.scale_loss in a class of one file) converts with
the file that calls amp.initialize and builds it, or neither converts.

The two shapes train like the originals in ``test_migrate_equivalence.py`` (``t24_*``: timm's scaler class and
autocast slot; ``t25_*``: GNMT's O2 optimizer wrapper with gradient accumulation and private loss-scale pokes). Here:
a file converted without its partner keeps its TODO, a partner that cannot convert holds the other back, a
checkpoint the original wrote loads into the converted program, and where the GradScaler's calls land.
"""
import ast
import shutil
import textwrap
from pathlib import Path

import pytest

from _migrate_runs import REPO, WarmRunner, run_migrate

LOOPS = REPO / "tests" / "fixtures" / "to_native_loops"
ALONE_WRAPPER = "amp.initialize is not called in this file"
ALONE_CALLER = "amp.scale_loss is not called in this file"


def copied(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "tree"
    folder.mkdir(parents=True, exist_ok=True)
    for name in list(names) + ["_loops.py"]:
        shutil.copy(LOOPS / name, folder / name)
    return folder


def to_native(*paths: Path) -> str:
    code, out = run_migrate([*paths, "--to-native", "--opt-level", "O1"])
    assert code == 0, out
    return out


def on_ampcompat(path: Path) -> bool:
    text = path.read_text()
    return "ampcompat" in text or "from apex" in text or "import apex" in text


def method(path: Path, class_name: str, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    owner = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    return next(node for node in owner.body if isinstance(node, ast.FunctionDef) and node.name == name)


# --- a file without its partner keeps today's TODO -----------------------------------------------------------------
@pytest.mark.parametrize("wrapper, caller", [("t24_scaler_helpers.py", "t24_timm_style.py"),
                                             ("t25_amp_optimizer.py", "t25_gnmt_style.py")])
def test_each_file_converted_without_its_partner_keeps_its_todo(tmp_path, wrapper, caller):
    folder = copied(tmp_path, wrapper, caller)
    to_native(folder / wrapper)
    to_native(folder / caller)
    assert ALONE_WRAPPER in (folder / wrapper).read_text() and on_ampcompat(folder / wrapper)
    assert ALONE_CALLER in (folder / caller).read_text() and on_ampcompat(folder / caller)
    # The twin: the same two files scanned together both convert.
    together = copied(tmp_path / "together", wrapper, caller)
    to_native(together)
    for name in (wrapper, caller):
        assert not on_ampcompat(together / name) and "TODO(ampcompat)" not in (together / name).read_text(), name


_CALLER = """\
import torch
from apex import amp
from helpers import Scaler


def main(model, optimizer, data):
    model, optimizer = amp.initialize(model, optimizer, opt_level="O1"{options})
    scaler = Scaler()
    for x, y in data:
        optimizer.zero_grad()
        output = model(x)
        loss = torch.nn.functional.cross_entropy(output, y)
        scaler(loss, optimizer)
"""
_WRAPPER = """\
from apex import amp


class Scaler:
    def __call__(self, loss, optimizer):
        with amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        {extra}
        optimizer.step()
"""


def _pair(tmp_path: Path, options: str = "", extra: str = "pass", report: list = None) -> Path:
    folder = tmp_path / "pair"
    folder.mkdir()
    (folder / "train.py").write_text(_CALLER.format(options=options))
    (folder / "helpers.py").write_text(_WRAPPER.format(extra=extra))
    out = to_native(folder)
    if report is not None:
        report.append(out)
    return folder


def test_a_plain_pair_converts_and_the_forward_pass_goes_under_autocast(tmp_path):
    folder = _pair(tmp_path)
    train = (folder / "train.py").read_text()
    assert not on_ampcompat(folder / "train.py") and not on_ampcompat(folder / "helpers.py")
    body = method_body = ast.parse(train).body[-1].body
    loop = next(node for node in method_body if isinstance(node, ast.For))
    wrapped = next(node for node in loop.body if isinstance(node, ast.With))
    assert "torch.autocast" in ast.unparse(wrapped.items[0].context_expr)
    assert [ast.unparse(node) for node in wrapped.body][0] == "output = model(x)"
    assert "amp.initialize" not in train and body


def test_a_caller_that_cannot_convert_holds_its_wrapper_back(tmp_path):
    """A static loss scale has no GradScaler counterpart: the caller keeps amp.initialize on ampcompat, so the
    wrapper must keep Apex's scaling too (a GradScaler there would scale losses amp also manages)."""
    folder = _pair(tmp_path, options=", loss_scale=128.0")
    assert on_ampcompat(folder / "train.py") and on_ampcompat(folder / "helpers.py")
    assert ALONE_WRAPPER in (folder / "helpers.py").read_text()


def test_a_wrapper_that_does_more_than_scaling_holds_its_caller_back(tmp_path):
    report = []
    folder = _pair(tmp_path, extra="print(amp._amp_state.loss_scalers[0].loss_scale())", report=report)
    assert on_ampcompat(folder / "train.py") and on_ampcompat(folder / "helpers.py")
    assert "touches amp's private state" in (folder / "helpers.py").read_text()
    assert ALONE_CALLER in (folder / "train.py").read_text()
    # The wrapper's TODO says why it cannot own a GradScaler, at the line in the way.
    assert "helpers.py:8:9: TODO(ampcompat): Scaler scales the loss for code that calls amp.initialize elsewhere, " \
           "but cannot own a torch.amp.GradScaler in Apex's place: amp's private state is touched" in report[0]


def test_a_wrapper_that_qualifies_gets_no_extra_todo_without_its_partner(tmp_path):
    folder = copied(tmp_path, "t25_amp_optimizer.py")
    out = to_native(folder / "t25_amp_optimizer.py")
    assert ALONE_WRAPPER in out and "cannot own a torch.amp.GradScaler" not in out


# --- where the GradScaler's calls land --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = copied(tmp_path_factory.mktemp("pairs"), "t24_scaler_helpers.py", "t24_timm_style.py",
                    "t25_amp_optimizer.py", "t25_gnmt_style.py")
    to_native(folder)
    return folder


def test_accumulation_unscales_only_on_the_calls_that_step(pairs):
    """GNMT's step(..., update=False) accumulates: unscale_ and the step run only under `if update:`, once."""
    step = method(pairs / "t25_amp_optimizer.py", "AmpStepper", "step")
    text = ast.unparse(step)
    assert text.count("unscale_(") == 1 and text.count(".step(optimizer)") == 1
    gate = next(node for node in step.body if isinstance(node, ast.If))
    assert ast.unparse(gate.test) == "update"
    inside = ast.unparse(gate)
    assert "unscale_(optimizer)" in inside and "grad_scaler.update()" in inside
    first = ast.unparse(step.body[0])
    assert first == "self.grad_scaler.scale(loss).backward()"
    assert inside.index("unscale_(") < inside.index("clip_grad_norm_(")


def test_private_loss_scale_pokes_become_the_grad_scaler_arguments(pairs):
    init = ast.unparse(method(pairs / "t25_amp_optimizer.py", "AmpStepper", "__init__"))
    assert "torch.amp.GradScaler(" in init and "init_scale=loss_scale" in init
    assert "growth_interval=upscale_interval" in init and "_amp_state" not in init and "_loss_scale" not in init


def test_the_autocast_slot_enters_torch_autocast_on_the_apex_path_only(pairs):
    main = ast.unparse(next(node for node in ast.parse((pairs / "t24_timm_style.py").read_text()).body
                            if isinstance(node, ast.FunctionDef) and node.name == "main"))
    assert "amp_autocast = suppress" in main
    branch = main[main.index("if not args.fp32:"):]
    assert branch.index("amp_autocast = functools.partial(torch.autocast") < branch.index("ScaledStep()")


def test_the_gnmt_flag_keeps_autocast_off_on_the_other_paths(pairs):
    trainer = (pairs / "t25_gnmt_style.py").read_text()
    assert "self.amp_enabled = math == 'fp16'" in trainer
    assert "enabled=self.amp_enabled" in trainer


# --- checkpoints ------------------------------------------------------------------------------------------------------
def test_a_checkpoint_the_original_wrote_loads_into_the_converted_program(tmp_path):
    """The original saves amp.state_dict() (Apex's layout) under the wrapper's key; the converted wrapper's
    load_state_dict reads it through grad_scaler_state and starts from the same scale and step count, and a
    checkpoint the converted program writes loads back into it too."""
    original = copied(tmp_path / "original", "t24_scaler_helpers.py", "t24_timm_style.py")
    folder = copied(tmp_path / "converted", "t24_scaler_helpers.py", "t24_timm_style.py")
    to_native(folder)
    apex_ckpt, native_ckpt = tmp_path / "apex.pt", tmp_path / "native.pt"
    runner = WarmRunner()
    try:
        saved = runner.run({"script": str(original / "t24_timm_style.py"), "args": ["--save", str(apex_ckpt)],
                            "env": "alias"})
        resumed = runner.run({"script": str(folder / "t24_timm_style.py"),
                              "args": ["--resume", str(apex_ckpt), "--save", str(native_ckpt)], "env": "absent"})
        again = runner.run({"script": str(folder / "t24_timm_style.py"), "args": ["--resume", str(native_ckpt)],
                            "env": "absent"})
    finally:
        runner.close()
    assert saved["code"] == 0, saved["output"]
    written = [line for line in saved["output"].splitlines() if line.startswith("SCALE")][-1]
    assert resumed["code"] == 0, resumed["output"]
    scales = [line for line in resumed["output"].splitlines() if line.startswith("SCALE")]
    assert scales[0] == written  # the Apex entry, read by the converted wrapper
    assert again["code"] == 0, again["output"]
    assert [line for line in again["output"].splitlines() if line.startswith("SCALE")][0] == scales[-1]


# --- known library wrappers (the partner is an installed package) -----------------------------------------------------
_TIMM_CALLER = """\
from contextlib import suppress

import torch
from apex import amp
from timm.utils import ApexScaler, NativeScaler


def train_one_epoch(model, data, optimizer, amp_autocast=suppress, loss_scaler=None, clip_grad=None):
    for x, y in data:
        with amp_autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss_scaler(loss, optimizer, clip_grad=clip_grad{parameters})


def main(model, optimizer, data, use_amp):
    amp_autocast = suppress
    loss_scaler = None
    if use_amp == "apex":
        model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
        loss_scaler = ApexScaler()
    elif use_amp == "native":
        amp_autocast = torch.cuda.amp.autocast
        loss_scaler = NativeScaler()
    train_one_epoch(model, data, optimizer, amp_autocast=amp_autocast, loss_scaler=loss_scaler)
"""


def _alone(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.py"
    path.write_text(text)
    to_native(path)
    return path


def test_timms_apex_scaler_becomes_its_native_scaler(tmp_path):
    path = _alone(tmp_path, _TIMM_CALLER.format(parameters=", parameters=model.parameters()"))
    text = path.read_text()
    assert not on_ampcompat(path) and "ApexScaler()" not in text
    apex_branch = text[text.index('if use_amp == "apex":'):text.index("elif use_amp")]
    assert "loss_scaler = NativeScaler()" in apex_branch
    assert "amp_autocast = functools.partial(torch.autocast" in apex_branch
    code, out = run_migrate([path, "--to-native", "--opt-level", "O1"])
    assert code == 0 and path.read_text() == text  # a second run changes nothing


def test_timms_native_scaler_is_not_used_where_it_would_assert(tmp_path):
    """NativeScaler asserts parameters= when it clips; a caller that clips without them keeps its TODO."""
    path = _alone(tmp_path, _TIMM_CALLER.format(parameters=""))
    assert on_ampcompat(path) and ALONE_CALLER in path.read_text() and "ApexScaler()" in path.read_text()


_LR_FINDER = """\
import torch
from apex import amp
from torch_lr_finder import LRFinder


def run_apex(model, optimizer, criterion, loader):
    model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
    finder = LRFinder(model, optimizer, criterion, device="cuda", amp_backend="apex")
    finder.range_test(loader, end_lr=10, num_iter=10)
{torch_run}"""
_TORCH_RUN = """

def run_torch(model, optimizer, criterion, loader):
    finder = LRFinder(model, optimizer, criterion, device="cuda", amp_backend="torch",
                      amp_config={"device_type": "cuda", "dtype": torch.float16},
                      grad_scaler=torch.cuda.amp.GradScaler())
    finder.range_test(loader, end_lr=10, num_iter=10)
"""


def test_lr_finder_takes_its_torch_backend_where_the_file_shows_it_has_one(tmp_path):
    path = _alone(tmp_path, _LR_FINDER.format(torch_run=_TORCH_RUN))
    text = path.read_text()
    assert not on_ampcompat(path) and "amp.initialize" not in text
    call = next(node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Call)
                and ast.unparse(node.func) == "LRFinder")
    keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords}
    assert keywords["amp_backend"] == "'torch'"
    assert keywords["amp_config"] == "{'device_type': amp_device_type, 'dtype': torch.float16}"
    assert keywords["grad_scaler"].startswith("torch.amp.GradScaler(amp_device_type")
    assert "amp_device_type = next(model.parameters()).device.type" in text


def test_lr_finder_without_evidence_of_a_torch_backend_keeps_its_todo(tmp_path):
    """An older torch-lr-finder has no 'torch' backend: without a torch run in the file, the API is not certain."""
    path = _alone(tmp_path, _LR_FINDER.format(torch_run=""))
    assert on_ampcompat(path) and ALONE_CALLER in path.read_text()


def test_one_caller_that_cannot_convert_holds_back_the_wrapper_and_every_other_caller(tmp_path):
    """Two scripts build the same wrapper; one passes a static loss scale. The wrapper must keep Apex's scaling for
    that one, so it stays, and then the other script cannot drop amp.initialize either."""
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "helpers.py").write_text(_WRAPPER.format(extra="pass"))
    (folder / "train_a.py").write_text(_CALLER.format(options=""))
    (folder / "train_b.py").write_text(_CALLER.format(options=", loss_scale=128.0"))
    to_native(folder)
    for name in ("helpers.py", "train_a.py", "train_b.py"):
        assert on_ampcompat(folder / name), name
    assert ALONE_CALLER in (folder / "train_a.py").read_text()
    (folder / "train_b.py").unlink()  # the twin: without the static scale's script, the pair converts
    to_native(folder)
    assert not on_ampcompat(folder / "helpers.py") and not on_ampcompat(folder / "train_a.py")
