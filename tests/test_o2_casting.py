"""O0/O2/O3/O5 model casting, as Apex cast models, with module hooks.

Proves: Apex's dtype table for every module kind and every casting level; ``Parameter``
identity (the optimizer keeps holding the model's params); recursive input casting seen from *inside*
``forward`` (nested containers keep their types, integer tensors and custom batches handled); FP32
outputs unless ``cast_model_outputs``; FP32 ``model.state_dict()`` that loads back; and that the casts
survive ``copy.deepcopy``, ``torch.save``/``torch.load`` and ``pickle`` (Apex's instance-attribute
forward patch broke all three).
"""
import collections
import collections.abc
import copy
import dataclasses
import io
import pickle
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from ampcompat import amp

from _skips import NEEDS_INTEGRATIONS_EXTRA

HALF = torch.float16
BF16 = torch.bfloat16
FP32 = torch.float32

# (opt_level, overrides, cast dtype, affine batchnorms kept FP32)
CASTING_LEVELS = {
    "O2": ("O2", {}, HALF, True),
    "O3": ("O3", {}, HALF, False),
    "O3+keep_bn": ("O3", {"keep_batchnorm_fp32": True}, HALF, True),
    "O5": ("O5", {}, BF16, True),
    "O2+bf16": ("O2", {"cast_model_type": BF16}, BF16, True),
    "O0": ("O0", {}, FP32, True),
}
HALF_LEVELS = ["O2", "O3", "O3+keep_bn", "O5", "O2+bf16"]


