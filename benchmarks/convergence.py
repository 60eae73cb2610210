"""Convergence benchmark: does every precision mode learn like FP32?

Trains the same byte-level GPT-style LM on the Python standard library's own sources (fixed
train/validation split by file, nothing downloaded) once per mode — FP32, native fp16 autocast +
GradScaler, native bf16 autocast, and ampcompat O0-O5 — from the same initial weights, on the same
batches in the same order, with the same hyper-parameters. Records per-step train loss, periodic
validation loss, the loss scale and skipped steps; writes JSON (after every mode, so a run cut short
keeps what it finished), PNG plots when matplotlib is importable, and prints a summary table.

Examples::

    python benchmarks/convergence.py                          # GPU default (~5 min on one H100)
    python benchmarks/convergence.py --device cpu --tiny      # smoke run, well under a minute
    python benchmarks/convergence.py --modes fp32,O1,O2 --steps 300
"""
from __future__ import annotations

import argparse
import os
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run from a checkout without installing: use the checkout's ampcompat
    sys.path.insert(1, str(_REPO))

from _models import GPT, GPTConfig, byte_batches, count_parameters, fixed_batches, gpt_train_flops  # noqa: E402
from _models import lm_loss, load_stdlib_corpus, weight_decay_groups  # noqa: E402
from _env import device_name, run_metadata  # noqa: E402
from _modes import MODE_DESCRIPTIONS, make_adamw_factory, make_recipe, parse_modes  # noqa: E402

