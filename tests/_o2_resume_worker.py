"""Runs for tests/test_o2_resume.py: the model, data and training loop, and the fresh-process resume.

Imported by the test for the uninterrupted runs; run as a script it is the *fresh Python process* that
builds the same model and optimizer, loads a checkpoint (``torch.load(weights_only=True)``) and finishes
the run:

    python tests/_o2_resume_worker.py JOBS.json

``JOBS.json`` holds a list of jobs ``{"checkpoint", "level", "optimizer", "order", "device", "threads", "out"}``;
each job writes its final snapshot (see :func:`snapshot`) to ``out`` with ``torch.save``.
"""
import json
import sys
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

TOTAL_STEPS = 20
CHECKPOINT_STEP = 10
SPIKE_STEPS = (0, 13)  # one overflow before the checkpoint, one after it (dynamic loss scale only)
SPIKE = 300.0

OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    # eps representable in FP16: pure-FP16 (O3) AdamW with the default 1e-8 divides by zero.
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-4),
}
LOAD_ORDERS = ("model_first", "optimizer_first")


def make_model(device: str, seed: int = 0) -> torch.nn.Module:
    """Linear -> BatchNorm (FP32 under O2/O5) -> ReLU -> Linear."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).to(device)


def batch(step: int, device: str, spikes: bool):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 3, generator=g)
    if spikes and step in SPIKE_STEPS:
        y = y * SPIKE
    return x.to(device), y.to(device)


def spikes_for(level: str) -> bool:
    """Overflow-provoking batches only where a dynamic loss scale turns them into skipped steps."""
    return level == "O2"


def build(level: str, optimizer_name: str, device: str, seed: int = 0):
    """A fresh FP32 model and optimizer passed through ``amp.initialize`` at ``level``."""
    from ampcompat import amp

    model = make_model(device, seed)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    return amp.initialize(model, optimizer, opt_level=level, verbosity=0)


def train(model, optimizer, level: str, start: int, stop: int, device: str) -> None:
    from ampcompat import amp

    for step in range(start, stop):
        x, y = batch(step, device, spikes_for(level))
        loss = F.mse_loss(model(x), y)
        with amp.scale_loss(loss, optimizer) as scaled:
            scaled.backward()
        optimizer.step()
        optimizer.zero_grad()


def checkpoint(model, optimizer) -> Dict[str, Any]:
    """The documented checkpoint: model, optimizer and amp state dicts."""
    from ampcompat import amp

    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "amp": amp.state_dict()}


def load(model, optimizer, ckpt: Dict[str, Any], order: str) -> None:
    from ampcompat import amp

    if order == "model_first":
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    elif order == "optimizer_first":
        optimizer.load_state_dict(ckpt["optimizer"])
        model.load_state_dict(ckpt["model"])
    else:
        raise ValueError("unknown load order {!r}".format(order))
    amp.load_state_dict(ckpt["amp"])


def snapshot(model, optimizer) -> Dict[str, Any]:
    """Everything that must match bitwise, on the CPU: live params, masters, optimizer state, amp state."""
    from ampcompat import amp

    masters = list(amp.master_params(optimizer))
    state: List[Dict[str, torch.Tensor]] = []
    for master in masters:
        entry = optimizer.state.get(master, {})
        state.append({k: v.detach().cpu().clone() for k, v in entry.items() if torch.is_tensor(v)})
    return {
        "params": [p.detach().cpu().clone() for p in model.parameters()],
        "buffers": [b.detach().cpu().clone() for b in model.buffers()],
        "masters": [m.detach().cpu().clone() for m in masters],
        "state": state,
        "amp": {k: dict(v) for k, v in amp.state_dict().items()},
    }


def resume_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Build (other initial weights than the saved run), load the checkpoint, train to the end."""
    import ampcompat

    ampcompat.reset()
    device, level = job["device"], job["level"]
    model, optimizer = build(level, job["optimizer"], device, seed=1)
    ckpt = torch.load(job["checkpoint"], map_location=device, weights_only=True)
    load(model, optimizer, ckpt, job["order"])
    train(model, optimizer, level, CHECKPOINT_STEP, TOTAL_STEPS, device)
    return snapshot(model, optimizer)


def main(argv: List[str]) -> int:
    with open(argv[1]) as f:
        jobs = json.load(f)
    torch.set_num_threads(int(jobs[0].get("threads", 1)) if jobs else 1)
    for job in jobs:
        torch.save(resume_job(job), job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
