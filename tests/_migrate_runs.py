"""Running migrated programs for the migrate tests: each program in a fork of one warm interpreter (torch imported
once), with the import alias on, off, or Apex and ampcompat impossible to import; and ``migrate`` itself in-process."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

from ampcompat.tools import migrate

REPO = Path(__file__).resolve().parents[1]

_DRIVER = r"""
import json, os, runpy, sys, tempfile, traceback
import torch, torch.distributed as dist
import ampcompat, ampcompat.amp, ampcompat.parallel, ampcompat.optimizers, ampcompat.normalization, ampcompat.fp16_utils

# Pay once for what every program would pay again: the first optimizer step, the first gloo group.
_warm = torch.nn.Parameter(torch.zeros(1))
_warm.grad = torch.zeros(1)
torch.optim.SGD([_warm], lr=0.1).step()
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"), rank=0, world_size=1)
torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
dist.destroy_process_group()

BLOCKED = ("apex", "amp_C", "apex_C", "ampcompat")

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this run has no Apex and no ampcompat)",
                                      name=name)
        return None

for line in sys.stdin:
    request = json.loads(line)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        code = 0
        try:
            if request["env"] == "absent":
                for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
                    del sys.modules[name]
                sys.meta_path.insert(0, Blocker())
            elif request["env"] == "alias":
                ampcompat.install_apex_alias()
            script = request["script"]
            sys.path.insert(0, os.path.dirname(script))
            os.chdir(os.path.dirname(script))
            sys.argv = [script] + request["args"]
            import warnings
            warnings.simplefilter("ignore")
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, errors="replace") as pipe:
        output = pipe.read()
    status = os.waitpid(pid, 0)[1]
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "output": output}), flush=True)
"""


def _driver_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("AMPCOMPAT_APEX_ALIAS", "WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def run_all(requests: List[dict]) -> List[dict]:
    """Run every request (script, args, env) in its own fork of one warm interpreter."""
    stdin = "".join(json.dumps(request) + "\n" for request in requests)
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=stdin, env=_driver_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(replies) == len(requests), proc.stderr[-3000:]
    return replies


class WarmRunner:
    """The same driver kept open between requests, for tests that run scripts one at a time (a module fixture):
    :meth:`run` sends one request and returns its reply (``code``, ``output``)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _DRIVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=_driver_env())

    def run(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def run_migrate(args: List[str]) -> Tuple[int, str]:
    """``python -m ampcompat migrate ARGS`` in this process: (exit status, what it printed)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
        code = migrate.main([str(arg) for arg in args])
    return code, buffer.getvalue()
