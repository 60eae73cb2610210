"""``migrate --to-native`` for Apex's multi-tensor kernels, ``apex.pyprof`` and two ``amp.initialize`` calls in
the branches of one ``if``.

The rewritten multi-tensor code is run under plain PyTorch and compared with what ``ampcompat.amp_C`` returns
through ``multi_tensor_applier`` for the same inputs: random FP32/FP16 tensor lists, with inf/NaN injected,
both ``per_tensor`` settings, empty lists, the flag buffer included. The training shapes (NVIDIA BERT's clipper,
the EMA recipes, FastSpeech's pyprof) train like the originals in ``test_migrate_equivalence.py`` (t20-t22).
"""
import re
import textwrap
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import torch

from ampcompat import amp_C
from ampcompat.multi_tensor_apply import multi_tensor_applier
from ampcompat.tools.migrate.native_levels import parse_level_choice
from ampcompat.tools.migrate.native_profiling import REMOVED_NOTE
from ampcompat.tools.migrate.scanner import scan
from ampcompat.tools.migrate.sources import load_source
from ampcompat.tools.migrate.to_native import NativeRewrite, to_native


def native(tmp_path: Path, source: str, level: str = "") -> NativeRewrite:
    """``--to-native`` (with ``--opt-level level``) on ``source``; a second run must change nothing."""
    path = tmp_path / "program.py"
    path.write_text(textwrap.dedent(source))
    choice = parse_level_choice(level) if level else None
    result = to_native(scan(load_source(str(path))), choice=choice)
    assert not result.failed, result.failed
    path.write_text(result.text)
    again = to_native(scan(load_source(str(path))), choice=choice)
    assert again.text == result.text, "a second --to-native run changed the file"
    return result


def messages(result: NativeRewrite) -> str:
    return "\n".join(note.message for note in result.notes)


def comments(result: NativeRewrite) -> str:
    """The text with each wrapped TODO comment joined onto one line."""
    return re.sub(r"\n[ \t]*#   ", " ", result.text)


def plain_namespace(result: NativeRewrite) -> Dict[str, object]:
    """The converted module, run without Apex or ampcompat: its globals."""
    assert not re.search(r"^\s*(import|from)\s+(apex|amp_C|ampcompat)\b", result.text, re.M), result.text
    assert not result.on_ampcompat and not result.imports_apex
    namespace: Dict[str, object] = {"__name__": "converted"}
    exec(compile(result.text, "converted.py", "exec"), namespace)
    return namespace


# --- the rewritten expressions compute what ampcompat.amp_C computes ----------------------------------------------
_KERNELS = """
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier


    def l2norm_per_tensor(flag, tensors):
        total, per = multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [tensors], True)
        return total, per


    def l2norm_total(flag, tensors):
        total, per = multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [tensors], False)
        return total, per


    def l2norm_default(flag, tensors):
        return multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [tensors])


    def l2norm_first(flag, tensors):
        norm = multi_tensor_applier(amp_C.multi_tensor_l2norm_mp, flag, [tensors])[0]
        return norm


    def scale_in_place(flag, tensors, factor):
        multi_tensor_applier(amp_C.multi_tensor_scale, flag, [tensors, tensors], factor)


    def scale_copy(flag, sources, destinations, factor):
        multi_tensor_applier(amp_C.multi_tensor_scale, flag, [sources, destinations], factor)


    def scale_copy_of_a_comprehension(flag, parameters, destinations, factor):
        multi_tensor_applier(amp_C.multi_tensor_scale, flag, [[p for p in parameters], destinations], factor)


    def axpby_both(flag, x, y, out, a, b):
        amp_C.multi_tensor_axpby(65536, flag, [x, y, out], a, b, -1)


    def axpby_x(flag, x, y, out, a, b):
        multi_tensor_applier(amp_C.multi_tensor_axpby, flag, [x, y, out], a, b, 0)


    def axpby_y(flag, x, y, out, a, b):
        multi_tensor_applier(amp_C.multi_tensor_axpby, flag, [x, y, out], a, b, 1)
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Tuple[Dict[str, Callable], NativeRewrite]:
    result = native(tmp_path_factory.mktemp("kernels"), _KERNELS)
    return plain_namespace(result), result


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""Where the comparisons run: also on CUDA, where Apex's kernels ran, when there is a GPU."""


