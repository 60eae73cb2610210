"""timm's training loop on its ``--amp-impl apex`` path, as its ``train.py`` runs it -- run it unchanged with

    python -m ampcompat run examples/integrations/timm_apex.py --opt-level O1

``train.py`` needs an image dataset on disk; this is the same path on random images: a timm model
(``create_model``, no pretrained weights), timm's optimizer factory, ``amp.initialize(model,
optimizer, opt_level=...)`` (``train.py`` uses O1; O2 runs the same path), ``timm.utils.ApexScaler``
for backward, gradient clipping over ``amp.master_params`` and the step, and the scaler's
``state_dict`` that ``train.py`` saves in checkpoints under ``"amp"``, loaded back. Prints the loss of
every step and what proves Apex was in use.
"""
import argparse
import math
import sys
from contextlib import suppress

import torch

import timm
from timm.optim import create_optimizer_v2
from timm.utils import ApexScaler

try:
    from apex import amp
    has_apex = True
except ImportError:
    has_apex = False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--opt-level", default="O1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    args = parser.parse_args()
    assert has_apex, "apex is not importable: run this under `python -m ampcompat run`"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"timm {timm.__version__}, torch {torch.__version__}, device {device}", flush=True)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10).to(device)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    model, optimizer = amp.initialize(model, optimizer, opt_level=args.opt_level)
    loss_scaler = ApexScaler()
    amp_autocast = suppress  # train.py: Apex does its own casting
    loss_fn = torch.nn.CrossEntropyLoss()
    images = torch.randn(16, 3, 64, 64, device=device)
    targets = torch.randint(0, 10, (16,), device=device)

    losses = []
    model.train()
    for step in range(1, args.steps + 1):
        with amp_autocast():
            output = model(images)
            loss = loss_fn(output, targets)
        optimizer.zero_grad()
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode="norm", parameters=model.parameters())
        losses.append(loss.item())
        print(f"step {step} loss {losses[-1]:.4f}", flush=True)

    checkpoint = {ApexScaler.state_dict_key: loss_scaler.state_dict()}  # what train.py's saver writes
    loss_scaler.load_state_dict(checkpoint[ApexScaler.state_dict_key])
    print(f"apex in use: amp opt_level {amp._amp_state.opt_properties.opt_level}, "
          f"checkpoint 'amp' entry {checkpoint['amp']}, model dtype {next(model.parameters()).dtype}")
    ok = len(losses) == args.steps and all(math.isfinite(loss) for loss in losses) and checkpoint["amp"] is not None
    print("RESULT", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
