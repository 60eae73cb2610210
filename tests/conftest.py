"""Shared fixtures: a clean amp state around every test, the `cuda` marker's skip, and `--full`.

The default run (``python -m pytest -q``) leaves out the tests marked ``slow``: long runs, runs of
whole scripts or libraries beyond one variant each, and the cases of the large matrices outside their
sample (``tests/_sampling.py``). ``--full`` runs them too; an explicit ``-m`` expression chooses by
itself (``-m slow`` runs only what the default leaves out).
"""
import pytest
import torch

from _skips import NEEDS_CUDA

torch.set_num_threads(1)  # the tests use tiny tensors: threading only adds overhead


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the whole suite: also the tests marked slow (long runs, full matrices), "
                          "which the default run leaves out")


_DEFAULT_SELECTION = "not slow"


def pytest_configure(config):
    if not config.getoption("--full") and not config.option.markexpr:
        config.option.markexpr = _DEFAULT_SELECTION


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left_out = len(terminalreporter.stats.get("deselected", []))
    if config.option.markexpr == _DEFAULT_SELECTION and not config.option.keyword and left_out:
        terminalreporter.write_line(f"{left_out} tests marked slow were left out (long runs, the rest of the "
                                    "sampled matrices): --full runs them")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NEEDS_CUDA)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def full(request) -> bool:
    """True under ``--full``: a test that walks a corpus takes a fixed sample of it by default, all of it then."""
    return bool(request.config.getoption("--full"))


@pytest.fixture(autouse=True)
def _fresh_amp_state():
    """Every test starts and ends with no amp state and autocast off on every device."""
    import ampcompat

    ampcompat.reset()
    yield
    ampcompat.reset()


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


DEVICES = [pytest.param("cpu")] + [pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