def tensor_list(seed: int, dtype: torch.dtype, poison: str = "", count: int = 4, device: str = "cpu") -> list:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=generator).mul(3).to(device=device, dtype=dtype) for n in (7, 130, 1, 65)[:count]]
    if poison:
        tensors[min(1, count - 1)][0] = float(poison)
    return tensors


def clone(tensors: list) -> list:
    return [t.clone() for t in tensors]


def flag_buffer(value: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.full((1,), value, dtype=torch.int, device=device)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tolerance) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.device == expected.device
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance)


POISONS = ["", "inf", "-inf", "nan"]
DTYPES = [torch.float32, torch.float16]


def test_the_kernels_file_is_plain_pytorch(kernels):
    namespace, result = kernels
    assert "multi_tensor_applier" not in result.text and "amp_C" not in result.text
    assert result.converted >= 11
    assert "TODO(ampcompat)" not in result.text


@pytest.mark.parametrize("function, per_tensor", [("l2norm_per_tensor", True), ("l2norm_total", False),
                                                  ("l2norm_default", None)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_l2norm_matches_ampcompat(kernels, function, per_tensor, dtype, poison, start, device):
    namespace, _ = kernels
    tensors = tensor_list(3, dtype, poison, device=device)
    expected_flag, flag = flag_buffer(start, device), flag_buffer(start, device)
    expected = multi_tensor_applier(amp_C.multi_tensor_l2norm, expected_flag, [clone(tensors)], per_tensor)
    before = clone(tensors)
    total, per = namespace[function](flag, tensors)
    assert_close(total, expected[0], rtol=1e-5, atol=1e-5)
    assert_close(per, expected[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(flag, expected_flag), (flag, expected_flag)
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(tensors, before))  # reads only


def test_l2norm_inside_an_expression_matches_ampcompat(kernels):
    namespace, _ = kernels
    tensors = tensor_list(5, torch.float32)
    expected = multi_tensor_applier(amp_C.multi_tensor_l2norm, flag_buffer(), [clone(tensors)])[0]
    assert_close(namespace["l2norm_first"](flag_buffer(), tensors), expected, rtol=1e-5, atol=1e-6)


def test_a_norm_too_large_for_fp16_is_accumulated_in_fp32(kernels):
    namespace, _ = kernels
    tensors = [torch.full((4096,), 60000.0, dtype=torch.float16)]
    flag = flag_buffer()
    total, _ = namespace["l2norm_total"](flag, tensors)
    expected = multi_tensor_applier(amp_C.multi_tensor_l2norm, flag_buffer(), [clone(tensors)], False)[0]
    assert torch.isfinite(total).all() and total.dtype == torch.float32
    assert_close(total, expected, rtol=1e-5, atol=0)
    assert flag.item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("factor", [0.37, 2.0])
@pytest.mark.parametrize("device", DEVICES)
def test_scale_in_place_matches_ampcompat(kernels, dtype, poison, factor, device):
    namespace, _ = kernels
    tensors = tensor_list(7, dtype, poison, device=device)
    expected_tensors, expected_flag, flag = clone(tensors), flag_buffer(0, device), flag_buffer(0, device)
    multi_tensor_applier(amp_C.multi_tensor_scale, expected_flag, [expected_tensors, expected_tensors], factor)
    assert namespace["scale_in_place"](flag, tensors, factor) is None
    # FP32 math as in Apex's kernel: exact, except FP16 on CPU, where torch's foreach fallback rounds the factor to
    # FP16 first (one FP16 ulp; Apex never ran on CPU, and torch's CUDA foreach kernel keeps the factor FP32)
    ulp = dict(rtol=1e-3, atol=1e-7) if dtype == torch.float16 and tensors[0].device.type == "cpu" else {}
    for actual, expected in zip(tensors, expected_tensors):
        assert_close(actual, expected, **(ulp or dict(rtol=0, atol=0)))
    assert torch.equal(flag, expected_flag) and flag.item() == (1 if poison else 0)


@pytest.mark.parametrize("source_dtype, destination_dtype", [(torch.float16, torch.float32),
                                                             (torch.float32, torch.float16),
                                                             (torch.float32, torch.float32),
                                                             (torch.float16, torch.float16)])
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("function", ["scale_copy", "scale_copy_of_a_comprehension"])
@pytest.mark.parametrize("device", DEVICES)
def test_scale_into_another_list_matches_ampcompat(kernels, source_dtype, destination_dtype, poison, function, device):
    """Unscaling FP16 gradients into FP32 masters (and back) rounds once, as Apex's kernel did."""
    namespace, _ = kernels
    sources = tensor_list(11, source_dtype, poison, device=device)
    expected = [torch.zeros_like(t, dtype=destination_dtype) for t in sources]
    actual = [torch.zeros_like(t, dtype=destination_dtype) for t in sources]
    expected_flag, flag = flag_buffer(0, device), flag_buffer(0, device)
    multi_tensor_applier(amp_C.multi_tensor_scale, expected_flag, [clone(sources), expected], 1 / 65536)
    namespace[function](flag, sources, actual, 1 / 65536)
    for a, e in zip(actual, expected):
        assert_close(a, e, rtol=0, atol=0)
    assert torch.equal(flag, expected_flag) and flag.item() == (1 if poison else 0)


@pytest.mark.parametrize("function, checked", [("axpby_both", (0, 1)), ("axpby_x", (0,)), ("axpby_y", (1,))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poisoned", [None, 0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_axpby_matches_ampcompat(kernels, function, checked, dtype, poisoned, device):
    namespace, _ = kernels
    lists = [tensor_list(13, dtype, "nan" if poisoned == 0 else "", device=device), 
             tensor_list(17, dtype, "inf" if poisoned == 1 else "", device=device)]
    out_expected = [torch.empty_like(t) for t in lists[0]]
    out_actual = [torch.empty_like(t) for t in lists[0]]
    expected_flag, flag = flag_buffer(0, device), flag_buffer(0, device)
    check = {"axpby_both": -1, "axpby_x": 0, "axpby_y": 1}[function]
    multi_tensor_applier(amp_C.multi_tensor_axpby, expected_flag, [clone(lists[0]), clone(lists[1]), out_expected],
                         0.9, 0.1, check)
    namespace[function](flag, lists[0], lists[1], out_actual, 0.9, 0.1)
    for a, e in zip(out_actual, out_expected):
        assert_close(a, e, rtol=0, atol=0)
    assert torch.equal(flag, expected_flag)
    assert flag.item() == (1 if poisoned in checked else 0)


def test_axpby_in_place_is_the_ema_update(kernels):
    namespace, _ = kernels
    ema, weights = tensor_list(19, torch.float32), tensor_list(23, torch.float32)
    expected = clone(ema)
    multi_tensor_applier(amp_C.multi_tensor_axpby, flag_buffer(), [expected, clone(weights), expected], 0.99, 0.01, -1)
    namespace["axpby_both"](flag_buffer(), ema, weights, ema, 0.99, 0.01)
    for a, e in zip(ema, expected):
        assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("call", [
    lambda ns: ns["l2norm_per_tensor"](flag_buffer(), []),
    lambda ns: ns["l2norm_total"](flag_buffer(), []),
    lambda ns: ns["scale_in_place"](flag_buffer(), [], 2.0),
    lambda ns: ns["scale_copy"](flag_buffer(), [], [], 2.0),
    lambda ns: ns["axpby_both"](flag_buffer(), [], [], [], 0.5, 0.5),
], ids=["l2norm-per-tensor", "l2norm", "scale", "scale-copy", "axpby"])
def test_empty_lists_raise_as_under_ampcompat(kernels, call):
    """Apex (and ampcompat) refuse an empty tensor list with RuntimeError; the foreach code does too."""
    namespace, _ = kernels
    with pytest.raises(RuntimeError):
        multi_tensor_applier(amp_C.multi_tensor_scale, flag_buffer(), [[], []], 2.0)
    with pytest.raises(RuntimeError):
        call(namespace)


# --- the flag: set where something can read it, dropped where nothing can --------------------------------------
def test_a_flag_nobody_reads_is_dropped_and_one_that_is_read_is_set(tmp_path):
    result = native(tmp_path, """
        import torch
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier

        def private(tensors):
            scratch = torch.zeros(1, dtype=torch.int)
            multi_tensor_applier(amp_C.multi_tensor_scale, scratch, [tensors, tensors], 0.5)
            total, _ = multi_tensor_applier(amp_C.multi_tensor_l2norm, scratch, [tensors], False)
            return total

        def checked(tensors):
            overflow = torch.zeros(1, dtype=torch.int)
            multi_tensor_applier(amp_C.multi_tensor_scale, overflow, [tensors, tensors], 0.5)
            return overflow.item()
    """)
    namespace = plain_namespace(result)
    private = result.text.split("def checked")[0]
    assert "masked_fill_" not in private
    assert "overflow.masked_fill_(" in result.text
    tensors = [torch.tensor([1.0, float("inf")])]
    assert namespace["checked"](clone(tensors)) == 1
    assert namespace["checked"]([torch.ones(2)]) == 0
    assert torch.isinf(namespace["private"](clone(tensors))).all()


# --- what stays on ampcompat, and says why ------------------------------------------------------------------------
@pytest.mark.parametrize("call, reason", [
    ("multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [grads], per_tensor)",
     "per_tensor is only known at run time"),
    ("multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, lists)", "the tensor lists are not written out here"),
    ("multi_tensor_applier(amp_C.multi_tensor_scale, flag, [grads, grads], 0.5) or None",
     "the result of multi_tensor_scale (None) is used here"),
    ("multi_tensor_applier(amp_C.multi_tensor_adam, flag, [grads, grads, grads, grads], 1e-3, 0.9, 0.99, 1e-8, 1, 1,"
     " 1, 0.0)", "no mechanical rewrite of `apex.multi_tensor_apply.multi_tensor_applier`"),
])
def test_shapes_left_on_ampcompat_say_why(tmp_path, call, reason):
    result = native(tmp_path, f"""
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier

        def use(flag, grads, lists, per_tensor):
            return {call}
    """)
    assert reason in messages(result)
    assert result.on_ampcompat
    assert "TODO(ampcompat): " + reason.split("`")[0] in comments(result)


def test_an_op_attribute_read_elsewhere_keeps_its_assignment(tmp_path):
    """NVIDIA's GradientClipper keeps the ops as attributes: the assignment goes only when every read of the
    attribute was a converted call."""
    source = """
        import torch
        from apex.multi_tensor_apply import multi_tensor_applier

        class Clipper:
            def __init__(self):
                import amp_C
                self.flag = torch.zeros(1, dtype=torch.int)
                self.norm_op = amp_C.multi_tensor_l2norm
                self.scale_op = amp_C.multi_tensor_scale

            def norm(self, grads):
                total, _ = multi_tensor_applier(self.norm_op, self.flag, [grads], False)
                return total

            def scale(self, grads, factor):
                multi_tensor_applier(self.scale_op, self.flag, [grads, grads], factor)
        {extra}
    """
    clean = native(tmp_path, source.format(extra=""))
    assert "norm_op" not in clean.text and "scale_op" not in clean.text
    clipper = plain_namespace(clean)["Clipper"]()
    grads = tensor_list(29, torch.float32)
    expected = multi_tensor_applier(amp_C.multi_tensor_l2norm, flag_buffer(), [clone(grads)], False)[0]
    assert_close(clipper.norm(grads), expected, rtol=1e-5, atol=1e-6)

    shared = native(tmp_path, source.format(extra="    def op(self):\n                return self.scale_op"))
    assert "self.scale_op = amp_C.multi_tensor_scale" in shared.text
    assert "self.norm_op" not in shared.text
    assert shared.on_ampcompat


def test_available_is_true(tmp_path):
    result = native(tmp_path, """
        from apex.multi_tensor_apply import multi_tensor_applier

        def check(expected):
            assert multi_tensor_applier.available == expected
            return multi_tensor_applier.available
    """)
    assert "multi_tensor_applier.available` is now `True`" in messages(result)
    namespace = plain_namespace(result)
    assert namespace["check"](True) is True
    with pytest.raises(AssertionError):
        namespace["check"](False)


# --- apex.pyprof --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("imports, call", [
    ("from apex import pyprof", "pyprof.nvtx.init()"),
    ("import apex.pyprof", "apex.pyprof.nvtx.init()"),
    ("from apex import pyprof", "pyprof.init()"),
    ("from apex import pyprof", "pyprof.nvtx.init(enable_function_stack=True)"),
])
def test_pyprof_init_goes_with_a_note(tmp_path, imports, call):
    result = native(tmp_path, f"""
        import torch

        def setup(profile):
            if profile:
                {imports}
                {call}
            return 3
    """)
    namespace = plain_namespace(result)
    assert "pyprof" not in result.text
    assert REMOVED_NOTE.format(call=call) in messages(result)
    assert "emit_nvtx(record_shapes=True)" in messages(result)
    assert re.search(r"if profile:\n\s+pass\n", result.text), result.text
    assert namespace["setup"](True) == 3


def test_other_pyprof_apis_keep_a_todo(tmp_path):
    result = native(tmp_path, """
        from apex import pyprof

        pyprof.nvtx.init()
        rows = pyprof.parse.parse("net.sql")
    """)
    assert "pyprof.nvtx.init()" not in result.text
    assert "rows = pyprof.parse.parse" in result.text and "from apex import pyprof" in result.text
    assert "TODO(ampcompat): `apex.pyprof.parse" in comments(result)
    assert result.imports_apex


def test_pyprof_init_whose_arguments_compute_something_stays(tmp_path):
    result = native(tmp_path, """
        from apex import pyprof

        pyprof.nvtx.init(enable_function_stack=decide())
    """)
    assert "pyprof.nvtx.init(enable_function_stack=decide())" in result.text
    assert "computes its arguments" in messages(result)


# --- two amp.initialize calls, one per branch --------------------------------------------------------------------
_PAIR = """
    import torch
    from apex import amp

    def train(model, optimizer, data, loss_scale):
        if loss_scale == 0:
            model, optimizer = amp.initialize(model, optimizer, opt_level="O1", loss_scale="dynamic")
        else:
            {second}
        for x, y in data:
            loss = torch.nn.functional.mse_loss(model(x), y)
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return loss.item()
"""


def test_an_initialize_per_branch_converts_as_one(tmp_path):
    second = 'model, optimizer = amp.initialize(model, optimizer, opt_level="O1", loss_scale=loss_scale)'
    result = native(tmp_path, _PAIR.format(second=second))
    train = plain_namespace(result)["train"]
    assert result.text.count("torch.amp.GradScaler(") == 1
    assert "amp.initialize" not in result.text

    def run(loss_scale):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        data = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(3)]
        return train(model, torch.optim.SGD(model.parameters(), lr=0.1), data, loss_scale)

    assert run(0) > 0
    assert run("dynamic") == run(0)
    with pytest.raises(ValueError, match="no static loss scale"):
        run(128.0)


@pytest.mark.parametrize("second, reason", [
    ('model, optimizer = amp.initialize(model, optimizer, opt_level="O2", loss_scale=loss_scale)',
     "differ in `opt_level`"),
    ('model, optimizer = amp.initialize(model, [optimizer], opt_level="O1")', "differ in `optimizers`"),
    ('net, optimizer = amp.initialize(model, optimizer, opt_level="O1")', "assign their results to different names"),
    ('model, optimizer = amp.initialize(model, optimizer, opt_level="O1")\n            model.half()',
     None),
])
def test_initialize_per_branch_that_differ_stay(tmp_path, second, reason):
    source = _PAIR.format(second=second)
    result = native(tmp_path, source)
    if reason is None:  # the same call: converted (what follows it in the branch stays there)
        assert "amp.initialize" not in result.text and "model.half()" in result.text
        return
    assert reason in messages(result)
    assert result.on_ampcompat and "amp.initialize" in result.text


def test_initialize_in_elif_branches_stays(tmp_path):
    result = native(tmp_path, """
        from apex import amp

        def setup(model, optimizer, mode):
            if mode == 0:
                model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
            elif mode == 1:
                model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
            return model, optimizer
    """)
    assert "amp.initialize is called more than once in this file" in messages(result)


def test_a_result_kept_whole_is_what_apex_returned(tmp_path):
    """NVIDIA's BERT GLUE script keeps amp.initialize's result whole and unpacks it by its own test: the pair with
    an optimizer, the model alone without one (Apex's return value), reported at the call."""
    result = native(tmp_path, """
        import torch
        from apex import amp

        def setup(model, optimizer, loss_scale):
            inits = amp.initialize(model, optimizers=optimizer, opt_level="O1",
                                   loss_scale="dynamic" if loss_scale == 0 else loss_scale)
            return inits

        def train(model, optimizer, x):
            loss = model(x).sum()
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            optimizer.step()
    """, "O1")
    assert "is kept whole in `inits`" in messages(result)
    namespace = plain_namespace(result)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert namespace["setup"](model, optimizer, 0) == (model, optimizer)
    assert namespace["setup"](model, None, 0) is model
    with pytest.raises(ValueError, match="no static loss scale"):
        namespace["setup"](model, optimizer, 128.0)
    namespace["setup"](model, optimizer, 0)
    namespace["train"](model, optimizer, torch.randn(3, 2))


def test_a_result_kept_whole_under_a_list_stays(tmp_path):
    result = native(tmp_path, """
        from apex import amp

        def setup(model, optimizer):
            inits = amp.initialize([model], optimizers=optimizer, opt_level="O1")
            return inits
    """, "O1")
    assert "is not unpacked" in messages(result)
