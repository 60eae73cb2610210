"""Every shim of ``ampcompat/_torch_compat.py`` against the running torch, checked by what it does.

A torch release that removes, renames or changes one of the private APIs ampcompat relies on fails
here, naming the shim, instead of somewhere inside a training step. Each check compares the private
API with a public-API computation of the same result, or with the documented behaviour torch's own
callers (``GradScaler``, ``LRScheduler``) depend on.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from ampcompat import _torch_compat as compat


def test_every_private_api_exists_in_this_torch():
    assert compat.MISSING == [], "this torch lacks: {}".format(", ".join(compat.MISSING))


def test_a_missing_api_raises_naming_itself_and_the_torch_version():
    before = list(compat.MISSING)
    stand_in = compat._private(torch, "_no_such_private_api_")
    try:
        assert compat.MISSING[-1] == "torch._no_such_private_api_"
        with pytest.raises(RuntimeError, match=r"torch\._no_such_private_api_.*torch " + re.escape(torch.__version__)):
            stand_in()
    finally:
        compat.MISSING[:] = before


def _lists(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, generator=g, dtype=dtype) + 2 for _ in range(3)], \
        [torch.randn(2, 2, generator=g, dtype=dtype) + 2 for _ in range(3)]


FOREACH_REFERENCES = {
    # shim name: (call on the lists, the same with public per-tensor ops); in-place ones return their input
    "foreach_add": (lambda a, b: compat.foreach_add(a, b, alpha=2), lambda a, b: [x.add(y, alpha=2) for x, y in zip(a, b)]),
    "foreach_add_": (lambda a, b: (compat.foreach_add_(a, b), a)[1], lambda a, b: [x.add_(y) for x, y in zip(a, b)]),
    "foreach_addcmul_": (lambda a, b: (compat.foreach_addcmul_(a, b, b, value=0.5), a)[1],
                         lambda a, b: [x.addcmul_(y, y, value=0.5) for x, y in zip(a, b)]),
    "foreach_copy_": (lambda a, b: (compat.foreach_copy_(a, b), a)[1], lambda a, b: [x.copy_(y) for x, y in zip(a, b)]),
    "foreach_div": (lambda a, b: compat.foreach_div(a, b), lambda a, b: [x / y for x, y in zip(a, b)]),
    "foreach_div_": (lambda a, b: (compat.foreach_div_(a, b), a)[1], lambda a, b: [x.div_(y) for x, y in zip(a, b)]),
    "foreach_mul": (lambda a, b: compat.foreach_mul(a, 3.0), lambda a, b: [x * 3.0 for x in a]),
    "foreach_mul_": (lambda a, b: (compat.foreach_mul_(a, b), a)[1], lambda a, b: [x.mul_(y) for x, y in zip(a, b)]),
    "foreach_norm": (lambda a, b: compat.foreach_norm(a, 2), lambda a, b: [torch.linalg.vector_norm(x, 2) for x in a]),
    "foreach_sqrt": (lambda a, b: compat.foreach_sqrt(b), lambda a, b: [y.sqrt() for y in b]),
    "foreach_sqrt_": (lambda a, b: (compat.foreach_sqrt_(b), b)[1], lambda a, b: [y.sqrt_() for y in b]),
    "foreach_sub_": (lambda a, b: (compat.foreach_sub_(a, b), a)[1], lambda a, b: [x.sub_(y) for x, y in zip(a, b)]),
    "foreach_zero_": (lambda a, b: (compat.foreach_zero_(a), a)[1], lambda a, b: [x.zero_() for x in a]),
}


@pytest.mark.parametrize("name", sorted(FOREACH_REFERENCES))
def test_foreach_shim_equals_the_per_tensor_loop(name):
    shim, reference = FOREACH_REFERENCES[name]
    a, b = _lists()
    shapes_b = [t.reshape(-1)[:3].clone() for t in b]  # binary ops take same-shaped pairs
    got = shim([t.clone() for t in a], [t.clone() for t in shapes_b])
    want = reference([t.clone() for t in a], [t.clone() for t in shapes_b])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_amp_unscale_kernel_divides_in_place_and_flags_only_non_finite_values():
    grads = [torch.tensor([2.0, 4.0]), torch.tensor([8.0])]
    found_inf = torch.zeros(1)
    compat.amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.full((1,), 0.5))
    assert [g.tolist() for g in grads] == [[1.0, 2.0], [4.0]] and found_inf.item() == 0.0
    compat.amp_foreach_non_finite_check_and_unscale_([torch.tensor([1.0, float("nan")])], found_inf,
                                                     torch.ones(1))
    assert found_inf.item() == 1.0


def test_amp_update_scale_kernel_backs_off_grows_after_the_window_and_counts():
    scale, tracker = torch.full((1,), 1024.0), torch.zeros(1, dtype=torch.int32)
    clean, overflow = torch.zeros(1), torch.ones(1)
    compat.amp_update_scale_(scale, tracker, overflow, 2.0, 0.5, 3)
    assert (scale.item(), tracker.item()) == (512.0, 0)
    for expected in ((512.0, 1), (512.0, 2), (1024.0, 0)):  # the third clean pass completes the window
        compat.amp_update_scale_(scale, tracker, clean, 2.0, 0.5, 3)
        assert (scale.item(), tracker.item()) == expected


def test_set_grad_enabled_switches_grad_mode_like_the_public_context():
    assert torch.is_grad_enabled()
    compat.set_grad_enabled(False)
    try:
        assert not torch.is_grad_enabled()
        assert not (torch.ones(1, requires_grad=True) * 2).requires_grad
    finally:
        compat.set_grad_enabled(True)
    assert torch.is_grad_enabled()


def test_is_torch_function_mode_enabled_sees_a_public_torch_function_mode():
    assert not compat.is_torch_function_mode_enabled()
    with torch.overrides.TorchFunctionMode():
        assert compat.is_torch_function_mode_enabled()
    assert not compat.is_torch_function_mode_enabled()


def test_dispatch_key_queries_and_library_destruction():
    assert compat.dispatch_key_exists("AutocastCPU") and not compat.dispatch_key_exists("AutocastNoSuchDevice")
    assert compat.dispatch_key_name("cpu") == "CPU" and compat.dispatch_key_name("cuda") == "CUDA"
    assert compat.has_kernel_for_dispatch_key("aten::mm", "CPU")
    assert compat.has_kernel_for_dispatch_key("aten::mm", "AutocastCPU")  # on CPU autocast's low-precision list
    op = "aten::acosh"
    assert not compat.has_kernel_for_dispatch_key(op, "AutocastCPU")
    library = torch.library.Library("aten", "IMPL", "AutocastCPU")
    library.impl("acosh", lambda x: x, "AutocastCPU")
    assert compat.has_kernel_for_dispatch_key(op, "AutocastCPU")
    compat.destroy_library(library)
    assert not compat.has_kernel_for_dispatch_key(op, "AutocastCPU")  # gone now, though `library` still lives


def test_batch_norm_base_is_the_class_every_batch_norm_derives_from():
    for module in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2)):
        assert isinstance(module, compat.BatchNormBase)
    assert not isinstance(nn.InstanceNorm2d(2), compat.BatchNormBase)
    assert not isinstance(nn.LayerNorm(2), compat.BatchNormBase)


def test_sync_batch_norm_function_is_torchs_autograd_function():
    assert issubclass(compat.SyncBatchNormFunction, torch.autograd.Function)
    assert callable(compat.SyncBatchNormFunction.apply)


def test_flatten_and_unflatten_round_trip_like_cat_and_views():
    tensors = [torch.arange(3.0), torch.arange(4.0).reshape(2, 2)]
    flat = compat.flatten_dense_tensors(tensors)
    torch.testing.assert_close(flat, torch.cat([t.reshape(-1) for t in tensors]), rtol=0, atol=0)
    back = compat.unflatten_dense_tensors(flat, tensors)
    assert [b.shape for b in back] == [t.shape for t in tensors]
    assert all(torch.equal(b, t) for b, t in zip(back, tensors))


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(2)
    before = compat.tensor_version(t)
    t.add_(1)
    compat.foreach_zero_([t])
    assert compat.tensor_version(t) == before + 2
    assert list(map(compat.tensor_version, [t, t.detach()])) == [before + 2] * 2  # a detached alias shares it


def test_optimizer_device_lists_name_cuda():
    assert "cuda" in set(compat.fused_optimizer_devices())
    assert "cuda" in set(compat.capturable_optimizer_devices())


def test_optimizer_device_lists_are_torchs_own_where_it_has_them():
    """The CUDA-only fallback is for a torch without the lookup, not for a lookup spelled wrong."""
    import torch.optim.optimizer as optimizer_module
    import torch.utils._foreach_utils as foreach_utils
    torch_capturable = getattr(optimizer_module, "_get_capturable_supported_devices", None)
    torch_fused = getattr(foreach_utils, "_get_fused_kernels_supported_devices", None)
    if torch_capturable is not None:
        assert list(compat.capturable_optimizer_devices()) == list(torch_capturable())
    if torch_fused is not None:
        assert list(compat.fused_optimizer_devices()) == list(torch_fused())


def test_optimizer_attribute_protocols_are_the_ones_torch_uses():
    param = nn.Parameter(torch.ones(2))
    fused = torch.optim.AdamW([param], fused=True) if "cpu" in set(compat.fused_optimizer_devices()) else None
    if fused is not None:
        assert getattr(fused, compat.STEP_SUPPORTS_AMP_SCALING) is True
    plain = torch.optim.SGD([param], lr=0.1)
    assert not getattr(plain, compat.STEP_SUPPORTS_AMP_SCALING, False)
    scheduler = torch.optim.lr_scheduler.StepLR(plain, 1)
    assert getattr(plain.step, compat.WRAPPED_BY_LR_SCHED, False)  # the scheduler wrapped step
    plain.step()
    assert getattr(plain, compat.OPT_CALLED) is True  # ...and its wrapper records the call here
    scheduler.step()


def test_grad_scaler_internals_read_what_a_fused_step_needs():
    param = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(param.sum() * float("inf")).backward()
    assert not compat.grad_scaler_unscaled(scaler, opt)
    assert compat.grad_scaler_scale(scaler).item() == 8.0
    scaler.unscale_(opt)
    assert compat.grad_scaler_unscaled(scaler, opt)
    flags = compat.grad_scaler_found_inf_per_device(scaler, opt)
    assert [flag.item() for flag in flags.values()] == [1.0]


def test_a_recorded_overflow_flag_is_the_one_grad_scaler_update_reads():
    param = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(param.sum()).backward()  # finite: torch's own check would let the scale stand
    compat.grad_scaler_record_found_inf(scaler, opt, {param.device: torch.ones(())})
    scaler.update()
    assert scaler.get_scale() == 4.0  # the recorded overflow backed the scale off


def test_optimizer_step_hooks_registered_sees_every_public_way_to_register_one():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    param = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    assert not compat.optimizer_step_hooks_registered(opt)
    for register in (opt.register_step_pre_hook, opt.register_step_post_hook, register_optimizer_step_pre_hook,
                     register_optimizer_step_post_hook):
        handle = register(lambda *args: None)
        try:
            assert compat.optimizer_step_hooks_registered(opt)
        finally:
            handle.remove()
        assert not compat.optimizer_step_hooks_registered(opt)
