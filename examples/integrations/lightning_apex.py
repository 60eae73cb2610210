"""PyTorch Lightning 1.x with its Apex backend, as an Apex-era user ran it -- run it unchanged with

    python -m ampcompat run examples/integrations/lightning_apex.py --opt-level O2

On a GPU: ``Trainer(precision=16, amp_backend="apex", amp_level=...)``. Lightning refuses that
combination on the CPU, so there the same ``ApexMixedPrecisionPlugin`` is passed in ``plugins=``
(Lightning then drives ``apex.amp`` exactly as on the GPU: ``initialize``, ``scale_loss``).
A small ``LightningModule`` whose ``training_step`` calls ``self(x)`` trains a few steps; prints the
loss of every step and what proves Apex was in use (Lightning's precision plugin, ``apex.amp``'s
opt level, the model's parameter dtype). ``--opt-level`` is handed to Lightning's ``amp_level``
(``--amp-level``, the flag's earlier name here, still works).
"""
import argparse
import math
import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt-level", "--amp-level", dest="opt_level", default="O2",
                        help="Apex opt level, handed to Lightning's amp_level (--amp-level: deprecated spelling)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = (x[:, :4].argmax(dim=1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = Classifier()
    common = dict(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False)
    if torch.cuda.is_available():
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision=16, amp_backend="apex",
                             amp_level=args.opt_level, **common)
    else:
        from pytorch_lightning.plugins import ApexMixedPrecisionPlugin

        trainer = pl.Trainer(accelerator="cpu", plugins=[ApexMixedPrecisionPlugin(amp_level=args.opt_level)],
                             **common)
    print(f"pytorch_lightning {pl.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"precision plugin {type(trainer.precision_plugin).__name__}", flush=True)
    trainer.fit(model, loader)

    from apex import amp

    for step, loss in enumerate(model.losses, 1):
        print(f"step {step} loss {loss:.4f}")
    print(f"apex in use: {type(trainer.precision_plugin).__name__}, amp opt_level "
          f"{amp._amp_state.opt_properties.opt_level}, model dtype {next(model.parameters()).dtype}")
    ok = (type(trainer.precision_plugin).__name__ == "ApexMixedPrecisionPlugin" and len(model.losses) == args.steps
          and all(math.isfinite(loss) for loss in model.losses))
    print("RESULT", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
