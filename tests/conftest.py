"""Shared fixtures: a clean amp state around every test, and the `cuda` marker's skip."""
import pytest
import torch

torch.set_num_threads(1)  # the tests use tiny tensors: threading only adds overhead


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
