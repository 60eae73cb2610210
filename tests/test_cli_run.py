"""The command line: ``python -m ampcompat --help/--version``, usage errors, and ``run``.

``run`` must look to the script exactly like ``python script.py`` / ``python -m module`` (argv,
``__name__``, ``__file__``, ``sys.path[0]``, exit status, tracebacks) with the ``apex`` alias installed,
in the script and in every Python process it starts: a multiprocessing ``spawn`` worker, a plain
``subprocess`` child, and ``torchrun`` workers. Scripts live in ``fixtures/alias``.
"""
import json
import os
import socket
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from _stderr import own_stderr

from ampcompat import __version__
from ampcompat.__main__ import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "alias"


def ampcompat_cli(*args: str, cwd: Path = FIXTURES, path_entries=(REPO,), timeout: int = 300,
                  python_args: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m ampcompat ARGS`` (``python ARGS`` with ``python_args``) in ``cwd``, ``path_entries`` as PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key not in ("AMPCOMPAT_APEX_ALIAS", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, path_entries))
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, *args] if python_args else [sys.executable, "-m", "ampcompat", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- top level (in-process: these paths touch no global state) -----------------------------------

def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m ampcompat [-h] [--version] {run,migrate,doctor} ...\n")
    for command in ("run", "migrate", "doctor"):
        assert f"\n  {command} " in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ampcompat {__version__}\n"


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "argument command: invalid choice: 'frobnicate' (choose from 'run', 'migrate', 'doctor')"),
    ([], "the following arguments are required: command"),
    (["run"], "the following arguments are required: SCRIPT or -m MODULE"),
    (["run", "-m"], "argument -m: expected one argument"),
    (["run", "--bogus", "x.py"], "unrecognized option: --bogus"),
    (["run", "-c", "print(1)"], "argument -c: running code from the command line is not supported; "
                                "put the code in a script and run `python -m ampcompat run script.py`"),
    (["run", "-cprint(1)"], "argument -c: running code from the command line is not supported; "
                            "put the code in a script and run `python -m ampcompat run script.py`"),
])
def test_usage_errors_exit_2_with_usage(capsys, args, message):
    meta_path, environ = list(sys.meta_path), dict(os.environ)
    assert main(args) == 2
    assert (sys.meta_path, dict(os.environ)) == (meta_path, environ)  # a usage error installs nothing
    captured = capsys.readouterr()
    assert captured.out == ""
    usage, error = captured.err.splitlines()
    assert usage.startswith("usage: python -m ampcompat ")
    assert error == "python -m ampcompat: error: " + message


def test_run_help(capsys):
    assert main(["run", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m ampcompat run [-h] (SCRIPT | -m MODULE) [ARGS ...]\n")


@pytest.mark.parametrize("command", ["migrate", "doctor"])
def test_migrate_and_doctor_get_the_arguments_after_their_name(monkeypatch, command):
    received = []
    stand_in = types.ModuleType("ampcompat." + command)
    stand_in.main = lambda argv: received.append(argv) or 7
    monkeypatch.setitem(sys.modules, "ampcompat.tools." + command, stand_in)
    assert main([command, "--check", "src", "--version"]) == 7
    assert received == [["--check", "src", "--version"]]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["run", "--help"], ["migrate", "--help"],
                                  ["doctor", "--help"], []])
def test_help_version_and_usage_errors_do_not_import_torch(args):
    """Answering in well under a second means not importing torch (about 2 s here, 5 s on a cold disk)."""
    result = ampcompat_cli("-X", "importtime", "-m", "ampcompat", *args, python_args=True)
    assert result.returncode == (2 if not args else 0), result.stderr
    assert "usage: python -m ampcompat" in result.stdout + result.stderr or result.stdout.startswith("ampcompat ")
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "ampcompat" in imported  # the check sees the modules that were imported
    assert "torch" not in imported and "numpy" not in imported


def test_importing_ampcompat_does_not_import_torch_until_amp_is_used():
    code = ("import sys, ampcompat; before = 'torch' in sys.modules; amp = ampcompat.amp; "
            "from ampcompat import amp as amp2, reset, amp_state_to_grad_scaler; "
            "print(before, 'torch' in sys.modules, amp is amp2, callable(amp.initialize), "
            "amp_state_to_grad_scaler.__module__)")
    assert succeeded(ampcompat_cli("-c", code, python_args=True)).split() == [
        "False", "True", "True", "True", "ampcompat.amp.scaler"]