CONVERGENCE_MODES = ("fp32", "native_fp16", "native_bf16", "O0", "O1", "O2", "O3", "O4", "O5")
# The order runs are made in: the reference first, the slowest and least informative (O0 = FP32) last,
# so that a run cut short by a time limit still holds the comparisons that matter.
_RUN_ORDER = ("fp32", "native_fp16", "native_bf16", "O1", "O2", "O5", "O4", "O3", "O0")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; identical for every mode of one benchmark."""

    model: GPTConfig
    batch_size: int
    steps: int
    eval_interval: int
    eval_batches: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    adam_eps: float
    clip_norm: float
    seed: int
    max_files: Optional[int] = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.as_dict()
        return out


# ~25M parameters (8 x 512, 8 heads, 512 bytes of context), 16k tokens per step. FLOPs per step are
# about 2.9e12; on an H100 that is ~60-70 ms in true FP32 (O0 too) and ~15-20 ms in fp16/bf16, so
# 1000 steps per mode for 9 modes (+ evaluation) is about 5 minutes.
GPU_DEFAULT = RunConfig(
    model=GPTConfig(vocab_size=256, seq_len=512, n_layer=8, n_head=8, d_model=512),
    batch_size=32, steps=1000, eval_interval=100, eval_batches=16, lr=1e-3, warmup_steps=100,
    min_lr_ratio=0.1, weight_decay=0.1, adam_eps=1e-5, clip_norm=1.0, seed=1234,
)
# A CPU run that still shows the curves separating (fp16 matmuls are slow on most CPUs).
CPU_DEFAULT = RunConfig(
    model=GPTConfig(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=64),
    batch_size=16, steps=200, eval_interval=25, eval_batches=4, lr=2e-3, warmup_steps=20,
    min_lr_ratio=0.1, weight_decay=0.1, adam_eps=1e-5, clip_norm=1.0, seed=1234,
)
# Smoke-test size: seconds per mode on two CPU cores.
TINY = RunConfig(
    model=GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=2, d_model=32),
    batch_size=8, steps=40, eval_interval=10, eval_batches=2, lr=3e-3, warmup_steps=4,
    min_lr_ratio=0.1, weight_decay=0.1, adam_eps=1e-5, clip_norm=1.0, seed=1234, max_files=60,
)


def learning_rate(step: int, config: RunConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_eval_loss(recipe, batches) -> float:
    recipe.model.eval()
    losses = torch.stack([recipe.eval_loss(x, y, lm_loss) for x, y in batches])
    recipe.model.train()
    return float(losses.mean())


def train_one_mode(mode: str, config: RunConfig, corpus, val_batches, device: torch.device,
                   log=print) -> dict:
    """Train a fresh model in ``mode``; return its curves and counters (see the JSON schema in the README)."""
    torch.manual_seed(config.seed)
    model = GPT(config.model).to(device)
    make_optimizer = make_adamw_factory(
        config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95), eps=config.adam_eps,
        param_groups=lambda m: weight_decay_groups(m, config.weight_decay),
    )
    recipe = make_recipe(mode, model, make_optimizer, device, track_skips=True)
    try:
        batches = byte_batches(corpus.train, config.batch_size, config.model.seq_len, config.seed, device)
        val_curve = [[0, _mean_eval_loss(recipe, val_batches)]]
        log(f"[{mode}] step 0: val_loss={val_curve[0][1]:.4f}")
        train_losses: List[torch.Tensor] = []
        loss_scales: List[Optional[float]] = []
        skipped_at: List[int] = []
        _synchronize(device)
        start = time.perf_counter()
        for step in range(config.steps):
            for group in recipe.optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            inputs, targets = next(batches)
            train_losses.append(recipe.train_step(inputs, targets, lm_loss, config.clip_norm))
            loss_scales.append(recipe.loss_scale())
            if recipe.last_step_skipped:
                skipped_at.append(step)
            if (step + 1) % config.eval_interval == 0 or step + 1 == config.steps:
                val_curve.append([step + 1, _mean_eval_loss(recipe, val_batches)])
                recent = torch.stack(train_losses[-config.eval_interval:]).float().mean()
                scale = "" if loss_scales[-1] is None else f" loss_scale={loss_scales[-1]:g}"
                log(f"[{mode}] step {step + 1}: train_loss={float(recent):.4f} "
                    f"val_loss={val_curve[-1][1]:.4f}{scale} skipped={len(skipped_at)}")
        _synchronize(device)
        wall = time.perf_counter() - start
        return {
            "description": MODE_DESCRIPTIONS[mode],
            "optimizer": "AdamW(fused)" if recipe.optimizer.defaults.get("fused") else "AdamW(foreach)",
            "train_loss": torch.stack(train_losses).float().tolist(),
            "val_loss": val_curve,
            "loss_scale": loss_scales,
            "skipped_steps": len(skipped_at),
            "skipped_at": skipped_at,
            "initial_val_loss": val_curve[0][1],
            "final_val_loss": val_curve[-1][1],
            "wall_s": wall,
            "ms_per_step": 1e3 * wall / config.steps,
            "error": None,
        }
    finally:
        recipe.close()


def summarize(results: Dict[str, dict]) -> List[dict]:
    """One row per mode: final validation loss, its relative difference to FP32, skipped steps."""
    reference = results.get("fp32", {}).get("final_val_loss")
    rows = []
    for mode in sorted(results, key=lambda m: CONVERGENCE_MODES.index(m) if m in CONVERGENCE_MODES else 99):
        result = results[mode]
        final = result.get("final_val_loss")
        rel = None
        if final is not None and reference is not None and math.isfinite(final) and reference:
            rel = (final - reference) / reference
        rows.append({
            "mode": mode,
            "final_val_loss": final,
            "rel_diff_vs_fp32": rel,
            "skipped_steps": result.get("skipped_steps"),
            "ms_per_step": result.get("ms_per_step"),
            "error": result.get("error"),
        })
    return rows


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if math.isnan(value) else str(value)
    return format(value, spec)


def format_table(rows: List[dict]) -> str:
    """The summary as a Markdown table (also readable as plain text)."""
    lines = ["| mode | final val loss | rel. diff vs FP32 | skipped steps | ms/step (incl. eval) | note |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        note = row["error"] or MODE_DESCRIPTIONS.get(row["mode"], "")
        lines.append(
            f"| {row['mode']} | {_fmt(row['final_val_loss'], '.4f')} | {_fmt(row['rel_diff_vs_fp32'], '+.2%')} "
            f"| {_fmt(row['skipped_steps'], 'd')} | {_fmt(row['ms_per_step'], '.1f')} | {note} |"
        )
    return "\n".join(lines)


def markdown_report(report: dict, table: str) -> str:
    """The summary table headed by what was run, where and when (ready for docs/benchmarks.md)."""
    meta, config = report["meta"], report["meta"]["config"]
    model = config["model"]
    return "\n".join([
        "# ampcompat convergence benchmark", "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']} ({meta['device_type']}); torch {meta['torch']}; Python {meta['python']}; "
        f"ampcompat {meta['ampcompat']}; FP32 matmul precision {meta['float32_matmul_precision']}",
        f"- date: {meta['date']}",
        f"- model: byte-level GPT, {meta['parameters'] / 1e6:.2f}M parameters ({model['n_layer']} layers x "
        f"{model['d_model']}, {model['n_head']} heads, {model['seq_len']} bytes of context); batch "
        f"{config['batch_size']}; {config['steps']} steps per mode; AdamW lr {config['lr']:g} (warm-up "
        f"{config['warmup_steps']}, cosine to {config['min_lr_ratio']:g}x), eps {config['adam_eps']:g}, "
        f"weight decay {config['weight_decay']:g}, clip {config['clip_norm']:g}",
        f"- data: {meta['corpus']['source']}; {meta['corpus']['train_bytes']:,} train / "
        f"{meta['corpus']['val_bytes']:,} validation bytes, split by file; same batches and initial weights "
        "for every mode",
        "- O4/O5 are bf16 and use no loss scaling (static scale 1), as in ROCm Apex; O0/O3 default to a "
        "static scale of 1 as in Apex",
        "", table, ""])


def _save_figure(plt, fig, prefix: Path, suffix: str) -> str:
    """Write ``fig`` to ``<prefix><suffix>``, close it, and return the path written."""
    path = prefix.with_name(prefix.name + suffix)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def save_plots(results: Dict[str, dict], prefix: Path) -> List[str]:
    """Loss curves of every mode on one chart, and the loss-scale traces; returns the files written.

    Returns an empty list (after printing a note) when matplotlib is not importable.
    """
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("note: matplotlib is not importable; skipping plots (pip install 'ampcompat[bench]').")
        return []
    written = []
    finished = {m: r for m, r in results.items() if r.get("train_loss")}
    fig, (ax, diff_ax) = plt.subplots(2, 1, figsize=(9, 8), sharex=True,
                                     gridspec_kw={"height_ratios": (3, 2)})
    reference = dict(map(tuple, finished["fp32"]["val_loss"])) if "fp32" in finished else None
    for mode, result in finished.items():
        losses = torch.tensor(result["train_loss"])
        window = max(1, len(losses) // 50)
        smooth = torch.nn.functional.avg_pool1d(losses.view(1, 1, -1), window, stride=1).view(-1)
        line, = ax.plot(range(window, len(losses) + 1), smooth.tolist(), linewidth=1.0, alpha=0.8, label=mode)
        steps, vals = zip(*result["val_loss"])
        ax.plot(steps, vals, "o--", color=line.get_color(), markersize=3, linewidth=0.8)
        if reference is not None:
            diffs = [(s, v - reference[s]) for s, v in result["val_loss"] if s in reference]
            diff_ax.plot(*zip(*diffs), "o-", color=line.get_color(), markersize=3, linewidth=1.0, label=mode)
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("Byte-level LM on the Python standard library: every mode, same data and seed\n"
                 "lines: train loss (moving average); dots: validation loss")
    ax.legend(ncol=3, fontsize=8)
    ax.grid(alpha=0.3)
    diff_ax.axhline(0.0, color="black", linewidth=0.8)
    diff_ax.set_xlabel("step")
    diff_ax.set_ylabel("val loss minus FP32's")
    diff_ax.grid(alpha=0.3)
    written.append(_save_figure(plt, fig, prefix, "_loss.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    styles = ("-", "--", ":", "-.")
    for index, (mode, result) in enumerate(finished.items()):
        scales = result["loss_scale"]
        if any(s is not None for s in scales):
            ax.step(range(1, len(scales) + 1), [s if s is not None else float("nan") for s in scales],
                    where="post", linestyle=styles[index % len(styles)],
                    label=f"{mode} ({result['skipped_steps']} skipped)")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.set_title("Loss scale per step (bf16 modes and O0/O3 use a static scale of 1)")
    ax.legend(ncol=3, fontsize=8)
    ax.grid(alpha=0.3)
    written.append(_save_figure(plt, fig, prefix, "_loss_scale.png"))
    return written


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke-test size (CPU tests)")
    parser.add_argument("--modes", default=",".join(CONVERGENCE_MODES),
                        help="comma-separated subset of: " + ", ".join(CONVERGENCE_MODES))
    parser.add_argument("--steps", type=int, help="training steps per mode (default: by configuration)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-interval", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--adam-eps", type=float,
                        help="AdamW eps (default 1e-5: with fp16 optimizer state, as in O3, 1e-8 divides by "
                             "an underflowed exp_avg_sq and diverges)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", default="out/convergence.json", help="where to write all numbers")
    parser.add_argument("--plots", default=None,
                        help="path prefix for the PNG plots (default: the JSON path without .json)")
    parser.add_argument("--markdown", default=None, help="also write the summary table here")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels (e.g. embedding backward without atomics), so modes that "
                             "do the same arithmetic give the same curve bit for bit; slower")
    args = parser.parse_args(argv)
    try:
        args.modes = sorted(parse_modes(args.modes, CONVERGENCE_MODES), key=_RUN_ORDER.index)
    except ValueError as error:
        parser.error(str(error))
    for flag in ("steps", "batch_size", "eval_interval"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def build_config(args: argparse.Namespace, device: torch.device) -> RunConfig:
    config = TINY if args.tiny else (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)
    overrides = {name: getattr(args, arg) for name, arg in (
        ("steps", "steps"), ("batch_size", "batch_size"), ("eval_interval", "eval_interval"),
        ("lr", "lr"), ("adam_eps", "adam_eps"), ("seed", "seed")) if getattr(args, arg) is not None}
    config = replace(config, **overrides)
    if "steps" in overrides:
        config = replace(config, warmup_steps=min(config.warmup_steps, max(1, config.steps // 10)))
    return config


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)
    modes = args.modes
    config = build_config(args, device)
    corpus = load_stdlib_corpus(config.max_files)
    val_batches = fixed_batches(corpus.val, config.eval_batches, config.batch_size, config.model.seq_len,
                                seed=config.seed + 1, device=device)

    params = count_parameters(GPT(config.model))
    flops = gpt_train_flops(config.model, config.batch_size)
    print(f"device: {device_name(device)}; torch {torch.__version__}; modes: {', '.join(modes)}")
    print(f"model: {params / 1e6:.2f}M parameters {config.model.as_dict()}; batch {config.batch_size} x "
          f"{config.model.seq_len} bytes; {config.steps} steps per mode; ~{flops / 1e12:.3g} TFLOP per step")
    print(f"corpus: {corpus.describe()}")

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(device)
    meta.update(parameters=params, train_flops_per_step=flops, config=config.as_dict(), corpus=corpus.describe())
    report = {
        "meta": meta,
        "modes": {},
        "summary": [],
    }
    started = time.perf_counter()
    slowest = 0.0
    for index, mode in enumerate(modes):
        mode_started = time.perf_counter()
        try:
            report["modes"][mode] = train_one_mode(mode, config, corpus, val_batches, device)
        except Exception as error:  # one broken mode must not cost the others
            report["modes"][mode] = {"description": MODE_DESCRIPTIONS[mode], "error": f"{type(error).__name__}: {error}",
                                     "final_val_loss": None, "skipped_steps": None}
            print(f"[{mode}] FAILED: {type(error).__name__}: {error}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        slowest = max(slowest, time.perf_counter() - mode_started)
        remaining = len(modes) - index - 1
        if remaining:
            print(f"elapsed {time.perf_counter() - started:.0f}s; ~{slowest * remaining:.0f}s to go at most "
                  f"({remaining} modes left, none slower than FP32, which runs first)")
        report["summary"] = summarize(report["modes"])
        json_path.write_text(json.dumps(report, indent=1))

    table = format_table(report["summary"])
    try:
        plots = save_plots(report["modes"], Path(args.plots) if args.plots else json_path.with_suffix(""))
    except Exception as error:  # a plotting problem must not cost the numbers
        plots = []
        print(f"note: plotting failed ({type(error).__name__}: {error}); the JSON has every number.")
    report["meta"]["plots"] = plots
    report["meta"]["total_wall_s"] = time.perf_counter() - started
    json_path.write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_report(report, table))
    print()
    print(table)
    print(f"\nwrote {json_path}" + (f", {', '.join(plots)}" if plots else ""))
    failed = [row["mode"] for row in report["summary"] if row["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
