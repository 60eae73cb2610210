"""``--to-native`` for Apex optimizers torch cannot express: the plain-PyTorch classes it adds to a file
(``_ApexFusedAdam``, ``_ApexLARC``) train exactly as ampcompat's ``FusedAdam`` / ``LARC``, and the converter adds
them only where needed, once per file, idempotently."""
import math
import textwrap

import pytest
import torch

from ampcompat.optimizers import FusedAdam
from ampcompat.parallel.LARC import LARC
from ampcompat.tools.migrate.native_inline_classes import FUSED_ADAM, LARC as INLINE_LARC, class_text
from ampcompat.tools.migrate.scanner import scan
from ampcompat.tools.migrate.sources import load_source
from ampcompat.tools.migrate.to_native import to_native


def _inline_classes():
    namespace = {"torch": torch, "math": math}
    exec(class_text(FUSED_ADAM), namespace)
    exec(class_text(INLINE_LARC), namespace)
    return namespace["_ApexFusedAdam"], namespace["_ApexLARC"]


InlineFusedAdam, InlineLARC = _inline_classes()


# --- twins: the generated classes against ampcompat's ------------------------------------------------
def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dtype)
    with torch.no_grad():
        model[2].bias.zero_()  # a parameter with norm 0 (LARC steps it unchanged)
    return model


def _groups(model, lr=None):
    """Two param groups: weights with the optimizer's defaults, biases with their own rate and no decay."""
    biases = {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}
    if lr is not None:
        biases["lr"] = lr
    return [{"params": [model[0].weight, model[2].weight]}, biases]


def _train(model, optimizer, steps, loss_scale=3.0, start=0, scaler=None):
    """``steps`` steps on fixed batches (batch ``i`` is the same for every run); the group norms seen."""
    norms = []
    for i in range(start, start + steps):
        generator = torch.Generator().manual_seed(i)
        x = torch.randn(16, 8, generator=generator).to(next(model.parameters()).dtype)
        y = torch.randint(0, 4, (16,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y) * loss_scale
        if scaler is None:
            loss.backward()
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [p.grad.float().norm() for p in optimizer.param_groups[0]["params"] if p.grad is not None]))))
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return norms


def _assert_same(model_a, model_b):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


