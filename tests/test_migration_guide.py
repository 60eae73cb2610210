"""``migration_guide.md``: every public Apex name is there with the catalogue's status, the statuses are
true of ampcompat, and the code the guide tells users to run works."""
import importlib
import re
import textwrap
from pathlib import Path

import pytest
import torch

import ampcompat
from ampcompat._not_provided import ApexModuleNotProvided
from ampcompat.tools.migrate import catalogue

from apex_module_paths import APEX_PUBLIC_NAMES

GUIDE_PATH = Path(__file__).resolve().parents[1] / "migration_guide.md"
GUIDE = GUIDE_PATH.read_text(encoding="utf-8")
CHECKED_BLOCK = re.compile(r"<!-- checked by tests/test_migration_guide.py -->\s*```python\n(.*?)```", re.S)


def table_rows():
    """``name -> (status, native, note)`` for every row of the guide's status tables."""
    rows = {}
    for line in GUIDE.splitlines():
        match = re.match(r"\| `([^`]+)`(?: \(attribute amp adds\))? \| ([^|]+) \| ", line)
        if match and match.group(2).strip() in {v.value for v in catalogue.Verdict}:
            rows[match.group(1)] = match.group(2).strip()
    return rows


@pytest.mark.parametrize("name", APEX_PUBLIC_NAMES)
def test_every_public_apex_name_has_a_status_row(name):
    rows = table_rows()
    assert name in rows, f"{name} is missing from migration_guide.md"
    assert name in catalogue.ENTRIES
    assert rows[name] == catalogue.ENTRIES[name].verdict.value


def test_status_tables_are_the_catalogue():
    start = GUIDE.index("<!-- status tables: generated from ampcompat/tools/migrate/catalogue.py")
    start = GUIDE.index("\n\n", start) + 2
    end = GUIDE.index("<!-- end of status tables -->")
    assert GUIDE[start:end] == catalogue.markdown_tables() + "\n"
    assert set(table_rows()) == set(catalogue.ENTRIES)


def test_guide_sections_and_links():
    headings = re.findall(r"^#{2,3} (.+)$", GUIDE, re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    for anchor in re.findall(r"\]\(#([^)]+)\)", GUIDE):
        assert anchor in slugs, anchor
    for section in ("Behaviour that differs from Apex", "Checkpoints: Apex's `amp.state_dict()` and `GradScaler`",
                    "From O1 to native, step by step", "From O2 or O3 to native, step by step", "Limitations"):
        assert section in headings
    limitations = GUIDE[GUIDE.index("## Limitations"):]
    assert limitations.splitlines()[2] == "None known beyond the items below."
    assert "TODO" not in GUIDE.replace("TODO(ampcompat)", "")


def _ampcompat_object(apex_name):
    """The ampcompat object standing in for ``apex_name`` (raises AttributeError if there is none)."""
    parts = apex_name.split(".")
    for length in range(len(parts), 0, -1):
        module_name = catalogue.ampcompat_module(".".join(parts[:length]))
        try:
            value = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for attribute in parts[length:]:
            value = getattr(value, attribute)
        return value
    raise AttributeError(apex_name)


def _entries_backed_by_ampcompat():
    for name, entry in catalogue.ENTRIES.items():
        if name.startswith(("optimizer.", "apex.amp.init()")) or catalogue.ampcompat_module(name) is None:
            continue
        yield pytest.param(name, entry, id=name)


@pytest.mark.parametrize("name, entry", list(_entries_backed_by_ampcompat()))
def test_statuses_are_true_of_ampcompat(name, entry):
    top = catalogue.ampcompat_module(".".join(name.split(".")[:2]) if name.startswith("apex.") else name.split(".")[0])
    try:
        importlib.import_module(top)
    except ApexModuleNotProvided:  # a module ampcompat refuses, with advice: its entries must say so
        assert entry.verdict is catalogue.Verdict.UNSUPPORTED
        return
    if entry.verdict is catalogue.Verdict.UNSUPPORTED:
        try:
            stand_in = _ampcompat_object(name)
        except (AttributeError, ImportError):  # absent, or a refused module (ApexModuleNotProvided)
            return
        with pytest.raises(NotImplementedError):
            stand_in()
    else:
        assert _ampcompat_object(name) is not None


def test_private_optimizer_attributes_exist_after_initialize():
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ampcompat.amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    for attribute in catalogue.PRIVATE_ATTRIBUTES:
        assert hasattr(optimizer, attribute), attribute


def _guide_code():
    blocks = CHECKED_BLOCK.findall(GUIDE)
    assert len(blocks) == 3
    namespace = {"torch": torch, "amp": ampcompat.amp}
    for block in blocks:
        exec(compile(textwrap.dedent(block), str(GUIDE_PATH), "exec"), namespace)
    return namespace


def test_checkpoint_conversion_code_round_trips_with_grad_scaler():
    code = _guide_code()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2000)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    for grad in (float("inf"), 1.0, 1.0):  # one skipped step (scale halves), then two clean ones
        param.grad = torch.full((2,), grad)
        scaler.step(optimizer) if scaler.scale(torch.ones(())) is not None else None
        scaler.update()
    state = scaler.state_dict()
    assert (state["scale"], state["_growth_tracker"]) == (2.0**15, 2)
    amp_state = code["grad_scaler_to_apex_amp_state"](state, num_losses=2)
    assert amp_state == {"loss_scaler0": {"loss_scale": 32768.0, "unskipped": 2},
                         "loss_scaler1": {"loss_scale": 32768.0, "unskipped": 2}}
    assert amp_state == dict(ampcompat.grad_scaler_to_amp_state(state, num_losses=2))
    back = code["apex_amp_state_to_grad_scaler"](amp_state)
    assert back == state == ampcompat.amp_state_to_grad_scaler(amp_state)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(back)
    assert restored.get_scale() == 2.0**15 and restored.state_dict() == state


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_o2_checkpoint_export_gives_the_masters_to_a_native_model():
    """The guide's O2 -> native recipe: the native model gets the FP32 masters bit for bit."""
    code = _guide_code()
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = ampcompat.amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(3)]
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        with ampcompat.amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        optimizer.step()
    masters = [p.detach().clone() for p in ampcompat.amp.master_params(optimizer)]
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    ampcompat.reset()

    fresh = _model()
    exported = code["export_o2_checkpoint"](fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2), checkpoint)
    ampcompat.reset()

    native_model = _model()
    native_optimizer = torch.optim.AdamW(native_model.parameters(), lr=1e-2)
    code["load_exported"](native_model, native_optimizer, exported)
    for param, master in zip(native_model.parameters(), masters):
        assert param.dtype == torch.float32
        torch.testing.assert_close(param.detach(), master, rtol=0, atol=0)
    assert torch.equal(native_model[1].running_mean, checkpoint["model"]["1.running_mean"].float())
    for key, value in native_optimizer.state_dict()["state"].items():
        torch.testing.assert_close(value["exp_avg"], exported["optimizer"]["state"][key]["exp_avg"], rtol=0, atol=0)
    loss = torch.nn.functional.cross_entropy(native_model(data[0][0]), data[0][1])
    loss.backward()
    native_optimizer.step()  # the native run carries on from the checkpoint
