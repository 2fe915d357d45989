"""`fastpref train` and `fastpref eval` as a new user meets them: flags, messages, what is shown."""
import argparse
import json
import re
import shlex
import sys

import pytest

import fastpref
from fastpref.cli import main
from fastpref.train import data as data_module
from fastpref.train.commands import add_eval_arguments, add_train_arguments
from fastpref.train.config import config_from_args, read_config_file
from fastpref.train.config import TrainConfig
from fastpref.train.loop import TrainingInterrupted, train
from fastpref.train.monitor import DisplacementMonitor

SMALL = ["--max-length", "64", "--max-prompt-length", "32", "--pairs-per-step", "4", "--eval-fraction", "0.2",
         "--learning-rate", "3e-3", "--no-progress"]


def small_config(tmp_path, data, **overrides) -> TrainConfig:
    options = dict(data=data, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                   max_length=64, max_prompt_length=32, pairs_per_step=4, max_steps=4, eval_steps=2,
                   eval_fraction=0.2, learning_rate=3e-3, progress=False)
    options.update(overrides)
    return TrainConfig(**options)


def parser_with(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpref sub")
    add(parser)
    return parser


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fastpref {fastpref.__version__}"


def test_a_bad_flag_value_is_one_short_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--loss-type", "dpop"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --loss-type/--loss_type: invalid choice: 'dpop'" in err and "fastpref train --help" in err
    assert len(err.strip().splitlines()) == 2


def test_dpo_is_accepted_for_sigmoid_and_reported_as_sigmoid(tmp_path, small_data, capsys):
    help_text = " ".join(parser_with(add_train_arguments).format_help().split())
    assert "dpo is another name for sigmoid" in help_text
    settings = tmp_path / "run.yaml"
    settings.write_text("loss_type: [dpo, sft]\n")
    parser = parser_with(add_train_arguments)
    parser.set_defaults(**read_config_file(str(settings), parser))
    assert config_from_args(parser.parse_args([])).resolved().loss_type == ["sigmoid", "sft"]
    assert main(["train", "--loss-type", "dpo", "--data", small_data, "--output-dir", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--score-train-pairs", "0",
                 *SMALL]) == 0
    assert capsys.readouterr().out.startswith("fastpref train: sigmoid loss (beta 0.1)")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run"]["loss_type"] == "sigmoid"


@pytest.mark.parametrize("add", [add_train_arguments, add_eval_arguments])
def test_every_flag_has_help_and_shows_its_default(add):
    parser = parser_with(add)
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = " ".join(parser.format_help().split())
    assert ("--truncation-mode {keep_end,keep_start}, --truncation_mode {keep_end,keep_start} which end of an "
            "over-long prompt to keep (default: keep_end)") in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_train_and_eval_share_flag_names():
    train_flags = {s for a in parser_with(add_train_arguments)._actions for s in a.option_strings}
    eval_flags = {s for a in parser_with(add_eval_arguments)._actions for s in a.option_strings}
    assert eval_flags - train_flags == {"--output"}
    assert parser_with(add_eval_arguments).parse_args(["--model", "m", "--data-format", "auto"]).data_format == "auto"
    assert parser_with(add_train_arguments).parse_args(["--data-format", "auto"]).data_format == "auto"


def test_trl_flag_names_are_accepted(monkeypatch):
    args = parser_with(add_train_arguments).parse_args([
        "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "3", "--num-train-epochs", "2",
        "--lr-scheduler-type", "linear", "--eval-steps", "5", "--save-steps", "7", "--save-total-limit", "1",
        "--resume-from-checkpoint", "never"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config_from_args(args)
    assert (cfg.gradient_accumulation_steps, cfg.num_train_epochs, cfg.lr_scheduler_type) == (3, 2.0, "linear")
    assert (cfg.eval_steps, cfg.save_steps, cfg.save_total_limit, cfg.resume_from_checkpoint) == (5, 7, 1, "never")
    assert cfg.resolved(world_size=2).pairs_per_step == 4


def test_errors_name_the_flag_not_the_python_argument(tmp_path, small_data, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(small_data).read() + "{not json\n")
    code = main(["train", "--data", str(bad), "--on-malformed", "error", "--output-dir", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "row 24: not valid JSON" in err and "--on-malformed skip" in err
    assert "on_malformed" not in err


def test_a_path_that_is_not_a_model_is_named_before_anything_is_printed_or_made(tmp_path, capsys):
    for argument in ("--model", "--reference-model"):
        code = main(["train", argument, str(tmp_path / "my-llama"), "--output-dir", str(tmp_path / "run")])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and len(err.splitlines()) == 1
        assert err.startswith(f"fastpref train: error: {argument}: no model at {tmp_path / 'my-llama'} (expected a "
                              "local folder saved with save_pretrained, or one of the names smollm2-135m")
        assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_output_dir(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "no-such.jsonl"), "--output-dir", str(tmp_path / "run"), *SMALL])
    assert code == 2 and "no-such.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_dir_fails_before_any_work(tmp_path, small_data, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("read the data before checking the output directory")

    monkeypatch.setattr(data_module, "load_rows", must_not_load)
    with pytest.raises(ValueError, match=r"--output-dir /proc/sys is not a writable directory"):
        train(small_config(tmp_path, small_data, output_dir="/proc/sys"))


def test_lora_without_peft_says_what_to_install(tmp_path, small_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ValueError, match=r"lora_r > 0 needs the peft package.*pip install 'fastpref\[lora\]'"):
        train(small_config(tmp_path, small_data, lora_r=4))


def test_max_length_beyond_the_model_is_refused(tmp_path, small_data):
    with pytest.raises(ValueError, match=r"--max-length 5000 exceeds the model's context of 1024 tokens"):
        train(small_config(tmp_path, small_data, max_length=5000))


def test_no_progress_still_shows_the_data_report_and_resume(tmp_path, small_data, capsys):
    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(small_config(tmp_path, small_data), on_step=interrupt)
    assert "24 rows read" in capsys.readouterr().out
    train(small_config(tmp_path, small_data))
    out = capsys.readouterr().out
    assert "24 rows read" in out and f"resuming from {tmp_path / 'run' / 'checkpoint-2'} (step 2 of 4)" in out


def test_the_console_leads_with_held_out_accuracy_and_a_finished_run_is_not_retrained(
        tmp_path, small_data, capsys, monkeypatch):
    command = ["train", "--data", small_data, "--output-dir", str(tmp_path / "run"), "--cache-dir",
               str(tmp_path / "cache"), "--max-steps", "4", "--eval-steps", "2", *SMALL]
    assert main(command) == 0
    out = capsys.readouterr().out
    held_out, training = out.index("5 held-out pairs (never trained on): reward accuracy"), out.index(
        "16 training pairs: reward accuracy")  # the 4 steps' pairs
    assert held_out < training
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_eval"]["pairs"] == 5 and summary["final_eval"]["step"] == 4
    heldout_rows = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line) for line in open(small_data).read().splitlines()]
    assert len(heldout_rows) == 5 and all(row in train_rows for row in heldout_rows)
    # the run names its reference and the command that scores the held-out pairs; that command
    # gives the run's held-out accuracy again
    assert f"reference model: {tmp_path / 'run' / 'initial'}\n" in out
    (eval_command,) = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("score the held-out")]
    assert summary["eval_command"] == eval_command and summary["reference_model"] == str(tmp_path / "run" / "initial")
    assert main(shlex.split(eval_command)[1:]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["pairs"] == 5 and scored["rewards/accuracies"] == summary["final_eval"]["rewards/accuracies"]
    assert scored["rewards/margins"] == pytest.approx(summary["final_eval"]["rewards/margins"], abs=1e-5)

    def must_not_train(self):
        raise AssertionError("trained a finished run again")

    from fastpref.train.loop import Trainer

    monkeypatch.setattr(Trainer, "_train_step", must_not_train)
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "already holds this run, finished at step 4: nothing to do" in out
    assert "5 held-out pairs (never trained on)" in out
    assert f"score the held-out pairs one by one: {eval_command}" in out


def test_counts_of_one_are_singular(tmp_path, capsys):
    rows = data_module.load_rows(None).select(range(3)).to_list()
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n")
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), "--cache-dir",
                 str(tmp_path / "cache"), "--max-steps", "1", "--pairs-per-step", "1", "--eval-fraction", "0.34",
                 "--max-length", "64", "--max-prompt-length", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for expected in ("  1 step, 1 pair per micro-batch x 1 accumulated",
                     "4 rows read (implicit format): 3 pairs kept, 1 row skipped", "): 1 row: 3\n",
                     "2 training pairs, 1 held out: 1 step of up to 1 pair train on 1 of the training pairs "
                     "(0.5 epochs)",
                     "the data's longest pair: ", "done: 1 step\n", "  1 held-out pair (never trained on): ",
                     "  1 training pair: "):
        assert expected in out
    assert not re.search(r"(?<![\d.])1 (rows|pairs|steps|epochs|tokens|prompts)\b", out), out


