"""QLoRA: ``fastpref train --load-in-4bit`` (and ``--load-in-8bit``) loads the model's decoder-layer
projections quantized by bitsandbytes (which runs its 4- and 8-bit layers on the CPU), prepares
it with PEFT for k-bit training and trains LoRA adapters; the LM head stays unquantized and frozen
(the fused head's frozen path, no weight gradient); the memory report counts the quantized bytes.
In the TRL drop-in, a quantized model passed by the user steps as in TRL."""
import math

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fastpref.train.default_assets import default_model, default_tokenizer  # noqa: E402
from fastpref.train.loop import TrainConfig, Trainer  # noqa: E402
from fastpref.train.monitor import read_metrics  # noqa: E402
from tiers import first_fast  # noqa: E402
from test_trainer import config  # noqa: E402


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The embedded tiny Llama, saved as a model folder (a quantized model is loaded, not built)."""
    folder = tmp_path_factory.mktemp("model")
    tokenizer = default_tokenizer()
    default_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("bits", first_fast([4, 8]))
def test_a_quantized_model_trains_lora_adapters_with_a_frozen_head(tmp_path, small_data, model_folder, bits):
    options = {f"load_in_{bits}bit": True}
    trainer = Trainer(config(tmp_path, small_data, model=model_folder, lora_r=4, max_steps=2, eval_fraction=0.0,
                             **options))
    base = trainer.policy.get_base_model()
    layer = type(base.model.layers[0].self_attn.q_proj.base_layer).__name__
    assert layer == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    head = base.lm_head.weight
    assert type(base.lm_head) is torch.nn.Linear and head.dtype == torch.float32 and not head.requires_grad
    trainable = {name for name, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    parameters = next(line for line in trainer.memory_lines if "memory: parameters" in line)
    assert "quantized weights" in parameters
    assert "4-bit (nf4) model (QLoRA)" in trainer._header() if bits == 4 else "8-bit model" in trainer._header()

    result = trainer.run()
    steps = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    # the adapter starts at 0: the policy is its reference (the adapter disabled), rewards exactly 0;
    # but bitsandbytes' 8-bit layer computes otherwise in train mode (the policy) than in eval mode
    # (the reference pass): 0.004 apart on this model's logits
    assert steps[0]["rewards/margins"] == 0.0 if bits == 4 else abs(steps[0]["rewards/margins"]) < 0.05
    assert head.grad is None
    assert (tmp_path / "run" / "final-adapter" / "adapter_config.json").is_file()


def test_the_memory_report_counts_4bit_weights(tmp_path, small_data, model_folder):
    """The quantized projections take half a byte per weight, a float32 scale per block of 64 (a
    sixteenth of a byte more) and the 16 float32 values of the data type's code per matrix: about
    an eighth of their float32 bytes."""
    from fastpref.train.memory import stored_bytes

    full = Trainer(config(tmp_path / "full", small_data, model=model_folder, lora_r=4))
    quantized = Trainer(config(tmp_path / "4bit", small_data, model=model_folder, lora_r=4, load_in_4bit=True))
    projections = [module for name, module in full.policy.get_base_model().named_modules()
                   if name.endswith("proj.base_layer")]
    weights = sum(m.weight.numel() for m in projections)
    packed = [p for p in quantized.policy.parameters() if type(p).__name__ == "Params4bit"]
    assert sum(p.numel() for p in packed) * 2 == weights  # two 4-bit values per byte
    assert stored_bytes(packed) == weights // 2 + weights // 64 * 4 + 16 * 4 * len(packed)
    saved = stored_bytes(full.policy.parameters()) - stored_bytes(quantized.policy.parameters())
    assert saved == weights * 4 - stored_bytes(packed)


@pytest.mark.parametrize("options, match", [
    (dict(load_in_4bit=True, load_in_8bit=True, lora_r=4), "exclusive"),
    (dict(load_in_4bit=True), "give lora_r > 0"),
    (dict(load_in_8bit=True, lora_r=4, model=None), "give --model"),
    (dict(load_in_4bit=True, lora_r=4, parallel="fsdp"), "use --parallel ddp"),
])
def test_quantization_options_are_checked(tmp_path, model_folder, options, match):
    options = {"model": model_folder, **options}
    with pytest.raises(ValueError, match=match):
        TrainConfig(output_dir=str(tmp_path), **options).resolved()


def test_a_missing_bitsandbytes_is_named(tmp_path, model_folder, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'fastpref\[qlora\]'"):
        TrainConfig(output_dir=str(tmp_path), model=model_folder, lora_r=4, load_in_4bit=True).resolved()


def test_drop_in_steps_a_users_quantized_model_as_trl(tmp_path, model_folder):
    """A 4-bit model passed to FastprefDPOTrainer with a LoRA peft_config: the same loss and adapter
    gradients as trl.DPOTrainer on the same model and batch."""
    import trl
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fastpref.integrations.trl import FastprefDPOTrainer
    from test_trl_integration import PAIRS, _assert_same_step, _config, _first_batch, _lora, _seeded, _step
    from datasets import Dataset

    def build(cls):
        model = AutoModelForCausalLM.from_pretrained(model_folder, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32)
        assert model.is_loaded_in_4bit
        trainer = _seeded(lambda: cls(model=model, args=_config(tmp_path), train_dataset=Dataset.from_dict(PAIRS),
                                      processing_class=default_tokenizer(), peft_config=_lora()), 3)
        with torch.no_grad():  # LoRA B starts at 0: a trained adapter, so that every gradient is non-zero
            for name, param in sorted(trainer.model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
        return trainer

    trl_trainer, trainer = build(trl.DPOTrainer), build(FastprefDPOTrainer)
    assert trainer.uses_fused_loss
    batch = _first_batch(trainer)
    assert torch.equal(batch["input_ids"], _first_batch(trl_trainer)["input_ids"])
    _assert_same_step(_step(trl_trainer, batch), _step(trainer, batch))


@pytest.mark.gpu
def test_qlora_on_a_gpu_in_bfloat16(tmp_path, small_data, model_folder):
    """On a GPU the 4-bit layers compute in bfloat16 (bitsandbytes' CUDA kernels) and the frozen head
    in float32 (PEFT's k-bit preparation): two steps, finite, the head without a gradient."""
    trainer = Trainer(config(tmp_path, small_data, model=model_folder, lora_r=4, load_in_4bit=True, max_steps=2,
                             eval_fraction=0.0, device="cuda", dtype="bfloat16"))
    base = trainer.policy.get_base_model()
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.device.type == "cuda"
    assert base.lm_head.weight.dtype == torch.float32
    steps = [r for r in read_metrics(trainer.run().metrics_path) if r["split"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert base.lm_head.weight.grad is None
