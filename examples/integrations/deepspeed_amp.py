"""DeepSpeed's ``"amp"`` config block (it hands the model to ``apex.amp``) -- run it unchanged with

    python -m ampcompat run examples/integrations/deepspeed_amp.py --opt-level O1

DeepSpeed releases up to 0.17 accept ``"amp": {"enabled": true, "opt_level": ...}``; the engine then
calls ``amp.initialize`` on the model and the client optimizer, ``amp.scale_loss`` in
``engine.backward`` and clips ``amp.master_params``. DeepSpeed installs without building its CUDA ops
(``DS_BUILD_OPS=0``); the client optimizer is ``torch.optim.AdamW`` so none is compiled at run time.
One process, no launcher: the rendezvous variables default to a single local rank. Prints the loss
of every step and what proves Apex was in use.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                    ("WORLD_SIZE", "1")):
    os.environ.setdefault(name, value)

import deepspeed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt-level", default="O1")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "steps_per_print": 1, "amp": {"enabled": True, "opt_level": args.opt_level}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    print(f"deepspeed {deepspeed.__version__}, torch {torch.__version__}, device {engine.device}", flush=True)

    x = torch.randn(32, 32, device=engine.device)
    y = x[:, :4].argmax(dim=1)
    losses = []
    for step in range(1, args.steps + 1):
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        print(f"step {step} loss {losses[-1]:.4f}", flush=True)

    from apex import amp

    print(f"apex in use: engine.amp_enabled() {engine.amp_enabled()}, amp opt_level "
          f"{amp._amp_state.opt_properties.opt_level}, model dtype {next(engine.module.parameters()).dtype}")
    ok = engine.amp_enabled() and len(losses) == args.steps and all(math.isfinite(loss) for loss in losses)
    print("RESULT", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
