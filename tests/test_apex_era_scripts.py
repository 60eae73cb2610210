"""Apex-era scripts run unchanged through ``python -m ampcompat run`` and match plain-PyTorch twins."""
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


@pytest.mark.parametrize("opt_level,tol", [("O0", dict(rtol=0, atol=0)), ("O1", dict(rtol=5e-2, atol=5e-3))])
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
