"""A training process for tests/test_resume_faults.py that can be killed at any point and resumed.

    python tests/_kill_resume_worker.py CONFIG.json

``CONFIG.json``: ``{"directory", "device", "total_steps", "save_every", "die_at": [step, phase] or null,
"pause": seconds to sleep after each step}``.
The run is tests/_o2_resume_worker.py's O2 AdamW run (an overflow at steps 0 and 13). It starts from
``directory/checkpoint.pt`` when one exists, saves ``{"model", "optimizer", "amp", "step"}`` there every
``save_every`` steps (atomically: a temporary file, then ``os.replace``), prints ``step N`` after each
step, and writes its final snapshot to ``directory/final.pt``. With ``die_at`` it sends itself SIGKILL
(no cleanup, no ``atexit``, no flush) at that step, in one of :data:`PHASES`.
"""
import io
import json
import os
import signal
import sys
import time
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

import _o2_resume_worker as run

LEVEL, OPTIMIZER = "O2", "adamw"
#: Where in a step the process can die: inside the step, after it, half-way through writing a
#: checkpoint (a torn temporary file is left behind), and just after a checkpoint is in place.
PHASES = ("after_backward", "after_step", "mid_save", "after_save")
CHECKPOINT = "checkpoint.pt"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def save_atomically(obj: Any, path: str, die_half_way: bool = False) -> None:
    """``torch.save`` to ``path`` so that a reader sees the old file or the new one, never a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if die_half_way:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_step(model, optimizer, step: int, device: str, die_here: Optional[str]) -> None:
    """One step of ``_o2_resume_worker.train`` (same operations, so the same bits)."""
    from ampcompat import amp

    x, y = run.batch(step, device, run.spikes_for(LEVEL))
    loss = F.mse_loss(model(x), y)
    with amp.scale_loss(loss, optimizer) as scaled:
        scaled.backward()
    if die_here == "after_backward":
        die()
    optimizer.step()
    optimizer.zero_grad()
    if die_here == "after_step":
        die()


def main(argv) -> int:
    with open(argv[1]) as f:
        config: Dict[str, Any] = json.load(f)
    torch.set_num_threads(1)
    device, directory = config["device"], config["directory"]
    die_step, die_phase = config.get("die_at") or (None, None)
    path = os.path.join(directory, CHECKPOINT)
    if os.path.exists(path):
        model, optimizer = run.build(LEVEL, OPTIMIZER, device, seed=1)  # other weights than the run's: all must load
        ckpt = torch.load(path, map_location=device, weights_only=True)
        run.load(model, optimizer, ckpt, "model_first")
        start = ckpt["step"]
    else:
        model, optimizer = run.build(LEVEL, OPTIMIZER, device, seed=0)
        start = 0
    for step in range(start, config["total_steps"]):
        here = die_phase if step == die_step else None
        train_step(model, optimizer, step, device, here)
        done = step + 1
        if done % config["save_every"] == 0:
            state = dict(run.checkpoint(model, optimizer), step=done)
            save_atomically(state, path, die_half_way=here == "mid_save")
            if here == "after_save":
                die()
        print("step", done, flush=True)
        if config.get("pause"):
            time.sleep(config["pause"])  # lets a SIGKILL from outside land mid-run
    save_atomically(run.snapshot(model, optimizer), os.path.join(directory, "final.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