def test_console_entry_point_reads_sys_argv(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ampcompat", "--version"])
    assert main() == 0
    assert capsys.readouterr().out == f"ampcompat {__version__}\n"


# --- run SCRIPT / run -m MODULE ---------------------------------------------------------------------

def shown(stdout: str) -> dict:
    """The JSON line ``show_main.py`` prints."""
    return json.loads(stdout.splitlines()[0])


@pytest.mark.parametrize("cwd, script", [
    (FIXTURES, "show_main.py"),
    pytest.param(REPO, "tests/fixtures/alias/show_main.py", marks=pytest.mark.slow),  # a subprocess: --full
])
def test_script_sees_what_python_gives_it(cwd, script):
    seen = shown(succeeded(ampcompat_cli("run", script, "a", "--flag", "-m", cwd=cwd)))
    assert seen == {
        "argv": [script, "a", "--flag", "-m"],
        "name": "__main__",
        "file": str(FIXTURES / "show_main.py"),
        "path0": str(FIXTURES),
        "spec": None,
        "is_sys_main": True,
        "amp_is_ampcompat_amp": True,
    }


def test_module_sees_what_python_dash_m_gives_it():
    seen = shown(succeeded(ampcompat_cli("run", "-m", "show_main", "x", "y")))
    assert seen == {
        "argv": [str(FIXTURES / "show_main.py"), "x", "y"],
        "name": "__main__",
        "file": str(FIXTURES / "show_main.py"),
        "path0": str(FIXTURES),
        "spec": "show_main",
        "is_sys_main": True,
        "amp_is_ampcompat_amp": True,
    }


@pytest.mark.parametrize("exit_arg, status, stderr", [  # a subprocess each: one by default, all under --full
    ("3", 3, ""),
    pytest.param("none", 0, "", marks=pytest.mark.slow),
    pytest.param("bad input file", 1, "bad input file\n", marks=pytest.mark.slow),
])
def test_exit_status_is_the_scripts(exit_arg, status, stderr):
    result = ampcompat_cli("run", "show_main.py", "--exit", exit_arg)
    assert (result.returncode, own_stderr(result.stderr)) == (status, stderr)
    assert shown(result.stdout)["name"] == "__main__"  # the script did run


@pytest.mark.parametrize("target", [["raise_error.py"], pytest.param(["-m", "raise_error"], marks=pytest.mark.slow)])
def test_uncaught_exception_prints_the_scripts_traceback_and_exits_1(target):
    result = ampcompat_cli("run", *target)
    assert result.returncode == 1
    lines = own_stderr(result.stderr).splitlines()
    script = str(FIXTURES / "raise_error.py")
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1] == f'  File "{script}", line 12, in <module>'  # starts at the script: no runner frames
    assert f'  File "{script}", line 5, in inner' in lines
    assert lines[-1] == "ValueError: boom from the script"


def test_missing_script_and_module():
    result = ampcompat_cli("run", "no_such_script.py")
    assert result.returncode == 2
    assert own_stderr(result.stderr) == (
        f"python -m ampcompat run: can't open file {str(FIXTURES / 'no_such_script.py')!r}: "
        "[Errno 2] No such file or directory\n")
    result = ampcompat_cli("run", "-m", "no_such_module")
    assert (result.returncode, own_stderr(result.stderr)) == (
        1, "python -m ampcompat run: No module named no_such_module\n")