class AllKinds(torch.nn.Module):
    """One of every module kind Apex's casting treats differently, plus a float and an integer buffer of its own.

    ``forward`` leaves out ``sync_bn``: SyncBatchNorm needs a process group to run in training mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.layer_norm = torch.nn.LayerNorm(4)
        self.group_norm = torch.nn.GroupNorm(2, 4)
        self.instance_norm = torch.nn.InstanceNorm1d(4, affine=True)
        self.embedding = torch.nn.Embedding(10, 4)
        self.bn_affine = torch.nn.BatchNorm1d(4)
        self.bn_plain = torch.nn.BatchNorm1d(4, affine=False)
        self.sync_bn = torch.nn.SyncBatchNorm(4)  # constructed only; never run distributed
        self.register_buffer("float_buffer", torch.linspace(0.0, 1.0, 3))
        self.register_buffer("int_buffer", torch.arange(3))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = self.linear(x) + self.embedding(idx)
        h = self.bn_plain(self.bn_affine(h))
        h = self.layer_norm(h)
        h = self.group_norm(h)
        h = self.instance_norm(h.unsqueeze(-1).expand(-1, -1, 3)).mean(-1)
        return h * self.float_buffer.sum()


def _expected_dtype(name: str, tensor: torch.Tensor, cast: torch.dtype, keep_bn_fp32: bool) -> torch.dtype:
    if not tensor.is_floating_point():
        return tensor.dtype  # num_batches_tracked, int_buffer: untouched
    if name.startswith(("bn_affine.", "sync_bn.")):
        return FP32 if keep_bn_fp32 else cast
    return cast


def _initialize(model, optimizer=None, level="O2", **extra):
    opt_level, overrides, _, _ = CASTING_LEVELS[level]
    kwargs = dict(overrides, **extra)
    if optimizer is None:
        return amp.initialize(model, opt_level=opt_level, verbosity=0, **kwargs)
    return amp.initialize(model, optimizer, opt_level=opt_level, verbosity=0, **kwargs)


# --- the dtype table: which parameters and buffers each level casts -----------------------------------

@pytest.mark.parametrize("level", list(CASTING_LEVELS))
def test_dtype_table_for_every_module_kind(level, device):
    _, _, cast, keep_bn_fp32 = CASTING_LEVELS[level]
    torch.manual_seed(0)
    model = AllKinds().to(device)
    integer_before = {n: t.clone() for n, t in model.named_buffers() if not t.is_floating_point()}

    _initialize(model, level=level)

    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    # Spot-check the rows Apex's table spells out, so the table below cannot silently be empty.
    for name in ("linear.weight", "layer_norm.weight", "group_norm.weight", "instance_norm.weight",
                 "embedding.weight", "bn_affine.weight", "bn_affine.running_mean", "bn_plain.running_var",
                 "sync_bn.weight", "sync_bn.running_var", "float_buffer", "bn_affine.num_batches_tracked",
                 "int_buffer"):
        assert name in tensors
    for name, tensor in tensors.items():
        assert tensor.dtype == _expected_dtype(name, tensor, cast, keep_bn_fp32), name
        assert tensor.device.type == device, name
    for name, before in integer_before.items():
        assert torch.equal(tensors[name], before), name


@pytest.mark.parametrize("level", ["O2", "O3", "O5"])
def test_parameter_identity_is_kept_and_optimizer_holds_the_models_params(level, device):
    torch.manual_seed(0)
    model = AllKinds().to(device)
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model_out, optimizer_out = _initialize(model, optimizer, level=level)

    assert model_out is model and optimizer_out is optimizer
    params_after = list(model.parameters())
    assert len(params_after) == len(params_before)
    assert all(a is b for a, b in zip(params_after, params_before))
    assert all(isinstance(p, torch.nn.Parameter) for p in params_after)
    # Before lazy init (no scale_loss yet) the optimizer still holds exactly the model's objects.
    group_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(group_params, params_before))
    assert all(a is b for a, b in zip(amp.master_params(optimizer), params_before))


# --- casting seen from inside forward -----------------------------------------------------------------

Pair = collections.namedtuple("Pair", ["value", "index"])


class CustomBatch:
    """A user batch object with ``.to`` (like PackedSequence or a dataloader's batch class)."""

    def __init__(self, tensor: torch.Tensor, casts=None) -> None:
        self.tensor = tensor
        self.casts = [] if casts is None else casts

    def to(self, dtype):
        self.casts.append(dtype)
        return CustomBatch(self.tensor.to(dtype), self.casts)


class Probe(torch.nn.Module):
    """Records what ``forward`` receives; returns half outputs of several shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.seen = []

    def forward(self, x, nested=None, *, kw=None):
        self.seen.append({"x": x, "nested": nested, "kw": kw})
        h = self.linear(x)
        return {"out": h, "pair": Pair(h * 2, torch.arange(3, device=h.device)), "list": [h.sum()]}


def _nested_inputs(device):
    t = torch.randn(2, 4, device=device)
    ints = torch.arange(4, device=device)
    return {
        "list": [t, ints],
        "tuple": (t, 3, "text"),
        "pair": Pair(t, ints),
        "ordered": collections.OrderedDict([("b", t), ("a", ints)]),
        "custom": CustomBatch(t),
    }


@pytest.mark.parametrize("level", HALF_LEVELS)
def test_inputs_arrive_cast_with_container_types_kept(level, device):
    _, _, cast, _ = CASTING_LEVELS[level]
    torch.manual_seed(0)
    model = Probe().to(device)
    _initialize(model, level=level)
    x = torch.randn(2, 4, device=device)
    nested = _nested_inputs(device)

    model(x, nested, kw={"scale": torch.ones(1, device=device), "steps": torch.tensor([1, 2], device=device)})

    seen = model.seen[-1]
    assert seen["x"].dtype == cast
    got = seen["nested"]
    assert type(got) is dict
    assert type(got["list"]) is list and got["list"][0].dtype == cast
    assert got["list"][1].dtype == torch.int64 and torch.equal(got["list"][1], nested["list"][1])
    assert type(got["tuple"]) is tuple and got["tuple"][0].dtype == cast and got["tuple"][1:] == (3, "text")
    assert type(got["pair"]) is Pair and got["pair"].value.dtype == cast and got["pair"].index.dtype == torch.int64
    assert type(got["ordered"]) is collections.OrderedDict and list(got["ordered"]) == ["b", "a"]
    assert got["ordered"]["b"].dtype == cast and got["ordered"]["a"].dtype == torch.int64
    assert isinstance(got["custom"], CustomBatch) and got["custom"].tensor.dtype == cast
    assert nested["custom"].casts == [cast]
    assert seen["kw"]["scale"].dtype == cast and seen["kw"]["steps"].dtype == torch.int64
    # The caller's own tensors are not modified in place.
    assert x.dtype == FP32 and nested["list"][0].dtype == FP32


@pytest.mark.parametrize("level", HALF_LEVELS)
def test_outputs_are_fp32_with_their_structure_kept(level, device):
    torch.manual_seed(0)
    model = Probe().to(device)
    _initialize(model, level=level)

    out = model(torch.randn(2, 4, device=device))

    assert type(out) is dict
    assert out["out"].dtype == FP32
    assert type(out["pair"]) is Pair and out["pair"].value.dtype == FP32
    assert out["pair"].index.dtype == torch.int64
    assert type(out["list"]) is list and out["list"][0].dtype == FP32
    # FP32 outputs are the half computation up-cast, not a FP32 recomputation.
    expected = F.linear(model.seen[-1]["x"], model.linear.weight, model.linear.bias).float()
    assert torch.equal(out["out"], expected)


@pytest.mark.parametrize("level", ["O2", "O5"])
def test_cast_model_outputs_keeps_outputs_in_the_requested_dtype(level, device):
    _, _, cast, _ = CASTING_LEVELS[level]
    torch.manual_seed(0)
    model = Probe().to(device)
    _initialize(model, level=level, cast_model_outputs=cast)

    out = model(torch.randn(2, 4, device=device))

    assert out["out"].dtype == cast and out["pair"].value.dtype == cast
    assert out["pair"].index.dtype == torch.int64


def test_o0_casts_a_half_input_to_fp32(device):
    torch.manual_seed(0)
    model = Probe().to(device)
    _initialize(model, level="O0")

    out = model(torch.randn(2, 4, device=device).half())

    assert model.seen[-1]["x"].dtype == FP32
    assert out["out"].dtype == FP32 and model.linear.weight.dtype == FP32


@pytest.mark.parametrize("level", ["O2", "O3", "O5"])
def test_all_kinds_model_runs_forward_and_backward(level, device):
    """The cast model (half layers next to FP32 batchnorms) computes, and its grads match param dtypes."""
    _, _, cast, _ = CASTING_LEVELS[level]
    torch.manual_seed(0)
    model = AllKinds().to(device)
    _initialize(model, level=level)

    out = model(torch.randn(6, 4, device=device), torch.arange(6, device=device))
    out.float().pow(2).mean().backward()

    assert out.dtype == FP32 and torch.isfinite(out).all()
    for name, p in model.named_parameters():
        if not name.startswith("sync_bn."):
            assert p.grad is not None and p.grad.dtype == p.dtype, name
    assert model.bn_affine.running_mean.dtype == (FP32 if level != "O3" else cast)
    assert model.bn_affine.num_batches_tracked.item() == 1


# --- FP32 state_dict ----------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["O2", "O3", "O5"])
def test_state_dict_is_fp32_and_loads_back(level, device):
    _, _, cast, _ = CASTING_LEVELS[level]
    torch.manual_seed(0)
    model = AllKinds().to(device)
    _initialize(model, level=level)
    live = dict(model.named_parameters())
    live.update(model.named_buffers())

    state = model.state_dict()

    assert set(state) == set(live)
    for name, value in state.items():
        if live[name].is_floating_point():
            assert value.dtype == FP32, name
            assert torch.equal(value, live[name].float()), name
        else:
            assert value.dtype == live[name].dtype, name

    # Load a perturbed FP32 copy: values arrive (rounded to the live dtype) and dtypes stay as cast.
    perturbed = {k: (v + 0.5 if v.is_floating_point() else v + 1) for k, v in state.items()}
    model.load_state_dict(perturbed)
    for name, tensor in live.items():
        expected_dtype = _expected_dtype(name, tensor, cast, level != "O3")
        assert tensor.dtype == expected_dtype, name
        assert torch.equal(tensor, perturbed[name].to(expected_dtype)), name
    assert all(a is b for a, b in zip(model.parameters(), live.values()))


# --- copies and pickles keep the casts (module hooks, not a patched forward) --------------------------

def _o2_probe(device):
    torch.manual_seed(0)
    model = Probe().to(device)
    _initialize(model, level="O2")
    return model


def _assert_casts(model, x):
    out = model(x)
    assert model.seen[-1]["x"].dtype == HALF
    assert out["out"].dtype == FP32
    return out["out"]


def test_deepcopy_runs_its_own_weights_and_keeps_casting(device):
    model = _o2_probe(device)
    x = torch.randn(3, 4, device=device)
    original_out = _assert_casts(model, x)

    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.linear.weight.mul_(-2.0)
        clone.linear.bias.add_(1.0)

    clone_out = _assert_casts(clone, x)
    assert clone.linear.weight.dtype == HALF
    assert not torch.equal(clone_out, original_out)
    assert torch.equal(clone_out, F.linear(x.half(), clone.linear.weight, clone.linear.bias).float())
    # The original is unaffected and still computes with its own weights.
    assert torch.equal(_assert_casts(model, x), original_out)
    assert clone.state_dict()["linear.weight"].dtype == FP32


def test_torch_save_and_load_of_the_whole_model_keeps_casting(device):
    model = _o2_probe(device)
    x = torch.randn(3, 4, device=device)
    expected = _assert_casts(model, x)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    assert loaded.linear.weight.dtype == HALF
    assert torch.equal(_assert_casts(loaded, x), expected)
    assert loaded.state_dict()["linear.weight"].dtype == FP32


def test_pickle_of_the_model_keeps_casting(device):
    model = _o2_probe(device)
    x = torch.randn(3, 4, device=device)
    expected = _assert_casts(model, x)

    restored = pickle.loads(pickle.dumps(model))

    assert torch.equal(_assert_casts(restored, x), expected)


# --- every container a model takes or returns: rebuilt, never mutated ---------------------------------

class NoUpdateDict(dict):
    """A dict subclass that forbids the in-place bulk operations (as ``ModelOutput`` does)."""

    def update(self, *args, **kwargs):
        raise RuntimeError(f"You cannot use ``update`` on a {type(self).__name__} instance.")

    def setdefault(self, *args, **kwargs):
        raise RuntimeError(f"You cannot use ``setdefault`` on a {type(self).__name__} instance.")


@dataclasses.dataclass
class FakeModelOutput(collections.OrderedDict):
    """A hand-written ``transformers.ModelOutput``: dataclass fields mirrored as the non-None mapping items,
    index access by position, and every in-place mapping operation forbidden."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                collections.OrderedDict.__setitem__(self, field.name, value)

    def _forbidden(self, *args, **kwargs):
        raise Exception(f"You cannot use this method on a {type(self).__name__} instance.")

    update = setdefault = pop = __delitem__ = _forbidden

    def __getitem__(self, key):
        if isinstance(key, str):
            return collections.OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def to_tuple(self):
        return tuple(self[name] for name in self.keys())


@dataclasses.dataclass(frozen=True)
class Frozen:
    value: torch.Tensor
    steps: torch.Tensor
    note: str = "kept"


class Returns(torch.nn.Module):
    """Returns whatever ``make(h)`` builds from its half activation ``h``."""

    def __init__(self, make) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.make = make
        self.seen = None

    def forward(self, x, extra=None):
        self.seen = extra
        return self.make(self.linear(x))


def _run(make, device, level="O2", extra=None):
    torch.manual_seed(0)
    model = Returns(make).to(device)
    _initialize(model, level=level)
    return model(torch.randn(2, 4, device=device), extra), model


def test_dict_subclass_that_forbids_update_keeps_its_type(device):
    originals = []

    def make(h):
        originals.append(NoUpdateDict(a=h, b=torch.arange(2, device=h.device)))
        return originals[-1]

    out, _ = _run(make, device)

    assert type(out) is NoUpdateDict and list(out) == ["a", "b"]
    assert out["a"].dtype == FP32 and out["b"].dtype == torch.int64
    assert originals[0]["a"].dtype == HALF  # rebuilt, never mutated


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_model_output_style_container_keeps_attribute_index_and_tuple_access(level, device):
    def make(h):
        return FakeModelOutput(loss=h.sum(), logits=h, hidden_states=(h, h * 2))

    out, _ = _run(make, device, level)

    assert type(out) is FakeModelOutput and list(out) == ["loss", "logits", "hidden_states"]
    assert out.loss.dtype == FP32 and out["logits"].dtype == FP32 and out[0] is out.loss
    assert type(out.hidden_states) is tuple and [t.dtype for t in out.hidden_states] == [FP32, FP32]
    assert out.to_tuple()[1] is out.logits and out["hidden_states"] is out.hidden_states
    out.loss.backward()  # the cast is part of the graph


def test_model_output_style_container_without_optional_fields(device):
    out, _ = _run(lambda h: FakeModelOutput(logits=h), device)

    assert type(out) is FakeModelOutput and list(out) == ["logits"] and out.loss is None
    assert out[0].dtype == FP32


def test_dataclasses_namedtuples_and_nested_mixtures(device):
    def make(h):
        ints = torch.arange(2, device=h.device)
        return [Frozen(h, ints), {"pairs": (Pair(h, ints),), "set": frozenset({"tag"})},
                collections.defaultdict(list, {"x": [h]})]

    out, _ = _run(make, device)

    frozen, mapping, default = out
    assert type(out) is list and type(frozen) is Frozen and frozen.note == "kept"
    assert frozen.value.dtype == FP32 and frozen.steps.dtype == torch.int64
    assert type(mapping["pairs"]) is tuple and type(mapping["pairs"][0]) is Pair
    assert mapping["pairs"][0].value.dtype == FP32 and mapping["set"] == frozenset({"tag"})
    assert type(default) is collections.defaultdict and default.default_factory is list
    assert default["x"][0].dtype == FP32


def test_inputs_in_model_output_style_containers_are_cast(device):
    x = torch.randn(2, 4, device=device)
    _, model = _run(lambda h: h, device, extra=FakeModelOutput(logits=x, hidden_states=(x,)))

    seen = model.seen
    assert type(seen) is FakeModelOutput and seen.logits.dtype == HALF and seen.hidden_states[0].dtype == HALF


class OddMapping(collections.abc.Mapping):
    """A read-only mapping whose constructor takes no items and which has no ``copy``."""

    def __init__(self, source_name):
        self._data = {"t": torch.ones(2, dtype=HALF)}

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


class OddTuple(tuple):
    def __new__(cls, first, second):
        return super().__new__(cls, (first, second))


@dataclasses.dataclass
class InitOnlyFailure:
    value: torch.Tensor

    def __post_init__(self):
        if self.value.dtype != HALF:
            raise ValueError("this type only accepts half tensors")


def test_containers_that_cannot_be_rebuilt_fall_back_to_apex_behaviour():
    from ampcompat.amp.model_casting import cast_tree

    half = torch.ones(2, dtype=HALF)
    mapping = cast_tree(OddMapping("x"), FP32)
    assert type(mapping) is dict and mapping["t"].dtype == FP32  # Apex returned a plain dict
    odd = cast_tree(OddTuple(half, 1), FP32)
    assert type(odd) is tuple and odd[0].dtype == FP32 and odd[1] == 1
    original = InitOnlyFailure(half)
    assert cast_tree(original, FP32) is original  # Apex passed unknown objects through


def test_transformers_model_output_when_installed():
    transformers = pytest.importorskip("transformers", reason=NEEDS_INTEGRATIONS_EXTRA)
    from ampcompat.amp.model_casting import cast_tree

    half = torch.randn(2, 3, dtype=HALF)
    output = transformers.modeling_outputs.SequenceClassifierOutput(loss=half.sum(), logits=half)
    out = cast_tree(output, FP32)
    assert type(out) is type(output) and list(out.keys()) == ["loss", "logits"]
    assert out.loss.dtype == FP32 and out["logits"].dtype == FP32 and out[0] is out.loss
    assert out.to_tuple()[1] is out.logits and output.logits.dtype == HALF