ADAM_GRID = [
    pytest.param(dict(bias_correction=False, max_grad_norm=1.0), id="2019-no-bias-correction-clipped"),
    pytest.param(dict(bias_correction=True, max_grad_norm=1.0, weight_decay=0.01), id="2019-bias-correction-decay"),
    pytest.param(dict(max_grad_norm=1000.0), id="2019-max-grad-norm-not-hit"),
    pytest.param(dict(eps_inside_sqrt=True, weight_decay=0.01, eps=1e-4), id="2019-eps-inside-sqrt"),
    pytest.param(dict(bias_correction=False, eps_inside_sqrt=True, max_grad_norm=0.5), id="2019-both-keywords"),
    pytest.param(dict(bias_correction=False), id="no-bias-correction"),
    pytest.param(dict(bias_correction=False, weight_decay=0.01), id="no-bias-correction-adamw-decay"),
    pytest.param(dict(bias_correction=False, adam_w_mode=False, weight_decay=0.01), id="no-bias-correction-l2"),
    pytest.param(dict(bias_correction=False, betas=(0.8, 0.99), set_grad_none=False), id="betas-zeroed-grads"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kwargs", ADAM_GRID)
def test_inline_fused_adam_trains_exactly_as_ampcompat_fused_adam(kwargs, dtype):
    reference, inline = _model(dtype), _model(dtype)
    norms = _train(reference, FusedAdam(_groups(reference, lr=5e-3), lr=1e-2, **kwargs), 6)
    _train(inline, InlineFusedAdam(_groups(inline, lr=5e-3), lr=1e-2, **kwargs), 6)
    _assert_same(reference, inline)
    if kwargs.get("max_grad_norm") == 1.0:
        assert max(norms) > 1.0  # the clipping was exercised
    untouched = _model(dtype)
    assert any(not torch.equal(a, b) for a, b in zip(untouched.parameters(), inline.parameters()))


def test_max_grad_norm_clipping_changes_the_result():
    """The grid's clipped case really clips: without max_grad_norm the same run ends elsewhere."""
    clipped, unclipped = _model(), _model()
    _train(clipped, InlineFusedAdam(clipped.parameters(), lr=1e-2, bias_correction=False, max_grad_norm=1.0), 4)
    _train(unclipped, InlineFusedAdam(unclipped.parameters(), lr=1e-2, bias_correction=False), 4)
    assert any(not torch.equal(a, b) for a, b in zip(clipped.parameters(), unclipped.parameters()))


@pytest.mark.parametrize("kwargs", [dict(bias_correction=False, max_grad_norm=1.0), dict(bias_correction=False)],
                         ids=["2019", "today"])
def test_inline_fused_adam_under_grad_scaler_skips_inf_steps_like_ampcompat(kwargs):
    """The native recipe: GradScaler.step unscales the gradients, and skips the step (state and all) on inf/NaN."""
    models, optimizers = [], []
    for cls in (FusedAdam, InlineFusedAdam):
        model = _model()
        models.append(model)
        optimizers.append(cls(_groups(model), lr=1e-2, **kwargs))
    for model, optimizer in zip(models, optimizers):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        _train(model, optimizer, 3, scaler=scaler)
        _train(model, optimizer, 1, loss_scale=float("inf"), start=3, scaler=scaler)  # skipped
        _train(model, optimizer, 2, start=4, scaler=scaler)
    _assert_same(*models)
    steps = [float(optimizers[1].state[p]["step"]) for p in models[1].parameters()]
    assert steps == [5.0] * 4


def test_inline_fused_adam_state_dict_round_trip_and_resume():
    straight, resumed = _model(), _model()
    kwargs = dict(lr=1e-2, bias_correction=False, max_grad_norm=1.0, weight_decay=0.01)
    _train(straight, InlineFusedAdam(_groups(straight), **kwargs), 6)
    first = InlineFusedAdam(_groups(resumed), **kwargs)
    _train(resumed, first, 3)
    saved = first.state_dict()
    second = InlineFusedAdam(_groups(resumed), **kwargs)
    second.load_state_dict(saved)
    assert second.state_dict()["param_groups"] == saved["param_groups"]
    for key, state in saved["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(second.state_dict()["state"][key][name], value, rtol=0, atol=0)
    _train(resumed, second, 3, start=3)
    _assert_same(straight, resumed)


def test_inline_fused_adam_resumes_from_an_ampcompat_fused_adam_checkpoint():
    """Same state layout as ampcompat's FusedAdam: a checkpoint written before the conversion loads and continues."""
    straight, resumed = _model(), _model()
    kwargs = dict(lr=1e-2, bias_correction=True, max_grad_norm=1.0)
    _train(straight, FusedAdam(_groups(straight), **kwargs), 5)
    before = FusedAdam(_groups(resumed), **kwargs)
    _train(resumed, before, 2)
    after = InlineFusedAdam(_groups(resumed), **kwargs)
    after.load_state_dict(before.state_dict())
    _train(resumed, after, 3, start=2)
    _assert_same(straight, resumed)


def test_inline_fused_adam_refuses_what_ampcompat_refuses():
    params = [torch.nn.Parameter(torch.ones(2))]
    for kwargs in (dict(max_grad_norm=1.0, adam_w_mode=False), dict(max_grad_norm=-1.0)):
        with pytest.raises(ValueError):
            FusedAdam(params, **kwargs)
        with pytest.raises(ValueError):
            InlineFusedAdam(params, **kwargs)
    sparse = torch.nn.Parameter(torch.ones(3))
    sparse.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        InlineFusedAdam([sparse], bias_correction=False).step()


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_inline_larc_trains_exactly_as_ampcompat_larc(clip, weight_decay):
    reference, inline = _model(), _model()

    def sgd(model):
        return torch.optim.SGD(_groups(model, lr=0.05), lr=0.1, momentum=0.9, weight_decay=weight_decay)

    _train(reference, LARC(sgd(reference), trust_coefficient=0.02, clip=clip, eps=1e-6), 6)
    _train(inline, InlineLARC(sgd(inline), trust_coefficient=0.02, clip=clip, eps=1e-6), 6)
    _assert_same(reference, inline)
    plain = _model()
    _train(plain, sgd(plain), 6)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), inline.parameters()))


