"""Train a small byte-level GPT on the Python standard library's sources, the Apex way.

This is mixed-precision training code as it was written for NVIDIA Apex: ``from apex import amp``,
``amp.initialize``, ``amp.scale_loss``, ``amp.master_params`` for clipping, and a checkpoint holding
``amp.state_dict()``. Apex's ``amp`` was removed in 2025; this file runs unchanged through ampcompat::

    python -m ampcompat run examples/legacy_apex_lm.py --opt-level O2
    python -m ampcompat run examples/legacy_apex_lm.py --opt-level O1 --loss-scale 128.0
    python -m ampcompat run examples/legacy_apex_lm.py --opt-level O5 --device cuda   # bf16 masters

The corpus is the standard library's own ``.py`` files (no download): every 10th file, in name
order, is held out for validation. It prints the device, a line every few steps, then saves a
checkpoint, resumes it into new objects and ends with a one-line summary.
"""
import argparse
import functools
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
parser.add_argument("--log-interval", type=int, default=5)
parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--seed", type=int, default=0)

D_MODEL, N_LAYER, N_HEAD = 64, 2, 4
log = functools.partial(print, flush=True)  # progress shows at once, also through a pipe or a log file


def describe_device(device):
    if device.startswith("cuda"):
        return "%s (%s)" % (device, torch.cuda.get_device_name(torch.device(device)))
    note = "" if torch.cuda.is_available() else "; no CUDA GPU found"
    return "%s (%d threads%s)" % (device, torch.get_num_threads(), note)


def read_corpus():
    """Train and validation bytes from the standard library's top-level .py files."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    train = b"".join(open(f, "rb").read() for i, f in enumerate(files) if i % 10 != 9)
    val = b"".join(open(f, "rb").read() for i, f in enumerate(files) if i % 10 == 9)
    as_tensor = lambda raw: torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return as_tensor(train), as_tensor(val), len(files)


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


def build(args, verbosity=1):
    model = TinyGPT(args.seq_len).to(args.device)
    # eps=1e-5: under O3 the optimizer state is fp16 too, and 1e-8 would round away.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.01)
    model, optimizer = amp.initialize(model, optimizer, opt_level=args.opt_level,
                                      keep_batchnorm_fp32=args.keep_batchnorm_fp32,
                                      loss_scale=args.loss_scale, verbosity=verbosity)
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
    log("device: %s" % describe_device(args.device))
    log("data: reading the Python standard library's .py files as training text (no download)...")
    train_data, val_data, n_files = read_corpus()
    log("corpus: %d train bytes, %d validation bytes (%d files)" % (len(train_data), len(val_data), n_files))

    model, optimizer = build(args)  # amp prints its options once, here
    log("model: %d-layer byte-level GPT, %.2fM parameters, opt_level %s" % (
        N_LAYER, sum(p.numel() for p in model.parameters()) / 1e6, args.opt_level))
    log("initial: val_loss=%.4f" % evaluate(model, val_data, args))

    generator = torch.Generator().manual_seed(args.seed)
    train_seconds, interval_start, interval_steps = 0.0, time.time(), 0
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

        interval_steps += 1
        evaluating = (step + 1) % args.eval_interval == 0 or step + 1 == args.steps
        if step == 0 or evaluating or (step + 1) % args.log_interval == 0:
            train_loss = loss.item()  # waits for the device, so the time below is the steps' own
            seconds = time.time() - interval_start
            train_seconds += seconds
            line = "step %4d/%d  train_loss %.4f  loss_scale %g  %.0f ms/step" % (
                step + 1, args.steps, train_loss, amp._amp_state.loss_scalers[0].loss_scale(),
                1000 * seconds / interval_steps)
            if evaluating:
                line += "  val_loss %.4f" % evaluate(model, val_data, args)
            log(line)
            interval_start, interval_steps = time.time(), 0

    val_loss = evaluate(model, val_data, args)
    loss_scale = amp._amp_state.loss_scalers[0].loss_scale()

    # Checkpoint as Apex's README recommends, then resume from it into fresh objects.
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "amp": amp.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(checkpoint, path)
        model, optimizer = build(args, verbosity=0)  # the options were printed for the first build
        # weights_only=True: every part is plain tensors and numbers (and says so to torch < 2.6, which warns
        # when the argument is left out).
        checkpoint = torch.load(path, map_location=args.device, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        amp.load_state_dict(checkpoint["amp"])
    resumed_val_loss = evaluate(model, val_data, args)
    matches = math.isclose(resumed_val_loss, val_loss, rel_tol=1e-5, abs_tol=1e-6)
    log("resumed: saved, rebuilt and reloaded model, optimizer and amp state: val_loss=%.4f (%s)" % (
        resumed_val_loss, "matches" if matches else "MISMATCH"))
    log("final: train_loss=%.4f val_loss=%.4f loss_scale=%g steps/s=%.2f resume=%s" % (
        train_loss, val_loss, loss_scale, args.steps / train_seconds, "matches" if matches else "MISMATCH"))
    if not matches:
        raise SystemExit("the resumed model does not reproduce the saved one's validation loss")


if __name__ == "__main__":
    main()
