"""``apex.contrib``: the contrib modules real code uses, on native PyTorch; the others refuse with advice."""
from typing import Any


def __getattr__(name: str) -> Any:
    # Without this, ``from apex.contrib import sparsity`` loses the refusal's advice: Python turns a failed
    # from-import of a missing submodule into a bare "cannot import name".
    from .._not_provided import NOT_PROVIDED, refuse_import

    if "apex.contrib." + name in NOT_PROVIDED:
        refuse_import(__name__ + "." + name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
