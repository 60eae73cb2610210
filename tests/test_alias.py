"""The opt-in ``apex`` import alias (``ampcompat.tools.alias``).

Covers: ``apex.*`` names are the ampcompat module objects themselves (state shared, ``amp._amp_state``
the object while ``apex.amp._amp_state`` imports the module); lazy loading; normal import errors for
what ampcompat lacks; nothing named ``apex`` without the alias; coexistence with a real NVIDIA Apex
(stub packages under ``fixtures/alias``); Apex-era pickles and ``torch.load`` checkpoints; uninstall.

The alias changes process-wide import state, so every check runs in a fresh interpreter.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _skips import NEEDS_INTEGRATIONS_EXTRA

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "alias"


def python(code: str, *path_entries: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``path_entries`` (then the repository) on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "AMPCOMPAT_APEX_ALIAS"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path_entries), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def check(code: str, *path_entries: Path) -> str:
    """Run ``code`` (assertions inside) and return its stdout; fail with its output if it failed."""
    result = python(code, *path_entries)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_apex_amp_names_are_the_ampcompat_modules_themselves():
    check("""
        import sys
        import ampcompat
        import ampcompat.amp.process_state
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        from apex import amp
        assert amp is ampcompat.amp
        import apex.amp
        assert apex.amp is ampcompat.amp and sys.modules["apex.amp"] is ampcompat.amp

        # Import path -> the module; attribute -> the AmpState object (as in Apex).
        from apex.amp._amp_state import _amp_state, maybe_print, warn_or_err, master_params
        state_module = sys.modules["ampcompat.amp._amp_state"]
        assert sys.modules["apex.amp._amp_state"] is state_module
        assert _amp_state is ampcompat.amp._amp_state is ampcompat.amp.process_state._amp_state
        assert (maybe_print, warn_or_err, master_params) == (
            state_module.maybe_print, state_module.warn_or_err, state_module.master_params)
        import apex.amp._amp_state
        assert type(apex.amp._amp_state).__name__ == "AmpState", type(apex.amp._amp_state)
        assert apex.amp._amp_state is _amp_state

        import apex.amp.scaler, apex.amp.handle, apex.amp.frontend
        for name in ("scaler", "handle", "frontend"):
            assert sys.modules["apex.amp." + name] is sys.modules["ampcompat.amp." + name], name
        assert apex.amp.scaler.LossScaler is ampcompat.amp.scaler.LossScaler
        from apex.amp import scale_loss, initialize
        assert (scale_loss, initialize) == (ampcompat.amp.scale_loss, ampcompat.amp.initialize)

        # One state, whichever name writes it.
        apex.amp._amp_state.verbosity = 0
        assert ampcompat.amp.process_state._amp_state.verbosity == 0

        # ampcompat's modules keep their own identity.
        assert ampcompat.amp.__name__ == "ampcompat.amp"
        assert ampcompat.amp.__spec__.name == "ampcompat.amp"
        assert state_module.__spec__.name == "ampcompat.amp._amp_state"
    """)


def test_legacy_surfaces_and_their_submodules_resolve_to_ampcompat():
    check("""
        import importlib, pkgutil, sys
        import ampcompat
        from ampcompat.tools.alias import APEX_SUBPACKAGES, install_apex_alias

        install_apex_alias()
        from ampcompat._not_provided import NOT_PROVIDED  # these refuse at import (tests/test_contrib.py)
        for package in APEX_SUBPACKAGES:
            if "apex." + package in NOT_PROVIDED:
                continue
            target = importlib.import_module("ampcompat." + package)
            assert importlib.import_module("apex." + package) is target, package
            for info in pkgutil.iter_modules(getattr(target, "__path__", [])):
                name = package + "." + info.name
                if "apex." + name in NOT_PROVIDED:
                    continue
                assert importlib.import_module("apex." + name) is importlib.import_module("ampcompat." + name)

        # The paths legacy code names, explicitly.
        import apex.fp16_utils.fp16_optimizer, apex.fp16_utils.loss_scaler
        import apex.parallel.LARC, apex.parallel.distributed, apex.parallel.sync_batchnorm
        assert apex.fp16_utils.loss_scaler is sys.modules["ampcompat.fp16_utils.loss_scaler"]
        assert apex.parallel.LARC is sys.modules["ampcompat.parallel.LARC"]
        from apex.parallel import DistributedDataParallel, convert_syncbn_model
        from apex.parallel.LARC import LARC
        assert DistributedDataParallel is ampcompat.parallel.DistributedDataParallel
        assert LARC is ampcompat.parallel.LARC.LARC
        from apex.fp16_utils import FP16_Optimizer
        assert FP16_Optimizer is ampcompat.fp16_utils.FP16_Optimizer
        from apex.multi_tensor_apply import multi_tensor_applier
        assert multi_tensor_applier is ampcompat.multi_tensor_apply.multi_tensor_applier
    """)


def test_amp_C_resolves_to_ampcompat():
    check("""
        import sys
        import ampcompat.amp_C
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        import amp_C
        assert amp_C is ampcompat.amp_C and sys.modules["amp_C"] is ampcompat.amp_C
    """)


def test_names_ampcompat_does_not_provide_fail_as_usual():
    check("""
        import ampcompat
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        import apex
        for name in ("apex.scaler", "apex.amp.not_a_module", "apex.contrib.not_a_module"):
            try:
                __import__(name)
            except ModuleNotFoundError as exc:
                assert exc.name == name and str(exc) == f"No module named {name!r}", (name, exc)
            else:
                raise AssertionError(name + " imported")
        try:
            from apex import not_a_module
        except ImportError as exc:
            assert str(exc).startswith("cannot import name 'not_a_module' from 'apex'"), exc
        else:
            raise AssertionError("from apex import not_a_module worked")
        assert getattr(apex, "not_a_module", None) is None
        assert hasattr(apex, "amp") and "amp" in dir(apex)
    """)


def test_ampcompat_never_creates_apex_without_the_alias():
    check("""
        import importlib, pkgutil, sys
        import ampcompat

        from ampcompat._not_provided import ApexModuleNotProvided

        for info in pkgutil.walk_packages(ampcompat.__path__, "ampcompat."):
            if not info.name.startswith("ampcompat.tools._bootstrap"):  # start-up hook, not a library module
                try:
                    importlib.import_module(info.name)
                except ApexModuleNotProvided:  # a stub that refuses (apex.transformer, ...)
                    pass
                except ModuleNotFoundError as exc:  # the fused O2 kernels need Triton, an optional dependency
                    if exc.name != "triton":
                        raise
        leaked = [n for n in sys.modules if n == "apex" or n.startswith("apex.") or n == "amp_C"]
        assert not leaked, leaked
        assert not [f for f in sys.meta_path if getattr(f, "_ampcompat_alias", False)], sys.meta_path
        try:
            import apex
        except ModuleNotFoundError as exc:
            assert exc.name == "apex"
        else:
            raise AssertionError("import apex worked without the alias")
    """)


def test_alias_imports_legacy_surfaces_only_on_first_use():
    check("""
        import sys
        import ampcompat
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        assert "apex" not in sys.modules
        import apex
        assert "ampcompat.fp16_utils" not in sys.modules and "apex.fp16_utils" not in sys.modules
        assert apex.fp16_utils is sys.modules["ampcompat.fp16_utils"]  # attribute access imports it
        assert "ampcompat.parallel" not in sys.modules
    """)


def test_uninstall_removes_every_trace_and_reinstall_works():
    check("""
        import sys
        import ampcompat
        from ampcompat.tools.alias import install_apex_alias, uninstall_apex_alias

        install_apex_alias()
        install_apex_alias()  # idempotent
        assert sum(getattr(f, "_ampcompat_alias", False) for f in sys.meta_path) == 1
        import apex.amp.scaler, apex.fp16_utils
        uninstall_apex_alias()
        assert not [n for n in sys.modules if n == "apex" or n.startswith("apex.")]
        assert not [f for f in sys.meta_path if getattr(f, "_ampcompat_alias", False)]
        assert type(ampcompat.amp._amp_state).__name__ == "AmpState"
        try:
            import apex
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("apex still importable")
        install_apex_alias()
        from apex import amp
        assert amp is ampcompat.amp
    """)


# --- a real NVIDIA Apex installed next to ampcompat ------------------------------------------------

@pytest.mark.parametrize("imported_before_install", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_real_apex_keeps_its_modules_and_gets_the_removed_ones(imported_before_install):
    check(f"""
        import sys
        import ampcompat
        from ampcompat.tools.alias import install_apex_alias

        if {imported_before_install}:
            import apex
            try:
                from apex import amp
            except ImportError:
                pass  # the stub lacks amp, like Apex 25.07+
            else:
                raise AssertionError("the stub apex has amp")
        install_apex_alias()
        import apex
        assert apex.__file__ == {str(FIXTURES / "real_apex" / "apex" / "__init__.py")!r}, apex.__file__
        assert type(apex.__loader__).__name__ == "SourceFileLoader", apex.__loader__
        assert apex.__spec__.loader is apex.__loader__
        assert apex.optimizers.MARKER == "real apex.optimizers"
        assert apex.normalization.MARKER == "real apex.normalization"
        from apex.optimizers import MARKER
        assert MARKER == "real apex.optimizers"

        assert apex.amp is ampcompat.amp  # supplied on attribute access
        from apex import amp, fp16_utils
        assert amp is ampcompat.amp and fp16_utils is ampcompat.fp16_utils
        from apex.amp._amp_state import _amp_state
        assert _amp_state is ampcompat.amp._amp_state
        import apex.parallel.LARC
        assert apex.parallel.LARC is sys.modules["ampcompat.parallel.LARC"]
        assert getattr(apex, "not_a_module", None) is None
    """, FIXTURES / "real_apex")


def test_uninstall_takes_back_what_was_given_to_a_real_apex():
    check("""
        import sys
        from ampcompat.tools.alias import install_apex_alias, uninstall_apex_alias

        install_apex_alias()
        import apex
        from apex import amp
        uninstall_apex_alias()
        assert sys.modules["apex"] is apex and "apex.optimizers" in sys.modules
        assert "apex.amp" not in sys.modules and "amp" not in vars(apex) and "__getattr__" not in vars(apex)
        try:
            from apex import amp
        except ImportError:
            pass
        else:
            raise AssertionError("apex.amp survived uninstall")
    """, FIXTURES / "real_apex")


def test_real_amp_C_extension_wins():
    check("""
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        import amp_C
        assert amp_C.MARKER == "real amp_C"
    """, FIXTURES / "real_amp_C")


def test_real_apex_that_still_has_amp_keeps_it():
    check("""
        import ampcompat
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        from apex import amp, fp16_utils
        assert amp.MARKER == "real apex.amp"
        assert fp16_utils is ampcompat.fp16_utils
    """, FIXTURES / "old_apex")


def test_unrelated_package_named_apex_is_not_taken_for_nvidia_apex():
    check("""
        import ampcompat
        try:
            import apex
        except ModuleNotFoundError as exc:
            assert exc.name == "cryptacular_stand_in_that_is_not_installed"
        else:
            raise AssertionError("the unrelated stub imported")
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        from apex import amp
        assert amp is ampcompat.amp
    """, FIXTURES / "unrelated_apex")


# --- apex as an installed distribution (package metadata) --------------------------------------------

def test_apex_is_an_installed_distribution_while_the_alias_is_and_only_then():
    check("""
        import importlib.metadata as metadata, importlib.util, os, sys
        from ampcompat.tools.alias import install_apex_alias, uninstall_apex_alias

        def assert_absent():
            try:
                metadata.version("apex")
            except metadata.PackageNotFoundError:
                pass
            else:
                raise AssertionError("apex metadata without the alias")
            assert importlib.util.find_spec("apex") is None
            assert "apex" not in metadata.packages_distributions()
            assert not [d for d in metadata.distributions() if d.metadata["Name"] == "apex"]

        assert_absent()
        install_apex_alias()
        assert "apex" not in sys.modules  # the lookups below import nothing
        assert metadata.version("apex") == "0.1"
        assert metadata.version("Apex") == "0.1"
        distribution = metadata.distribution("apex")
        assert (distribution.metadata["Name"], distribution.version) == ("apex", "0.1")
        assert distribution.files is None and distribution.requires is None
        assert metadata.packages_distributions()["apex"] == ["apex"]
        assert metadata.packages_distributions()["amp_C"] == ["apex"]
        assert len([d for d in metadata.distributions() if d.metadata["Name"] == "apex"]) == 1
        assert not list(metadata.distributions(path=[os.getcwd()], name="apex"))  # a search of chosen dirs
        assert "apex" not in sys.modules

        spec = importlib.util.find_spec("apex")
        assert spec is not None and spec.origin.endswith(os.path.join("ampcompat", "__init__.py"))
        import apex, ampcompat
        assert apex.__file__ == ampcompat.__file__ and os.path.isfile(apex.__file__)
        assert apex.__path__ == [] and apex.__version__ == "0.1"
        assert spec.origin == apex.__spec__.origin

        uninstall_apex_alias()
        assert_absent()
    """)


def test_lightning_utilities_requirement_cache_sees_apex():
    pytest.importorskip("lightning_utilities", reason=NEEDS_INTEGRATIONS_EXTRA)
    check("""
        from lightning_utilities.core.imports import RequirementCache
        from ampcompat.tools.alias import install_apex_alias

        assert not RequirementCache("apex")
        install_apex_alias()
        cache = RequirementCache("apex>=0.1")  # a versioned requirement: metadata alone decides
        assert cache, str(cache)
        assert str(RequirementCache("apex")) == "Requirement 'apex' met"
        assert not RequirementCache("apex>=1.0")
    """)


def test_a_real_apex_distribution_is_never_shadowed():
    out = check("""
        import importlib.metadata as metadata
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        assert [d.version for d in metadata.distributions() if d.metadata["Name"] == "apex"] == ["25.7"]
        import apex
        print(metadata.version("apex"), apex.__file__, apex.optimizers.MARKER)
    """, FIXTURES / "installed_apex", FIXTURES / "real_apex")
    assert out.split() == ["25.7", str(FIXTURES / "real_apex" / "apex" / "__init__.py"), "real", "apex.optimizers"]


def _needs_pkg_resources():
    if python("import pkg_resources").returncode != 0:
        pytest.skip("needs pkg_resources, which setuptools >= 81 dropped: pip install 'setuptools<81' "
                    "(the integrations extra pins it)")


@pytest.mark.parametrize("imported_before_install", [True, False])
def test_pkg_resources_sees_apex_while_the_alias_is_active(imported_before_install):
    _needs_pkg_resources()
    check(f"""
        import warnings
        warnings.simplefilter("ignore")  # pkg_resources warns that it is deprecated
        from ampcompat.tools.alias import install_apex_alias, uninstall_apex_alias

        if {imported_before_install}:
            import pkg_resources
        install_apex_alias()
        import pkg_resources
        assert pkg_resources.get_distribution("apex").version == "0.1"
        assert [d.project_name for d in pkg_resources.require("apex>=0.1")] == ["apex"]
        uninstall_apex_alias()
        try:
            pkg_resources.get_distribution("apex")
        except pkg_resources.DistributionNotFound:
            pass
        else:
            raise AssertionError("apex still known to pkg_resources")
    """)


def test_pkg_resources_in_a_child_process_sees_apex_before_any_import():
    _needs_pkg_resources()
    env = {key: value for key, value in os.environ.items() if key != "AMPCOMPAT_APEX_ALIAS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    from ampcompat.tools.alias import enable_alias_in_child_processes

    enable_alias_in_child_processes(env)
    code = ("import sys, warnings; warnings.simplefilter('ignore'); import pkg_resources; "
            "print(pkg_resources.get_distribution('apex').version, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.1", "False"]


# --- pickles and checkpoints written by Apex-era code -----------------------------------------------

@pytest.fixture(scope="module")
def apex_era_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("apex_era")
    result = subprocess.run([sys.executable, str(FIXTURES / "write_apex_era_pickles.py"), str(out)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out


def test_apex_era_pickles_name_apex_classes(apex_era_files):
    # Without the alias they cannot load: the files really name apex.* classes.
    check(f"""
        import pickle
        for name in ("amp_scaler_protocol2.pkl", "amp_scaler_protocol4.pkl", "fp16_utils_scalers.pkl"):
            try:
                pickle.load(open({str(apex_era_files)!r} + "/" + name, "rb"))
            except ModuleNotFoundError as exc:
                assert exc.name == "apex", exc
            else:
                raise AssertionError(name + " loaded without the alias")
    """)


def test_pickled_apex_amp_loss_scaler_loads_and_keeps_counting(apex_era_files):
    check(f"""
        import pickle
        import ampcompat.amp.scaler
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        for protocol in (2, 4):
            with open({str(apex_era_files)!r} + f"/amp_scaler_protocol{{protocol}}.pkl", "rb") as f:
                scaler = pickle.load(f)
            assert type(scaler) is ampcompat.amp.scaler.LossScaler
            assert (scaler.loss_scale(), scaler._unskipped, scaler.dynamic) == (1024.0, 7, True)
            assert scaler.update_scale() is False and scaler._unskipped == 8  # a clean pass continues the count
    """)


def test_pickled_fp16_utils_loss_scalers_load(apex_era_files):
    check(f"""
        import pickle
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        with open({str(apex_era_files / "fp16_utils_scalers.pkl")!r}, "rb") as f:
            scalers = pickle.load(f)
        import ampcompat.fp16_utils.loss_scaler as legacy
        static, dynamic = scalers["static"], scalers["dynamic"]
        assert type(static) is legacy.LossScaler and static.loss_scale == 128.0
        assert type(dynamic) is legacy.DynamicLossScaler and dynamic.loss_scale == 2.0 ** 20
        dynamic.update_scale(False)
        assert dynamic.cur_iter == 6
    """)


def test_fp16_optimizer_checkpoint_loads_with_torch_load(apex_era_files):
    check(f"""
        import torch
        import ampcompat.amp.scaler
        from ampcompat.tools.alias import install_apex_alias

        install_apex_alias()
        checkpoint = torch.load({str(apex_era_files / "fp16_optimizer_checkpoint.pt")!r}, weights_only=False)
        assert type(checkpoint["loss_scaler"]) is ampcompat.amp.scaler.LossScaler
        assert checkpoint["loss_scaler"].loss_scale() == 1024.0
        assert torch.equal(checkpoint["fp32_from_fp16"][0][0], torch.arange(6.0).reshape(2, 3))
        assert checkpoint["dynamic_loss_scale"] is True
    """)


def test_star_import_of_apex_binds_apexs_all_less_what_ampcompat_refuses():
    out = check("""
        import ampcompat
        ampcompat.install_apex_alias()
        namespace = {}
        exec("from apex import *", namespace)
        import apex
        from ampcompat.tools.alias import APEX_STAR_EXPORTS
        bound = sorted(name for name in namespace if not name.startswith("__"))
        assert bound == sorted(apex.__all__), bound
        assert set(APEX_STAR_EXPORTS) - set(bound) == {"transformer"}  # refused: left out, the rest still binds
        assert namespace["amp"] is ampcompat.amp and namespace["parallel"] is ampcompat.parallel
        print(" ".join(bound))
    """)
    assert out.split() == sorted(["amp", "fp16_utils", "optimizers", "normalization", "parallel"])
