"""`fastpref train --loss-type kto`: unpaired data, its KL completions, and a step against TRL's formula."""
import json

import pytest
import torch
import torch.nn.functional as F

from fastpref.cli import main
from fastpref.train import data as data_module
from fastpref.train.default_assets import default_tokenizer
from fastpref.train.loop import Trainer
from fastpref.train.monitor import DisplacementMonitor
from test_trainer import config

SMALL = ["--max-length", "64", "--max-prompt-length", "32", "--pairs-per-step", "4", "--learning-rate", "3e-3",
         "--no-progress"]


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def unpaired_data(tmp_path_factory, small_data) -> str:
    """The small sample's pairs as unpaired explicit rows (TRL's unpair_preference_dataset of the
    extracted prompts), with the labels as 1/0, which TRL reads as true/false."""
    from datasets import Dataset
    from trl.data_utils import extract_prompt, unpair_preference_dataset

    rows = Dataset.from_list(data_module.load_rows(small_data).to_list()).map(extract_prompt)
    unpaired = unpair_preference_dataset(rows).to_list()
    path = tmp_path_factory.mktemp("unpaired") / "examples.jsonl"
    path.write_text("".join(json.dumps({**row, "label": int(row["label"])}) + "\n" for row in unpaired))
    return str(path)


# ------------------------------------------------------------------------------------------- data


