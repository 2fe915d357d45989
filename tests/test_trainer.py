"""The trainer end to end on the embedded tiny model and a slice of the bundled sample."""
import json
import math
from pathlib import Path

import pytest
import torch

from fastpref.train.checkpoint import CheckpointError, latest_checkpoint
from fastpref.train.loop import TrainConfig, Trainer, TrainingInterrupted, train
from fastpref.train.monitor import read_metrics
from tiers import fast_only, first_fast


def config(tmp_path, data, **overrides) -> TrainConfig:
    options = dict(data=data, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                   max_length=64, max_prompt_length=32, pairs_per_step=4, max_steps=6, eval_steps=3,
                   save_steps=100, eval_fraction=0.2, learning_rate=3e-3, progress=False)
    options.update(overrides)
    return TrainConfig(**options)


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(prefix_sharing=False), dict(prefix_sharing=True), dict(loss_type="kto")],
                         ids=["packed", "prefix-shared", "kto"])
def test_interrupt_and_resume_equals_an_uninterrupted_run(tmp_path, small_data, options):
    options = dict(options, gradient_accumulation_steps=2, max_steps=5)
    uninterrupted = train(config(tmp_path / "a", small_data, **options))

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 2: checkpoint saved to .*checkpoint-2"):
        train(config(tmp_path / "b", small_data, **options), on_step=interrupt)
    resumed = train(config(tmp_path / "b", small_data, **options))
    assert resumed.losses == pytest.approx(uninterrupted.losses[2:], abs=1e-6)
    records = [r for r in read_metrics(resumed.metrics_path) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    losses = [r["loss"] for r in records]
    assert losses == pytest.approx(uninterrupted.losses, abs=1e-6)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_lora_uses_the_disabled_adapter_as_reference(tmp_path, small_data):
    result = train(config(tmp_path, small_data, lora_r=4, max_steps=3, precompute_ref_log_probs=False))
    first = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"][0]
    # at the start the adapter is zero: policy == reference, so every reward is 0
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "run" / "final-adapter" / "adapter_config.json").is_file()


def test_reference_free_loss_needs_no_reference(tmp_path, small_data):
    trainer = Trainer(config(tmp_path, small_data, loss_type="simpo", beta=2.0))
    assert trainer.reference_cache is None and trainer._reference_for(trainer.train_pairs[:2]) is None


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
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