def test_the_displacement_warning_recommends_a_flag_the_cli_accepts():
    monitor = DisplacementMonitor(window=4, min_drop=0.1)
    warnings = [monitor.update(-10.0 - step, 0.1 * step) for step in range(4)]
    assert "--loss-type sigmoid sft" in warnings[-1]
    parser_with(add_train_arguments).parse_args(["--loss-type", "sigmoid", "sft"])


def test_python_names_in_messages_become_flags_but_paths_stay():
    from fastpref.train.commands import _in_flag_names

    assert _in_flag_names("eval_fraction=0.2 of 3 pairs; lora_r > 0; in /data/max_length.jsonl") == \
        "--eval-fraction 0.2 of 3 pairs; --lora-r > 0; in /data/max_length.jsonl"


def test_trl_flag_names_with_underscores_as_hf_argument_parser_takes_them(tmp_path):
    args = parser_with(add_train_arguments).parse_args([
        "--per_device_train_batch_size", "3", "--logging_steps", "5", "--warmup_steps", "2", "--bf16",
        "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-4", "--lr_scheduler_type", "linear",
        "--num_train_epochs", "2", "--gradient_accumulation_steps", "2", "--save_total_limit", "3",
        "--precompute_ref_log_probs", "false", "--max_prompt_length", "50", "--max_length", "100"])
    cfg = config_from_args(args)
    assert (cfg.per_device_train_batch_size, cfg.logging_steps, cfg.warmup_steps, cfg.bf16) == (3, 5, 2, True)
    assert (cfg.output_dir, cfg.learning_rate, cfg.lr_scheduler_type) == (str(tmp_path / "out"), 1e-4, "linear")
    assert (cfg.num_train_epochs, cfg.gradient_accumulation_steps, cfg.save_total_limit) == (2, 2, 3)
    assert (cfg.precompute_ref_log_probs, cfg.max_prompt_length, cfg.max_length) == (False, 50, 100)
    resolved = cfg.resolved(world_size=1)
    assert (resolved.pairs_per_step, resolved.dtype) == (3, "bfloat16")
    # the older names still work
    old = config_from_args(parser_with(add_train_arguments).parse_args(
        ["--epochs", "3", "--grad-accum", "4", "--eval-every", "9", "--lr-schedule", "constant", "--lr", "0.1"]))
    assert (old.num_train_epochs, old.gradient_accumulation_steps, old.eval_steps) == (3, 4, 9)
    assert (old.lr_scheduler_type, old.learning_rate) == ("constant", 0.1)


