"""``python -m ampcompat``: run legacy Apex code unchanged, rewrite it, or check the installation.

    python -m ampcompat run train.py --epochs 3      # `from apex import amp` etc. resolve to ampcompat
    python -m ampcompat run -m torch.distributed.run --nproc_per_node=2 train.py
    python -m ampcompat migrate --help
    python -m ampcompat doctor
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence

from ._version import __version__

_PROG = "python -m ampcompat"
_USAGE = f"usage: {_PROG} [-h] [--version] {{run,migrate,doctor}} ..."
_HELP = f"""{_USAGE}

Run code written for NVIDIA Apex's amp on PyTorch's native mixed precision.

commands:
  run        run a script (SCRIPT [ARGS ...]) or a module (-m MODULE [ARGS ...]) with `import apex`,
             `from apex import amp` and `import amp_C` resolving to ampcompat (see: run --help)
  migrate    find Apex uses in source files; rewrite them to ampcompat or plain PyTorch (see: migrate --help)
  doctor     check the environment ampcompat runs in (see: doctor --help)

options:
  -h, --help  show this help message and exit
  --version   show ampcompat's version and exit

`pip install` also installs this as the `ampcompat` command: `ampcompat run ...` is `python -m ampcompat run ...`.
"""
_RUN_USAGE = f"usage: {_PROG} run [-h] (SCRIPT | -m MODULE) [ARGS ...]"
_RUN_HELP = f"""{_RUN_USAGE}

Run SCRIPT (or MODULE, as `python -m MODULE`) as __main__ with ARGS, exactly as `python` would, with
the `apex` import alias installed: `import apex`, `from apex import amp`, `apex.fp16_utils`,
`apex.parallel`, `amp_C` and old pickles naming Apex classes resolve to ampcompat. Child Python
processes (multiprocessing spawn workers, torchrun workers) get the alias too. A real NVIDIA Apex,
if installed, keeps its own modules; ampcompat supplies only the ones it lacks.
The exit status is the script's.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m ampcompat`` and of the ``ampcompat`` console script.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: the command's, 0 for ``--help``/``--version``, 2 for a usage error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return _usage_error(_USAGE, "the following arguments are required: command")
    command, rest = args[0], args[1:]
    if command in ("-h", "--help"):
        print(_HELP, end="")
        return 0
    if command == "--version":
        print(f"ampcompat {__version__}")
        return 0
    handler = _COMMANDS.get(command)
    if handler is None:
        choices = ", ".join(repr(name) for name in _COMMANDS)
        return _usage_error(_USAGE, f"argument command: invalid choice: {command!r} (choose from {choices})")
    return handler(rest)


def _usage_error(usage: str, message: str) -> int:
    print(usage, file=sys.stderr)
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def _run(args: List[str]) -> int:
    """``run``: install the alias here and for child processes, then run the script or module."""
    if not args:
        return _usage_error(_RUN_USAGE, "the following arguments are required: SCRIPT or -m MODULE")
    first = args[0]
    if first in ("-h", "--help"):
        print(_RUN_HELP, end="")
        return 0
    module: Optional[str] = None
    if first == "-m":
        if len(args) < 2:
            return _usage_error(_RUN_USAGE, "argument -m: expected one argument")
        module, rest = args[1], args[2:]
    elif first.startswith("-m"):  # -mMODULE, as python accepts
        module, rest = first[2:], args[1:]
    elif first.startswith("-c"):  # -c CODE or -cCODE, as python accepts
        return _usage_error(_RUN_USAGE, "argument -c: running code from the command line is not supported; "
                                        f"put the code in a script and run `{_PROG} run script.py`")
    elif first.startswith("-"):
        return _usage_error(_RUN_USAGE, f"unrecognized option: {first}")
    else:
        rest = args[1:]

    from .tools import runner
    from .tools.alias import enable_alias_in_child_processes, install_apex_alias

    enable_alias_in_child_processes()
    install_apex_alias()
    if module is not None:
        return runner.run_module(module, rest)
    return runner.run_path(first, rest)


def _migrate(args: List[str]) -> int:
    from .tools.migrate import main as migrate_main

    return migrate_main(args)


def _doctor(args: List[str]) -> int:
    from .tools.doctor import main as doctor_main

    return doctor_main(args)


_COMMANDS: Dict[str, Callable[[List[str]], int]] = {"run": _run, "migrate": _migrate, "doctor": _doctor}


if __name__ == "__main__":
    sys.exit(main())