@pytest.mark.slow
def test_learning_rates_follow_trl_warmup_and_cosine(tmp_path, small_data):
    peak, steps = 3e-3, 6
    result = train(config(tmp_path, small_data, max_steps=steps, warmup_ratio=0.1, learning_rate=peak))
    rates = [r["lr"] for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    # TRL: ceil(0.1 * 6) = 1 warmup step starting at 0, then cosine over the remaining 5
    expected = [0.0] + [peak * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("signal_name", first_fast(["SIGTERM", "SIGUSR1"]))
def test_a_stop_signal_saves_and_the_rerun_resumes_to_the_same_weights(tmp_path, small_data, signal_name):
    """SLURM, Kubernetes and `timeout` stop a job with SIGTERM (SLURM may send SIGUSR1 first): the
    step at hand finishes, a checkpoint is saved, and the rerun ends where an uninterrupted run does."""
    import os
    import signal

    from transformers import AutoModelForCausalLM

    options = dict(gradient_accumulation_steps=2, max_steps=5)
    uninterrupted = train(config(tmp_path / "a", small_data, **options))

    def send(step):
        if step == 2:
            os.kill(os.getpid(), getattr(signal, signal_name))

    with pytest.raises(TrainingInterrupted, match=rf"stopped by {signal_name} at step 2 of 5: checkpoint saved to "
                                                  r".*checkpoint-2; run the same command again") as stopped:
        train(config(tmp_path / "b", small_data, **options), on_step=send)
    assert stopped.value.exit_code == 128 + getattr(signal, signal_name)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handlers are put back"
    records = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    resumed = train(config(tmp_path / "b", small_data, **options))
    assert resumed.losses == pytest.approx(uninterrupted.losses[2:], abs=1e-6)
    a, b = (AutoModelForCausalLM.from_pretrained(run / "run" / "final", local_files_only=True)
            for run in (tmp_path / "a", tmp_path / "b"))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_the_reference_pass_covers_only_the_pairs_the_run_uses(tmp_path, small_data):
    trainer = Trainer(config(tmp_path, small_data, max_steps=2, score_train_pairs=3))
    used = {p.row for p in trainer.trained_pairs + trainer.eval_pairs}
    assert len(trainer.trained_pairs) == 8 and len(trainer.train_pairs) == 19
    assert set(trainer.reference_cache.values) == used
    assert trainer.scored_train_pairs == trainer.trained_pairs[:3]
    result = trainer.run()
    assert result.final_metrics["pairs"] == 3


def test_the_console_shows_each_long_phase_once_and_no_other_packages_bars(tmp_path, small_data, capsys):
    """The scoring after training has a bar; a reference cache hit is one line, not an empty bar;
    transformers' "Writing model shards" does not show, and its bars are on again afterwards."""
    from transformers.utils import logging as transformers_logging

    def console(output_dir):
        trainer = Trainer(config(tmp_path, small_data, max_steps=2, eval_steps=2, progress=True,
                                 output_dir=str(tmp_path / output_dir)))
        trainer.run()
        captured = capsys.readouterr()
        return trainer, (captured.out + captured.err).replace("\r", "\n")

    _, first = console("first")
    trainer, second = console("second")
    for text in first, second:
        assert "scoring held-out pairs: " in text and "scoring trained pairs: " in text
        assert "Writing model shards" not in text
    assert "reference log-probs: 100%" in first
    used = len(trainer.trained_pairs) + len(trainer.eval_pairs)
    assert [line for line in second.splitlines() if "reference log-probs" in line] == [
        f"reference log-probs: all {used} pairs from the cache in {trainer.reference_cache.directory}"]
    assert transformers_logging.is_progress_bar_enabled()


def test_the_plot_has_whole_steps_and_plain_values():
    from fastpref.train.monitor import metrics_figure

    records = [{"step": step, "split": "train", "loss": 0.6931472 + 1e-5 * step, "rewards/accuracies": 0.5,
                "rewards/margins": 1e-5 * step, "logps/chosen": -300.12 - 0.01 * step,
                "logps/rejected": -300.13 - 0.01 * step} for step in (1, 2)]
    figure = metrics_figure(records)
    figure.canvas.draw()
    for axes in figure.axes:
        low, high = axes.get_xlim()
        ticks = zip(axes.get_xticklabels(), axes.get_xticks())
        steps = [tick.get_text() for tick, where in ticks if low <= where <= high]
        assert steps == ["1", "2"], axes.get_title()
        assert axes.xaxis.get_offset_text().get_text() == axes.yaxis.get_offset_text().get_text() == ""
        assert not any("e" in tick.get_text() for tick in axes.get_yticklabels()), axes.get_title()


def test_a_stopped_reference_pass_keeps_its_pieces_and_the_rerun_computes_the_rest(
        tmp_path, small_data, monkeypatch):
    import os
    import signal

    from fastpref.train import reference

    monkeypatch.setattr(reference, "PIECE_SECONDS", 0.0)  # a piece after every batch
    computed, sent = [], []
    compute = Trainer._reference_logps_now

    def counting(self, pairs):
        computed.extend(p.row for p in pairs)
        if len(computed) == 8 and not sent:  # during the second batch of the first run
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return compute(self, pairs)

    monkeypatch.setattr(Trainer, "_reference_logps_now", counting)
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM during the reference pass: the log-probs of "
                                                  r"8 of 24 pairs are saved in .*reference-logps-") as stopped:
        Trainer(config(tmp_path, small_data, max_steps=100))
    assert stopped.value.exit_code == 143
    assert not (tmp_path / "run").exists(), "a start that did not proceed leaves no output directory"
    first = list(computed)
    computed.clear()
    trainer = Trainer(config(tmp_path, small_data, max_steps=100))
    assert len(computed) == 16 and not set(computed) & set(first)
    assert len(trainer.reference_cache.values) == 24


@pytest.mark.slow
def test_a_refused_rerun_writes_nothing(tmp_path, small_data):
    train(config(tmp_path, small_data, save_steps=2, max_steps=4, num_train_epochs=1))
    (tmp_path / "run" / "summary.json").unlink()  # unfinished: the rerun would resume from checkpoint-2
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(CheckpointError, match="belongs to a different run: seed differ"):
        train(config(tmp_path, small_data, save_steps=2, max_steps=4, seed=1))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


@pytest.mark.slow
def test_logging_steps_average_the_metrics_of_their_steps(tmp_path, small_data):
    every = read_metrics(train(config(tmp_path / "a", small_data, max_steps=5)).metrics_path)
    third = read_metrics(train(config(tmp_path / "b", small_data, max_steps=5, logging_steps=3)).metrics_path)
    every, third = ([r for r in records if r["split"] == "train"] for records in (every, third))
    assert [r["step"] for r in third] == [3, 5]
    assert third[0]["loss"] == pytest.approx(sum(r["loss"] for r in every[:3]) / 3, rel=1e-6)
    assert third[1]["tokens"] == every[3]["tokens"] + every[4]["tokens"]
    assert third[1]["lr"] == every[4]["lr"]


@pytest.mark.slow
def test_warmup_steps_override_the_warmup_ratio(tmp_path, small_data):
    result = train(config(tmp_path, small_data, max_steps=6, warmup_ratio=0.1, warmup_steps=3,
                          lr_scheduler_type="constant"))
    rates = [r["lr"] for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    assert rates == pytest.approx([0.0, 1e-3, 2e-3, 3e-3, 3e-3, 3e-3])


def test_conversational_data_trains_the_embedded_model(tmp_path, small_data):
    """The embedded tokenizer has a chat template (HH-RLHF's dialogue form), so message lists run
    with the default model."""
    from fastpref.train import data as data_module

    rows = []
    for index, row in enumerate(data_module.load_rows(small_data).to_list()):
        question = row["chosen"].split("\n\nHuman: ")[1].split("\n\nAssistant:")[0]
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": f"answer {index}, the good one"}],
                     "rejected": [{"role": "assistant", "content": f"answer {index}, the bad one"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(config(tmp_path, str(path), max_steps=2))
    assert trainer.data_report.format == "conversational" and trainer.data_report.pairs_kept == 24
    prompt = trainer.tokenizer.decode(trainer.train_pairs[0].prompt_ids[1:])
    assert prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:")
    assert trainer.run().steps == 2


def test_the_memory_estimate_comes_from_the_data_not_the_length_limit(tmp_path, small_data):
    trainer = Trainer(config(tmp_path, small_data, max_length=1000, max_prompt_length=500, max_steps=3))
    lengths = sorted(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in trainer.trained_pairs)
    line = next(line for line in trainer.memory_lines if "activations" in line)
    assert f"the data's 4 longest pairs: {sum(lengths[-4:])} tokens" in line
    assert sum(lengths[-4:]) < 4 * 1000


@pytest.mark.slow
@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_gradient_checkpointing_trains_without_deprecation_warnings(tmp_path, small_data):
    result = train(config(tmp_path, small_data, gradient_checkpointing=True, lora_r=4, max_steps=2))
    assert result.steps == 2


@pytest.mark.parametrize("options", [
    pytest.param(dict(precompute_ref_log_probs=False), id="online"),
    pytest.param(dict(precompute_ref_log_probs=True), id="cached"),
    pytest.param(dict(precompute_ref_log_probs=False, lora_r=4), id="lora"),
])
def test_a_policy_equal_to_its_reference_has_rewards_exactly_zero_in_bfloat16(tmp_path, small_data, options):
    """The reference pass computes the policy's log-probs bit for bit while their weights are the same
    (the first step, or a LoRA adapter still 0), whichever path the policy's head takes."""
    result = train(config(tmp_path, small_data, dtype="bfloat16", max_steps=1, eval_fraction=0.0, **options))
    first = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"][0]
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2)) and first["non_finite_logps"] == 0.0


def _overflowing_model(directory: Path) -> str:
    """The embedded model with final hidden states past float16's range (65,504)."""
    from fastpref.train.default_assets import default_model, default_tokenizer

    tokenizer = default_tokenizer()
    model = default_model(tokenizer)
    with torch.no_grad():
        model.model.norm.weight.fill_(1e5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_float16_steps_whose_gradients_overflow_are_skipped_and_counted(tmp_path, small_data, monkeypatch):
    """As a GradScaler does: the update is skipped, the step counted in skipped_updates and its NaN in
    non_finite_logps, no exception; too many in a row stop the run with a FloatingPointError."""
    model = _overflowing_model(tmp_path / "model")
    result = train(config(tmp_path, small_data, model=model, dtype="float16", max_steps=2, eval_fraction=0.0,
                          precompute_ref_log_probs=False))
    steps = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    assert [r["skipped_updates"] for r in steps] == [1, 1]
    assert all(r["non_finite_logps"] == 1.0 for r in steps)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.model_path).state_dict()
    assert all(torch.equal(before[name].to(after[name].dtype), after[name]) for name in after)

    import fastpref.train.loop as loop

    monkeypatch.setattr(loop, "MAX_SKIPPED_IN_A_ROW", 2)
    with pytest.raises(FloatingPointError, match=r"2 steps in a row up to step 2 had NaN or inf gradients"):
        train(config(tmp_path, small_data, model=model, dtype="float16", max_steps=3, eval_fraction=0.0,
                     precompute_ref_log_probs=False, output_dir=str(tmp_path / "stopped")))


# every row of the loss table, and TRL's options on top, each trained by `fastpref train`
def _training_losses():
    from fastpref.loss_types import ALL

    cases = [pytest.param(name, {"label_smoothing": 0.1} if name == "exo_pair" else {}, id=name) for name in ALL]
    cases.append(pytest.param("sigmoid", dict(use_weighting=True, ld_alpha=0.5, f_divergence_type="js_divergence"),
                              id="sigmoid-wpo-ld_alpha-js_divergence"))
    return fast_only(cases, {"nca_pair", "sigmoid-wpo-ld_alpha-js_divergence"})


@pytest.mark.parametrize("loss_type, options", _training_losses())
def test_every_loss_type_trains(tmp_path, small_data, loss_type, options):
    result = train(config(tmp_path, small_data, loss_type=loss_type, max_steps=2, eval_fraction=0.0, **options))
    steps = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in steps)
    assert f"loss/{loss_type}" in steps[0]