def test_every_config_field_is_a_flag_with_its_help_and_default():
    import dataclasses

    parser = parser_with(add_train_arguments)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and not isinstance(a, argparse._StoreFalseAction)}
    for f in dataclasses.fields(TrainConfig):
        action = by_dest[f.name]
        assert action.help == f.metadata["help"] or action.help.startswith(f.metadata["help"]), f.name
        assert f"--{f.name}" in action.option_strings and f"--{f.name.replace('_', '-')}" in action.option_strings
        assert action.default == f.default, f.name
    assert "--learning-rate LEARNING_RATE, --learning_rate LEARNING_RATE, --lr LEARNING_RATE peak learning rate " \
           "(default: 0.002 for the embedded model, 5e-07 for a real one)" in " ".join(parser.format_help().split())


def test_a_config_file_sets_what_the_command_line_leaves_unsaid(tmp_path, small_data, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text(f"data: {small_data}\noutput_dir: {tmp_path / 'from-file'}\nmax-steps: 2\n"
                        "per_device_train_batch_size: 4\nlearning_rate: 3e-3\nloss_type: [sigmoid, sft]\n"
                        "max_length: 64\nmax_prompt_length: 32\nprogress: false\n")
    code = main(["train", "--config", str(settings), "--output-dir", str(tmp_path / "from-flag"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    summary = json.loads((tmp_path / "from-flag" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["run"]["loss_type"] == ["sigmoid", "sft"]
    assert summary["run"]["learning_rate"] == 3e-3 and summary["run"]["pairs_per_step"] == 4
    assert not (tmp_path / "from-file").exists()


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown setting 'epochz'"),
    ("max_steps: 2.5\n", "max_steps: expected int, got 2.5"),
    ("lr_scheduler_type: step\n", "lr_scheduler_type must be one of cosine, linear, constant, got 'step'"),
    ("- a list\n", "expected a mapping of setting: value, got a list"),
])
def test_a_bad_config_file_is_one_error_naming_the_setting(tmp_path, capsys, text, message):
    settings = tmp_path / "run.yaml"
    settings.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(settings)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--config {settings}: {message}" in err


@pytest.mark.slow
def test_sigterm_from_outside_saves_exits_143_and_the_rerun_resumes(tmp_path, small_data):
    """As `timeout`, SLURM or Kubernetes would stop it: a real signal to a real `fastpref train`,
    twice: the rerun resumes from the first stop's checkpoint."""
    import os
    import select
    import signal
    import subprocess
    import time

    command = [sys.executable, "-m", "fastpref.cli", "train", "--data", small_data, "--output-dir",
               str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1000", *SMALL]
    env = dict(os.environ, PYTHONWARNINGS="error::FutureWarning,error::DeprecationWarning:fastpref")
    metrics = tmp_path / "run" / "metrics.jsonl"

    def train_steps():
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return [json.loads(line)["step"] for line in lines if '"split": "train"' in line]

    def run_until(more_steps):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wanted, deadline = len(train_steps()) + more_steps, time.monotonic() + 300
        while len(train_steps()) < wanted:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        # printed line by line although stdout is a pipe: the header is readable while it runs
        assert select.select([process.stdout], [], [], 60)[0], "nothing printed yet"
        printed = os.read(process.stdout.fileno(), 1 << 16).decode()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
        out = printed + out
        assert process.returncode == 143, err
        assert "stopped by SIGTERM at step" in err and "run the same command again to resume" in err
        step = int(err.split("stopped by SIGTERM at step ")[1].split(" ")[0])
        assert (tmp_path / "run" / f"checkpoint-{step}" / "manifest.json").is_file()
        assert train_steps() == list(range(1, step + 1)), "the metrics end at the saved step, whole"
        return step, out

    first, out = run_until(2)
    assert out.startswith("fastpref train: sigmoid loss (beta 0.1) of the embedded tiny Llama")
    second, out = run_until(1)
    assert f"resuming from {tmp_path / 'run' / f'checkpoint-{first}'} (step {first} of 1000)" in out
    assert second > first


def test_eval_takes_its_model_from_a_config_file_or_says_it_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval"])
    assert exit_.value.code == 2 and "--model is required" in capsys.readouterr().err
    settings = tmp_path / "eval.yaml"
    settings.write_text(f"model: {tmp_path / 'nowhere'}\nmax_length: 64\n")
    assert main(["eval", "--config", str(settings)]) == 2
    assert f"--model: no model at {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_the_loss_path_flags_reach_the_loss(tmp_path, small_data, capsys):
    """--gradients-in-forward and --group-rows reach the trainer's PreferenceLoss; a bad group size
    is a one-line error naming its flag, before any work."""
    from fastpref.train.loop import _preference_loss

    args = parser_with(add_train_arguments).parse_args(["--gradients-in-forward", "false", "--group-rows", "64"])
    loss_fn = _preference_loss(config_from_args(args).resolved())
    assert (loss_fn.gradients_in_forward, loss_fn.group_rows) == (False, 64)
    default = config_from_args(parser_with(add_train_arguments).parse_args([])).resolved()
    assert (_preference_loss(default).gradients_in_forward, _preference_loss(default).group_rows) == (None, None)
    code = main(["train", "--data", str(small_data), "--group-rows", "0", "--output-dir", str(tmp_path / "run"),
                 *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "--group-rows must be None or a positive int, got 0" in err
    assert not (tmp_path / "run").exists()