def test_unpaired_rows_are_tokenised_and_bad_labels_reported(tokenizer):
    rows = [
        {"prompt": "Q: sky?", "completion": " blue", "label": True},
        {"prompt": "Q: sea?", "completion": " green", "label": 0},
        {"prompt": "Q: sun?", "completion": " hot", "label": "good"},
        {"prompt": "Q: moon?", "completion": " cold", "label": None},
        {"prompt": "Q: rain?", "completion": "  ", "label": False},
    ]
    examples, report = data_module.tokenize_unpaired(rows, tokenizer, max_length=64, max_prompt_length=32)
    assert [(e.row, e.label) for e in examples] == [(0, True), (1, False)]
    assert report.skipped == {"'label' is not true or false": [2], "missing 'label'": [3],
                              "empty completion": [4]}
    assert "5 rows read (explicit format): 2 examples kept, 3 rows skipped" in report.summary()
    first = examples[0]
    assert first.prompt_ids == [tokenizer.bos_token_id] + tokenizer("Q: sky?", add_special_tokens=False)["input_ids"]
    assert first.completion_ids == tokenizer(" blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match=r"3 malformed rows \(row 2: 'label' is not true or false"):
        data_module.tokenize_unpaired(rows, tokenizer, on_malformed="error")
    with pytest.raises(ValueError, match="unpaired text rows need a 'prompt' column"):
        data_module.tokenize_unpaired([{"completion": "x", "label": True}], tokenizer)
    with pytest.raises(ValueError, match="no 'label' column"):
        data_module.tokenize_unpaired([{"prompt": "p", "completion": "x"}], tokenizer)


def test_conversational_completions_take_an_explicit_or_implicit_prompt(tokenizer):
    question = [{"role": "user", "content": "What colour is the sky?"}]
    answer = [{"role": "assistant", "content": "Blue."}]
    explicit, report = data_module.tokenize_unpaired([{"prompt": question, "completion": answer, "label": True}],
                                                     tokenizer)
    implicit, _ = data_module.tokenize_unpaired([{"completion": question + answer, "label": True},
                                                 {"completion": question, "label": False}], tokenizer)
    assert report.format == "conversational"
    assert implicit == explicit  # the second row has no assistant message to train on: skipped
    prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(question + answer, tokenize=False)
    assert tokenizer.decode(explicit[0].prompt_ids) == tokenizer.bos_token + prompt
    assert tokenizer.decode(explicit[0].completion_ids) == whole[len(prompt):] + tokenizer.eos_token
    assert explicit[0].label is True


def test_pairs_unpair_as_trl_does(small_data, unpaired_data, tokenizer):
    """The pairs unpaired after tokenising are the examples of TRL's unpair_preference_dataset."""
    options = dict(max_length=512, max_prompt_length=256)
    pairs, _ = data_module.tokenize_pairs(data_module.load_rows(small_data), tokenizer, **options)
    ours = data_module.unpair(pairs)
    theirs, _ = data_module.tokenize_unpaired(data_module.load_rows(unpaired_data), tokenizer, **options)
    assert [(e.prompt_ids, e.completion_ids, e.label) for e in ours] == \
        [(e.prompt_ids, e.completion_ids, e.label) for e in theirs]


def test_kl_completions_come_from_other_prompts_and_fit(tokenizer):
    def example(prompt, completion, label=True, row=0):
        return data_module.TokenizedCompletion(prompt, completion, label, row)

    # grouped by prompt: a rotation by one would pair most completions with their own prompt
    examples = [example([1], [10, 11, 12]), example([1], [13]), example([2, 3], [20]), example([2, 3], [21]),
                example([4], [30, 31])]
    paired = data_module.with_kl_completions(examples, max_length=3)
    assert [e.kl_completion_ids for e in paired] == [[30, 31], [30, 31], [13], [13], [21]]
    assert [e.completion_ids for e in paired] == [e.completion_ids for e in examples]
    assert data_module.fingerprint_completions(paired) != data_module.fingerprint_completions(examples)
    with pytest.raises(ValueError, match="every example has the same prompt"):
        data_module.with_kl_completions(examples[:2], max_length=8)


# ------------------------------------------------------------------------------------------ a step


def _response_logp(model, prompt, response) -> torch.Tensor:
    """log p(response | prompt) of a single unpacked sequence, from the full logits in float64."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    return logits[positions].log_softmax(-1).gather(1, ids[0, positions + 1, None]).sum()


def test_a_kto_step_is_trls_loss_on_the_same_batch(tmp_path, small_data):
    """After a first step moved the policy, the second step's loss and metrics are TRL's KTOTrainer
    formula (kto_trainer.py, _compute_loss) on the same examples, with log-probs from full logits."""
    beta, desirable_weight, undesirable_weight = 0.5, 1.3, 0.7
    trainer = Trainer(config(tmp_path, small_data, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
                             undesirable_weight=undesirable_weight, pairs_per_step=6, max_steps=2, warmup_ratio=0.0,
                             learning_rate=3e-3, seed=1))
    trainer._train_step()
    (batch,) = trainer._micro_batches(1)
    policy, reference = trainer.policy, trainer.initial_model  # the reference: the policy's start

    def logps(model, completion):
        return torch.stack([_response_logp(model, e.prompt_ids, getattr(e, completion)) for e in batch])

    kl = (logps(policy, "kl_completion_ids") - logps(reference, "kl_completion_ids")).mean().clamp(min=0)
    logratios = logps(policy, "completion_ids") - logps(reference, "completion_ids")
    labels = torch.tensor([e.label for e in batch])
    assert 0 < labels.sum() < len(batch) and kl > 0, "the batch exercises both labels and the KL term"
    chosen_losses = 1 - F.sigmoid(beta * (logratios[labels] - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - logratios[~labels]))
    loss = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses)).nanmean()

    record = trainer._train_step()
    assert record["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert record["kl"] == pytest.approx(float(kl), abs=1e-5)
    assert record["rewards/chosen"] == pytest.approx(float(beta * logratios[labels].mean()), abs=1e-5)
    assert record["rewards/rejected"] == pytest.approx(float(beta * logratios[~labels].mean()), abs=1e-5)
    assert record["logps/chosen"] == pytest.approx(float(logps(reference, "completion_ids")[labels].mean()
                                                         + logratios[labels].mean()), abs=1e-4)
    rewards = beta * logratios
    accuracy = torch.where(labels, rewards > 0, rewards < 0).double().mean()
    assert record["rewards/accuracies"] == pytest.approx(float(accuracy))


# ------------------------------------------------------------------------------ the command line


def test_the_displacement_warning_of_kto_suggests_no_sft_term_kto_cannot_have():
    monitor = DisplacementMonitor(window=4, min_drop=0.1, suggest_sft=False)
    warnings = [monitor.update(-10.0 - step, 0.1 * step) for step in range(4)]
    assert warnings[-1].endswith("consider a lower learning rate or a larger beta")


def test_kto_trains_from_the_command_line_on_the_embedded_default(tmp_path, capsys):
    command = ["train", "--loss-type", "kto", "--output-dir", str(tmp_path / "run"), "--cache-dir",
               str(tmp_path / "cache"), "--max-steps", "2", "--eval-fraction", "0.01", "--score-train-pairs", "0",
               *SMALL]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "kto loss (beta 0.1, desirable weight 1, undesirable weight 1)" in out
    assert "10 held-out examples (never trained on): reward accuracy" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_eval"]["examples"] == 10 and summary["steps"] == 2
    assert all(torch.isfinite(torch.tensor(summary["final_eval"][key]))
               for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies"))


def test_kto_trains_from_the_command_line_on_unpaired_data(tmp_path, unpaired_data, capsys):
    command = ["train", "--loss-type", "kto", "--data", unpaired_data, "--output-dir", str(tmp_path / "run"),
               "--cache-dir", str(tmp_path / "cache"), "--max-steps", "3", "--eval-steps", "2",
               "--eval-fraction", "0.2", "--undesirable-weight", "1.5", *SMALL]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "48 rows read (explicit format): 48 examples kept" in out
    assert "desirable and" in out and "the KTO paper advises 1 to 4/3: e.g. --desirable-weight" in out
    assert "10 held-out examples (never trained on): reward accuracy" in out
    assert "12 training examples: reward accuracy" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 3]
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected", "rewards/accuracies"):
        assert key in records[0], key
    heldout = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 10 and set(heldout[0]) == {"prompt", "completion", "label"}


def test_a_kto_run_counts_examples_on_its_progress_bars(tmp_path, unpaired_data, capsys):
    result = Trainer(config(tmp_path, unpaired_data, loss_type="kto", max_steps=1, progress=True)).run()
    err = capsys.readouterr().err.replace("\r", "\n")
    bars = [line for line in err.splitlines() if line.startswith(("reference log-probs", "scoring"))]
    assert {line.split(":")[0] for line in bars} == {
        "reference log-probs", "scoring held-out examples", "scoring trained examples"}
    assert all("example/s" in line or "s/example" in line for line in bars), bars
    assert not any("pair" in line for line in bars), bars
    # the held-out rows are unpaired examples, which `fastpref eval` does not score: no command for it
    assert result.reference_model == str(tmp_path / "run" / "initial") and result.eval_command is None


@pytest.mark.parametrize("flags, message", [
    (["--loss-type", "kto", "sigmoid"], "'kto' is unpaired and cannot be combined with paired losses"),
    (["--desirable-weight", "2"], "--desirable-weight weighs the examples of --loss-type kto"),
    (["--loss-type", "kto", "--label-smoothing", "0.1"], "--label-smoothing applies to the paired losses"),
    (["--loss-type", "kto", "--undesirable-weight", "0"], "--undesirable-weight must be > 0"),
    ([], "the data holds unpaired examples (completion, label); loss types ['sigmoid'] need pairs"),
])
def test_a_mixed_configuration_is_one_error_naming_the_flag(tmp_path, unpaired_data, capsys, flags, message):
    command = ["train", "--data", unpaired_data, "--output-dir", str(tmp_path / "run"), *SMALL, *flags]
    assert main(command) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
