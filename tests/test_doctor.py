"""``python -m ampcompat doctor``: versions, devices with their working autocast dtypes, fused kernels, Apex."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ampcompat import __version__
from ampcompat.tools import doctor

REPO = Path(__file__).resolve().parents[1]


def run_doctor(capsys, *argv):
    assert doctor.main(list(argv)) == 0
    return capsys.readouterr().out


def autocast_produces(device_type, dtype):
    a = torch.ones(3, 3, device=device_type)
    with torch.autocast(device_type, dtype=dtype):
        return torch.mm(a, a).dtype == dtype


def test_versions_and_cpu_capabilities(capsys):
    report = json.loads(run_doctor(capsys, "--format", "json"))
    versions = (report["ampcompat"], report["torch"], report["torch_cuda"])
    assert versions == (__version__, torch.__version__, torch.version.cuda)
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    cpu = report["devices"][0]
    assert cpu["device"] == "cpu"
    assert cpu["autocast_dtypes"] == [name for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16))
                                      if autocast_produces("cpu", dtype)]
    assert cpu["autocast_dtypes"]  # torch >= 2.1 autocasts both on the CPU
    assert cpu["fused_amp_kernels"] == {"status": "ok"}
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    torch.optim.AdamW([param], fused=True).step()  # what the report claims below
    assert cpu["fused_optimizers"]["AdamW"] == {"status": "ok"}
    assert [d["device"] for d in report["devices"]] == ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def test_text_report(capsys):
    out = run_doctor(capsys)
    assert out.startswith(f"ampcompat {__version__}, Python {'.'.join(map(str, sys.version_info[:3]))}, "
                          f"torch {torch.__version__} (")
    assert "  cpu: " in out and "    autocast dtypes: " in out
    assert "    fused AMP unscale/inf-check kernel: available" in out
    if not torch.cuda.is_available():
        assert ("  cuda: no GPU found\n" in out) == bool(torch.version.cuda)


def test_a_refused_fused_optimizer_is_reported_with_its_reason(capsys, monkeypatch):
    class NoFusedAdamW(torch.optim.AdamW):
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires floating point params of\nsupported devices")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedAdamW)
    report = json.loads(run_doctor(capsys, "--format", "json"))
    assert report["devices"][0]["fused_optimizers"]["AdamW"] == {
        "status": "missing", "reason": "RuntimeError: `fused=True` requires floating point params of"}
    out = run_doctor(capsys)
    assert "    fused optimizers (fused=True): Adam, SGD, Adagrad\n" in out
    assert "      AdamW: unavailable (RuntimeError: `fused=True` requires floating point params of)\n" in out


def test_an_autocast_dtype_that_does_not_take_effect_is_not_listed(capsys, monkeypatch):
    real_autocast = torch.autocast

    def bf16_refused(device_type, dtype=None, **kwargs):
        return real_autocast(device_type, dtype=dtype, enabled=dtype != torch.bfloat16, **kwargs)

    monkeypatch.setattr(torch, "autocast", bf16_refused)
    assert json.loads(run_doctor(capsys, "--format", "json"))["devices"][0]["autocast_dtypes"] == ["float16"]


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder on sys.path where a test lays out an ``apex`` package."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_package(root, files):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_no_apex(capsys):
    out = run_doctor(capsys)
    assert out.endswith("NVIDIA Apex: not installed "
                        "(ampcompat stands in for it: `python -m ampcompat run script.py`)\n")


def test_old_apex_that_fails_on_modern_torch(capsys, fake_site):
    write_package(fake_site, {
        "apex/__init__.py": "from . import amp\n",
        "apex/amp/__init__.py": "from torch._six import string_classes\n",
        "apex/fp16_utils/__init__.py": "",
        "apex/parallel/__init__.py": "",
        "apex/optimizers/__init__.py": "",
        "amp_C.py": "",
    })
    out = run_doctor(capsys)
    apex_part = out[out.index("NVIDIA Apex: "):]
    error = "ModuleNotFoundError: No module named 'torch._six'"
    imports = json.loads(run_doctor(capsys, "--format", "json"))["apex"]["imports"]
    assert imports == {name: {"status": "fails", "reason": error}
                       for name in ("apex", "apex.amp", "apex.fp16_utils", "apex.parallel", "apex.optimizers")}
    assert apex_part == "\n".join([
        f"NVIDIA Apex: {fake_site / 'apex'}",
        f"  import apex: fails: {error}",
        f"  apex.amp: present, import fails: {error}",
        f"  apex.fp16_utils: present, import fails: {error}",
        f"  apex.parallel: present, import fails: {error}",
        f"  apex.optimizers: present, import fails: {error}",
        "  apex.normalization: missing",
        "  apex.multi_tensor_apply: missing",
        "  apex.contrib: missing",
        "  apex.transformer: missing",
        "  amp_C (compiled extension): present",
        "  apex_C (compiled extension): missing",
        "  fused_layer_norm_cuda (compiled extension): missing",
        "  syncbn (compiled extension): missing",
    ]) + "\n"


def test_current_apex_without_amp(capsys, fake_site):
    write_package(fake_site, {
        "apex/__init__.py": "from . import optimizers, normalization\n",
        "apex/optimizers/__init__.py": "FusedAdam = object\n",
        "apex/normalization/__init__.py": "",
    })
    report = json.loads(run_doctor(capsys, "--format", "json"))["apex"]
    assert report["nvidia"] is True
    assert report["imports"] == {"apex": {"status": "ok"}, "apex.optimizers": {"status": "ok"},
                                 "apex.normalization": {"status": "ok"}}
    out = run_doctor(capsys)
    assert "  import apex: works\n" in out
    assert "  apex.amp: missing (removed from Apex in 2025; ampcompat provides it)\n" in out
    assert "  apex.optimizers: imports\n" in out


def test_unrelated_package_named_apex(capsys, fake_site):
    write_package(fake_site, {"apex/__init__.py": "raise ImportError('cryptacular')\n", "apex/views.py": ""})
    out = run_doctor(capsys)
    assert out.endswith(f"apex: {fake_site / 'apex'} is not NVIDIA Apex (it has none of Apex's subpackages; "
                        "`pip install apex` installs an unrelated 2013 package of that name)\n")


def test_the_alias_does_not_count_as_apex(capsys):
    import ampcompat

    ampcompat.install_apex_alias()
    try:
        assert run_doctor(capsys).endswith("NVIDIA Apex: not installed (ampcompat stands in for it: "
                                           "`python -m ampcompat run script.py`)\n")
    finally:
        from ampcompat.tools import alias

        alias.uninstall_apex_alias()


@pytest.mark.slow  # a subprocess each: the report itself and the command's dispatch are tested in-process
@pytest.mark.parametrize("command", [["-m", "ampcompat", "doctor"], ["-m", "ampcompat.tools.doctor", "--format", "json"]])
def test_command_line(command):
    proc = subprocess.run([sys.executable, *command], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout


@pytest.mark.cuda
def test_cuda_devices_are_probed(capsys):
    report = json.loads(run_doctor(capsys, "--format", "json"))
    cuda = report["devices"][1]
    assert cuda["device"] == "cuda:0" and torch.cuda.get_device_name(0) in cuda["name"]
    assert "float16" in cuda["autocast_dtypes"]
    assert ("bfloat16" in cuda["autocast_dtypes"]) == autocast_produces("cuda", torch.bfloat16)
    assert cuda["fused_optimizers"]["AdamW"] == cuda["fused_amp_kernels"] == {"status": "ok"}
