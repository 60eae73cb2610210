"""``migrate``'s verdicts agree with what running the code under the ``apex`` alias does.

Every catalogued name (including every submodule path Apex had) is imported under the alias in a
fresh interpreter; a "not supported" placeholder is also called. Then Apex-era snippets are both
run under the alias and scanned by ``migrate``: a snippet runs exactly when no use in it is reported
"not supported". Nothing here hard-codes what ampcompat provides -- when ampcompat gains a module or
a keyword argument, the run and the verdict change together.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ampcompat.tools.migrate import catalogue
from ampcompat.tools.migrate.catalogue import Verdict
from ampcompat.tools.migrate.scanner import scan
from ampcompat.tools.migrate.sources import load_source

REPO = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib, json, sys, traceback
import torch
import ampcompat
ampcompat.install_apex_alias()

def attribute_path(name):
    # Read `name` as Python reads `from a.b import c`: import the longest module prefix, then attributes.
    parts = name.split(".")
    for length in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:length]))
        except ModuleNotFoundError as exc:
            if exc.name and ".".join(parts[:length]).startswith(exc.name):
                continue
            raise
        for part in parts[length:]:
            value = getattr(value, part)
        return value
    raise ModuleNotFoundError(name)

request = json.load(sys.stdin)
out = {"names": {}, "snippets": {}}
for name, kind in request["names"]:
    try:
        value = importlib.import_module(name) if kind == "module" else attribute_path(name)
        if name in request["call"]:
            value()
        out["names"][name] = "ok"
    except Exception as exc:
        out["names"][name] = f"{type(exc).__name__}: {exc}"
for key, code in request["snippets"].items():
    try:
        exec(compile(code, key, "exec"), {})
        out["snippets"][key] = "ok"
    except Exception as exc:
        out["snippets"][key] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""

SNIPPETS = {
    "bert_fused_layer_norm_path": """
        import torch
        from apex.normalization.fused_layer_norm import FusedLayerNorm
        FusedLayerNorm(8)(torch.randn(2, 8))
    """,
    "fused_adam_max_grad_norm": """
        import torch
        from apex.optimizers import FusedAdam
        FusedAdam(torch.nn.Linear(2, 2).parameters(), lr=1e-3, bias_correction=False, max_grad_norm=1.0)
    """,
    "fused_adam_unknown_keyword": """
        import torch
        from apex.optimizers import FusedAdam
        FusedAdam(torch.nn.Linear(2, 2).parameters(), lr=1e-3, no_such_option_in_any_apex=1)
    """,
    "fused_adam_eps_inside_sqrt": """
        import torch
        from apex.optimizers import FusedAdam
        FusedAdam(torch.nn.Linear(2, 2).parameters(), lr=1e-3, eps_inside_sqrt=True)
    """,
    "fused_sgd_too_many_positional": """
        import torch
        from apex.optimizers import FusedSGD
        FusedSGD(torch.nn.Linear(2, 2).parameters(), 0.1, 0.9, 0, 0, False, False, True, False, "extra")
    """,
    "parallel_distributed_module": """
        import apex.parallel.distributed
        apex.parallel.distributed.flat_dist_call
    """,
    "amp_handle_module": """
        import apex.amp.handle
        apex.amp.handle.scale_loss
    """,
    "amp_state_by_import_path": """
        from apex.amp._amp_state import _amp_state
        _amp_state.verbosity
    """,
    "amp_state_loss_scalers_attribute": """
        from apex import amp
        getattr(amp._amp_state, "loss_scalers", None)
    """,
    "amp_C_placeholder": """
        import amp_C
        amp_C.multi_tensor_lars(2048, None, [[]])
    """,
    "mixed_precision_lamb": """
        import torch
        from apex.optimizers import FusedMixedPrecisionLamb
        FusedMixedPrecisionLamb(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    """,
    "fused_adam_2019_keyword_with_todays": """
        import torch
        from apex.optimizers import FusedAdam
        FusedAdam(torch.nn.Linear(2, 2).parameters(), lr=1e-3, max_grad_norm=1.0, adam_w_mode=False)
    """,
    "contrib_xentropy": """
        from apex.contrib.xentropy import SoftmaxCrossEntropyLoss
    """,
    "contrib_optimizers_2019": """
        import torch
        from apex.contrib.optimizers import FP16_Optimizer, FusedAdam
        model = torch.nn.Linear(2, 2)
        FP16_Optimizer(FusedAdam(model.parameters(), lr=1e-3), dynamic_loss_scale=True)
    """,
    "optimizers_fp16_optimizer_2019": """
        import torch
        from apex.optimizers import FusedAdam, FP16_Optimizer
        model = torch.nn.Linear(2, 2)
        FP16_Optimizer(FusedAdam(model.parameters(), lr=1e-3, bias_correction=False, max_grad_norm=1.0),
                       dynamic_loss_scale=True)
    """,
    "contrib_refused_submodule": """
        from apex.contrib.sparsity import ASP
    """,
    "contrib_refused_from_parent": """
        from apex.contrib import multihead_attn
    """,
    "transformer_refused": """
        from apex.transformer import parallel_state
        parallel_state.get_tensor_model_parallel_world_size()
    """,
    "contrib_missing_name": """
        from apex.contrib.xentropy import NoSuchLoss
    """,
    "mlp_and_fused_dense": """
        import torch
        from apex.mlp import MLP
        from apex.fused_dense import FusedDense
        MLP([4, 8, 2])(torch.randn(3, 4))
        FusedDense(4, 2)
    """,
    "apex_C_from_import": """
        import torch
        from apex_C import flatten, unflatten
        unflatten(flatten([torch.ones(2), torch.zeros(3)]), [torch.ones(2), torch.zeros(3)])
    """,
    "apex_C_flatten": """
        import torch
        import apex_C
        apex_C.flatten([torch.ones(2)])
    """,
    "fp16_optimizer_static_scale": """
        import torch
        from apex.fp16_utils import FP16_Optimizer
        FP16_Optimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), static_loss_scale=128.0,
                       verbose=False)
    """,
    "initialize_bad_level": """
        import torch
        from apex import amp
        model = torch.nn.Linear(2, 2)
        amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O7", verbosity=0)
    """,
    "multi_tensor_apply_submodule": """
        from apex.multi_tensor_apply.multi_tensor_apply import MultiTensorApply
    """,
    "larc_module_and_class": """
        import torch
        from apex.parallel.LARC import LARC
        LARC(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), trust_coefficient=0.02)
    """,
}


def _derivable(name):
    return not name.startswith("optimizer.") and "()" not in name


def _module_semantics(entry):
    return entry.name if entry.kind == "module" else None


@pytest.fixture(scope="module")
def probe():
    """Import every catalogued name and run every snippet under the alias, in one fresh interpreter."""
    entries = [entry for entry in catalogue.ENTRIES.values() if _derivable(entry.name)]
    placeholders = [entry.name for entry in entries if entry.kind in ("function", "class")
                    and catalogue.verdict_of(entry) is Verdict.UNSUPPORTED]
    request = {"names": [(entry.name, entry.kind) for entry in entries], "call": placeholders,
               "snippets": {key: textwrap.dedent(code) for key, code in SNIPPETS.items()}}
    env = {k: v for k, v in os.environ.items() if k != "AMPCOMPAT_APEX_ALIAS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps(request), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _snippet_verdicts(tmp_path, key):
    path = tmp_path / f"{key}.py"
    path.write_text(textwrap.dedent(SNIPPETS[key]))
    return [use for use in scan(load_source(str(path))).uses]


@pytest.mark.parametrize("name", [name for name in catalogue.ENTRIES if _derivable(name)])
def test_catalogue_verdict_matches_running_it_under_the_alias(probe, name):
    entry = catalogue.ENTRIES[name]
    verdict = catalogue.verdict_of(entry)
    outcome = probe["names"][name]
    if verdict is Verdict.UNSUPPORTED:
        assert outcome != "ok", f"{name} is reported not supported, but it imports (and runs) under the alias"
    else:
        assert outcome == "ok", f"{name} is reported {verdict.value}, but under the alias: {outcome}"
    # The table's claim agrees with ampcompat too (stale data is caught here, not by users).
    assert (entry.verdict is Verdict.UNSUPPORTED) == (verdict is Verdict.UNSUPPORTED), name


@pytest.mark.parametrize("key", sorted(SNIPPETS))
def test_snippet_runs_exactly_when_no_use_is_reported_unsupported(probe, tmp_path, key):
    uses = _snippet_verdicts(tmp_path, key)
    assert uses, "every snippet uses Apex"
    unsupported = [f"{u.line}: {u.api}: {u.reason}" for u in uses if u.verdict is Verdict.UNSUPPORTED]
    ran = probe["snippets"][key]
    assert (ran == "ok") == (not unsupported), f"ran: {ran}; reported not supported: {unsupported}"


def test_the_issue_examples(probe, tmp_path):
    """The usual 2019 BERT import is fine; a keyword FusedAdam rejects is flagged, naming it."""
    assert probe["snippets"]["bert_fused_layer_norm_path"] == "ok"
    uses = _snippet_verdicts(tmp_path, "bert_fused_layer_norm_path")
    assert {u.api for u in uses} == {"apex.normalization.FusedLayerNorm"}  # the submodule path's object
    assert all(u.verdict is Verdict.SUPPORTED for u in uses)

    assert probe["snippets"]["fused_adam_unknown_keyword"].startswith("TypeError")
    [call] = [u for u in _snippet_verdicts(tmp_path, "fused_adam_unknown_keyword") if u.kind == "call"]
    assert call.verdict is Verdict.UNSUPPORTED and "`no_such_option_in_any_apex`" in call.reason

    # The 2019 keywords are accepted: the call runs unchanged, with that era's arithmetic.
    assert probe["snippets"]["fused_adam_max_grad_norm"] == "ok"
    [call] = [u for u in _snippet_verdicts(tmp_path, "fused_adam_max_grad_norm") if u.kind == "call"]
    assert call.verdict is Verdict.SUPPORTED and "`max_grad_norm`" in call.reason and "2019" in call.reason
    # ...but not combined with today's options, which ampcompat rejects.
    assert probe["snippets"]["fused_adam_2019_keyword_with_todays"].startswith("ValueError")
    [call] = [u for u in _snippet_verdicts(tmp_path, "fused_adam_2019_keyword_with_todays") if u.kind == "call"]
    assert call.verdict is Verdict.UNSUPPORTED and "`adam_w_mode=False`" in call.reason


def test_refused_modules_report_ampcompats_own_error(probe, tmp_path):
    """A refused Apex module is "not supported" with the message importing it raises, replacement included."""
    for key in ("contrib_refused_submodule", "transformer_refused"):
        ran = probe["snippets"][key]
        assert ran.startswith("ApexModuleNotProvided: "), ran
        [use] = [u for u in _snippet_verdicts(tmp_path, key) if u.kind == "import"]
        assert use.verdict is Verdict.UNSUPPORTED
        assert ran.split(": ", 1)[1] in use.reason, (ran, use.reason)
    # `from package import refused_submodule`: the package's __getattr__ keeps the refusal's advice (a bare
    # from-import would turn it into "cannot import name"), and migrate reports the same sentence.
    ran = probe["snippets"]["contrib_refused_from_parent"]
    assert ran.startswith("ApexModuleNotProvided: apex.contrib.multihead_attn is not provided by ampcompat: "), ran
    [use] = [u for u in _snippet_verdicts(tmp_path, "contrib_refused_from_parent") if u.kind == "import"]
    assert use.verdict is Verdict.UNSUPPORTED
    assert ran.split(": ", 1)[1] in use.reason, (ran, use.reason)


def test_check_gates_on_derived_verdicts(tmp_path, capsys):
    from ampcompat.tools import migrate

    good = tmp_path / "good.py"
    good.write_text("from apex.normalization.fused_layer_norm import FusedLayerNorm\nFusedLayerNorm(8)\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom apex.optimizers import FusedAdam\nFusedAdam([], lr=1.0, bogus_knob=2)\n")
    assert migrate.main([str(good), "--check"]) == 0
    assert migrate.main([str(bad), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:3:1: apex.optimizers.FusedAdam — not supported: " in out and "`bogus_knob`" in out
