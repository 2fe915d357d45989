"""The trainer end to end on the embedded tiny model and a slice of the bundled sample."""
import json
import math
from pathlib import Path

import pytest
import torch

from fastpref.train.checkpoint import CheckpointError, latest_checkpoint
from fastpref.train.loop import TrainConfig, Trainer, TrainingInterrupted, train
from fastpref.train.monitor import read_metrics


def config(tmp_path, data, **overrides) -> TrainConfig:
    options = dict(data=data, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                   max_length=64, max_prompt_length=32, pairs_per_step=4, max_steps=6, eval_steps=3,
                   save_steps=100, eval_fraction=0.2, learning_rate=3e-3, progress=False)
    options.update(overrides)
    return TrainConfig(**options)


def test_default_config_trains_and_writes_its_outputs(tmp_path, small_data):
    result = train(config(tmp_path, small_data))
    assert result.steps == 6 and len(result.losses) == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))
    records = read_metrics(result.metrics_path)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s"):
        assert key in train_records[0], key
    assert any(r["split"] == "eval" for r in records)
    assert records[-1]["split"] == "train-final"
    assert result.plot_path.stat().st_size > 10_000
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.model_path, local_files_only=True)
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def test_two_runs_give_identical_metrics(tmp_path, small_data):
    """The same configuration trains to bit-identical metrics on the CPU (each run with its own
    reference cache, so the reference log-probs are recomputed too)."""
    timing = {"tokens_per_s", "elapsed_s", "time", "step_time_s"}

    def run(name):
        result = train(config(tmp_path / name, small_data, cache_dir=str(tmp_path / name / "cache")))
        return [{k: v for k, v in record.items() if k not in timing} for record in read_metrics(result.metrics_path)]

    first, second = run("a"), run("b")
    assert first == second
    assert any(record["split"] == "eval" for record in first)


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix-shared"])
def test_interrupt_and_resume_equals_an_uninterrupted_run(tmp_path, small_data, prefix_sharing):
    uninterrupted = train(config(tmp_path / "a", small_data, prefix_sharing=prefix_sharing, gradient_accumulation_steps=2,
                                 max_steps=5))

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 2: checkpoint saved to .*checkpoint-2"):
        train(config(tmp_path / "b", small_data, prefix_sharing=prefix_sharing, gradient_accumulation_steps=2, max_steps=5),
              on_step=interrupt)
    resumed = train(config(tmp_path / "b", small_data, prefix_sharing=prefix_sharing, gradient_accumulation_steps=2, max_steps=5))
    assert resumed.losses == pytest.approx(uninterrupted.losses[2:], abs=1e-6)
    records = [r for r in read_metrics(resumed.metrics_path) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    losses = [r["loss"] for r in records]
    assert losses == pytest.approx(uninterrupted.losses, abs=1e-6)


def test_corrupt_or_partial_checkpoints_are_refused(tmp_path, small_data):
    train(config(tmp_path, small_data, save_steps=2, max_steps=4))
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "checkpoint-2"
    optimizer = checkpoint / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: optimizer.pt does not match its checksum"):
        train(config(tmp_path, small_data, max_steps=4, resume_from_checkpoint=str(checkpoint)))
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no manifest.json: the checkpoint is incomplete"):
        train(config(tmp_path, small_data, max_steps=4, resume_from_checkpoint=str(checkpoint)))


def test_checkpoint_of_another_run_is_refused(tmp_path, small_data):
    train(config(tmp_path, small_data, save_steps=2, max_steps=4))
    with pytest.raises(CheckpointError, match=r"belongs to a different run: beta differ"):
        train(config(tmp_path, small_data, max_steps=4, beta=0.5))


def test_cached_reference_equals_online_reference(tmp_path, small_data):
    cached = Trainer(config(tmp_path, small_data))
    assert any(Path(cached.reference_cache.directory).glob("piece-*.pt"))
    online = Trainer(config(tmp_path, small_data, precompute_ref_log_probs=False))
    pairs = cached.train_pairs[:6]
    a, b = cached._reference_for(pairs), online._reference_for(pairs)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-5)


def test_reference_cache_is_reused_across_runs(tmp_path, small_data, monkeypatch):
    Trainer(config(tmp_path, small_data))

    def must_not_run(self, pairs):
        raise AssertionError("the cached reference log-probs were recomputed")

    monkeypatch.setattr(Trainer, "_reference_logps_now", must_not_run)
    again = Trainer(config(tmp_path, small_data, output_dir=str(tmp_path / "other")))
    assert again.reference_cache.values


def test_lora_uses_the_disabled_adapter_as_reference(tmp_path, small_data):
    result = train(config(tmp_path, small_data, lora_r=4, max_steps=3, precompute_ref_log_probs=False))
    first = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"][0]
    # at the start the adapter is zero: policy == reference, so every reward is 0
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "run" / "final-adapter" / "adapter_config.json").is_file()


def test_reference_free_loss_needs_no_reference(tmp_path, small_data):
    trainer = Trainer(config(tmp_path, small_data, loss_type="simpo", beta=2.0))
    assert trainer.reference_cache is None and trainer._reference_for(trainer.train_pairs[:2]) is None


def test_evaluate_scores_pairs_against_the_reference(tmp_path, small_data):
    from fastpref.train.evaluate import evaluate_pairs

    result = train(config(tmp_path, small_data, lora_r=4, max_steps=4))
    out = tmp_path / "eval.jsonl"
    summary = evaluate_pairs(str(tmp_path / "run" / "final-adapter"), small_data, beta=0.1,
                             output=str(out), max_length=64, max_prompt_length=32, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs"] == len(records) == 24 and result.final_metrics["pairs"] < 24
    assert summary["rewards/accuracies"] == pytest.approx(sum(r["correct"] for r in records) / len(records))
    for r in records:
        expected = 0.1 * (r["logps/chosen"] - r["ref_logps/chosen"])
        assert r["rewards/chosen"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"lr_scheduler_type": "step"}, r"lr_scheduler_type must be one of cosine, linear, constant, got 'step'"),
    ({"pairs_per_step": 0}, r"pairs_per_step must be >= 1"),
    ({"eval_fraction": 1.0}, r"eval_fraction must lie in \[0, 1\)"),
    ({"resume_from_checkpoint": "no-such-dir"},
     r"resume_from_checkpoint must be 'auto', 'never' or an existing checkpoint directory"),
    ({"per_device_train_batch_size": 2, "pairs_per_step": 4}, "give pairs_per_step or per_device_train_batch_size"),
    ({"bf16": True, "dtype": "float32"}, r"bf16 asks for bfloat16, which contradicts dtype='float32'"),
])
def test_bad_configuration_fails_at_start(tmp_path, small_data, options, message):
    with pytest.raises(ValueError, match=message):
        train(config(tmp_path, small_data, **options))


def test_learning_rates_follow_trl_warmup_and_cosine(tmp_path, small_data):
    peak, steps = 3e-3, 6
    result = train(config(tmp_path, small_data, max_steps=steps, warmup_ratio=0.1, learning_rate=peak))
    rates = [r["lr"] for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    # TRL: ceil(0.1 * 6) = 1 warmup step starting at 0, then cosine over the remaining 5
    expected = [0.0] + [peak * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