@pytest.mark.parametrize("clip", [True, False])
def test_inline_larc_steps_zero_norm_parameters_unchanged_and_without_decay(clip):
    """A parameter whose weight or gradient norm is zero gets neither LARC's factor nor the folded-in decay."""
    results = []
    for cls in (LARC, InlineLARC):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.zeros(4)),
                  torch.nn.Parameter(torch.randn(5))]
        optimizer = cls(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2), clip=clip)
        for step in range(3):
            params[0].grad = torch.zeros(3, 2)  # weight but no gradient
            params[1].grad = torch.full((4,), 0.5 + step)  # gradient but no weight (first step)
            params[2].grad = torch.linspace(-1, 1, 5) * (step + 1)
            optimizer.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inline_larc_wraps_any_optimizer_and_restores_weight_decay():
    reference, inline = _model(), _model()
    groups = [{"params": list(reference.parameters())}]
    _train(reference, LARC(torch.optim.Adam(groups, lr=1e-2, weight_decay=1e-2)), 4)
    optimizer = InlineLARC(torch.optim.Adam([{"params": list(inline.parameters())}], lr=1e-2, weight_decay=1e-2))
    _train(inline, optimizer, 4)
    _assert_same(reference, inline)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-2
    no_decay = InlineLARC(torch.optim.Adagrad(_model().parameters(), lr=0.1))
    del no_decay.param_groups[0]["weight_decay"]
    no_decay.optim.param_groups[0]["params"][0].grad = torch.ones(16, 8)
    no_decay.step()
    assert "weight_decay" not in no_decay.param_groups[0]