def test_folder_zip_or_package_without_main_gets_one_line_as_from_python(tmp_path):
    """``python DIR`` says "can't find '__main__' module in 'DIR'" and exits 1: no runpy traceback."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    with zipfile.ZipFile(tmp_path / "app.zip", "w") as archive:
        archive.writestr("helper.py", "")
    for target, message in [
        (["pkg"], "can't find '__main__' module in 'pkg'"),
        (["app.zip"], "can't find '__main__' module in 'app.zip'"),
        (["-m", "pkg"], "No module named pkg.__main__; 'pkg' is a package and cannot be directly executed"),
    ]:
        result = ampcompat_cli("run", *target, cwd=tmp_path)
        assert (result.returncode, own_stderr(result.stderr)) == (1, f"python -m ampcompat run: {message}\n")
        python = subprocess.run([sys.executable, *target], cwd=tmp_path, capture_output=True, text=True)
        assert python.returncode == 1 and message.split(" in '")[0] in python.stderr  # (python shows the full path)


def test_a_script_whose_own_import_fails_still_gets_its_traceback(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "__main__.py").write_text("import no_such_dependency\n")
    result = ampcompat_cli("run", "pkg", cwd=tmp_path)
    lines = own_stderr(result.stderr).splitlines()
    assert result.returncode == 1
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ModuleNotFoundError: No module named 'no_such_dependency'"


# --- child processes --------------------------------------------------------------------------------

def test_spawn_worker_imports_apex():
    out = succeeded(ampcompat_cli("run", "spawn_child.py"))
    assert "worker saw: [True, 'ampcompat.amp.scaler'] exit code: 0" in out


def test_child_processes_see_apex_installed_before_importing_it():
    seen = json.loads(succeeded(ampcompat_cli("run", "apex_metadata_child.py")))
    expected = {"version": "0.1", "name": "apex", "packages_distributions": ["apex"], "apex_distributions": 1,
                "find_spec": True, "file": str(REPO / "ampcompat" / "__init__.py"), "path": [],
                "version_attribute": "0.1"}
    for where in ("main", "spawn", "subprocess"):
        assert {k: v for k, v in seen[where].items() if k != "torch_imported_by_lookups"} == expected, where
    # Metadata lookups in a child cost no ampcompat (torch) import: only ``import apex`` does.
    assert not seen["spawn"]["torch_imported_by_lookups"] and not seen["subprocess"]["torch_imported_by_lookups"]


def test_plain_child_interpreter_gets_the_alias_and_the_users_sitecustomize():
    result = ampcompat_cli("run", str(FIXTURES / "subprocess_child.py"), cwd=REPO,
                           path_entries=(FIXTURES / "user_sitecustomize",))
    seen = json.loads(succeeded(result))
    assert seen["uses_apex"] == {
        "alias": True,
        "user_sitecustomize_ran": True,  # the sitecustomize ampcompat's start-up hook shadows still runs
        "sitecustomize": str(FIXTURES / "user_sitecustomize" / "sitecustomize.py"),
    }
    # A child that cannot import ampcompat by itself uses the parent's.
    assert seen["not_installed"] == {"alias": True, "ampcompat": str(REPO / "ampcompat" / "__init__.py")}
    # A child that never imports apex does not pay for ampcompat or torch.
    assert seen["idle"] == {"ampcompat_imported": False, "torch_imported": False}


@pytest.mark.slow  # torchrun and two workers: the alias reaching child interpreters is tested by default above
def test_torchrun_workers_import_apex():
    port = str(free_port())
    out = succeeded(ampcompat_cli("run", "-m", "torch.distributed.run", "--nproc_per_node=2",
                                  f"--master_port={port}", "torchrun_worker.py"))
    for rank in (0, 1):
        assert f"rank {rank}/2: apex alias ok, all_reduce ok" in out


# --- unchanged legacy Apex scripts ------------------------------------------------------------------

@pytest.mark.slow  # two training subprocesses; CI runs the README main job itself
def test_legacy_training_script_matches_the_same_script_on_ampcompat(tmp_path):
    """Twin run: via the alias (``from apex import amp``) and directly (``from ampcompat import amp``)."""
    through_alias = json.loads(succeeded(ampcompat_cli("run", "apex_style_train.py", str(tmp_path / "a.pt"))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("AMPCOMPAT_APEX_ALIAS", None)
    direct = subprocess.run([sys.executable, "apex_style_train.py", str(tmp_path / "b.pt"), "--import-from",
                             "ampcompat"], cwd=FIXTURES, env=env, capture_output=True, text=True, timeout=300)
    assert through_alias == json.loads(succeeded(direct))
    # The script's write to the private scaler field reached the one shared state: 4 clean steps at 2**10.
    assert through_alias["amp_state"] == {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 4}}
    assert through_alias["loss_scale_seen_through_amp_state"] == 1024.0
    assert through_alias["model_dtype"] == "torch.float16"  # O2 really cast the model


@pytest.mark.slow  # torchrun and two workers: the alias reaching child interpreters is tested by default above
def test_torchrun_legacy_apex_ddp_script():
    port = str(free_port())
    out = succeeded(ampcompat_cli("run", "-m", "torch.distributed.run", "--nproc_per_node=2",
                                  f"--master_port={port}", "torchrun_apex_ddp.py"))
    for rank in (0, 1):
        assert f"rank {rank}/2: apex DDP + amp O1 replicas identical" in out
