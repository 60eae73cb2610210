"""Apex's one-process-per-GPU launcher: ``python -m ampcompat.parallel.multiproc train.py [args...]``.

Starts ``torch.cuda.device_count()`` copies of ``python train.py args... --world-size N --rank i``
(replacing those flags when present); rank 0 prints to the terminal, rank ``i > 0`` to ``GPU_i.log``.
Each line of arguments is printed before its process starts, as Apex did. New code should use
``torchrun --nproc_per_node=N``, which also serves CPU-only runs.
"""
import subprocess
import sys
from typing import List, Optional, Sequence

import torch

__all__ = ["worker_argv", "main"]


def _set_flag(argv: List[str], flag: str, value: str) -> None:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv.extend([flag, value])


def worker_argv(script_args: Sequence[str], world_size: int, rank: int) -> List[str]:
    """The script and arguments for worker ``rank``: ``--world-size``/``--rank`` set or appended."""
    argv = list(script_args)
    _set_flag(argv, "--world-size", str(world_size))
    _set_flag(argv, "--rank", str(rank))
    return argv


def main(script_args: Optional[Sequence[str]] = None) -> int:
    """Launch one worker per CUDA device, wait for all, and return the first non-zero exit code (or 0).

    Raises:
        SystemExit: when no script is given or no CUDA device is visible.
    """
    script_args = list(sys.argv[1:] if script_args is None else script_args)
    if not script_args:
        raise SystemExit("usage: python -m ampcompat.parallel.multiproc script.py [args...]")
    world_size = torch.cuda.device_count()
    if world_size == 0:
        raise SystemExit("multiproc starts one process per CUDA device and found none; "
                         "use torchrun --nproc_per_node=N script.py to run on CPUs.")
    workers = []
    logs = []
    try:
        for rank in range(world_size):
            argv = worker_argv(script_args, world_size, rank)
            stdout = None if rank == 0 else open("GPU_{}.log".format(rank), "w")
            if stdout is not None:
                logs.append(stdout)
            print(argv)
            workers.append(subprocess.Popen([sys.executable] + argv, stdout=stdout))
        return_codes = [worker.wait() for worker in workers]
    finally:
        for log in logs:
            log.close()
    return next((code for code in return_codes if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