def test_inline_larc_passes_state_through_round_trips_and_steps_under_grad_scaler():
    straight, resumed = _model(), _model()

    def larc(model):
        return InlineLARC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), clip=False)

    _train(straight, larc(straight), 6, scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    first = larc(resumed)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    _train(resumed, first, 3, scaler=scaler)
    assert first.state is first.optim.state and first.defaults is first.optim.defaults
    second = larc(resumed)
    second.load_state_dict(first.state_dict())
    _train(resumed, second, 3, start=3, scaler=scaler)
    _assert_same(straight, resumed)
    reference = _model()
    _train(reference, LARC(torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
                           clip=False), 6, scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    _assert_same(reference, straight)


# --- the converter ---------------------------------------------------------------------------------------
def _native(tmp_path, source, name="snippet.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    result = to_native(scan(load_source(str(path))))
    return result


def _todos(result):
    return [note.message for note in result.notes if note.message.startswith("TODO(ampcompat)")]


def test_two_calls_get_the_class_once_and_a_second_run_changes_nothing(tmp_path):
    result = _native(tmp_path, """\
        \"\"\"A training script.\"\"\"
        import torch
        from apex.optimizers import FusedAdam
        from apex.parallel.LARC import LARC

        def build(model, args):
            first = FusedAdam(model.parameters(), lr=args.lr, bias_correction=False, max_grad_norm=1.0)
            second = FusedAdam(model.parameters(),
                               lr=1e-3,  # the head
                               bias_correction=False)
            third = LARC(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), trust_coefficient=0.001, clip=False)
            return first, second, third
    """)
    assert not result.on_ampcompat and not result.imports_apex and _todos(result) == []
    text = result.text
    assert text.count("class _ApexFusedAdam(torch.optim.Optimizer):") == 1
    assert text.count("class _ApexLARC:") == 1
    assert class_text(FUSED_ADAM) in text and class_text(INLINE_LARC) in text
    assert "first = _ApexFusedAdam(model.parameters(), lr=args.lr, bias_correction=False, max_grad_norm=1.0)" in text
    assert "second = _ApexFusedAdam(model.parameters(),\n                       lr=1e-3,  # the head\n" in text
    assert "third = _ApexLARC(optimizer=torch.optim.SGD(" in text
    assert "apex" not in text and "ampcompat" not in text  # not even in the docstrings: converted files are grepped
    lines = text.splitlines()
    assert lines.index("import math") < lines.index("class _ApexFusedAdam(torch.optim.Optimizer):")
    assert lines.index("import torch") < lines.index("class _ApexFusedAdam(torch.optim.Optimizer):")
    notes = [note.message for note in result.notes if "became" in note.message]
    assert len(notes) == 3 and all("plain-PyTorch class reproducing Apex's" in note for note in notes)
    compile(text, "snippet.py", "exec")
    (tmp_path / "again.py").write_text(text)
    again = to_native(scan(load_source(str(tmp_path / "again.py"))))
    assert again.text == text


def test_torch_expressible_calls_still_become_torch_optimizers(tmp_path):
    result = _native(tmp_path, """\
        import torch
        from apex.optimizers import FusedAdam
        a = FusedAdam(params, lr=1e-3)
        b = FusedAdam(params, lr=1e-3, adam_w_mode=False, bias_correction=True)
        c = FusedAdam(params, lr=1e-3, max_grad_norm=0.0, eps_inside_sqrt=False)
    """)
    assert "class _Apex" not in result.text and _todos(result) == []
    assert result.text.splitlines()[1:] == [
        "a = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)",
        "b = torch.optim.Adam(params, lr=1e-3, fused=True)",
        "c = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)",
    ]


@pytest.mark.parametrize("call, reason", [
    ("FusedAdam(params, bias_correction=False, amsgrad=True)", "rejected amsgrad=True"),
    ("FusedAdam(params, max_grad_norm=1.0, amsgrad=True)", "rejected amsgrad=True"),
    ("FusedAdam(params, bias_correction=False, master_weights=True, capturable=True)", "master_weights"),
    ("FusedAdam(params, bias_correction=False, capturable=True)", "capturable=True"),
    ("FusedAdam(params, max_grad_norm=1.0, adam_w_mode=False)", "raises ValueError"),
    ("FusedAdam(params, bias_correction=args.bc)", "only known at run time"),
    ("FusedAdam(params, max_grad_norm=args.clip)", "only known at run time"),
    ("FusedAdam(params, 1e-3, False, max_grad_norm=1.0)", "positional"),
    ("FusedAdam(params, bias_correction=False, **extra)", "unpacked"),
    ("FusedAdam(params, bias_correction=False, maxgradnorm=1.0)", "`maxgradnorm` is not an argument"),
    ("LARC(optimizer, *rest)", "unpacked"),
])
def test_calls_apex_rejected_or_that_cannot_be_proven_keep_their_refusal(tmp_path, call, reason):
    result = _native(tmp_path, f"""\
        from apex.optimizers import FusedAdam
        from apex.parallel.LARC import LARC
        opt = {call}
    """)
    todos = _todos(result)
    assert len(todos) == 1 and reason in todos[0], todos
    assert "class _Apex" not in result.text and result.on_ampcompat


@pytest.mark.parametrize("call", [
    "FusedAdam(params, bias_correction=False, max_grad_norm=args.clip)",
    "FusedAdam(params, bias_correction=args.bc, max_grad_norm=1.0)",
    "FusedAdam(params, bias_correction=0, eps_inside_sqrt=True)",
])
def test_run_time_values_the_class_handles_exactly_are_inlined(tmp_path, call):
    result = _native(tmp_path, f"""\
        from apex.optimizers import FusedAdam
        opt = {call}
    """)
    assert _todos(result) == [] and not result.on_ampcompat
    assert f"opt = _Apex{call}" in result.text


def test_the_class_name_avoids_names_the_file_uses(tmp_path):
    result = _native(tmp_path, """\
        import torch
        from apex.optimizers import FusedAdam
        _ApexFusedAdam = "taken"
        opt = FusedAdam(params, bias_correction=False)
    """)
    assert "class _ApexFusedAdam_native(torch.optim.Optimizer):" in result.text
    assert "opt = _ApexFusedAdam_native(params, bias_correction=False)" in result.text
    assert '_ApexFusedAdam = "taken"' in result.text


def test_the_class_goes_after_a_late_torch_import_and_torch_is_imported_where_missing(tmp_path):
    late = _native(tmp_path, """\
        import sys
        sys.path.insert(0, "lib")
        import torch
        from apex.parallel.LARC import LARC

        def build(optimizer):
            return LARC(optimizer)
    """)
    lines = late.text.splitlines()
    assert lines.index("import torch") < lines.index("class _ApexLARC:")
    assert lines.index('sys.path.insert(0, "lib")') < lines.index("class _ApexLARC:")
    missing = _native(tmp_path, """\
        #!/usr/bin/env python
        # a script without torch
        from apex.optimizers import FusedAdam
        opt = FusedAdam(params, bias_correction=False)
    """, name="other.py")
    lines = missing.text.splitlines()
    assert lines[:2] == ["#!/usr/bin/env python", "# a script without torch"]
    assert lines.index("import torch") < lines.index("class _ApexFusedAdam(torch.optim.Optimizer):")
    assert lines.index("class _ApexFusedAdam(torch.optim.Optimizer):") < lines.index(
        "opt = _ApexFusedAdam(params, bias_correction=False)")
    compile(missing.text, "other.py", "exec")


def test_a_module_level_call_above_the_place_for_the_class_keeps_ampcompat(tmp_path):
    result = _native(tmp_path, """\
        from apex.optimizers import FusedAdam
        opt = FusedAdam(params, bias_correction=False)
        import torch
    """)
    todos = _todos(result)
    assert len(todos) == 1 and "no place for a plain-PyTorch FusedAdam class" in todos[0]
    assert "class _Apex" not in result.text


def test_converted_file_runs_without_apex_or_ampcompat_and_matches_ampcompat(tmp_path):
    """The rewritten file, executed with only torch, trains as the original did under ampcompat."""
    source = """\
        import torch
        from apex.optimizers import FusedAdam
        from apex.parallel.LARC import LARC

        def build(model):
            adam = FusedAdam([model[0].weight], lr=1e-2, bias_correction=False, max_grad_norm=1.0, weight_decay=0.01)
            larc = LARC(torch.optim.SGD([model[0].bias, model[2].weight, model[2].bias], lr=0.1, momentum=0.9),
                        clip=False)
            return adam, larc
    """
    result = _native(tmp_path, source)
    converted: dict = {}
    exec(compile(result.text, "converted.py", "exec"), converted)
    original = {"FusedAdam": FusedAdam, "LARC": LARC}
    models = []
    for build in (converted["build"], _build_original(source, original)):
        model = _model()
        for optimizer in build(model):
            _train(model, optimizer, 4)
        models.append(model)
    _assert_same(*models)


def _build_original(source, names):
    body = "\n".join(line for line in textwrap.dedent(source).splitlines() if "apex" not in line)
    namespace = dict(names, torch=torch)
    exec(body, namespace)
    return namespace["build"]
