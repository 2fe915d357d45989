"""FastprefDPOTrainer built in every form trl.DPOTrainer takes, each step checked against TRL's;
identical weights give identical log-probs in the policy's and the reference's pass (rewards
exactly 0 at the first step, in bfloat16); a float16 overflow on the head reaches the gradients,
so that a GradScaler skips the step, under FastprefDPOTrainer and under TRL's trainer on
fastpref's head.

What TRL's own test suite teaches, kept here: TRL's quick start passes the model as a string.
"""
import contextlib
import copy
import inspect
import math

import pytest
import torch

import peft
import trl
from transformers import AutoModelForCausalLM

import fastpref
from fastpref.integrations.trl import FastprefDPOTrainer, use_fastpref_head
from test_trl_integration import (  # noqa: F401 (fixtures)
    _assert_same_step, _config, _first_batch, _lora, _one_thread, _seeded, _step, dataset, models, policy,
    tokenizer)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer, models):
    """Two saved models with the tokenizer beside them: "policy" and "reference"."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, model in zip(("policy", "reference"), models["llama"]):
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def test_the_signature_is_trls():
    assert inspect.signature(FastprefDPOTrainer) == inspect.signature(trl.DPOTrainer)


def _built(cls, tmp_path, dataset, tokenizer, **arguments):
    options = arguments.pop("options", {})
    return cls(args=_config(tmp_path, **options), train_dataset=dataset, **arguments)


CONSTRUCTOR_FORMS = {
    # name: (FastprefDPOTrainer's arguments, trl.DPOTrainer's), "policy"/"reference" standing for a saved model's
    # folder, "tokenizer" for the tokenizer
    "string model": ({"model": "policy", "processing_class": "tokenizer"},
                     {"model": "policy", "processing_class": "tokenizer"}),
    "string reference": ({"model": "policy", "ref_model": "reference", "processing_class": "tokenizer"},
                         {"model": "policy", "ref_model": "loaded reference", "processing_class": "tokenizer"}),
    "dtype in model_init_kwargs": ({"model": "policy", "options": {"model_init_kwargs": {"dtype": torch.float64}}},
                                   {"model": "policy", "options": {"model_init_kwargs": {"dtype": torch.float64}}}),
    "no processing class": ({"model": "policy"}, {"model": "policy"}),
    "peft config": ({"model": "policy", "peft_config": "lora"}, {"model": "policy", "peft_config": "lora"}),
}


def _resolved(arguments, model_dirs, tokenizer):
    resolved = dict(arguments)
    for key, value in arguments.items():
        if value in ("policy", "reference"):
            resolved[key] = model_dirs[value]
        elif value == "loaded reference":
            resolved[key] = AutoModelForCausalLM.from_pretrained(model_dirs["reference"])
        elif value == "tokenizer":
            resolved[key] = tokenizer
        elif value == "lora":
            resolved[key] = _lora()
    return resolved


@pytest.mark.parametrize("form", CONSTRUCTOR_FORMS)
def test_each_constructor_form_steps_as_trl(tmp_path, tokenizer, dataset, model_dirs, form):
    ours, theirs = (_resolved(arguments, model_dirs, tokenizer) for arguments in CONSTRUCTOR_FORMS[form])
    trainer = _seeded(lambda: _built(FastprefDPOTrainer, tmp_path, dataset, tokenizer, **ours), 3)
    trl_trainer = _seeded(lambda: _built(trl.DPOTrainer, tmp_path, dataset, tokenizer, **theirs), 3)
    assert trainer.uses_fused_loss
    if form == "dtype in model_init_kwargs":
        assert trainer.model.dtype == torch.float64
    if form == "string reference":
        assert isinstance(trainer.ref_model, torch.nn.Module)
        with torch.no_grad():  # the reference is the other model, not a copy of the policy
            assert not torch.equal(trainer.ref_model.lm_head.weight, trainer.model.lm_head.weight)
    batch, trl_batch = _first_batch(trainer), _first_batch(trl_trainer)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    _assert_same_step(_step(trl_trainer, trl_batch), _step(trainer, batch))


def _first_logged_step(cls, tmp_path, dataset, model_dirs, lora=False, **options):
    trainer = cls(model=model_dirs["policy"], args=trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=True, save_strategy="no", seed=0,
        per_device_train_batch_size=2, max_length=32, max_steps=1, logging_steps=1, **options),
        train_dataset=dataset, peft_config=_lora() if lora else None)
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("setting", [
    pytest.param({}, id="reference-copy"),
    pytest.param({"loss_type": ["ipo"]}, id="ipo"),
    pytest.param({"precompute_ref_log_probs": True}, id="precomputed"),
    pytest.param({"padding_free": True}, id="padding_free"),
])
def test_a_policy_equal_to_its_reference_has_rewards_exactly_zero_in_bfloat16(tmp_path, dataset, model_dirs,
                                                                                setting):
    """TRL's default mixed precision: at the first step the policy is its reference, and the two passes
    must give the same log-probs bit for bit, as TRL's do (its loss is then ln 2 exactly for sigmoid)."""
    logged = _first_logged_step(FastprefDPOTrainer, tmp_path, dataset, model_dirs, **setting)
    assert logged["rewards/chosen"] == logged["rewards/rejected"] == logged["rewards/margins"] == 0.0
    if not setting:
        expected = _first_logged_step(trl.DPOTrainer, tmp_path, dataset, model_dirs)
        assert expected["rewards/margins"] == 0.0 and logged["loss"] == expected["loss"] == pytest.approx(math.log(2))


def test_a_fresh_adapter_has_rewards_exactly_zero_in_bfloat16(tmp_path, dataset, model_dirs):
    """LoRA: the reference is the model with its adapter disabled, equal to the policy while B = 0."""
    logged = _first_logged_step(FastprefDPOTrainer, tmp_path, dataset, model_dirs, lora=True)
    assert logged["rewards/chosen"] == logged["rewards/margins"] == 0.0


def _overflowing(model):
    """A model whose final hidden states overflow float16 (65,504) on the head's input."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.norm.weight.fill_(1e5)
    return model


@pytest.mark.parametrize("trainer_kind", ["FastprefDPOTrainer", "DPOTrainer on fastpref's head"])
def test_a_float16_overflow_on_the_head_makes_the_grad_scaler_skip_the_step(tmp_path, tokenizer, dataset, policy,
                                                                            trainer_kind):
    """As in PyTorch and TRL: the overflow's inf reaches the loss and the gradients instead of an
    exception, the GradScaler skips the update and halves its scale; fastpref raises it only when
    asked (raise_pending_errors(non_finite=True))."""
    head = use_fastpref_head() if trainer_kind != "FastprefDPOTrainer" else contextlib.nullcontext()
    cls = FastprefDPOTrainer if trainer_kind == "FastprefDPOTrainer" else trl.DPOTrainer
    with head:
        trainer = cls(model=_overflowing(policy), ref_model=copy.deepcopy(policy), args=_config(tmp_path),
                      train_dataset=dataset, processing_class=tokenizer)
    batch = _first_batch(trainer)
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    trainer.model.train()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = trainer.compute_loss(trainer.model, batch)
    assert not torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(weights[name], p) for name, p in trainer.model.named_parameters())
    if trainer_kind == "FastprefDPOTrainer":
        assert trainer._metrics["train"]["non_finite_logps"][-1] > 0
    fastpref.raise_pending_errors()  # not an error: a value let through
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        trainer.compute_loss(trainer.model, batch)
    with pytest.raises(ValueError, match="non-finite log-probability"):
        fastpref.raise_pending_errors(non_finite=True)
