"""The memory estimate (fastpref.train.memory) and ``fastpref plan --memory``: the model's sizes
read off its config equal the built model's, each term counts what the run holds (the quantized
bytes those of bitsandbytes' tensors), sharding divides what it shards, the plan's largest
micro-batch fits the budget and the next does not. Its estimates against measured peak memory:
benchmarks/bench_memory_plan.py."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastpref.cli import main
from fastpref.train.memory import (MemorySetting, ModelShape, estimate_memory, longest_micro_batch,
                                   packed_tokens)
from fastpref.train.memory_plan import fits, parse_size, settings


def _config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_shape_read_off_the_config_is_the_built_models(tied):
    model = LlamaForCausalLM(_config(tied))
    shape = ModelShape.from_config(_config(tied))
    assert shape == ModelShape.of(model)
    assert shape.parameters == sum(p.numel() for p in model.parameters()) and shape.tied == tied
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert shape.projections == sum(m.weight.numel() for m in linears) and shape.projection_matrices == 21
    assert shape.largest_layer == sum(p.numel() for p in model.model.layers[0].parameters())


def test_a_model_naming_no_decoder_layer_class_is_still_measured():
    """Every Linear but the head is a projection, the config's layers are equal shares of the rest:
    for a Llama, the shape read through its decoder-layer classes (a layer's share of the final norm
    aside)."""
    model = LlamaForCausalLM(_config(tied=False))
    expected = ModelShape.of(model)
    model._no_split_modules = None
    shape = ModelShape.of(model)
    assert shape.largest_layer == expected.largest_layer + 64 // 3
    assert dataclasses.replace(shape, largest_layer=expected.largest_layer) == expected


def test_each_term_counts_what_the_run_holds():
    shape = ModelShape.from_config(_config(tied=False))
    tokens, scored = 300, 120
    full = estimate_memory(shape, MemorySetting(compute_bytes=2), tokens=tokens, scored_tokens=scored)
    P = shape.parameters
    assert (full.weights, full.gradients, full.optimizer_state) == (2 * P, 2 * P, 4 * P)
    assert full.activations == 3 * tokens * (11 * 64 + 4 * 160) * 2  # flash attention: no mask
    assert full.head_gradient == 1000 * 64 * 2 and full.embedding_gradient == 0  # untied
    checkpointed = estimate_memory(shape, MemorySetting(compute_bytes=2, gradient_checkpointing=True),
                                   tokens=tokens, scored_tokens=scored)
    assert checkpointed.activations == 3 * tokens * 64 * 2
    sdpa = estimate_memory(shape, MemorySetting(compute_bytes=2, attention="sdpa"), tokens=tokens, scored_tokens=scored)
    assert sdpa.activations == full.activations + tokens * tokens * 2
    lora = estimate_memory(shape, MemorySetting(adaptation="lora", lora_r=8), tokens=tokens, scored_tokens=scored)
    adapters = 8 * shape.lora_per_rank
    assert (lora.weights, lora.gradients, lora.optimizer_state) == (2 * P + 4 * adapters, 4 * adapters, 8 * adapters)
    assert lora.head_gradient == 0  # the frozen head's path computes no weight gradient
    for sharding in ("zero2", "zero3"):
        one, four = (estimate_memory(shape, MemorySetting(sharding=sharding, processes=n), tokens=tokens,
                                     scored_tokens=scored) for n in (2, 4))
        assert four.gradients * 2 == one.gradients and four.optimizer_state * 2 == one.optimizer_state
        assert (four.weights < one.weights) == (sharding == "zero3")
    assert full.peak == full.weights + full.optimizer_state + max(full.moments.values())


def test_the_4bit_estimate_is_bitsandbytes_bytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fastpref.train.memory import stored_bytes

    LlamaForCausalLM(_config(tied=False)).save_pretrained(tmp_path)
    shape = ModelShape.from_config(_config(tied=False))
    for nested in (False, True):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_use_double_quant=nested)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=quantization)
        estimate = estimate_memory(shape, MemorySetting(adaptation="qlora-4bit", nested_quantization=nested, lora_r=0),
                                   tokens=1, scored_tokens=1)
        # the unquantized weights in float32, as PEFT's k-bit preparation leaves them
        assert estimate.weights == pytest.approx(stored_bytes(model.parameters()), rel=0.01), nested


def test_sharding_needs_several_processes():
    with pytest.raises(ValueError, match="give at least 2 to shard"):
        MemorySetting(sharding="zero3", processes=1)
    with pytest.raises(ValueError, match="adaptation must be one of"):
        MemorySetting(adaptation="qlora")


@pytest.mark.parametrize("text, size", [("24GiB", 24 << 30), ("80GB", 80 * 10 ** 9), ("1.5g", 1.5e9),
                                        ("512 MiB", 512 << 20), ("2048", 2048)])
def test_sizes_are_parsed(text, size):
    assert parse_size(text) == int(size)


@pytest.mark.parametrize("text", ["", "24 GiBs", "-1GiB", "0GB", "lots"])
def test_bad_sizes_name_the_flag(text):
    with pytest.raises(ValueError, match="--memory must be a positive size"):
        parse_size(text)


def test_the_largest_fitting_micro_batch_fits_and_the_next_does_not():
    from fastpref.train.data import TokenizedPair

    shape = ModelShape.from_config(_config(tied=True))
    items = [TokenizedPair([1] * (10 + i), [2] * (5 + i % 7), [3] * (4 + i % 5), row=i) for i in range(40)]
    budget = estimate_memory(shape, MemorySetting(), tokens=longest_micro_batch(items, 8, False)[0],
                             scored_tokens=longest_micro_batch(items, 8, False)[1]).peak
    for fit in fits(shape, items, budget, settings(lora_r=4), micro_batches=(1, 2, 4, 8, 16, 32)):
        if fit.pairs is None:
            assert fit.smallest.peak > budget
            continue
        assert fit.estimate.peak <= budget
        if fit.pairs < 32:
            tokens, scored = longest_micro_batch(items, fit.pairs * 2, False)
            assert estimate_memory(shape, fit.setting, tokens=tokens, scored_tokens=scored).peak > budget
    assert packed_tokens(items[0], prefix_sharing=True) == 10 + 5 + 4


def test_plan_memory_on_the_embedded_model(capsys):
    assert main(["plan", "--memory", "0.2GiB"]) == 0
    out = capsys.readouterr().out
    assert "# Memory plan: the embedded tiny Llama on the bundled HH-RLHF sample, 0.2 GiB per GPU" in out
    assert "| full | 1 GPU (or DDP) |" in out and "| qlora-4bit | 1 GPU (or DDP) |" in out
    assert "Fewest GPUs for each (the largest micro-batch there, and how to launch it)" in out
    assert "fastpref train --lora-r 16 --pairs-per-step" in out
    assert "- qlora-4bit: quantizes a model as it is loaded: give --model" in out
    assert main(["plan", "--memory", "24 GiBs"]) == 2
    assert "--memory must be a positive size" in capsys.readouterr().err


def test_plan_refuses_model_without_memory(capsys):
    assert main(["plan", "--model", "smollm2-135m"]) == 2
    assert "--model is read by the memory plan: give --memory SIZE too" in capsys.readouterr().err


def test_plan_memory_reads_a_model_folders_config(tmp_path, capsys):
    from fastpref.train.default_assets import default_model, default_tokenizer

    tokenizer = default_tokenizer()
    default_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["plan", "--memory", "1GiB", "--model", str(tmp_path), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert f"# Memory plan: {tmp_path} on the bundled HH-RLHF sample, 1.0 GiB per GPU" in out
    assert f"`fastpref train --model {tmp_path} --lora-r 16 --load-in-4bit --pairs-per-step" in out
    assert "longest 128)" in out  # pairs of at most 64 + 64 tokens


def test_the_trainers_report_ends_with_the_estimated_peak(tmp_path, small_data):
    """Its static terms are the tensors held; the peak adds the estimate's largest moment."""
    from fastpref.train.loop import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(data=small_data, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                                  max_steps=1, progress=False).resolved())
    sizes = {line.split("memory: ")[1].split(" ")[0]: float(line.split(" MiB")[0].split(" ")[-1].replace(",", ""))
             for line in trainer.memory_lines if "MiB" in line}
    peak = next(line for line in trainer.memory_lines if "memory: peak" in line)
    assert "at the forward's end" in peak  # the embedded model's activations outweigh its gradients
    expected = sizes["parameters"] + sizes["optimizer"] + sizes["activations"] + sizes["loss"]
    assert sizes["peak"] == pytest.approx(expected + 2048 * 128 * 4 / 2 ** 20, abs=0.2)  # + the head's gradient


def test_each_sharding_is_launched_as_it_runs():
    from fastpref.train.memory_plan import Fit, launch_command

    shape = ModelShape.from_config(_config(tied=True))
    estimate = estimate_memory(shape, MemorySetting(), tokens=10, scored_tokens=5)

    def command(**setting):
        return launch_command(Fit(MemorySetting(**setting), 3, estimate, estimate), "m", "d.jsonl", 16, False)

    assert command() == "`fastpref train --model m --data d.jsonl --pairs-per-step 3`"
    assert command(sharding="zero3", processes=4, gradient_checkpointing=True) == (
        "`torchrun --nproc-per-node 4 -m fastpref.cli train --model m --data d.jsonl --pairs-per-step 12 "
        "--gradient-checkpointing --parallel fsdp`")
    assert "FastprefDPOTrainer" in command(sharding="zero2", processes=2) and "per_device_train_batch_size=3" in \
        command(sharding="zero2", processes=2)
    assert "--lora-r 16 --load-in-4bit" in command(adaptation="qlora-4bit")
