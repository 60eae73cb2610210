"""Apex-era scripts run unchanged through ``python -m ampcompat run`` and match plain-PyTorch twins."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

FIXTURES = Path(__file__).parent / "fixtures" / "apex_era"


def _run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "ampcompat", "run", str(FIXTURES / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def _gan_twin(steps):
    """The same GAN in plain FP32 PyTorch: what an O0 run with power-of-two loss scales must equal."""
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    netD = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    optD = torch.optim.Adam(netD.parameters(), lr=2e-3, betas=(0.5, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=2e-3, betas=(0.5, 0.999))
    criterion = nn.BCEWithLogitsLoss()
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        real = torch.randn(16, 8, generator=data)
        noise = torch.randn(16, 4, generator=data)
        netD.zero_grad()
        criterion(netD(real), torch.ones(16, 1)).backward()
        fake = netG(noise)
        criterion(netD(fake.detach()), torch.zeros(16, 1)).backward()
        optD.step()
        netG.zero_grad()
        criterion(netD(fake), torch.ones(16, 1)).backward()
        optG.step()
    return list(netG.parameters()), list(netD.parameters())


@pytest.mark.parametrize("opt_level,tol", [
    pytest.param("O0", dict(rtol=0, atol=0), marks=pytest.mark.slow),  # a training subprocess each: O1 by default
    ("O1", dict(rtol=5e-2, atol=5e-3)),
])
def test_three_loss_gan_through_the_alias_matches_plain_pytorch(tmp_path, opt_level, tol):
    out = tmp_path / "gan.pt"
    _run("dcgan_apex.py", opt_level, 5, out)
    result = torch.load(out, weights_only=True)
    twin_g, twin_d = _gan_twin(5)
    for got, want in zip(result["G"] + result["D"], twin_g + twin_d):
        torch.testing.assert_close(got, want.detach(), **tol)  # O0: scaling by 2**16 is exact
    assert sorted(result["amp"]) == ["loss_scaler0", "loss_scaler1", "loss_scaler2"]
    if opt_level == "O0":
        assert all(entry == {"loss_scale": 65536.0, "unskipped": 5} for entry in result["amp"].values())


def _fp16_optimizer_twin(steps):
    """Half model, FP32 masters, dynamic scale (Apex's LossScaler rules), SGD momentum on the masters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).half()
    masters = [p.detach().clone().float().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.SGD(masters, lr=0.1, momentum=0.9)
    scale, unskipped = 2.0 ** 16, 0
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=data).half()
        y = torch.randint(0, 4, (32,), generator=data)
        for p in model.parameters():
            p.grad = None
        loss = nn.functional.cross_entropy(model(x).float(), y)
        (loss.float() * scale).backward()
        grads = [p.grad.float() / scale for p in model.parameters()]
        if not all(torch.isfinite(g).all() for g in grads):
            scale, unskipped = scale / 2, 0
            continue
        for m, g in zip(masters, grads):
            m.grad = g
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
        unskipped += 1
        if unskipped == 2000:
            scale, unskipped = scale * 2, 0
    return masters, scale


def test_fp16_optimizer_loop_through_the_alias_matches_a_hand_written_twin(tmp_path):
    out = tmp_path / "fp16.pt"
    _run("fp16_optimizer_apex.py", 8, out)
    result = torch.load(out, weights_only=True)
    masters, scale = _fp16_optimizer_twin(8)
    assert result["scale"] == scale
    for got, want in zip(result["masters"], masters):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def _bert_2019_twin(steps):
    """The 2019 BERT --fp16 loop in plain PyTorch: FP32 masters, Apex's 2019 FP16_Optimizer scaling rules,
    ``clip_grad_norm_`` per param group and Adam without bias correction (torch has none) written out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).half()
    named = list(model.named_parameters())
    groups = [([p for n, p in named if "bias" not in n], 0.01), ([p for n, p in named if "bias" in n], 0.0)]
    masters = [[p.detach().clone().float() for p in params] for params, _ in groups]
    moments = [[(torch.zeros_like(m), torch.zeros_like(m)) for m in group] for group in masters]
    scale, it, last_overflow = 2.0 ** 16, 0, -1
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.999, 1e-8
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=data).half()
        y = torch.randint(0, 4, (32,), generator=data)
        for p in model.parameters():
            p.grad = None
        (nn.functional.cross_entropy(model(x).float(), y).float() * scale).backward()
        grads = [[p.grad.float() for p in params] for params, _ in groups]
        if not all(torch.isfinite(g).all() for group in grads for g in group):
            scale, last_overflow = max(scale / 2, 1), it
        else:
            for (params, wd), group_masters, group_grads, group_moments in zip(groups, masters, grads, moments):
                unscaled = [g / scale for g in group_grads]
                for m, g in zip(group_masters, unscaled):
                    m.grad = g
                torch.nn.utils.clip_grad_norm_(group_masters, 1.0)
                for m, (exp_avg, exp_avg_sq) in zip(group_masters, group_moments):
                    exp_avg.mul_(beta1).add_(m.grad, alpha=1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(m.grad, m.grad, value=1 - beta2)
                    m.sub_(lr * (exp_avg / (exp_avg_sq.sqrt() + eps) + wd * m))
                    m.grad = None
                with torch.no_grad():
                    for p, m in zip(params, group_masters):
                        p.copy_(m)
            if (it - last_overflow) % 1000 == 0:
                scale *= 2
        it += 1
    return [m for group in masters for m in group], scale


@pytest.mark.slow  # a training subprocess; the 2019 FusedAdam/FP16_Optimizer API is tested in-process by default
def test_2019_bert_fp16_loop_through_the_alias_matches_an_fp32_master_twin(tmp_path):
    """A 2019 BERT fp16 loop through the alias: model.half(), FusedAdam(bias_correction=False, max_grad_norm=1.0),
    FP16_Optimizer(dynamic_loss_scale=True), optimizer.backward(loss), optimizer.step()."""
    out = tmp_path / "bert.pt"
    _run("bert_2019_fp16.py", 6, out)
    result = torch.load(out, weights_only=True)
    masters, scale = _bert_2019_twin(6)
    assert result["scale"] == scale
    flat_masters = torch.cat([t.reshape(-1) for t in result["masters"]])  # one flat master per group, as Apex
    assert len(result["masters"]) == 2
    torch.testing.assert_close(flat_masters, torch.cat([m.reshape(-1) for m in masters]), rtol=1e-5, atol=1e-6)
    model_in_group_order = [result["model"][i] for i in (0, 2, 1, 3)]  # weights (decay group), then biases
    for param, master in zip(model_in_group_order, masters):
        assert param.dtype == torch.float16
        torch.testing.assert_close(param, master.half(), rtol=0, atol=0)


@pytest.mark.slow  # a training subprocess; the alias answering `import apex` probes is tested by default elsewhere
def test_try_block_probing_apex_finds_it_through_the_alias_and_trains_fp16(tmp_path):
    """A try-block probe for Apex: ``import apex_C`` and the rest of a protein trainer's probe succeed."""
    out = tmp_path / "trainer.pt"
    _run("protein_trainer_try_block.py", 12, out)
    fp16 = torch.load(out, weights_only=True)
    assert fp16["apex_found"] is True
    assert fp16["param_dtypes"] == ["torch.float16"] * 4  # O2 ran: the model is half
    assert fp16["loss_scale"] == 2.0 ** 16 and fp16["grad_norm"] > 0
    assert fp16["losses"][-1] < 0.9 * fp16["losses"][0]
    # Without the alias the same script takes its fallback and trains in FP32, to the same losses.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("AMPCOMPAT_APEX_ALIAS", None)
    plain_out = tmp_path / "plain.pt"
    done = subprocess.run([sys.executable, str(FIXTURES / "protein_trainer_try_block.py"), "12", str(plain_out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    plain = torch.load(plain_out, weights_only=True)
    assert plain["apex_found"] is False and plain["param_dtypes"] == ["torch.float32"] * 4
    torch.testing.assert_close(fp16["losses"], plain["losses"], rtol=2e-3, atol=2e-3)


def _sentiment_lm_twin(rnn_type, steps, device="cpu"):
    """sentiment_lm_weight_norm.py in plain FP32 PyTorch: each RNN weight written as ``g * v / ||v||`` by hand
    (``functional_call``), Adam, clipping at 1. Returns the initial and the trained weights, by the plain
    model's names."""
    if str(FIXTURES) not in sys.path:
        sys.path.insert(0, str(FIXTURES))
    from sentiment_lm_model import RNNModel, batches

    torch.manual_seed(0)
    model = RNNModel(rnn_type).to(device)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    normed = [name for name, p in model.named_parameters() if name.startswith("rnn.") and p.dim() > 1]
    g = {n: p.detach().norm(dim=1, keepdim=True).requires_grad_() for n, p in model.named_parameters() if n in normed}
    v = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if n in normed}
    others = [p for n, p in model.named_parameters() if n not in normed]
    optim = torch.optim.Adam(others + list(g.values()) + list(v.values()), lr=3e-3)

    def weights():
        return {n: g[n] * v[n] / v[n].norm(dim=1, keepdim=True) for n in normed}

    for data, targets in batches(steps):
        optim.zero_grad()
        output, _ = torch.func.functional_call(model, weights(), (data.to(device),))
        loss = nn.functional.cross_entropy(output.view(-1, model.ntoken), targets.to(device).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(others + list(g.values()) + list(v.values()), 1.0)
        optim.step()
    with torch.no_grad():
        return initial, {**{n: p.detach().clone() for n, p in model.named_parameters() if n not in normed}, **weights()}


def _check_sentiment_lm_run(result, initial, twin, opt_level):
    normed = [key for key in result["weight_norm_state"] if key.endswith("_g")]
    assert normed and all(key.startswith("rnn.") for key in normed)  # apply_weight_norm(model.rnn, hook_child=False)
    assert sorted(result["state"]) == sorted(twin)  # remove_weight_norm: the plain model's keys again
    assert set(result["optimizer_dtypes"].values()) == {"torch.float32"}  # O2: FP32 masters of weight_g/weight_v too
    model_dtype = "torch.float16" if opt_level == "O2" else "torch.float32"
    assert {result["model_dtypes"][key] for key in normed} == {model_dtype}
    for key in normed:  # the restored weight is the trained g * v / ||v||, in the model's dtype
        g, v = result["weight_norm_state"][key], result["weight_norm_state"][key[:-2] + "_v"]
        expected = (v * (g / v.norm(dim=1, keepdim=True))).to(getattr(torch, model_dtype.split(".")[1]))
        # one rounding of the model's dtype apart at most: CUDA reduces ||v|| in another order than the CPU
        rtol = 2.0 ** -10 if model_dtype == "torch.float16" else 1e-6
        torch.testing.assert_close(result["state"][key[:-2]], expected.float(), rtol=rtol, atol=1e-6)
    # Training matched the hand-written FP32 twin: the whole update within 5% of the twin's (FP16 rounding).
    update = torch.cat([(result["state"][key] - initial[key].cpu()).flatten() for key in twin])
    twin_update = torch.cat([(want - initial[key]).cpu().flatten() for key, want in twin.items()])
    assert (update - twin_update).norm() < 0.05 * twin_update.norm()
    assert all(math.isfinite(loss) for loss in result["losses"]) and torch.isfinite(result["final_output"]).all()


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_sentiment_discovery_weight_norm_script_runs_unchanged(tmp_path, opt_level):
    """NVIDIA sentiment-discovery's shape: ``from apex.reparameterization import apply_weight_norm, remove_weight_norm``,
    weight norm hooked on the RNN's root, trained under amp, removed before saving."""
    out = tmp_path / "lm.pt"
    _run("sentiment_lm_weight_norm.py", "mlstm", opt_level, 4, "cpu", out)
    _check_sentiment_lm_run(torch.load(out, weights_only=True), *_sentiment_lm_twin("mlstm", 4), opt_level)


@pytest.mark.cuda
@pytest.mark.parametrize("rnn_type", ["lstm", "mlstm"])
@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_sentiment_discovery_weight_norm_script_on_cuda(tmp_path, rnn_type, opt_level):
    """The same on CUDA, where ``nn.LSTM`` runs cuDNN on weights the hook computes (and flattens) each step."""
    out = tmp_path / "lm.pt"
    _run("sentiment_lm_weight_norm.py", rnn_type, opt_level, 4, "cuda", out)
    _check_sentiment_lm_run(torch.load(out, weights_only=True), *_sentiment_lm_twin(rnn_type, 4, "cuda"), opt_level)
