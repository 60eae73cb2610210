"""Apex-era libraries on the CPU: Hugging Face ``transformers`` (model outputs, availability check, the
``Trainer``'s Apex backend) and PyTorch Lightning 1.x's Apex plugin, each as it drives ``apex.amp``.

``transformers`` (and ``accelerate`` for the Trainer) and ``pytorch_lightning`` 1.x are optional test
dependencies (``pip install -e ".[test,integrations]"``); without them these tests skip. The GPU runs of the
same libraries are ``examples/integrations/run_all.sh``. The README's full-suite command
(``python -m pytest -q --full``) runs every test here.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ampcompat import amp

from _skips import NEEDS_INTEGRATIONS_EXTRA

transformers = pytest.importorskip("transformers", reason=NEEDS_INTEGRATIONS_EXTRA)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "integrations"
# Tests that run a library's own training loop in a fresh interpreter (several seconds each) are left
# to --full; the in-process tests below run whenever the extra is installed.
RUNS_THE_LIBRARY = pytest.mark.slow


def tiny_bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 100, (8, 12), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids[:, 0] % 2}


def train(model, optimizer, steps, use_amp):
    """Steps as the Trainer takes them: ``outputs.loss`` backward (through ``amp.scale_loss`` under amp)."""
    losses, logits = [], []
    for _ in range(steps):
        outputs = model(**batch())
        loss = outputs.loss
        logits.append(outputs["logits"])
        assert outputs[0] is loss and outputs.to_tuple()[1] is outputs.logits
        if use_amp:
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, logits


@pytest.mark.parametrize("opt_level", ["O2", "O3"])
def test_tiny_bert_trains_under_o2_and_o3_like_its_fp32_twin(opt_level):
    reference = tiny_bert()
    ref_losses, _ = train(reference, torch.optim.SGD(reference.parameters(), lr=0.5), 5, use_amp=False)

    model = tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = amp.initialize(model, optimizer, opt_level=opt_level, loss_scale=128.0, verbosity=0)
    losses, logits = train(model, optimizer, 5, use_amp=True)

    assert next(model.parameters()).dtype == torch.float16
    assert [out.dtype for out in logits] == [torch.float32] * 5  # outputs cast back, ModelOutput kept
    assert ref_losses[-1] < ref_losses[0] and losses[-1] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 0.02, (losses, ref_losses)


def test_model_output_type_survives_the_forward_hooks():
    model = tiny_bert()
    model = amp.initialize(model, opt_level="O2", verbosity=0)
    outputs = model(**batch())
    assert type(outputs) is transformers.modeling_outputs.SequenceClassifierOutput
    assert list(outputs.keys()) == ["loss", "logits"] and outputs.loss.dtype == torch.float32


def _clean_env(**extra):
    env = {key: value for key, value in os.environ.items() if key != "AMPCOMPAT_APEX_ALIAS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@RUNS_THE_LIBRARY
def test_transformers_sees_apex_only_under_the_alias():
    code = ("import sys\n"
            "if sys.argv[1] == 'alias':\n"
            "    from ampcompat.tools.alias import install_apex_alias; install_apex_alias()\n"
            "from transformers.utils import is_apex_available\n"
            "print(is_apex_available())")
    seen = {mode: subprocess.run([sys.executable, "-c", code, mode], env=_clean_env(), capture_output=True,
                                 text=True, timeout=300).stdout.strip() for mode in ("alias", "plain")}
    assert seen == {"alias": "True", "plain": "False"}


def run_example(script, *args):
    result = subprocess.run([sys.executable, "-m", "ampcompat", "run", str(EXAMPLES / script), *args],
                            env=_clean_env(CUDA_VISIBLE_DEVICES=""), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


@RUNS_THE_LIBRARY
@pytest.mark.parametrize("opt_level, optim", [("O1", "adamw_apex_fused"), ("O2", "adamw_torch")])
def test_trainer_apex_backend_runs_unchanged(opt_level, optim, tmp_path):
    pytest.importorskip("accelerate", reason=NEEDS_INTEGRATIONS_EXTRA)
    if not hasattr(transformers.TrainingArguments, "use_cpu"):
        pytest.skip("this transformers refuses fp16 on the CPU: needs transformers >= 4.34 "
                    "(the integrations extra pins 4.45.2)")
    out = run_example("hf_trainer.py", "--opt-level", opt_level, "--optim", optim, "--output-dir", str(tmp_path))
    assert "transformers.utils.is_apex_available(): True; importlib.metadata.version('apex'): 0.1" in out
    assert "Trainer.use_apex: True" in out
    assert f"apex in use: amp opt_level {opt_level}" in out
    if optim == "adamw_apex_fused":
        assert "optimizer ampcompat.optimizers.fused_adam.FusedAdam" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1", "2", "3", "4", "5"]
    assert out.rstrip().endswith("RESULT PASS")


@RUNS_THE_LIBRARY
@pytest.mark.parametrize("opt_level, flag", [("O1", "--opt-level"), ("O2", "--amp-level")])  # --amp-level: old name
def test_lightning_1x_apex_plugin_runs_unchanged(opt_level, flag):
    pl = pytest.importorskip("pytorch_lightning", reason=NEEDS_INTEGRATIONS_EXTRA)
    if not pl.__version__.startswith("1."):
        pytest.skip("Lightning 2 dropped the Apex plugin: needs pytorch_lightning 1.x "
                    "(the integrations extra pins 1.9.5)")
    out = run_example("lightning_apex.py", flag, opt_level)
    assert f"apex in use: ApexMixedPrecisionPlugin, amp opt_level {opt_level}" in out
    assert out.rstrip().endswith("RESULT PASS")
