"""Hugging Face ``Trainer`` with its Apex backend, as an Apex-era user ran it -- run it unchanged with

    python -m ampcompat run examples/integrations/hf_trainer.py --opt-level O2 --optim adamw_apex_fused

A tiny BERT built from a config (no downloads) trains a few steps on random tokens with
``fp16=True, half_precision_backend="apex", fp16_opt_level=...``. Prints the loss of every step and
the lines that prove Apex was in use: the Trainer's ``use_apex``, the opt level ``apex.amp`` was
initialized with, the optimizer class, and what ``transformers`` itself concluded about Apex.
Without a GPU it runs on the CPU (transformers >= 4.34 allows fp16 there; older releases refuse it).

``--tokenizers-pin-off``: transformers <= 4.29 (the releases whose Apex check is ``find_spec`` alone)
refuse at import any ``tokenizers`` >= 0.14, and no older ``tokenizers`` exists for Python 3.12. With
this flag, the version check made while ``transformers`` is imported reads ``tokenizers`` as 0.13.3;
the installed one is used unchanged (and never tokenizes here). Apex is not involved.
"""
import argparse
import importlib.metadata
import math
import sys

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt-level", default="O2")
    parser.add_argument("--optim", default="adamw_torch", help="a Trainer optimizer name, e.g. adamw_apex_fused")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokenizers-pin-off", action="store_true")
    parser.add_argument("--output-dir", default="/tmp/hf_trainer_apex")
    return parser.parse_args()


class RandomTokens(torch.utils.data.Dataset):
    """Sequences of random token ids with a label that depends on them (learnable, deterministic)."""

    def __init__(self, size=64, length=16, vocab=100):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (size, length), generator=generator)
        self.labels = (self.ids[:, 0] < vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def main():
    args = parse_args()
    if args.tokenizers_pin_off:
        real_version = importlib.metadata.version
        importlib.metadata.version = lambda name: "0.13.3" if name == "tokenizers" else real_version(name)
        import transformers
        importlib.metadata.version = real_version
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.utils import is_apex_available

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"cuda {torch.cuda.is_available()}", flush=True)
    print(f"transformers.utils.is_apex_available(): {is_apex_available()}; "
          f"importlib.metadata.version('apex'): {importlib.metadata.version('apex')}", flush=True)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37)
    model = BertForSequenceClassification(config)
    options = dict(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=16,
                   learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                   fp16=True, half_precision_backend="apex", fp16_opt_level=args.opt_level, optim=args.optim)
    if not torch.cuda.is_available():
        fields = TrainingArguments.__dataclass_fields__
        options["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=RandomTokens())
    print(f"Trainer.use_apex: {trainer.use_apex}", flush=True)
    trainer.train()

    from apex import amp

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for step, loss in enumerate(losses, 1):
        print(f"step {step} loss {loss:.4f}")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    print(f"apex in use: amp opt_level {amp._amp_state.opt_properties.opt_level}, optimizer "
          f"{type(optimizer).__module__}.{type(optimizer).__name__}, "
          f"model dtype {next(trainer.model.parameters()).dtype}")
    ok = trainer.use_apex and len(losses) == args.steps and all(math.isfinite(loss) for loss in losses)
    print("RESULT", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
