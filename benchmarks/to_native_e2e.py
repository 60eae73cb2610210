"""One real training script end to end: the original under ampcompat against its ``--to-native`` conversion.

    python benchmarks/to_native_e2e.py ORIGINAL.py [--steps 8] [--batch-size 32] [--arch resnet18] [--tolerance 0.01]
                                       [--script-arg=ARG ...]

ORIGINAL.py is an ImageNet recipe with the command line of Apex's ``examples/imagenet/main_amp.py``
(``DATA -a ARCH -b N --epochs 1 --workers 0 --print-freq 1 --deterministic --opt-level O1``, printing
``Loss <value> (<average>)`` every ``--print-freq`` iterations). Nothing is fetched: the driver

1. writes a synthetic ImageFolder (``train/`` with ``steps * batch-size`` random RGB images in 4 classes,
   ``val/`` with one batch) as PNG files, in a temporary folder;
2. copies ORIGINAL.py and converts the copy with ``python -m ampcompat migrate --to-native --opt-level O1``,
   checking that the result imports neither ``apex`` nor ``ampcompat``;
3. runs (a) the original under ``python -m ampcompat run`` and (b) the conversion under plain ``python``
   with ``apex`` and ``ampcompat`` made impossible to import, both for one epoch (``--steps`` iterations)
   on the default device of the script;
4. prints both loss sequences, the largest relative difference, and whether they agree within
   ``--tolerance``; the exit status is 0 only if they do.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from typing import List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOSS = re.compile(r"\bLoss (\S+) \(")
_BLOCKED_RUN = r"""
import runpy, sys

class _NoApex:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("apex", "amp_C", "apex_C", "ampcompat"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the converted script must not need it)",
                                      name=name)
        return None

sys.meta_path.insert(0, _NoApex())
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, __import__("os").path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def png(width: int, height: int, pixels: bytes) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (rows of ``width * 3`` bytes), without any imaging library."""
    raw = b"".join(b"\x00" + pixels[row * width * 3:(row + 1) * width * 3] for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def synthetic_imagefolder(root: str, train_images: int, val_images: int, classes: int = 4, size: int = 64,
                          seed: int = 0) -> None:
    """``root/train/classK/N.png`` and ``root/val/classK/N.png``: random images, the same for every call."""
    import random

    rng = random.Random(seed)
    for split, count in (("train", train_images), ("val", val_images)):
        for index in range(count):
            folder = os.path.join(root, split, f"class{index % classes}")
            os.makedirs(folder, exist_ok=True)
            pixels = bytes(rng.randrange(256) for _ in range(size * size * 3))
            with open(os.path.join(folder, f"{index:05d}.png"), "wb") as handle:
                handle.write(png(size, size, pixels))


def imports_apex_or_ampcompat(path: str) -> bool:
    import ast

    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("apex", "ampcompat", "amp_C")
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in (
                "apex", "ampcompat", "amp_C"):
            return True
    return False


def convert(script: str) -> str:
    """``migrate --to-native --opt-level O1`` on ``script`` in place; its report."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ampcompat", "migrate", script, "--to-native", "--opt-level", "O1"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"migrate --to-native failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def run(command: List[str], cwd: str, with_repo: bool) -> Tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AMPCOMPAT_APEX_ALIAS", "PYTHONPATH")}
    if with_repo:
        env["PYTHONPATH"] = REPO
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def losses(output: str) -> List[float]:
    return [float(match.group(1)) for match in _LOSS.finditer(output)]


def compare(first: Sequence[float], second: Sequence[float], tolerance: float) -> Tuple[bool, float]:
    """Whether two loss sequences agree (same length, every pair within ``tolerance`` relative), and the largest
    relative difference."""
    if not first or len(first) != len(second):
        return False, float("inf")
    worst = max(abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(first, second))
    return worst <= tolerance, worst


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", help="the training script (an ImageNet recipe with main_amp.py's command line)")
    parser.add_argument("--steps", type=int, default=8, help="training iterations (one epoch of synthetic data)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--tolerance", type=float, default=1e-2, help="largest relative loss difference accepted")
    parser.add_argument("--keep", help="keep the work folder here (converted script, data, outputs)")
    parser.add_argument("--script-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for both runs of the script (repeat it; e.g. --script-arg=--has-ext "
                             "for Apex's tests/L1/common/main_amp.py)")
    args = parser.parse_args(argv)
    original = os.path.abspath(args.original)
    if not os.path.isfile(original):
        print(f"to_native_e2e: error: no such file: {args.original}", file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="to-native-e2e-")
    name = os.path.basename(original)
    try:
        for folder in ("original", "native"):
            os.makedirs(os.path.join(work, folder), exist_ok=True)
            shutil.copy(original, os.path.join(work, folder, name))
        data = os.path.join(work, "data")
        synthetic_imagefolder(data, args.steps * args.batch_size, args.batch_size)
        native = os.path.join(work, "native", name)
        report = convert(native)
        print(report.splitlines()[-1])
        if imports_apex_or_ampcompat(native):
            print("FAIL: the converted script still imports apex or ampcompat:\n" + report)
            return 1
        recipe = [data, "-a", args.arch, "-b", str(args.batch_size), "--epochs", "1", "--workers", "0",
                  "--print-freq", "1", "--deterministic", "--opt-level", "O1"] + args.script_arg
        code_a, out_a = run([sys.executable, "-m", "ampcompat", "run", os.path.join(work, "original", name)] + recipe,
                            os.path.join(work, "original"), with_repo=True)
        code_b, out_b = run([sys.executable, "-c", _BLOCKED_RUN, native] + recipe, os.path.join(work, "native"),
                            with_repo=False)
        for label, code, output in (("original under ampcompat", code_a, out_a), ("converted", code_b, out_b)):
            with open(os.path.join(work, label.split()[0] + ".log"), "w", encoding="utf-8") as handle:
                handle.write(output)
            if code != 0:
                print(f"FAIL: the {label} run exited with {code}:\n{output[-3000:]}")
                return 1
        first, second = losses(out_a), losses(out_b)
        print("original (python -m ampcompat run):", " ".join(f"{value:.6f}" for value in first))
        print("converted (plain python)          :", " ".join(f"{value:.6f}" for value in second))
        agree, worst = compare(first, second, args.tolerance)
        print(f"steps: {len(first)} and {len(second)}; largest relative difference: {worst:.3g}; "
              f"{'AGREE' if agree else 'DIFFER'} within {args.tolerance:g}")
        return 0 if agree else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
