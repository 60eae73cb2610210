"""Train a small byte-level GPT on the Python standard library's sources, the Apex way.

This is mixed-precision training code as it was written for NVIDIA Apex: ``from apex import amp``,
``amp.initialize``, ``amp.scale_loss``, ``amp.master_params`` for clipping, and a checkpoint holding
``amp.state_dict()``. Apex's ``amp`` was removed in 2025; this file runs unchanged through ampcompat::

    python -m ampcompat run examples/legacy_apex_lm.py --opt-level O2
    python -m ampcompat run examples/legacy_apex_lm.py --opt-level O1 --loss-scale 128.0
    python -m ampcompat run examples/legacy_apex_lm.py --opt-level O5 --device cuda   # bf16 masters

The corpus is the standard library's own ``.py`` files (no download): every 10th file, in name
order, is held out for validation.
"""
import argparse
import glob
import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from apex import amp

parser = argparse.ArgumentParser(description="Byte-level LM with apex.amp")
parser.add_argument("--opt-level", type=str, default="O1")
parser.add_argument("--keep-batchnorm-fp32", type=str, default=None)
parser.add_argument("--loss-scale", type=str, default=None)
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=64)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--eval-interval", type=int, default=20)
parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--seed", type=int, default=0)

D_MODEL, N_LAYER, N_HEAD = 64, 2, 4


def read_corpus():
    """Train and validation bytes from the standard library's top-level .py files."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    train = b"".join(open(f, "rb").read() for i, f in enumerate(files) if i % 10 != 9)
    val = b"".join(open(f, "rb").read() for i, f in enumerate(files) if i % 10 == 9)
    as_tensor = lambda raw: torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return as_tensor(train), as_tensor(val)


def get_batch(data, args, generator):
    starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=generator)
    chunk = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()]).long()
    chunk = chunk.to(args.device)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head):
        super(CausalSelfAttention, self).__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = [z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, d_model, n_head):
        super(Block, self).__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, seq_len, vocab_size=256, d_model=D_MODEL, n_layer=N_LAYER, n_head=N_HEAD):
        super(TinyGPT, self).__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as GPT-2
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.blocks(self.tok_emb(idx) + self.pos_emb(positions))
        return self.head(self.ln_f(x))


def build(args):
    model = TinyGPT(args.seq_len).to(args.device)
    # eps=1e-5: under O3 the optimizer state is fp16 too, and 1e-8 would round away.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.01)
    model, optimizer = amp.initialize(model, optimizer, opt_level=args.opt_level,
                                      keep_batchnorm_fp32=args.keep_batchnorm_fp32,
                                      loss_scale=args.loss_scale)
    return model, optimizer


def evaluate(model, data, args, batches=8):
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = get_batch(data, args, generator)
            logits = model(x)
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()
    model.train()
    return total / batches


def learning_rate(step, args):
    warmup = max(1, min(10, args.steps // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def main():
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train_data, val_data = read_corpus()
    print("corpus: %d train bytes, %d validation bytes" % (len(train_data), len(val_data)))

    model, optimizer = build(args)
    print("initial: val_loss=%.4f" % evaluate(model, val_data, args))

    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x, y = get_batch(train_data, args, generator)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

        optimizer.zero_grad()
        with amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), 1.0)
        optimizer.step()

        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            print("step %4d  train_loss %.4f  val_loss %.4f  loss_scale %g  %.0f ms/step" % (
                step + 1, loss.item(), evaluate(model, val_data, args),
                amp._amp_state.loss_scalers[0].loss_scale(), 1000 * (time.time() - start) / (step + 1)))

    train_loss, val_loss = loss.item(), evaluate(model, val_data, args)

    # Checkpoint as Apex's README recommends, then resume from it into fresh objects.
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "amp": amp.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(checkpoint, path)
        model, optimizer = build(args)
        checkpoint = torch.load(path, map_location=args.device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        amp.load_state_dict(checkpoint["amp"])
    resumed_val_loss = evaluate(model, val_data, args)
    matches = math.isclose(resumed_val_loss, val_loss, rel_tol=1e-5, abs_tol=1e-6)
    print("resumed: val_loss=%.4f (%s)" % (resumed_val_loss, "matches" if matches else "MISMATCH"))
    print("final: train_loss=%.4f val_loss=%.4f loss_scale=%g" % (
        train_loss, val_loss, amp._amp_state.loss_scalers[0].loss_scale()))
    if not matches:
        raise SystemExit("the resumed model does not reproduce the saved one's validation loss")


if __name__ == "__main__":
    main()
